"""Serving: the continuous-batching engine (no HTTP here; the server builds on it).

from idefics.serving import Engine, EngineConfig, SamplingParams

with Engine(model, processor, EngineConfig(max_batch_size=8)) as engine:
    stream = engine.submit(["User:", image, "What is this?<end_of_utterance>\\nAssistant:"],
                           SamplingParams(max_tokens=32, temperature=0.0))
    for event in stream:  # TokenEvents, then one FinishEvent per choice
        ...
"""

from .engine import Engine, EngineConfig
from .events import Completion, FinishEvent, TokenEvent, TokenLogprob
from .params import ContextLengthError, EngineDraining, EngineOverloaded, SamplingParams
from .requests import RequestStream

__all__ = [
    "Completion",
    "ContextLengthError",
    "Engine",
    "EngineConfig",
    "EngineDraining",
    "EngineOverloaded",
    "FinishEvent",
    "RequestStream",
    "SamplingParams",
    "TokenEvent",
    "TokenLogprob",
]
