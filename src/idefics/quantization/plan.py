"""Which settings each layer is quantised with: the config's where they fit the layer's shape, the nearest that fit
where not, recorded so that a saved model loads back as it was.

Only int4 has a shape constraint: its group size must divide the layer's in features (an even number of them). A
layer the configured size does not divide takes the largest kernel size (256, 128, 64, 32) that divides it; with
none, it stays int8 where the int8 kernel takes it (in features a multiple of 16) and in full precision otherwise.
Measured (`python benchmarks/quant_plan.py`, CPU time, 1 thread; BENCHMARKS.md): one layer against float32
`F.linear`, int8 through its kernel takes 0.28-2.3x the time (faster from about half a million weights on) with a
relative error of 4.6e-3, a tenth of int4's, in a quarter of the bytes; int8 without its kernel dequantises on every
call, 3.7-17x slower at one row, where float32 is exact. In the demo model at group 128 its four 336-wide layers in
int8 decode 1.27-1.50x faster than in float32 (0.93 against 1.45 MB of weights, both 100% right). int8 and nf4 hold
any shape (int8 layers the kernel does not take dequantise; nf4's blocks run over the flattened weight, the last one
padded), so they use their settings everywhere.

`QuantizationConfig.overrides` records the layers that differ; a config read back from a save (or written before
overrides existed, when such layers were refused) is applied exactly as recorded. With `strict` a layer the
settings do not fit is refused instead.
"""

from __future__ import annotations

from dataclasses import replace

from .config import FULL, QuantizationConfig, QuantizationError
from .kernels import INT4_GROUP_SIZES, int4_group_fits, int8_kernel_fits


def fallback(config: QuantizationConfig, in_features: int) -> dict | None:
    """The settings of a layer `in_features` wide where `config`'s own do not fit it; None where they do."""
    if config.scheme != "int4" or int4_group_fits(in_features, config.group_size):
        return None
    group = next((g for g in reversed(INT4_GROUP_SIZES) if int4_group_fits(in_features, g)), None)
    if group is not None:
        return {"scheme": "int4", "group_size": group}
    return {"scheme": "int8" if int8_kernel_fits(in_features) else FULL}


def plan(config: QuantizationConfig, widths: dict[str, int]) -> QuantizationConfig:
    """`config` with `overrides` for the layers of `widths` (path -> in features): as recorded, or chosen by
    `fallback` when `config.overrides` is None. QuantizationError for any override under `strict`, for a layer its
    settings do not fit and for a recorded override that names no layer of `widths`."""
    if config.overrides is None:
        found = {name: settings for name, width in widths.items() if (settings := fallback(config, width))}
        config = replace(config, overrides=found)
    unknown = [name for name in config.overrides if name not in widths]
    if unknown:
        raise QuantizationError(f"quantization_config overrides {unknown[0]!r}, which is not a quantisable layer")
    for name, width in widths.items():
        if config.strict and name in config.overrides:
            raise QuantizationError(refusal(config, name, width))
        layer = config.layer(name)
        if layer is not None and layer.scheme == "int4" and not int4_group_fits(width, layer.group_size):
            raise QuantizationError(refusal(layer, name, width))
    return config


def refusal(config: QuantizationConfig, name: str, in_features: int) -> str:
    return (
        f"int4 group_size {config.group_size} does not divide layer {name!r} (in features {in_features}; int4 also "
        f"needs an even number); the kernels take {', '.join(map(str, INT4_GROUP_SIZES))}, other sizes run by "
        "dequantising"
    )


def summary(config: QuantizationConfig, widths: dict[str, int]) -> str:
    """One line: how many layers took other settings than `config`'s own, which, and at which widths."""
    kinds: dict[str, list[int]] = {}
    for name, settings in config.overrides.items():
        kinds.setdefault(_kind(settings), []).append(widths[name])
    parts = [f"{len(ks)} {kind} (in features {', '.join(map(str, sorted(set(ks))))})" for kind, ks in kinds.items()]
    return (
        f"{config.scheme} group_size {config.group_size} does not divide {len(config.overrides)} of {len(widths)} "
        f"layers: {', '.join(parts)}; quantize_strict=True (--quantize-strict) refuses them instead"
    )


def _kind(settings: dict) -> str:
    if settings["scheme"] == "int4":
        return f"took group size {settings['group_size']}"
    return "stayed in full precision" if settings["scheme"] == FULL else f"stayed {settings['scheme']}"
