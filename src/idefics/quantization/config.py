"""`QuantizationConfig`: which scheme, with which groups; read and written as config.json's `quantization_config`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SCHEMES = ("int8", "int4", "nf4")
QUANT_METHOD = "idefics"  # the `quant_method` of the configs this package writes


class QuantizationError(ValueError):
    """A quantisation request that cannot be met: an unknown scheme, a device or a layer it does not fit."""


@dataclass
class QuantizationConfig:
    """Weight-only quantisation of the Linear layers (see `idefics.quantization`)."""

    scheme: str  # "int8": per output channel, symmetric; "int4": group-wise asymmetric; "nf4": QLoRA's NormalFloat4
    group_size: int = 128  # int4: input features sharing one (scale, zero); must divide every layer's in features
    block_size: int = 64  # nf4: weights sharing one absmax, over the flattened weight
    double_quant: bool = True  # nf4: absmax values stored as int8 (blocks of 256) rather than float32
    # The LM head's vocabulary rows in int8 per output channel (`head.py`; never a tied head). None: on for int8 and
    # int4 (inference), off for nf4, whose QLoRA training would dequantise the whole head in every backward.
    lm_head: bool | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"unknown quantisation scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        for name in ("group_size", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise QuantizationError(f"{name} must be a positive integer, got {value!r}")
        if self.lm_head is None:
            self.lm_head = self.scheme != "nf4"
        if not isinstance(self.lm_head, bool):
            raise QuantizationError(f"lm_head must be true or false, got {self.lm_head!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **asdict(self)}

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
        # Configs written before `lm_head` existed kept the head in full precision.
        return cls(**{key: data[key] for key in known if key in data}, lm_head=data.get("lm_head", False))
