"""`LoraConfig`: which Linears an adapter wraps and how its update is scaled, read from and written to PEFT's
`adapter_config.json` (peft 0.21's fields, with `auto_mapping` so that peft's AutoPeftModel finds the class)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
AUTO_MAPPING = {
    "base_model_class": "IdeficsForVisionText2Text",
    "parent_library": "transformers.models.idefics.modeling_idefics",
}
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# PEFT options that would change the adapter's numbers or shapes; a file that turns one on is refused.
_MUST_BE_OFF = (
    "use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "layers_to_transform",
    "exclude_modules", "layer_replication", "trainable_token_indices", "target_parameters", "use_qalora",
    "alora_invocation_tokens", "arrow_config", "kasa_config", "velora_config", "monteclora_config", "use_bdlora",
)  # fmt: skip
# init_lora_weights values that only decide A's and B's starting values (the others rewrite the base weights).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclass
class LoraConfig:
    """Which Linears get a rank-r update and how it is scaled; reads and writes PEFT's `adapter_config.json`."""

    r: int = 8  # rank of the update B A
    lora_alpha: float = 8  # the update is scaled by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the adapter's input, in training only
    # Module names (PEFT's suffix match) or one full-match regex over module paths. Like PEFT, "q_proj" also
    # matches the vision tower's, the perceiver's and the gated cross-attention layers' q_proj.
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False  # rank-stabilised scaling, lora_alpha / sqrt(r)
    modules_to_save: list[str] | None = None  # whole modules trained and saved, e.g. "lm_head.additional_fc"
    base_model_name_or_path: str | None = None  # default: the folder or hub id the model was loaded from

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int | float) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, int | float):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as error:
                raise ValueError(f"target_modules {self.target_modules!r} is not a valid regex: {error}") from None
        else:
            self.target_modules = _names("target_modules", self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is empty: name at least one Linear (e.g. q_proj) or give a regex")
        if self.modules_to_save is not None:
            self.modules_to_save = _names("modules_to_save", self.modules_to_save) or None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` contents, as peft 0.21 writes them (plain LoRA: every extra feature off)."""
        return {
            "peft_type": "LORA",
            "task_type": None,
            "auto_mapping": dict(AUTO_MAPPING),
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "use_rslora": self.use_rslora,
            "modules_to_save": self.modules_to_save,
            "bias": "none",
            "inference_mode": True,
            "init_lora_weights": True,
            **{key: None for key in ("layers_to_transform", "layers_pattern", "exclude_modules")},
            **{key: False for key in ("fan_in_fan_out", "use_dora", "lora_bias")},
            **{key: {} for key in ("rank_pattern", "alpha_pattern")},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Read PEFT's `adapter_config.json` fields; unknown keys are ignored, options that change numbers refused."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"peft_type {data['peft_type']!r} is not supported (only LORA)")
        if data.get("bias", "none") != "none":
            raise ValueError(f"bias={data['bias']!r} is not supported (only 'none': no trained biases)")
        for key in _MUST_BE_OFF:
            value = data.get(key)
            if not (value is None or value is False or (isinstance(value, list | dict | str) and not value)):
                raise ValueError(f"{key}={value!r} is not supported: it changes the adapter; only plain LoRA is")
        init = data.get("init_lora_weights", True)
        if init not in _PLAIN_INITS:
            raise ValueError(
                f"init_lora_weights={init!r} is not supported: that initialisation rewrites the base weights (or "
                "the forward), so the adapter only fits a modified base"
            )
        if data.get("target_modules") is None:
            raise ValueError("target_modules is missing (null): the adapter names no module")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> LoraConfig:
        """Read `adapter_config.json` from a folder."""
        path = Path(directory) / ADAPTER_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValueError, TypeError) as error:
            raise ValueError(f"{path}: {error}") from None

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ADAPTER_CONFIG).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _names(field_name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{field_name} must be a list of module names, got {value!r}")
    names = list(value)
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise ValueError(f"{field_name} must hold non-empty module names, got {bad[0]!r}")
    return names
