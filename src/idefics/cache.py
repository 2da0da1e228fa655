"""Caches for decoding: self-attention K/V per decoder layer, image K/V per gated cross-attention layer.

The self-attention cache is one preallocated (b, h, capacity, hd) buffer per layer for K and for V; a forward writes
its new positions in place and attends over the filled prefix. (Separate buffers per layer, rather than one stacked
tensor, let torch.compile update each in place instead of rewriting a whole stacked buffer.) The image cache holds
each gated layer's projected (and, with `qk_layer_norms`, normalised) image keys and values, computed once per request.
"""

from __future__ import annotations

import torch


class KVCache:
    """Self-attention keys and values for every decoder layer, updated in place."""

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, num_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # L x (b, h, T, hd)
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # positions filled, identical for every layer and row
        # Static mode (for torch.compile / CUDA graphs): writes go to the device tensor `pos` and attention reads
        # the whole buffer under a mask, so every decode step has the same shapes and addresses.
        self.static = False
        self.pos = torch.zeros(1, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                bufs[i] = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
                bufs[i][:, :, : self.length] = old[:, :, : self.length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (b, h, t, hd) after the filled prefix; return this layer's (b, h, length + t, hd) views
        (static mode: t == 1 written at `pos`, the whole (b, h, capacity, hd) buffers returned)."""
        k_buf, v_buf = self.k[layer], self.v[layer]
        if self.static:
            k_buf.index_copy_(2, self.pos, k)
            v_buf.index_copy_(2, self.pos, v)
            return k_buf, v_buf
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            self._grow(end)
            k_buf, v_buf = self.k[layer], self.v[layer]
        k_buf[:, :, start:end] = k
        v_buf[:, :, start:end] = v
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def advance(self, t: int) -> None:
        """Mark t more positions as filled; called once per forward, after every layer wrote them."""
        self.length += t
        self.pos.fill_(self.length)

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the batch rows in place (beam search): row i becomes old row index[i]."""
        for buf in (*self.k, *self.v):
            filled = buf[:, :, : self.length]
            filled.copy_(filled.index_select(0, index))

    @property
    def nbytes(self) -> int:
        return sum(buf.nbytes for buf in (*self.k, *self.v))


class IdeficsCache:
    """Everything a request keeps between forwards: self-attention K/V, image K/V and the last image mask row."""

    def __init__(self, kv: KVCache):
        self.kv = kv
        self.image_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per gated layer: (b, h, n*s, hd) x2
        self.image_hidden_states: torch.Tensor | None = None  # (b, n, s, d), the perceiver's output
        self.last_image_mask: torch.Tensor | None = None  # (b, n): which images the latest token attends to

    def get_seq_length(self) -> int:
        return self.kv.length

    def reorder(self, index: torch.Tensor) -> None:
        self.kv.reorder(index)
        if self.image_kv is not None:
            self.image_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.image_kv]
        if self.image_hidden_states is not None:
            self.image_hidden_states = self.image_hidden_states.index_select(0, index)
        if self.last_image_mask is not None:
            self.last_image_mask = self.last_image_mask.index_select(0, index)

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by part: {"self_attention": ..., "image": ..., "total": ...}."""
        image = sum(k.nbytes + v.nbytes for k, v in self.image_kv or [])
        return {"self_attention": self.kv.nbytes, "image": image, "total": self.kv.nbytes + image}
