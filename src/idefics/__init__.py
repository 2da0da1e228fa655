"""idefics: a fast, checkpoint-compatible PyTorch implementation of IDEFICS (HuggingFaceM4/idefics-9b, -80b)."""

from .cache import IdeficsCache, KVCache
from .config import IdeficsConfig, IdeficsPerceiverConfig, IdeficsVisionConfig
from .generation import GenerationConfig, stream_generate
from .modeling import IdeficsCausalLMOutput, IdeficsForVisionText2Text, IdeficsModel, IdeficsModelOutput
from .processing import IdeficsImageProcessor, IdeficsProcessor, IdeficsTokenizer, apply_chat_template

__version__ = "0.1.0"

__all__ = [
    "GenerationConfig",
    "IdeficsCache",
    "IdeficsCausalLMOutput",
    "IdeficsConfig",
    "IdeficsForVisionText2Text",
    "IdeficsImageProcessor",
    "IdeficsModel",
    "IdeficsModelOutput",
    "IdeficsPerceiverConfig",
    "IdeficsProcessor",
    "IdeficsTokenizer",
    "IdeficsVisionConfig",
    "KVCache",
    "apply_chat_template",
    "stream_generate",
]
