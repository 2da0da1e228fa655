"""Swap a model's Linear layers for quantised ones: `quantize_model`, and the rules of which layers and where.

Quantised: every nn.Linear of the decoder, the gated cross-attention layers, the perceiver resampler and the vision
tower, by the config's scheme (with another group size, int8 or full precision where int4's groups do not fit a
layer: `plan.py`); and the LM head's vocabulary rows in int8 (`head.py`; with int8 and int4 unless
`lm_head=False`, never when the head is tied to the embedding). Kept in full precision: embeddings, norms and the
2-row `additional_fc`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import QuantizationConfig, QuantizationError
from .head import Int8Head
from .int4 import Int4Linear
from .int8 import Int8Linear
from .linear import QuantizedLinear
from .nf4 import Nf4Linear
from .plan import plan, summary

LAYERS: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "nf4": Nf4Linear}
KEEP_FULL_PRECISION = ("additional_fc",)  # module names never quantised
logger = logging.getLogger(__name__)
DEVICES = ("cpu", "cuda")  # where the schemes run (int8 and int4 with kernels, nf4 by dequantising)
# The stored float tensors of quantised layers: a loader keeps them float32 whatever the model's dtype.
METADATA_PATTERN = r"\.weight_(scale|scale_zero|absmax|absmax_scale|absmax_offset)$"


def quantizable(model: nn.Module) -> list[str]:
    """Paths of the Linears `quantize_model` replaces."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.rpartition(".")[2] not in KEEP_FULL_PRECISION
    ]


def check_device(config: QuantizationConfig, device: torch.device | str) -> None:
    """QuantizationError when `config`'s scheme cannot run on `device`."""
    device = torch.device(device)
    if device.type not in DEVICES:
        raise QuantizationError(f"{config.scheme} quantisation runs on {' or '.join(DEVICES)}, not on {device}")


def layer_options(config: QuantizationConfig) -> dict:
    if config.scheme == "int4":
        return dict(group_size=config.group_size)
    if config.scheme == "nf4":
        return dict(block_size=config.block_size, double_quant=config.double_quant)
    return {}


def quantize_model(
    model: nn.Module, config: QuantizationConfig, *, device: torch.device | str | None = None
) -> QuantizationConfig:
    """Replace the quantisable Linears of `model` by `config`'s quantised layers, in place; returns `config` with
    the per-layer choices recorded in `overrides` (what `save_pretrained` writes).

    Each layer takes `config`'s settings where they fit it, otherwise the nearest that do (`plan.py`: an int4 group
    size that does not divide a layer's in features); one logged line says how many did, unless `config.strict`,
    which refuses such a layer with a QuantizationError naming it. A config with `overrides` (read back from a save)
    is applied exactly. On the meta device the new layers are empty (a loader fills them); otherwise each weight is
    quantised on its device as its layer is swapped, so at most one layer exists in both precisions at a time. A
    device the scheme cannot run on is refused. With `config.lm_head` the LM head (`model.lm_head`) becomes an
    `Int8Head`, unless it shares its rows with the embedding table.
    """
    check_device(config, device or next(model.parameters()).device)
    if any(type(m).__name__ == "LoraLinear" for m in model.modules()):
        raise QuantizationError("quantise the base model before adding a LoRA adapter, not after")
    widths = {name: model.get_submodule(name).in_features for name in quantizable(model)}
    chosen = plan(config, widths)
    if config.overrides is None and chosen.overrides:
        logger.warning(summary(chosen, widths))
    for name in widths:
        layer = chosen.layer(name)
        if layer is None:  # left in full precision
            continue
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, child, LAYERS[layer.scheme].from_linear(getattr(holder, child), **layer_options(layer)))
    head = getattr(model, "lm_head", None)
    if config.lm_head and head is not None and not isinstance(head, QuantizedLinear) and not _tied(model, head):
        model.lm_head = Int8Head.from_head(head)
    return chosen


def _tied(model: nn.Module, head: nn.Module) -> bool:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings is not None and embeddings.weight is head.weight


def finish_loading(model: nn.Module) -> None:
    """After a loader attached stored quantised tensors: put each layer's into its kernel's layout and dtypes."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.finish_loading()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, quantised ones as stored (the model's weight memory)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
