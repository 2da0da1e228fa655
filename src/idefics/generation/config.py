"""Generation settings, with transformers' names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .constraints import Constraint


@dataclass
class GenerationConfig:
    max_new_tokens: int = 20
    min_new_tokens: int = 0  # EOS is banned until this many tokens were generated
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50  # applies only when sampling, as in transformers
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # CTRL-style: divide positive / multiply negative logits of seen tokens
    num_beams: int = 1
    length_penalty: float = 1.0  # beam scores are divided by generated_length ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False (heuristic) or "never"
    eos_token_id: int | list[int] | None = None  # default: the model config's
    pad_token_id: int | None = None  # default: the model config's, else the first EOS
    bad_words_ids: list[list[int]] | None = None  # token sequences that may never be generated
    stop_strings: list[str] | str | None = None  # needs a tokenizer
    seed: int | None = None  # seeds a private torch.Generator for sampling
    compile: bool = False  # torch.compile the decode step over a static cache (and CUDA graphs on GPU)
    cuda_graphs: bool | None = None  # capture the decode step as a CUDA graph; None: on CUDA when compile=True
    constraint: Constraint | None = None  # structured output every row must match (needs a tokenizer)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(f"constraint must be a Constraint, got {type(self.constraint).__name__}")
        if self.constraint is not None and self.num_beams > 1:
            raise ValueError("constraints work with greedy search and sampling, not beam search (num_beams > 1)")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if self.stop_strings is not None and any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must be non-empty strings")

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerationConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown generation arguments {unknown}; known: {sorted(names)}")
        return cls(**kwargs)
