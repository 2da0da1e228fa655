"""LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) in PEFT's on-disk format.

Each targeted nn.Linear is swapped for a `LoraLinear` that keeps the base `weight` (so the model's own keys stay
`...q_proj.weight`) and adds a rank-r update: y = x W^T + scaling * B A x, A (r, in) and B (out, r). Over a quantised
base (QLoRA) the frozen quantised layer is kept whole as `base_layer`; such an adapter cannot be merged into it, but
its files are the same and load onto the full-precision base. Whole
`modules_to_save` get trainable copies of their parameters; the originals are kept aside so `delete_adapter` restores
the base exactly. Everything else is frozen while an adapter is attached.

Files, as peft 0.21 writes and reads them for transformers' IdeficsForVisionText2Text (same module names):
- `adapter_config.json`: PEFT's LoraConfig fields, with `auto_mapping` so that peft's AutoPeftModel finds the class.
- `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` (r, in), `...lora_B.weight` (out, r), and
  for modules_to_save `base_model.model.<module>.<param>` (PEFT's `adapter_model.bin` is read too).

Matching follows PEFT: a list entry of `target_modules` matches a module whose path equals it or ends with "." + entry,
a string is a full-match regex over module paths; a `modules_to_save` entry matches a module whose path ends with it,
and modules inside one are never LoRA targets.

Legend for shape comments: r rank, d_in / d_out the wrapped Linear's widths.
"""

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

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import CheckpointError, resolve_pretrained_dir
from ..modeling.layout import dense, project
from ..quantization import Int8Head, QuantizedLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"  # PEFT's older format; read, never written
PREFIX = "base_model.model."  # where PEFT's PeftModel puts the wrapped model's keys
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
_ATTACHED = "_lora_adapter"  # the model attribute holding an `_Attached`


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


class LoraLinear(nn.Linear):
    """An nn.Linear (its own `weight` and `bias`, untouched) plus a low-rank update scaled by `scaling`; over a
    quantised layer, that layer as `base_layer` (and no `weight` or `bias` of its own)."""

    def __init__(self, base: nn.Linear | QuantizedLinear, *, r: int, scaling: float, dropout: float):
        nn.Module.__init__(self)  # not nn.Linear's: the base weight is reused, not allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, QuantizedLinear):
            self.base_layer = base
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
            # The adapter computes in the bias's dtype, else float32 (the quantised values have none to offer).
            dtype = base.bias.dtype if base.bias is not None else torch.float32
            device = base.weight.device
        else:
            self.base_layer = None
            self.weight = base.weight
            self.register_parameter("bias", base.bias)
            dtype, device = base.weight.dtype, base.weight.device
        kwargs = dict(bias=False, device=device, dtype=dtype)
        self.lora_A = nn.Linear(base.in_features, r, **kwargs)  # (r, d_in)
        self.lora_B = nn.Linear(r, base.out_features, **kwargs)  # (d_out, r)
        self.scaling = scaling
        self.dropout = dropout
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear; B = 0 starts at the base model
        nn.init.zeros_(self.lora_B.weight)
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dense(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)  # (..., d_out)
        h = x.to(self.lora_A.weight.dtype)  # the adapter may be kept in float32 over a low-precision base
        if self.training and self.dropout > 0:
            h = F.dropout(h, self.dropout, True)
        return y + (project(self.lora_B, project(self.lora_A, h)) * self.scaling).to(y.dtype)

    def base_linear(self) -> nn.Linear | QuantizedLinear:
        """A plain nn.Linear holding this layer's base weight and bias (the same Parameters); the quantised base
        layer itself when there is one."""
        if self.base_layer is not None:
            return self.base_layer.train(self.training)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear.train(self.training)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """Fold scaling * B A into the base weight, in place, and return it as a plain nn.Linear."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling  # (d_out, d_in)
        self.weight.copy_(self.weight.float() + delta)
        return self.base_linear()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_A.out_features}, scaling={self.scaling:g}"


@dataclass
class _Attached:
    config: LoraConfig
    originals: dict[str, nn.Parameter]  # modules_to_save: parameter name -> the base Parameter its copy replaced
    requires_grad: dict[str, bool]  # every parameter's flag before the adapter froze it


def adapter_config(model: nn.Module) -> LoraConfig | None:
    attached = getattr(model, _ATTACHED, None)
    return attached.config if attached is not None else None


def _attached(model: nn.Module) -> _Attached:
    attached = getattr(model, _ATTACHED, None)
    if attached is None:
        raise ValueError("no adapter is attached: add_adapter() or load_adapter() first")
    return attached


def _in_modules_to_save(config: LoraConfig, module_name: str) -> bool:
    """PEFT's rule for modules that a LoRA target must not be in: the entry as a path segment (a regex, as PEFT)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", module_name) for m in config.modules_to_save or ())


