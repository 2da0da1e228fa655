"""Constraints compiled with llguidance for one tokenizer, and the per-row state that masks each step's logits.

`GrammarCompiler.compile` turns a `Constraint` into a `Grammar` (compiled once per distinct constraint and
tokenizer, thread-safe: concurrent requests for one schema wait for the same compile). Each generated row starts its
own `GrammarState` from it. Every step, `fill_bitmask` asks llguidance for the allowed tokens of every constrained
row at once (in its thread pool, without the GIL) and `apply_bitmask_` sets the others' logits to -inf in place;
after the token is chosen, `GrammarState.accept` advances the row and says whether the output is complete.

The row's own end ids (EOS, `<end_of_utterance>`, stop_token_ids) are allowed exactly when the output so far is
complete; an output that nothing can extend finishes its row at once, without spending a step on EOS.

Legend: r rows, v the logits' width (the tokenizer's tokens plus the model's additional rows), w = ceil(v / 32).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future

import numpy as np
import torch

from .constraints import Constraint, ConstraintError

CACHE_SIZE = 256  # compiled grammars kept per tokenizer (least recently used dropped first)
PARALLEL_ROWS = 8  # constrained rows from which their masks are computed in llguidance's thread pool
_SHIFTS: dict[torch.device, torch.Tensor] = {}


class GrammarError(RuntimeError):
    """A row's grammar refused a token or failed while generating (not the request's fault)."""


class GrammarCompiler:
    """Compiles constraints for one tokenizer and logits width, caching each compiled grammar."""

    def __init__(self, tokenizer, vocab_size: int, *, cache_size: int = CACHE_SIZE):
        from llguidance import LLTokenizer
        from tokenizers import Tokenizer

        raw = getattr(tokenizer, "_tokenizer", tokenizer)  # an IdeficsTokenizer or a tokenizers.Tokenizer
        if not isinstance(raw, Tokenizer):
            raise TypeError(f"constraints need an IdeficsTokenizer or a tokenizers.Tokenizer, got {type(raw).__name__}")
        raw = Tokenizer.from_str(raw.to_str())
        raw.no_padding()
        raw.no_truncation()
        eos = getattr(tokenizer, "eos_token", None)
        eos_id = raw.token_to_id(eos) if eos else None
        self.vocab_size = vocab_size
        self.width = max(vocab_size, raw.get_vocab_size(with_added_tokens=True))  # bits llguidance writes per row
        self.words = -(-self.width // 32)
        self.eos_id = eos_id if eos_id is not None else 0
        self.tokenizer = LLTokenizer(raw.to_str(), n_vocab=self.width, eos_token=self.eos_id)
        word = raw.encode("x", add_special_tokens=False).ids  # "▁x" with a SentencePiece-style tokenizer
        self.leading_space = self.tokenizer.decode_bytes(word).startswith(b" ") and raw.decode(word) == "x"
        self.cache_size = cache_size
        self._cache: OrderedDict[Constraint, Future] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> Grammar:
        """The compiled grammar (from the cache when this constraint was compiled before); ConstraintError when the
        schema, regex or choices cannot be compiled."""
        with self._lock:
            future = self._cache.get(constraint)
            owner = future is None
            if owner:
                future = self._cache[constraint] = Future()
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(constraint)
        if owner:
            try:
                future.set_result(self._build(constraint))
            except BaseException as err:
                with self._lock:
                    self._cache.pop(constraint, None)  # a failure is not cached: the error is raised to each caller
                future.set_exception(err)
        return future.result()

    def cached(self, constraint: Constraint) -> bool:
        with self._lock:
            future = self._cache.get(constraint)
            return future is not None and future.done() and future.exception() is None

    def _build(self, constraint: Constraint) -> Grammar:
        from llguidance import LLMatcher

        start = time.perf_counter()
        try:
            text = constraint.grammar(leading_space=self.leading_space)
        except ValueError as err:
            raise ConstraintError(str(err), param=constraint.param) from None
        matcher = LLMatcher(self.tokenizer, text, log_level=0)
        if not matcher.is_error():  # the first mask builds the lexer's first states, shared by every row's copy
            scratch = torch.empty(self.words, dtype=torch.int32)
            matcher.unsafe_compute_mask_ptr(scratch.data_ptr(), self.words * 4)
        if matcher.is_error():
            raise ConstraintError(f"invalid {constraint.kind.replace('_', ' ')}: {_one_line(matcher.get_error())}",
                                  param=constraint.param)  # fmt: skip
        return Grammar(constraint, matcher, self, seconds=time.perf_counter() - start)


class Grammar:
    """A compiled constraint; `start` gives a fresh state for one row. `seconds`: the compile's wall time."""

    def __init__(self, constraint: Constraint, matcher, compiler: GrammarCompiler, *, seconds: float):
        self.constraint, self._matcher, self.compiler, self.seconds = constraint, matcher, compiler, seconds

    def start(self, end_ids: Iterable[int]) -> GrammarState:
        """The state of a row that ends on any of `end_ids` (its EOS ids) once the output is complete."""
        return GrammarState(self._matcher.deep_copy(), self.compiler, end_ids)


