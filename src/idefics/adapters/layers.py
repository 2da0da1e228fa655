"""LoRA layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685) and how an adapter is put into a model and taken out.

Each targeted nn.Linear is swapped for a `LoraLinear` that keeps the base `weight` (so the model's own keys stay
`...q_proj.weight`) and adds a rank-r update: y = x W^T + scaling * B A x, A (r, in) and B (out, r). Over a quantised
base (QLoRA) the frozen quantised layer is kept whole as `base_layer`; such an adapter cannot be merged into it, but
its files are the same and load onto the full-precision base. Whole
`modules_to_save` get trainable copies of their parameters; the originals are kept aside so `delete_adapter` restores
the base exactly. Everything else is frozen while an adapter is attached.

Matching follows PEFT: a list entry of `target_modules` matches a module whose path equals it or ends with "." + entry,
a string is a full-match regex over module paths; a `modules_to_save` entry matches a module whose path ends with it,
and modules inside one are never LoRA targets.

Legend for shape comments: r rank, d_in / d_out the wrapped Linear's widths.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.layout import dense, project
from ..quantization import Int8Head, QuantizedLinear
from .config import LoraConfig

_ATTACHED = "_lora_adapter"  # the model attribute holding an `_Attached`


class LoraLinear(nn.Linear):
    """An nn.Linear (its own `weight` and `bias`, untouched) plus a low-rank update scaled by `scaling`; over a
    quantised layer, that layer as `base_layer` (and no `weight` or `bias` of its own)."""

    adapter_layer = True  # how `save_pretrained` (in modeling/, which does not import adapters) tells one apart

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
    """The attached adapter's config, or None."""
    attached = getattr(model, _ATTACHED, None)
    return attached.config if attached is not None else None


def require_adapter(model: nn.Module) -> _Attached:
    """What `add_adapter` recorded on the model; ValueError when no adapter is attached."""
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


def in_saved_module(config: LoraConfig, tensor_name: str) -> bool:
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
    return [name for name, _ in model.named_parameters() if in_saved_module(config, name)]


def _swap_parameter(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Put `new` wherever the model holds `old` (tied parameters stay tied)."""
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is old:
                module._parameters[key] = new


def _swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def refuse_tensor_parallel(model: nn.Module) -> None:
    """ValueError for a model sharded over several processes: its Linears hold slices, the adapter whole matrices."""
    tp = getattr(model, "tensor_parallel", None)
    if tp is not None and tp.size > 1:
        raise ValueError(
            f"LoRA adapters are not supported on a model sharded over {tp.size} processes (tp_plan): merge the "
            "adapter into the checkpoint on one process first (load it with merge=True, then save_pretrained)"
        )


def add_adapter(model: nn.Module, config: LoraConfig) -> None:
    """Wrap the targeted Linears, give `modules_to_save` trainable copies and freeze everything else.

    Works on the meta device too (nothing is materialised). The new A is kaiming-uniform, B zero (PEFT's default),
    so the adapted model starts equal to the base. The adapter takes the base weights' dtype and device.
    """
    if getattr(model, _ATTACHED, None) is not None:
        raise ValueError("an adapter is already attached: merge_adapter() or delete_adapter() it first")
    refuse_tensor_parallel(model)
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
    attached = require_adapter(model)
    if any(isinstance(m, LoraLinear) and m.base_layer is not None for m in model.modules()):
        raise ValueError(
            "cannot merge a LoRA adapter into quantised weights: save_adapter() it and load it onto the "
            "full-precision base (from_pretrained(base, adapter=..., merge=True))"
        )
    _detach(model, attached, merge=True)


def delete_adapter(model: nn.Module) -> None:
    """Remove the adapter: the LoRA layers go, modules_to_save get their original parameters back, and so do the
    `requires_grad` flags: the model is the base model again, bit for bit."""
    _detach(model, require_adapter(model), merge=False)
