"""The engine's cache: a fixed number of slots, each holding one running sequence.

Per decoder layer, self-attention keys and values live in one (slots, h, S, hd) buffer per K and V; each slot has its
own length, and its new token is written at its own position (no left padding between requests). Per gated layer,
a slot's image keys and values live in (slots, h, N*s, hd) buffers (N = the most images a request may carry, s image
tokens per image), with a mask over those N*s tokens and a gate that is off when the slot's tokens see no image. The
requests admitted together are prefilled as one batch (prefill.py); each row is copied into the slot(s) it was given.

Legend: B decode rows (slots 0..B-1), S positions per slot, T positions attended this step, M image tokens attended
(N*s at most), h heads, hd head width, v vocabulary.
"""

from __future__ import annotations

import heapq

import torch

from ..generation.step import DecodeState


def image_tokens_per_image(config) -> int:
    """s: latents with a perceiver, else the vision tower's CLS + patch tokens."""
    if config.use_resampler:
        return config.perceiver_config.resampler_n_latents
    return config.vision_config.num_patches + 1


class SlotCache:
    """Preallocated K/V for `num_slots` sequences of up to `max_len` positions and `max_images` images each."""

    def __init__(self, model, *, num_slots: int, max_len: int, max_images: int):
        c = model.config
        dtype, device = model.dtype, model.device  # the activations' (embeddings') dtype; an int8 LM head's is int8
        h, hd = model.model.num_heads, c.head_dim  # this rank's heads under tensor parallelism
        self.num_slots, self.max_len, self.max_images = num_slots, max_len, max_images
        self.image_tokens = image_tokens_per_image(c)  # s
        m = max_images * self.image_tokens
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        self.k = [zeros(num_slots, h, max_len, hd) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]  # L x (slots, h, S, hd)
        self.image_k = [zeros(num_slots, h, m, hd) for _ in range(c.num_cross_layers)]
        self.image_v = [torch.zeros_like(k) for k in self.image_k]  # G x (slots, h, N*s, hd)
        self.image_mask = torch.zeros(num_slots, m, dtype=torch.bool, device=device)  # image tokens a slot sees
        self.gate = torch.zeros(num_slots, dtype=torch.bool, device=device)  # does the slot see any image
        self.positions = torch.zeros(num_slots, dtype=torch.long, device=device)  # where each slot writes next
        self.rows = torch.arange(num_slots, device=device)
        self.lengths = [0] * num_slots  # host copy of the filled positions per slot
        self.images = [0] * num_slots  # images per slot (host)
        self._free = list(range(num_slots))  # a heap: the lowest free slots are used first, keeping B small

    @staticmethod
    def bytes_per_slot(model, *, max_len: int, max_images: int) -> int:
        """What one slot's buffers take: self-attention K/V for `max_len` positions in every decoder layer and image
        K/V for `max_images` images in every gated layer (plus its image mask)."""
        c = model.config
        width = model.model.num_heads * c.head_dim * model.dtype.itemsize  # bytes per position per K (this rank's)
        m = max_images * image_tokens_per_image(c)
        return 2 * width * (c.num_hidden_layers * max_len + c.num_cross_layers * m) + m

    # -- allocation ------------------------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """The n lowest free slots (ValueError when fewer are free)."""
        if n > len(self._free):
            raise ValueError(f"{n} slots asked for, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(n)]

    def release(self, slot: int) -> None:
        self.lengths[slot] = self.images[slot] = 0
        heapq.heappush(self._free, slot)

    # -- writes ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def load(self, slot: int, state: DecodeState, length: int, *, row: int = 0, offset: int = 0,
             images: int | None = None) -> None:  # fmt: skip
        """Copy row `row` of a prefill's cache into `slot`: its `length` positions (from `offset`, after its left
        padding), its first `images` images' K/V (default: all) and the image mask of its last token."""
        kv = state.cache.kv
        for dst_k, dst_v, src_k, src_v in zip(self.k, self.v, kv.k, kv.v, strict=True):
            dst_k[slot, :, :length] = src_k[row, :, offset : offset + length]
            dst_v[slot, :, :length] = src_v[row, :, offset : offset + length]
        self.image_mask[slot] = False
        self.gate[slot] = False
        if state.cache.image_kv is None:
            images = 0
        elif images is None:
            images = state.cache.image_hidden_states.shape[1]
        if images:
            m = images * self.image_tokens
            for dst_k, dst_v, (src_k, src_v) in zip(self.image_k, self.image_v, state.cache.image_kv, strict=True):
                dst_k[slot, :, :m] = src_k[row, :, :m]
                dst_v[slot, :, :m] = src_v[row, :, :m]
            self.image_mask[slot, :m] = state.cross_mask[row, 0, 0, :m]
            self.gate[slot] = state.gate[row, 0]
        self.lengths[slot], self.images[slot] = length, images

    @property
    def nbytes(self) -> int:
        bufs = (*self.k, *self.v, *self.image_k, *self.image_v)
        return sum(b.nbytes for b in bufs) + self.image_mask.nbytes + self.gate.nbytes


class SlotStep:
    """The K/V interface `run_layers` expects, for one decode step over slots 0..B-1 attending to T positions:
    each row's new K/V (B, h, 1, hd) is written at its own position, and the (B, h, T, hd) views are returned."""

    static = False  # (KVCache's flag) the views returned already span exactly the positions attended

    def __init__(self, cache: SlotCache, rows: int, length: int):
        self.cache, self.b, self.t = cache, rows, length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, b = self.cache, self.b
        rows, pos = c.rows[:b], c.positions[:b]
        k_buf, v_buf = c.k[layer], c.v[layer]
        k_buf[rows, :, pos] = k[:, :, 0]  # (B, h, hd) at (row, :, pos[row])
        v_buf[rows, :, pos] = v[:, :, 0]
        return k_buf[:b, :, : self.t], v_buf[:b, :, : self.t]


def slot_decode(model, cache: SlotCache, tokens: torch.Tensor, rows: int, length: int, images: int) -> torch.Tensor:
    """One decode step for slots 0..rows-1: tokens (B,) at `cache.positions[:B]`, attending to the first `length`
    positions and the first `images` image slots; returns the next logits (B, v) in float32. Fixed shapes for
    fixed (rows, length, images): compilable and capturable as a CUDA graph."""
    backbone = model.model
    pos = cache.positions[:rows]  # (B,)
    x = backbone.embed_tokens(tokens[:, None])  # (B, 1, d)
    rope = backbone.rotary_emb(pos[:, None], x.dtype)
    mask = (torch.arange(length, device=pos.device) <= pos[:, None])[:, None, None, :]  # (B, 1, 1, T)
    image_kv = cross_mask = gate = None
    if images:
        m = images * cache.image_tokens
        image_kv = [(k[:rows, :, :m], v[:rows, :, :m]) for k, v in zip(cache.image_k, cache.image_v, strict=True)]
        gate = cache.gate[:rows]  # (B,)
        # Rows that see no image attend to every image token (finite output) and the gate zeroes the result.
        cross_mask = (cache.image_mask[:rows, :m] | ~gate[:, None])[:, None, None, :]  # (B, 1, 1, M)
        gate = gate[:, None]  # (B, 1)
    x = backbone.run_layers(x, rope, mask, SlotStep(cache, rows, length), None, image_kv, cross_mask, gate)
    return model.lm_head(backbone.norm(x))[:, -1].float()
