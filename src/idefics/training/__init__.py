"""Fine-tuning: LoRA adapters in PEFT's format or full training, on one process or many (torchrun + FSDP2).

    from idefics.training import FinetuneConfig, finetune
    finetune(FinetuneConfig(model="HuggingFaceM4/idefics-9b-instruct", data="train.jsonl", output="out", bf16=True))

Files: config.py (the run's options), data.py (rows -> labelled examples), lora.py (adapters, PEFT's format),
sampler.py (who trains on which rows), step.py (one optimizer step), schedule.py, checkpoint.py (exact resume),
distributed.py (torchrun, FSDP2), metrics.py (metrics.jsonl, loss.png), loop.py (the run).
"""

from .config import FinetuneConfig
from .data import SFTDataset
from .loop import FinetuneResult, finetune
from .lora import LoraConfig

__all__ = ["FinetuneConfig", "FinetuneResult", "LoraConfig", "SFTDataset", "finetune"]