class GrammarState:
    """One row's position in its grammar."""

    def __init__(self, matcher, compiler: GrammarCompiler, end_ids: Iterable[int]):
        self.matcher, self.compiler = matcher, compiler
        self.end_ids = sorted({i for i in end_ids if 0 <= i < compiler.width})
        self.tokens = 0

    @property
    def complete(self) -> bool:
        """Whether the output so far satisfies the constraint (an end id may come next)."""
        return self.matcher.is_accepting()

    def accept(self, token: int) -> bool:
        """Advance past the chosen token; True when the output is complete and nothing can extend it."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token} after {self.tokens} tokens: "
                               f"{_one_line(self.matcher.get_error())}")  # fmt: skip
        self.tokens += 1
        return self.matcher.is_stopped()

    def fix_ends(self, words: np.ndarray) -> None:
        """Allow this row's end ids in its bitmask words (w,) uint32 exactly when the output is complete (llguidance
        knows only the tokenizer's EOS)."""
        complete = self.complete
        eos = self.compiler.eos_id
        if eos not in self.end_ids:
            words[eos >> 5] &= np.uint32(~(1 << (eos & 31)) & 0xFFFFFFFF)
        for i in self.end_ids:
            bit = np.uint32(1 << (i & 31))
            words[i >> 5] = words[i >> 5] | bit if complete else words[i >> 5] & ~bit


def new_bitmask(rows: int, compiler: GrammarCompiler) -> torch.Tensor:
    """(r, w) int32, every token allowed."""
    return torch.full((rows, compiler.words), -1, dtype=torch.int32)


def fill_bitmask(bitmask: torch.Tensor, states: list[tuple[int, GrammarState]]) -> None:
    """Write the allowed tokens of each (row, state) into bitmask (r, w) int32 (CPU); other rows are left as they
    are. Many rows on many cores go through llguidance's thread pool (in parallel, without the GIL); otherwise they
    are computed here, one after the other (on 2 cores the pool's wake-ups cost more than the masks: 16 rows of the
    bench schema took 0.12 ms here against 0.20 ms median and 0.95 ms mean through the pool)."""
    if not states:
        return
    words = bitmask.shape[1]
    if len(states) >= PARALLEL_ROWS and (os.cpu_count() or 1) > 2:
        _executor().unsafe_compute_mask_ptr([(s.matcher, row) for row, s in states], bitmask.data_ptr(), words * 4,
                                            bitmask.shape[0])  # fmt: skip
    else:
        for row, state in states:
            state.matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), words * 4)
    view = bitmask.numpy().view(np.uint32)  # (r, w), shares memory
    for row, state in states:
        state.fix_ends(view[row])


@torch.inference_mode()  # the logits come out of inference-mode steps
def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits (r, v) of tokens the bitmask (r, w) int32 (CPU) leaves out to -inf, in place; returns logits.
    On CPU numpy unpacks the bits and writes the -inf in one single-threaded pass (no OpenMP region, which costs more
    than the work on a busy machine); on a GPU the words are copied over (32x less than a mask) and unpacked there."""
    v = logits.shape[1]
    if logits.device.type == "cpu":
        banned = np.unpackbits((~bitmask.numpy()).view(np.uint8), axis=1, bitorder="little")[:, :v].view(np.bool_)
        if logits.dtype == torch.float32 and logits.is_contiguous():
            np.copyto(logits.numpy(), -np.inf, where=banned)
            return logits
        return logits.masked_fill_(torch.from_numpy(banned), -float("inf"))
    device = logits.device
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    words = bitmask.to(device, non_blocking=True)
    allowed = ((words[:, :, None] >> _SHIFTS[device]) & 1).flatten(1)[:, :v]  # (r, v)
    return logits.masked_fill_(allowed == 0, -float("inf"))


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()
_executor_instance = None


def compiler_for(tokenizer, vocab_size: int) -> GrammarCompiler:
    """The shared compiler (and cache) of this tokenizer for logits of width vocab_size."""
    if tokenizer is None:
        raise ValueError("constraints need a tokenizer: pass tokenizer= (or use the processor's)")
    with _compilers_lock:
        per_width = _compilers.setdefault(tokenizer, {})
        if vocab_size not in per_width:
            per_width[vocab_size] = GrammarCompiler(tokenizer, vocab_size)
        return per_width[vocab_size]


def _executor():
    global _executor_instance
    if _executor_instance is None:
        from llguidance import LLExecutor

        _executor_instance = LLExecutor()
    return _executor_instance


def _one_line(message: str, limit: int = 400) -> str:
    """llguidance's multi-line error (with a caret diagram) as one line."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip()) or "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."
