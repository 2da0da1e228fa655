"""Prefix reuse: a prompt that starts like a sequence already in a slot reuses that slot's self-attention K/V.

Design (per-slot prefixes): every slot remembers what its filled positions hold, running or free, as two integer
rows: the token id at each position and a "view" id naming the images that position's token attends to (0: none;
else a hash of those images' keys). A finished request's slot keeps its K/V and its record; a new prompt matches the
longest common prefix over every slot's record (tokens and views both equal, so a changed image is a miss), takes the
matching slot itself when it is free (no copy), or copies that prefix from a running or allocated-elsewhere slot,
and prefills only the rest. The slots are the cache: it costs no memory beyond them, and it is bounded by them; a free
slot is given to a new request least recently used first (so the freshest conversations are kept), and overwriting a
free slot's record is an eviction. Chosen over block-hashed pages (vLLM) and a radix tree (SGLang) because the slot
cache is contiguous per slot (a paged prefix would be copied into the slot anyway) and because a chat client's next
turn finds its whole history in the slot its last turn used (measured: BENCHMARKS.md, benchmarks/multiturn.py).

Deterministic: records change only inside the operations that fill slots (prefill into slots, one decode step,
release), and matching compares integers; tensor-parallel ranks replaying those operations choose the same prefixes.

Legend: t prompt tokens, n images, S positions per slot.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

PREFIX_MIN_TOKENS = 8  # shorter matches are prefilled whole with the other misses: a copy and a second forward
# in the step would cost more than they save


@dataclass(frozen=True)
class PromptRecord:
    """What a prompt's positions hold, for matching: token ids and image views, each (t,) int64."""

    tokens: np.ndarray
    views: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def view_id(keys: tuple[str, ...]) -> int:
    """0 for no image, else a 63-bit hash of the attended images' keys (the same in every process)."""
    if not keys:
        return 0
    digest = hashlib.blake2b("|".join(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1 or 1


def prompt_record(input_ids: torch.Tensor, image_attention_mask: torch.Tensor | None, keys: tuple[str, ...]):
    """input_ids (1, t), image_attention_mask (1, t, n) or None, the n image keys -> PromptRecord."""
    tokens = input_ids[0].cpu().numpy().astype(np.int64)
    views = np.zeros(len(tokens), dtype=np.int64)
    if image_attention_mask is not None and keys:
        rows, inverse = torch.unique(image_attention_mask[0].bool().cpu(), dim=0, return_inverse=True)  # (u, n), (t,)
        ids = [view_id(tuple(k for k, seen in zip(keys, row.tolist(), strict=True) if seen)) for row in rows]
        views = np.asarray(ids, dtype=np.int64)[inverse.numpy()]
    return PromptRecord(tokens, views)


def common_prefix(tokens: np.ndarray, views: np.ndarray, lengths: np.ndarray, record: PromptRecord) -> np.ndarray:
    """Per slot, how many leading positions its record (tokens, views: (slots, S), `lengths` filled) shares with
    `record`, at most len(record) - 1 (the last prompt token is always run: its logits are the first token's)."""
    m = min(len(record) - 1, tokens.shape[1])
    if m <= 0:
        return np.zeros(len(lengths), dtype=np.int64)
    same = (tokens[:, :m] == record.tokens[:m]) & (views[:, :m] == record.views[:m])  # (slots, m)
    same &= np.arange(m) < lengths[:, None]
    return np.cumprod(same, axis=1).sum(axis=1)  # (slots,)


class PrefixStats:
    """Counters of the prefix cache (engine thread writes; `snapshot` may be read from any thread)."""

    def __init__(self):
        self.hits = self.misses = self.evictions = self.tokens_reused = 0
        self.copied = 0  # hits whose prefix was copied from another slot (the others reused their own slot)

    def snapshot(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "tokens_reused": self.tokens_reused, "copied": self.copied}  # fmt: skip
