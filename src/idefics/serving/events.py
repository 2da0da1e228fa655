"""What a request's stream yields: one TokenEvent per generated token, one FinishEvent per choice."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model (a constraint's mask applied, sampling filters not) and the
    top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, token text, logprob), likeliest first


@dataclass
class TokenEvent:
    """One generated token of choice `index`; `text` is the printable delta ("" while bytes or a possible stop
    string are held back)."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class FinishEvent:
    """The end of choice `index`: why, its whole text and tokens, the counts and the timings (seconds; `arrival` is
    a Unix time, the others durations: queue_time, ttft, e2e, itl_mean)."""

    index: int
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Completion(FinishEvent):
    """One finished choice, as `RequestStream.result()` returns it: the FinishEvent fields plus its logprobs."""

    logprobs: list[TokenLogprob] | None = None
