"""Fine-tuning: LoRA adapters in PEFT's format or full training, on one process or many (torchrun + FSDP2).

    from idefics.training import FinetuneConfig, finetune
    finetune(FinetuneConfig(model="HuggingFaceM4/idefics-9b-instruct", data="train.jsonl", output="out", bf16=True))

Files: config.py (the run's options), data.py + rows.py + row_images.py (rows -> labelled examples),
sampler.py (who trains on which rows), step.py (one optimizer step), schedule.py, checkpoint.py (exact resume),
distributed.py (torchrun, FSDP2), metrics.py (metrics.jsonl, loss.png), loop.py (the run). The adapters themselves
are `idefics.adapters`; `LoraConfig` is re-exported here for recipes and notebooks.
"""

from ..adapters import LoraConfig
from .config import FinetuneConfig
from .data import SFTDataset
from .loop import FinetuneResult, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "LoraConfig", "SFTDataset", "finetune"]
