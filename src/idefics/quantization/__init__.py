"""Weight-only quantisation of the Linear layers: int8 (per channel), int4 (group-wise), NF4 (QLoRA).

    model = IdeficsForVisionText2Text.from_pretrained(path, quantize="int8")          # quantised while loading
    model = IdeficsForVisionText2Text.from_pretrained(path, quantize="int4", group_size=64)
    model.save_pretrained(out)  # quantised safetensors + `quantization_config` in config.json; loads back as is

`config.py` the settings, `linear.py` what every quantised Linear shares, `int8.py` / `int4.py` / `nf4.py` one layer
per scheme, `kernels.py` the PyTorch kernels and weight layouts, `plan.py` which settings each layer takes (another
int4 group size, int8 or full precision where the configured one does not divide it), `swap.py` which layers are
replaced and how.
"""

from .config import SCHEMES, QuantizationConfig, QuantizationError
from .head import Int8Head
from .int4 import Int4Linear
from .int8 import Int8Linear, Int8Pack
from .linear import QuantizedLinear
from .nf4 import Nf4Linear
from .swap import quantizable, quantize_model, weight_bytes

__all__ = [
    "SCHEMES",
    "Int4Linear",
    "Int8Head",
    "Int8Linear",
    "Int8Pack",
    "Nf4Linear",
    "QuantizationConfig",
    "QuantizationError",
    "QuantizedLinear",
    "quantizable",
    "quantize_model",
    "weight_bytes",
]
