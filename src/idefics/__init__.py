"""idefics: a fast, checkpoint-compatible PyTorch implementation of IDEFICS (HuggingFaceM4/idefics-9b, -80b)."""

from .cache import IdeficsCache, KVCache
from .config import IdeficsConfig, IdeficsPerceiverConfig, IdeficsVisionConfig
from .modeling import IdeficsCausalLMOutput, IdeficsForVisionText2Text, IdeficsModel, IdeficsModelOutput

__version__ = "0.1.0"

__all__ = [
    "IdeficsCache",
    "IdeficsCausalLMOutput",
    "IdeficsConfig",
    "IdeficsForVisionText2Text",
    "IdeficsModel",
    "IdeficsModelOutput",
    "IdeficsPerceiverConfig",
    "IdeficsVisionConfig",
    "KVCache",
]
