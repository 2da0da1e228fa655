"""`FinetuneConfig`: everything one fine-tuning run needs, as one dataclass.

The command line and recipe files carry the same keys (`--lora-r` / `lora_r:`); `from_mapping` reads a recipe
(unknown keys are an error that names them) and `validate` checks values before any model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

LOSS_ON = ("completion", "all")


@dataclass
class FinetuneConfig:
    # What to train, on what, and where to write it.
    model: str  # a folder or hub id (the local hub cache works offline)
    data: str  # a JSONL file, a dataset folder, or a hub dataset name (the last two need `datasets`)
    output: str  # checkpoint-STEP/ folders, then the final adapter or model, metrics.jsonl and loss.png
    eval_data: str | None = None  # same forms as `data`; its loss is logged as eval_loss
    # LoRA (the default) or full fine-tuning.
    full: bool = False  # train every parameter instead of LoRA adapters
    from_scratch: bool = False  # build the model from `model`'s config.json with random weights (implies full)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str | list[str] = "q_proj,k_proj,v_proj"  # comma list of module names, or a full-match regex
    use_rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    modules_to_save: list[str] = field(default_factory=list)  # whole modules trained and saved with the adapter
    # QLoRA: LoRA over a frozen base quantised while loading ("nf4" as in QLoRA, or "int8", "int4"); with bf16 and
    # gradient_checkpointing this is QLoRA's setting. The adapter loads onto the full-precision base.
    quantize: str | None = None
    group_size: int = 128  # int4: input features per (scale, zero); a layer it does not divide takes another
    quantize_strict: bool = False  # refuse such a layer instead
    # Length of training: exactly one of the two (default: one epoch).
    max_steps: int | None = None  # optimizer steps
    epochs: float | None = None
    # The batch: batch_size rows per process per micro-batch; global batch = batch_size * grad_accum * processes.
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 1024  # tokens per row; longer rows are cut or skipped (see training/data.py)
    loss_on: str = "completion"  # "completion": assistant / completion tokens; "all": every text token
    # Optimisation: AdamW, linear warmup then cosine decay to 0, gradient clipping.
    lr: float = 2e-4
    warmup: int = 0  # optimizer steps of linear warmup
    weight_decay: float = 0.0  # applied to matrices only (not to norms, biases or gates)
    max_grad_norm: float = 1.0  # 0 disables clipping
    bf16: bool = False  # bfloat16 autocast; frozen weights are stored in bf16 too (see loop.py)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each vision, decoder and gated layer (the first steps compile)
    seed: int = 0  # data order, adapter init (and weights with from_scratch), dropout
    # Evaluation and checkpoints.
    eval_every: int = 0  # optimizer steps between evaluations (0: only at the end, when eval_data is given)
    save_every: int = 0  # optimizer steps between checkpoints (0: none; SIGTERM/SIGINT still save one)
    keep: int = 2  # how many checkpoint-STEP folders to keep
    resume: str | bool = False  # True: the latest complete checkpoint in `output`; a path: that checkpoint
    # Data handling.
    allow_remote_images: bool = False  # fetch http(s) image URLs in the data
    strict: bool = False  # the first bad or skipped row is an error instead of being counted
    # Where to run.
    device: str | None = None  # default: cuda if available (cuda:LOCAL_RANK under torchrun), else cpu
    log_every: int = 1  # optimizer steps between progress-bar updates (metrics.jsonl gets every step)

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        for name in ("model", "data", "output"):
            if not isinstance(getattr(self, name), str | os.PathLike) or not str(getattr(self, name)):
                raise ValueError(f"{name} must be a path or name, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give max_steps or epochs, not both")
        positive = dict(batch_size=self.batch_size, grad_accum=self.grad_accum, max_length=self.max_length)
        positive |= dict(lora_r=self.lora_r, keep=self.keep, log_every=self.log_every)
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.epochs is not None and not (isinstance(self.epochs, int | float) and self.epochs > 0):
            raise ValueError(f"epochs must be positive, got {self.epochs!r}")
        for name in ("lr", "lora_alpha"):
            if not isinstance(getattr(self, name), int | float) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if not isinstance(getattr(self, name), int | float) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if self.from_scratch and not self.full:
            raise ValueError("from_scratch trains every parameter: pass full=True (--full) with it")
        if self.modules_to_save and self.full:
            raise ValueError("modules_to_save is a LoRA option; full fine-tuning already trains every module")
        if self.quantize is not None:
            from ..quantization import SCHEMES

            if self.quantize not in SCHEMES:
                raise ValueError(f"quantize must be one of {', '.join(SCHEMES)}, got {self.quantize!r}")
            if self.full:
                raise ValueError(
                    f"quantize={self.quantize!r} freezes the base weights in {self.quantize}: it trains LoRA adapters "
                    "only; drop full (--full) or quantize (--quantize)"
                )
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")

    def target_modules(self) -> str | list[str]:
        """`lora_targets` as LoRA takes it: a list of names, or one regex (anything that is not a plain name list)."""
        if isinstance(self.lora_targets, list):
            return self.lora_targets
        names = [name.strip() for name in self.lora_targets.split(",") if name.strip()]
        if names and all(name.replace("_", "").replace(".", "").isalnum() for name in names):
            return names
        return self.lora_targets

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, source: str = "config") -> FinetuneConfig:
        """Build from a recipe's keys (dashes or underscores); unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        values = {str(key).replace("-", "_"): value for key, value in data.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}")
        missing = [name for name in ("model", "data", "output") if values.get(name) in (None, "")]
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)}")
        if isinstance(values.get("modules_to_save"), str):
            values["modules_to_save"] = [m.strip() for m in values["modules_to_save"].split(",") if m.strip()]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (or JSON) recipe file as a flat mapping of FinetuneConfig keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        import json

        data = json.loads(text)
    else:
        try:
            import yaml
        except ImportError as err:
            raise ImportError("reading a YAML recipe needs pyyaml: pip install 'idefics[train]'") from err
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data
