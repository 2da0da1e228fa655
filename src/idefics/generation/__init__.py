"""Token generation: one cached loop (prefill + decode steps) that generate, streaming, CLI and server consume."""

from .config import GenerationConfig
from .constraints import Constraint, ConstraintError
from .loop import Step, generate, generate_steps
from .step import DecodeState, decode_step, prefill
from .stream import TextDeltas, stream_generate

__all__ = [
    "Constraint",
    "ConstraintError",
    "DecodeState",
    "GenerationConfig",
    "Step",
    "TextDeltas",
    "decode_step",
    "generate",
    "generate_steps",
    "prefill",
    "stream_generate",
]
