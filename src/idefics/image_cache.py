"""Encode each image once: a byte-bounded LRU cache of encoded images, keyed by a hash of the preprocessed pixels.

An entry is what the gated layers attend to for one image: the perceiver's output (s latents, d_img), or the vision
tower's output for a model without a resampler. Each gated layer's image keys/values are projected from it on use:
they are 21x its size on the bench model (52x on idefics-9b) and take 6% of the encoding's time there (NOTES in
BENCHMARKS.md), so a cache of the same bytes holds 21x more images for the cost of one matmul per gated layer.

The key is a hash of the pixel tensor itself (its shape, dtype and bytes) and of `interpolate_pos_encoding`, so it
changes whenever the encoder's input would: another image, another image size or processor setting (resize,
normalisation), another dtype. It does not name the model: a cache belongs to one model's weights (an Engine owns
one; pass the same one to `generate()` only for the same model).

Deterministic: hits, misses, inserts and evictions depend only on the sequence of calls and their keys (never on
time), so every process that replays the same calls (tensor-parallel ranks) makes the same decisions; each process
counts the bytes of its own tensors. Entries in use (between `lookup` and `release`) are never evicted; an entry that
cannot fit without evicting one in use is not inserted, so `bytes <= max_bytes` always holds.

Legend: N images, s image tokens per image, d_img their width, r image size.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter, OrderedDict

import torch


def image_key(pixels: torch.Tensor, *, interpolate_pos_encoding: bool = False) -> str:
    """A hash of one preprocessed image (3, r, r): its shape, dtype and bytes, and the encoder setting."""
    flat = pixels.detach().contiguous().cpu().reshape(-1).view(torch.uint8)  # the raw bytes, any dtype
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(pixels.shape)}|{pixels.dtype}|{int(interpolate_pos_encoding)}|".encode())
    h.update(flat.numpy().data)
    return h.hexdigest()


def image_keys(pixel_values: torch.Tensor, *, interpolate_pos_encoding: bool = False) -> list[list[str]]:
    """Keys of every image of a batch (b, n, 3, r, r): b lists of n."""
    return [[image_key(x, interpolate_pos_encoding=interpolate_pos_encoding) for x in row] for row in pixel_values]


class ImageCache:
    """Encoded images by key, least recently used first out, within `max_bytes` (0: off, nothing is kept)."""

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"ImageCache max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # oldest first
        self._in_use: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def lookup(self, keys: list[str]) -> list[torch.Tensor | None]:
        """The cached states (s, d_img) of each key, or None; the hits are in use until `release(keys)`."""
        out = []
        with self._lock:
            for key in keys:
                states = self._entries.get(key)
                if states is None:
                    self.misses += 1
                else:
                    self.hits += 1
                    self._entries.move_to_end(key)
                self._in_use[key] += 1
                out.append(states)
        return out

    def insert(self, key: str, states: torch.Tensor) -> bool:
        """Keep `states` under `key`, evicting the least recently used entries not in use; False when it cannot fit
        (off, larger than the cache, or the room is held by entries in use)."""
        size = states.nbytes
        with self._lock:
            if key in self._entries:
                return True
            if size > self.max_bytes:
                return False
            victims, room = [], self.max_bytes - self.bytes
            for old, tensor in self._entries.items():  # oldest first
                if room >= size:
                    break
                if not self._in_use[old]:
                    victims.append(old)
                    room += tensor.nbytes
            if room < size:
                return False
            for old in victims:
                self.bytes -= self._entries.pop(old).nbytes
                self.evictions += 1
            self._entries[key] = states
            self.bytes += size
            return True

    def release(self, keys: list[str]) -> None:
        """End the use `lookup(keys)` began."""
        with self._lock:
            for key in keys:
                self._in_use[key] -= 1
                if not self._in_use[key]:
                    del self._in_use[key]

    def clear(self) -> None:
        """Drop every entry not in use (the counters stay)."""
        with self._lock:
            for key in [k for k in self._entries if not self._in_use[k]]:
                self.bytes -= self._entries.pop(key).nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        """hits, misses, evictions, entries, bytes and max_bytes."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes}  # fmt: skip


@torch.inference_mode()
def encode_cached(model, pixel_values: torch.Tensor, keys: list[str], cache: ImageCache | None, *,
                  interpolate_pos_encoding: bool = False) -> torch.Tensor:  # fmt: skip
    """Images (1, N, 3, r, r) -> their states (1, N, s, d_img), encoding only those `cache` lacks (in one call);
    without a cache, all of them. The same image twice in one call is encoded once."""
    backbone = model.model
    if cache is None:
        return backbone.encode_images(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    found = cache.lookup(keys)
    try:
        first: dict[str, int] = {}  # each missing key -> its first image
        for i, (key, states) in enumerate(zip(keys, found, strict=True)):
            if states is None and key not in first:
                first[key] = i
        fresh: dict[str, torch.Tensor] = {}
        if first:
            index = torch.tensor(list(first.values()), device=pixel_values.device)
            encoded = backbone.encode_images(
                pixel_values=pixel_values.index_select(1, index), interpolate_pos_encoding=interpolate_pos_encoding
            )  # (1, M, s, d)
            for key, states in zip(first, encoded[0], strict=True):
                fresh[key] = states.clone()  # its own storage: the cache's bytes are exactly what it holds
                cache.insert(key, fresh[key])
        states = [x if x is not None else fresh[key] for key, x in zip(keys, found, strict=True)]
        return torch.stack(states)[None]  # (1, N, s, d)
    finally:
        cache.release(keys)
