"""Per-request sampling parameters and the errors `Engine.submit` raises."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..generation.constraints import Constraint

MAX_LOGPROBS = 20  # the most top alternatives a request may ask for per token


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; try again later (a server answers 429)."""


class EngineDraining(RuntimeError):
    """The engine is shutting down and accepts no new requests (a server answers 503)."""


class ContextLengthError(ValueError):
    """The prompt plus max_tokens does not fit the engine's positions per slot."""

    def __init__(self, *, max_model_len: int, prompt_tokens: int, max_tokens: int):
        self.max_model_len = max_model_len
        self.prompt_tokens = prompt_tokens
        self.requested = prompt_tokens + max_tokens
        super().__init__(
            f"this model's maximum context length is {max_model_len} tokens, you asked for {self.requested} tokens "
            f"({prompt_tokens} in the prompt, {max_tokens} to generate)"
        )


INT_MAX = 2**63 - 1


@dataclass
class SamplingParams:
    """How one request is decoded; every field is applied per row inside the engine's batched steps."""

    max_tokens: int | None = 16  # tokens to generate at most; None: as many as the engine's positions leave
    min_tokens: int = 0  # EOS (and stop_token_ids) are banned until this many tokens were generated
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling: keep the likeliest tokens whose probability reaches top_p
    top_k: int = 0  # keep the k likeliest tokens; 0: off
    repetition_penalty: float = 1.0  # CTRL-style, over the prompt and the generated tokens; 1: off
    seed: int | None = None  # a private generator: the same seed gives the same tokens alone or under load
    stop: list[str] = field(default_factory=list)  # stop strings; the matched one is not part of the text
    stop_token_ids: list[int] = field(default_factory=list)  # extra EOS ids
    ignore_eos: bool = False  # keep going past EOS (stop_token_ids still stop)
    n: int = 1  # completions of the prompt, sharing its prefill
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k likeliest alternatives
    skip_special_tokens: bool = True  # leave special tokens out of the text
    constraint: Constraint | None = None  # structured output (JSON schema / object, regex, choice); None: free text
    logit_bias: dict[int, float] | None = None  # token id -> a number in [-100, 100] added to its logit every step

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_tokens", self.max_tokens is None or isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             "an integer >= 1 or None"),
            ("min_tokens", isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= (self.max_tokens or INT_MAX),
             "an integer in [0, max_tokens]"),
            ("temperature", _number(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("repetition_penalty", _number(self.repetition_penalty) and self.repetition_penalty > 0, "a number > 0"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer or None"),
            ("stop", isinstance(self.stop, list | tuple) and all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
            ("stop_token_ids", isinstance(self.stop_token_ids, list | tuple)
             and all(isinstance(i, int) and i >= 0 for i in self.stop_token_ids), "a list of token ids"),
            ("n", isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int)
                                                   and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"None or an integer in [0, {MAX_LOGPROBS}]"),
            ("constraint", self.constraint is None or isinstance(self.constraint, Constraint), "a Constraint or None"),
            ("logit_bias", self.logit_bias is None or isinstance(self.logit_bias, dict) and all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 0 and _number(v) and -100 <= v <= 100
                for k, v in self.logit_bias.items()), "None or a dict of token ids to numbers in [-100, 100]"),
        ]  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {expected}, got {getattr(self, name)!r}")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x  # not NaN
