"""Token generation: one cached loop (prefill + decode steps) that generate, streaming, CLI and server consume."""

from .config import GenerationConfig
from .loop import DecodeState, Step, decode_step, generate, generate_steps, prefill

__all__ = ["DecodeState", "GenerationConfig", "Step", "decode_step", "generate", "generate_steps", "prefill"]
