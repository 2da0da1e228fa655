"""The IDEFICS network: vision encoder, perceiver resampler, LLaMA decoder with gated cross-attention."""

from .model import IdeficsForVisionText2Text, IdeficsModel
from .outputs import IdeficsCausalLMOutput, IdeficsModelOutput

__all__ = ["IdeficsCausalLMOutput", "IdeficsForVisionText2Text", "IdeficsModel", "IdeficsModelOutput"]
