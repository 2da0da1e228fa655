"""The public methods of `IdeficsForVisionText2Text` that live above the model core: `generate` (idefics.generation)
and the LoRA adapter methods (idefics.adapters), which `from_pretrained(adapter=...)` calls too.

The import graph points one way: the model core (modeling/, with cache, config, loading, quantization, parallel)
imports nothing above it, so it cannot take these methods as a mixin. Instead the package's `__init__` runs
`attach_model_methods()` after importing the model: every import of the class runs `idefics/__init__.py` first, so the
methods are always there; each imports its layer only when first called, so `import idefics.modeling` loads neither
generation nor adapters.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from .modeling.model import IdeficsForVisionText2Text

if TYPE_CHECKING:
    from .adapters import LoraConfig


class ModelMethods:
    """Methods copied onto `IdeficsForVisionText2Text` by `attach_model_methods`."""

    # -- LoRA adapters (idefics.adapters; files in PEFT's format) ----------------------------------------------------
    @property
    def adapter_config(self) -> LoraConfig | None:
        """The attached adapter's config, or None."""
        from . import adapters

        return adapters.adapter_config(self)

    def add_adapter(self, config: LoraConfig) -> None:
        """Wrap the targeted Linears in LoRA layers, give `modules_to_save` trainable copies, freeze the rest."""
        from . import adapters

        adapters.add_adapter(self, config)

    def load_adapter(self, path_or_id: str | os.PathLike, *, merge: bool = False) -> None:
        """Attach an adapter saved by `save_adapter` or by peft (folder or hub id); fold it in with `merge`."""
        from . import adapters

        adapters.load_adapter(self, path_or_id, merge=merge)

    def save_adapter(self, directory: str | os.PathLike, *, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write `adapter_config.json` + `adapter_model.safetensors`, which peft's PeftModel loads too.
        `state_dict` ({parameter name: tensor}, e.g. gathered from FSDP) is written instead of the model's own."""
        from . import adapters

        adapters.save_adapter(self, directory, state_dict=state_dict)

    def merge_adapter(self) -> None:
        """Fold the adapter into the base weights and drop the LoRA layers."""
        from . import adapters

        adapters.merge_adapter(self)

    def delete_adapter(self) -> None:
        """Remove the adapter; the model is the base model again, bit for bit."""
        from . import adapters

        adapters.delete_adapter(self)

    # -- generation (idefics.generation) ------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Generate after the prompt (b, t) -> (b, t + new); see `idefics.generation.generate` for the arguments."""
        from .generation import generate

        return generate(self, input_ids, **kwargs)


def attach_model_methods() -> None:
    """Give `IdeficsForVisionText2Text` the methods of `ModelMethods` (idempotent)."""
    for name, value in vars(ModelMethods).items():
        if not name.startswith("__"):
            setattr(IdeficsForVisionText2Text, name, value)
