"""idefics: a fast, checkpoint-compatible PyTorch implementation of IDEFICS (HuggingFaceM4/idefics-9b, -80b)."""

from pathlib import Path

from .cache import IdeficsCache, KVCache
from .config import IdeficsConfig, IdeficsPerceiverConfig, IdeficsVisionConfig
from .methods import attach_model_methods
from .modeling import IdeficsCausalLMOutput, IdeficsForVisionText2Text, IdeficsModel, IdeficsModelOutput
from .processing import IdeficsImageProcessor, IdeficsProcessor, IdeficsTokenizer, apply_chat_template

attach_model_methods()  # generate and the adapter methods, from the layers above the model core (see methods.py)

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


def __getattr__(name: str):
    """`idefics.GenerationConfig` and `idefics.stream_generate`, imported on first use (see methods.py)."""
    if name in ("GenerationConfig", "stream_generate"):
        from . import generation

        return getattr(generation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
