"""LoRA adapters in PEFT's format: a rank-r update wrapped around Linear layers (full precision or quantised).

    from idefics.adapters import LoraConfig, add_adapter, load_adapter, save_adapter
    add_adapter(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))  # or model.add_adapter(...)

`config.py` holds `LoraConfig` (PEFT's `adapter_config.json`), `layers.py` the `LoraLinear` wrapper and how an
adapter is added, merged and deleted, `peft_format.py` the adapter's files (PEFT's key names, safetensors). Like
`idefics.quantization`, a peer that changes Linear layers; it stands on the model core (modeling/layout.py's matrix
products, loading, quantization), and the model core does not import it: `IdeficsForVisionText2Text`'s adapter
methods are attached from above (idefics/methods.py).
"""

from .config import LoraConfig
from .layers import LoraLinear, adapter_config, add_adapter, delete_adapter, merge_adapter
from .peft_format import adapter_state_dict, load_adapter, save_adapter

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "adapter_config",
    "adapter_state_dict",
    "add_adapter",
    "delete_adapter",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
]
