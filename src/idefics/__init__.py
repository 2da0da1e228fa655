"""idefics: a fast, checkpoint-compatible PyTorch implementation of IDEFICS (HuggingFaceM4/idefics-9b, -80b)."""

from pathlib import Path

from .cache import IdeficsCache, KVCache
from .config import IdeficsConfig, IdeficsPerceiverConfig, IdeficsVisionConfig
from .generation import GenerationConfig, stream_generate
from .modeling import IdeficsCausalLMOutput, IdeficsForVisionText2Text, IdeficsModel, IdeficsModelOutput
from .processing import IdeficsImageProcessor, IdeficsProcessor, IdeficsTokenizer, apply_chat_template

__version__ = "0.1.0"

# The demo model shipped inside the package (trained from scratch by `python -m idefics.demo`): a folder path.
DEMO_MODEL = str(Path(__file__).parent / "demo_model")

__all__ = [
    "DEMO_MODEL",
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