def _is_target(config: LoraConfig, module_name: str) -> bool:
    if _in_modules_to_save(config, module_name):
        return False
    if isinstance(config.target_modules, str):
        return re.fullmatch(config.target_modules, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in config.target_modules)


def _saved_whole(config: LoraConfig, tensor_name: str) -> bool:
    """Whether a tensor lies in a module of `modules_to_save`: one whose path ends with an entry (PEFT's rule)."""
    parts = tensor_name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]  # the paths of the modules holding it
    return any(p.endswith(m) for p in prefixes for m in config.modules_to_save or ())


def _targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the Linears the adapter wraps; ValueError when a target is not a Linear or nothing matches."""
    names = []
    for name, module in model.named_modules():
        if name and _is_target(config, name):
            if not isinstance(module, nn.Linear | QuantizedLinear):
                raise ValueError(
                    f"target_modules {config.target_modules!r} match {name!r}, a {type(module).__name__}; "
                    "LoRA adapts nn.Linear layers (full precision or quantised) only"
                )
            names.append(name)
    if not names:
        linears = (nn.Linear, QuantizedLinear)
        leaves = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, linears)})
        raise ValueError(
            f"target_modules {config.target_modules!r} match no nn.Linear of the model (Linear names: "
            f"{', '.join(leaves)})"
        )
    return names


def _saved_parameters(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the parameters in `modules_to_save`; ValueError naming an entry that matches no module."""
    modules = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    for entry in config.modules_to_save or ():
        if not any(name.endswith(entry) for name in modules):
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model")
    return [name for name, _ in model.named_parameters() if _saved_whole(config, name)]


