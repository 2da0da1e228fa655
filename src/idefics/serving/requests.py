"""A submitted request, the stream its caller reads, and the running state of each of its choices (rows).

The engine thread pushes events; callers read them by blocking iteration, by `aiter()` in an asyncio loop, or wait
for `result()`. Pushing never blocks the engine: events are appended under a small lock and waiters are woken
(threads through a condition, asyncio loops through `call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..generation.grammar import Grammar, GrammarState
from ..generation.stopping import Detokenizer
from ..generation.stream import TextDeltas
from .events import Completion, FinishEvent, TokenEvent, TokenLogprob
from .params import SamplingParams
from .prefix import PromptRecord
from .sampler import RowSampling

Event = TokenEvent | FinishEvent


@dataclass
class Request:
    """A prompt, tokenised and preprocessed in the submitting thread, waiting for slots."""

    request_id: str
    input_ids: torch.Tensor  # (1, t)
    image_inputs: dict  # pixel_values (1, n, 3, r, r) and image_attention_mask (1, t, n), or empty
    num_images: int
    params: SamplingParams
    stream: RequestStream
    image_keys: tuple[str, ...] = ()  # each image's image-cache key, computed at submit
    record: PromptRecord | None = None  # token ids and image views per position, for the prefix cache
    arrival: float = field(default_factory=time.time)  # Unix time
    arrival_clock: float = field(default_factory=time.perf_counter)
    grammar: Grammar | None = None  # the compiled constraint (compiled in the submitting thread)

    @property
    def prompt_tokens(self) -> int:
        return self.input_ids.shape[1]


class RequestStream:
    """Events of one request: a TokenEvent per generated token of each choice, then one FinishEvent per choice."""

    def __init__(self, request_id: str, prompt_tokens: int, n: int, cancel: Callable[[RequestStream], None]):
        self.request_id, self.prompt_tokens, self.n = request_id, prompt_tokens, n
        self._cancel = cancel
        self._cond = threading.Condition()
        self._events: list[Event] = []
        self._finished: dict[int, FinishEvent] = {}
        self._logprobs: dict[int, list[TokenLogprob]] = {}
        self._loops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False

    @property
    def done(self) -> bool:
        return len(self._finished) == self.n

    def push(self, events: list[Event]) -> None:
        """Append events (engine thread) and wake every reader."""
        with self._cond:
            for event in events:
                if isinstance(event, FinishEvent):
                    self._finished[event.index] = event
                elif event.logprobs is not None:
                    self._logprobs.setdefault(event.index, []).extend(event.logprobs)
            self._events.extend(events)
            self._cond.notify_all()
            loops = list(self._loops)
        for loop, wake in loops:
            if not loop.is_closed():
                loop.call_soon_threadsafe(wake.set)

    def _read(self, start: int) -> tuple[list[Event], bool]:
        with self._cond:
            return self._events[start:], self.done

    def __iter__(self) -> Iterator[Event]:
        seen = 0
        while True:
            with self._cond:
                while len(self._events) == seen and not self.done:
                    self._cond.wait()
                events, done = self._events[seen:], self.done
            seen += len(events)
            yield from events
            if done and seen == len(self._events):
                return

    async def aiter(self) -> AsyncIterator[Event]:
        """The events, awaited without blocking the running asyncio loop."""
        wake = asyncio.Event()
        entry = (asyncio.get_running_loop(), wake)
        with self._cond:
            self._loops.append(entry)
        try:
            seen = 0
            while True:
                wake.clear()
                events, done = self._read(seen)
                seen += len(events)
                for event in events:
                    yield event
                if done and not self._read(seen)[0]:
                    return
                if not events:
                    await wake.wait()
        finally:
            with self._cond:
                self._loops.remove(entry)

    def cancel(self) -> None:
        """Stop every choice of this request (thread-safe, idempotent); its rows end "cancelled"."""
        if not self.cancelled and not self.done:
            self.cancelled = True
            self._cancel(self)

    def result(self, timeout: float | None = None) -> list[Completion]:
        """Block until every choice finished; one Completion per choice, in index order."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout=timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self._completions()

    async def aresult(self) -> list[Completion]:
        async for _ in self.aiter():
            pass
        return self._completions()

    def _completions(self) -> list[Completion]:
        return [
            Completion(**vars(self._finished[i]), logprobs=self._logprobs.get(i) if i in self._logprobs else None)
            for i in range(self.n)
        ]


class SpecialDeltas(TextDeltas):
    """TextDeltas that keep special tokens in the text (skip_special_tokens=False)."""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


@dataclass
class Row:
    """One running choice of a request, in one slot."""

    request: Request
    index: int  # the choice
    slot: int
    eos: set[int]  # ids that end this row (EOS unless ignore_eos, plus stop_token_ids)
    deltas: TextDeltas | None  # None without a tokenizer
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    first_token: float | None = None  # perf_counter times
    last_token: float | None = None
    admitted: float = 0.0
    grammar: GrammarState | None = None  # this choice's position in the request's constraint
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # the request's logit bias: ids (k,), values (k,) float32

    def __post_init__(self) -> None:
        if self.request.grammar is not None and self.grammar is None:
            self.grammar = self.request.grammar.start(self.eos)
        if self.params.logit_bias and self.bias is None:
            device = self.request.input_ids.device
            ids, values = zip(*self.params.logit_bias.items(), strict=True)
            self.bias = (torch.tensor(ids, device=device),
                         torch.tensor(values, dtype=torch.float32, device=device))  # fmt: skip

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def sampling(self) -> RowSampling:
        p = self.params
        return RowSampling(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            repetition_penalty=p.repetition_penalty,
            banned=sorted(self.eos) if len(self.tokens) < p.min_tokens else [],
            generator=self.generator,
            logprobs=p.logprobs,
            bias=self.bias,
        )

    def timings(self, now: float) -> dict[str, float]:
        req = self.request
        out = {"arrival": req.arrival, "queue_time": self.admitted - req.arrival_clock, "e2e": now - req.arrival_clock}
        if self.first_token is not None:
            out["ttft"] = self.first_token - req.arrival_clock
            if len(self.tokens) > 1:
                out["itl_mean"] = (self.last_token - self.first_token) / (len(self.tokens) - 1)
        return out


def make_deltas(tokenizer: Detokenizer | None, params: SamplingParams) -> TextDeltas | None:
    if tokenizer is None:
        return None
    cls = TextDeltas if params.skip_special_tokens else SpecialDeltas
    return cls(tokenizer, stop_strings=params.stop)
