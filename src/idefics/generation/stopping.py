"""When a row is done: an EOS id, or a stop string completed by its latest token."""

from __future__ import annotations

from typing import Protocol

import torch


class Detokenizer(Protocol):
    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str: ...


class StopStrings:
    """Finds rows whose generated text now contains a stop string that ends inside the latest token's text."""

    def __init__(self, stop_strings: list[str], tokenizer: Detokenizer):
        self.stop_strings = stop_strings
        self.tokenizer = tokenizer
        # Each token decodes to >= 1 character, or a byte-fallback piece of >= 1/4 character: this window suffices.
        self.window = 4 * max(len(s) for s in stop_strings) + 4

    def __call__(self, generated: list[list[int]]) -> list[bool]:
        hits = []
        for ids in generated:
            tail = ids[-self.window :]
            text = self.tokenizer.decode(tail)
            before = len(self.tokenizer.decode(tail[:-1])) if len(tail) > 1 else 0
            hits.append(any(0 <= text.rfind(s) and text.rfind(s) + len(s) > before for s in self.stop_strings))
        return hits


def eos_hits(tokens: torch.Tensor, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """tokens (rows,) -> bool (rows,)."""
    if eos_ids is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, eos_ids)