def _swap_parameter(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Put `new` wherever the model holds `old` (tied parameters stay tied)."""
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is old:
                module._parameters[key] = new


def _swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def add_adapter(model: nn.Module, config: LoraConfig) -> None:
    """Wrap the targeted Linears, give `modules_to_save` trainable copies and freeze everything else.

    Works on the meta device too (nothing is materialised). The new A is kaiming-uniform, B zero (PEFT's default),
    so the adapted model starts equal to the base. The adapter takes the base weights' dtype and device.
    """
    if getattr(model, _ATTACHED, None) is not None:
        raise ValueError("an adapter is already attached: merge_adapter() or delete_adapter() it first")
    if config.base_model_name_or_path is None and getattr(model, "name_or_path", None):
        config = dataclasses.replace(config, base_model_name_or_path=model.name_or_path)
    targets = _targets(model, config)
    saved = _saved_parameters(model, config)
    for name, module in model.named_modules():
        if isinstance(module, Int8Head) and (name in targets or any(p.startswith(name + ".") for p in saved)):
            raise ValueError(
                f"{name!r} is an int8-quantised LM head: LoRA cannot wrap it and modules_to_save cannot train it; "
                "load with quantize=QuantizationConfig(..., lm_head=False) to keep the head in full precision"
            )
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    for name in targets:
        lora = LoraLinear(model.get_submodule(name), r=config.r, scaling=config.scaling, dropout=config.lora_dropout)
        _swap_module(model, name, lora)
    originals = {}
    params = dict(model.named_parameters())
    for name in saved:
        originals[name] = params[name]
        _swap_parameter(model, params[name], nn.Parameter(params[name].detach().clone(), requires_grad=True))
    setattr(model, _ATTACHED, _Attached(config, originals, requires_grad))


def _detach(model: nn.Module, attached: _Attached, *, merge: bool) -> None:
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLinear):
                _swap_module(model, name, module.merged_linear() if merge else module.base_linear())
        if not merge:
            params = dict(model.named_parameters())
            for name, original in attached.originals.items():
                current = params[name]
                if (original.device, original.dtype) != (current.device, current.dtype):  # the model moved since
                    original = nn.Parameter(original.detach().to(current.device, current.dtype))
                _swap_parameter(model, current, original)
    for name, p in model.named_parameters():
        p.requires_grad_(attached.requires_grad[name])
    delattr(model, _ATTACHED)


def merge_adapter(model: nn.Module) -> None:
    """Fold every update into its base weight (in place) and drop the LoRA layers; modules_to_save keep their
    trained values. Parameters get back the `requires_grad` they had before the adapter was added."""
    attached = _attached(model)
    if any(isinstance(m, LoraLinear) and m.base_layer is not None for m in model.modules()):
        raise ValueError(
            "cannot merge a LoRA adapter into quantised weights: save_adapter() it and load it onto the "
            "full-precision base (from_pretrained(base, adapter=..., merge=True))"
        )
    _detach(model, attached, merge=True)


def delete_adapter(model: nn.Module) -> None:
    """Remove the adapter: the LoRA layers go, modules_to_save get their original parameters back, and so do the
    `requires_grad` flags: the model is the base model again, bit for bit."""
    _detach(model, _attached(model), merge=False)


def adapter_state_dict(
    source: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], config: LoraConfig
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys, from a model or from {our parameter name: tensor} (e.g. a gathered
    FSDP state dict): LoRA A/B as `base_model.model.<module>.lora_A.weight`, modules_to_save parameters as
    `base_model.model.<name>`. torch.compile's `_orig_mod.` is dropped from names."""
    named = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    out = {}
    for name, tensor in named.items():
        name = name.replace("_orig_mod.", "")
        if name.endswith(LORA_SUFFIXES) or _saved_whole(config, name):
            out[PREFIX + name] = tensor
    if not any(key.endswith(LORA_SUFFIXES) for key in out):
        raise ValueError(f"no LoRA weights (names ending in {' or '.join(LORA_SUFFIXES)}) among the given tensors")
    return out


def _check_keys(found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str) -> None:
    """CheckpointError naming the first unexpected, missing or mis-shaped key of `found`."""
    for key, tensor in found.items():
        if key not in expected:
            raise CheckpointError(
                f"{where}: key {key!r} matches no LoRA layer or module to save of the model "
                f"(expected keys like {next(iter(expected))!r})"
            )
        if tensor.shape != expected[key].shape:
            given, model = tuple(tensor.shape), tuple(expected[key].shape)
            raise CheckpointError(f"shape mismatch for {key!r} in {where}: given {given}, model {model}")
    missing = [key for key in expected if key not in found]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{where} lacks {missing[0]!r}{more}")


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, *, state_dict: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` (PEFT's format) for the attached adapter.

    `state_dict` ({our parameter name: tensor}, e.g. gathered from FSDP shards) is written instead of the model's
    tensors; it must hold every adapter tensor, and may hold others (they are left out).
    """
    from safetensors.torch import save_file

    attached = _attached(model)
    expected = adapter_state_dict(dict(model.named_parameters()), attached.config)
    tensors = expected if state_dict is None else adapter_state_dict(state_dict, attached.config)
    _check_keys(tensors, expected, "the state_dict" if state_dict is not None else "the model")
    meta = [key for key, t in tensors.items() if t.is_meta]
    if meta:
        raise ValueError(f"{meta[0]!r} is on the meta device: load or initialise the weights before saving")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    attached.config.save_pretrained(directory)


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / ADAPTER_WEIGHTS
    try:
        if path.is_file():
            return load_file(path), path
        path = directory / ADAPTER_BIN
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True), path
    except (SafetensorError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} (or {ADAPTER_BIN}) in {directory}")


def load_adapter(model: nn.Module, path_or_id: str | os.PathLike, *, merge: bool = False) -> None:
    """Attach the adapter in a folder (ours or PEFT's) or hub id; with `merge`, fold it in at once.

    The adapter's tensors are cast to the model's (LoRA: its base weights') dtype and device; like `add_adapter`,
    the LoRA weights and modules_to_save are left trainable and the rest frozen.
    """
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model's weights are on the meta device: load them before the adapter")
    patterns = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_BIN]
    directory = resolve_pretrained_dir(path_or_id, allow_patterns=patterns)
    config = LoraConfig.from_pretrained(directory)
    tensors, path = _read_weights(directory)
    add_adapter(model, config)
    try:
        expected = adapter_state_dict(dict(model.named_parameters()), config)  # PEFT key -> our Parameter
        _check_keys(tensors, expected, str(path))
        with torch.no_grad():
            for key, tensor in tensors.items():
                expected[key].copy_(tensor)
    except Exception:
        delete_adapter(model)
        raise
    if merge:
        merge_adapter(model)
