"""Few-shot evaluation with the IDEFICS protocol: VQA accuracy (the official rules), CIDEr-D, classification.

- data.py: VQAv2 / COCO captions / Karpathy / classification JSONL loaders (images found by id)
- prompts.py: templates, per-query random shots, base or instruct (chat) prompts
- predictor.py: `predict(prompts) -> texts`: batched `generate()` or the continuous-batching engine
- predictions.py: predictions.jsonl, appended batch by batch (resume)
- postprocess.py: stop rules and answer clean-up
- vqa_metric.py, caption_metric.py, classification.py: the metrics
- run.py: the driver (`evaluate(EvalConfig(...))`, resumable), what `idefics eval` runs
"""

from .data import DataError
from .run import EvalConfig, evaluate, format_table
from .vqa_metric import mean_vqa_accuracy, vqa_accuracy

__all__ = ["DataError", "EvalConfig", "evaluate", "format_table", "mean_vqa_accuracy", "vqa_accuracy"]
