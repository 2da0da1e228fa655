"""`QuantizationConfig`: which scheme, with which groups; read and written as config.json's `quantization_config`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

SCHEMES = ("int8", "int4", "nf4")
FULL = "full"  # the `scheme` of a layer left in full precision (see `overrides`)
QUANT_METHOD = "idefics"  # the `quant_method` of the configs this package writes
LAYER_SETTINGS = ("scheme", "group_size", "block_size", "double_quant")  # what `overrides` may set per layer


class QuantizationError(ValueError):
    """A quantisation request that cannot be met: an unknown scheme, a device or a layer it does not fit."""


@dataclass
class QuantizationConfig:
    """Weight-only quantisation of the Linear layers (see `idefics.quantization`)."""

    scheme: str  # "int8": per output channel, symmetric; "int4": group-wise asymmetric; "nf4": QLoRA's NormalFloat4
    # int4: input features sharing one (scale, zero). A layer it does not divide takes another (see `plan.py`).
    group_size: int = 128
    block_size: int = 64  # nf4: weights sharing one absmax, over the flattened weight (any size fits any layer)
    double_quant: bool = True  # nf4: absmax values stored as int8 (blocks of 256) rather than float32
    # The LM head's vocabulary rows in int8 per output channel (`head.py`; never a tied head). None: on for int8 and
    # int4 (inference), off for nf4, whose QLoRA training would dequantise the whole head in every backward.
    lm_head: bool | None = None
    # The layers whose settings differ from the above: path -> e.g. {"scheme": "int4", "group_size": 64},
    # {"scheme": "int8"} or {"scheme": "full"}. None: chosen by the rule of `plan.py` when quantising, then recorded
    # here, so that a saved model loads back layer for layer as it was.
    overrides: dict[str, dict[str, Any]] | None = field(default=None, repr=False)
    # Refuse a layer the settings above do not fit rather than choose another for it. How to quantise, not what was
    # quantised: neither saved nor compared.
    strict: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"unknown quantisation scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        for name in ("group_size", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise QuantizationError(f"{name} must be a positive integer, got {value!r}")
        if self.lm_head is None:
            self.lm_head = self.scheme != "nf4"
        for name in ("lm_head", "double_quant", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise QuantizationError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.overrides is not None:
            if not isinstance(self.overrides, dict):
                raise QuantizationError(f"overrides must map layer paths to settings, got {self.overrides!r}")
            for name in self.overrides:
                self.layer(name)

    def layer(self, name: str) -> QuantizationConfig | None:
        """The settings layer `name` is quantised with (this config, or it with the layer's override); None for a
        layer left in full precision."""
        settings = (self.overrides or {}).get(name)
        if settings is None:
            return self
        known = isinstance(settings, dict) and set(settings) <= set(LAYER_SETTINGS)
        if not known or settings.get("scheme") not in (*SCHEMES, FULL):
            raise QuantizationError(
                f"overrides[{name!r}] must set a scheme ({', '.join(SCHEMES)} or {FULL!r}) and at most "
                f"{', '.join(LAYER_SETTINGS[1:])}; got {settings!r}"
            )
        if settings["scheme"] == FULL:
            return None
        return replace(self, overrides=None, **settings)

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self)
        del settings["strict"]
        return {"quant_method": QUANT_METHOD, **settings}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationConfig:
        """Read a `quantization_config`; one written by another library (bitsandbytes, GPTQ, ...) is refused."""
        method = data.get("quant_method")
        if method != QUANT_METHOD:
            raise QuantizationError(
                f"quantization_config has quant_method {method!r}; only checkpoints quantised by idefics "
                f"({QUANT_METHOD!r}) load quantised (load the full-precision checkpoint with quantize= instead)"
            )
        known = ("scheme", "group_size", "block_size", "double_quant")
        # Configs written before `lm_head` existed kept the head in full precision; those written before `overrides`
        # existed had every layer at the configured settings (others were refused).
        return cls(
            **{key: data[key] for key in known if key in data},
            lm_head=data.get("lm_head", False),
            overrides=data.get("overrides") or {},
        )
