"""The engine's cache: a fixed number of slots, each holding one running sequence.

Per decoder layer, self-attention keys and values live in one (slots, h, S, hd) buffer per K and V; each slot has its
own length, and its new token is written at its own position (no left padding between requests). Per gated layer,
a slot's image keys and values live in (slots, h, N*s, hd) buffers (N = the most images a request may carry, s image
tokens per image), with a mask over those N*s tokens and a gate that is off when the slot's tokens see no image. The
requests admitted together are prefilled as one batch (prefill.py); each row is copied into the slot(s) it was given.
With `retain` (the prefix cache, prefix.py) every slot also records the token and image view at each filled
position, and a freed slot keeps its K/V and record until it is given to another request (least recently used first).

Legend: B decode rows (slots 0..B-1), S positions per slot, T positions attended this step, M image tokens attended
(N*s at most), h heads, hd head width, v vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from ..generation.step import DecodeState
from .prefix import PREFIX_MIN_TOKENS, PrefixStats, PromptRecord, common_prefix


def image_tokens_per_image(config) -> int:
    """s: latents with a perceiver, else the vision tower's CLS + patch tokens."""
    if config.use_resampler:
        return config.perceiver_config.resampler_n_latents
    return config.vision_config.num_patches + 1


class SlotCache:
    """Preallocated K/V for `num_slots` sequences of up to `max_len` positions and `max_images` images each."""

    def __init__(self, model, *, num_slots: int, max_len: int, max_images: int, retain: bool = False):
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
        self.lengths = [0] * num_slots  # host copy of the filled positions per slot (a freed slot's record with retain)
        self.images = [0] * num_slots  # images per slot (host)
        # the image-cache keys of the images whose K/V each slot's image buffers hold (None: unknown), kept when the
        # slot is freed: a chat's next turn in the same slot reuses them without projecting again
        self.image_ids: list[tuple[str, ...] | None] = [None] * num_slots
        self._free = set(range(num_slots))
        # the prefix cache: what each slot's positions hold, and when each slot was last freed (a counter, not time)
        self.retain = retain
        self.record_tokens = np.zeros((num_slots, max_len), dtype=np.int64)  # (slots, S)
        self.record_views = np.zeros((num_slots, max_len), dtype=np.int64)
        self.last_view = [0] * num_slots  # the view of the tokens a slot decodes (its prompt's last)
        self.freed_at = [-1] * num_slots
        self._clock = 0
        self.prefix_stats = PrefixStats()

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

    @property
    def free_slots(self) -> list[int]:
        return sorted(self._free)

    def allocate(self, n: int, record: PromptRecord | None = None) -> list[int]:
        """n free slots (ValueError when fewer are free): the lowest ones; with `retain` and a prompt's record, first
        the free slot sharing its longest prefix (PREFIX_MIN_TOKENS at least), then the least recently freed ones."""
        if n > len(self._free):
            raise ValueError(f"{n} slots asked for, {len(self._free)} free")
        free = sorted(self._free)
        if not self.retain or record is None:
            chosen = free[:n]
        else:
            shared = self.shared_prefix(record)
            best = max(free, key=lambda s: (shared[s], -s))
            first = [best] if shared[best] >= PREFIX_MIN_TOKENS else []
            chosen = first + sorted((s for s in free if s not in first), key=lambda s: (self.freed_at[s], s))
            chosen = chosen[:n]
            self.prefix_stats.evictions += sum(1 for s in chosen if self.lengths[s] and s not in first)
        self._free.difference_update(chosen)
        return chosen

    def release(self, slot: int) -> None:
        """Free a slot; with `retain` it keeps its K/V and record (at most S - 1 positions: a free slot's decode
        writes, unread, at its length)."""
        self.images[slot] = 0
        self.lengths[slot] = min(self.lengths[slot], self.max_len - 1) if self.retain else 0
        self.freed_at[slot], self._clock = self._clock, self._clock + 1
        self._free.add(slot)

    def forget(self, slot: int) -> None:
        """Drop a slot's record (its K/V may be partly written)."""
        self.lengths[slot] = 0
        self.image_ids[slot] = None

    # -- records (the prefix cache) --------------------------------------------------------------------------------
    def shared_prefix(self, record: PromptRecord) -> np.ndarray:
        """(slots,) positions each slot's record shares with the prompt's."""
        return common_prefix(self.record_tokens, self.record_views, np.asarray(self.lengths), record)

    def set_record(self, slot: int, record: PromptRecord) -> None:
        t = len(record)
        self.record_tokens[slot, :t] = record.tokens
        self.record_views[slot, :t] = record.views
        self.last_view[slot] = int(record.views[-1])
        self.lengths[slot] = t

    def advance(self, slots: list[int], tokens: list[int]) -> None:
        """Slots `slots` were each fed one token (a decode step): record it and count the position."""
        for s, token in zip(slots, tokens, strict=True):
            position = self.lengths[s]
            self.record_tokens[s, position] = token
            self.record_views[s, position] = self.last_view[s]
            self.lengths[s] = position + 1

    @property
    def retained_bytes(self) -> int:
        """Bytes of self-attention K/V that free slots keep for reuse."""
        width = 2 * len(self.k) * self.k[0][0, :, 0].nbytes  # per position, every layer's K and V
        return width * sum(self.lengths[s] for s in self._free) if self.retain else 0

    # -- writes ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def load(self, slot: int, state: DecodeState, length: int, *, row: int = 0, offset: int = 0,
             images: int | None = None, keys: tuple[str, ...] | None = None) -> None:  # fmt: skip
        """Copy row `row` of a prefill's cache into `slot`: its `length` positions (from `offset`, after its left
        padding), its first `images` images' K/V (default: all; `keys` names them) and the image mask of its last
        token."""
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
        self.image_ids[slot] = () if not images else tuple(keys) if keys is not None and len(keys) == images else None

    @torch.inference_mode()
    def copy_positions(self, src: int, dst: int, length: int) -> None:
        """Slot dst's first `length` positions (K/V in every layer, and the record) become slot src's."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
        self.record_tokens[dst, :length] = self.record_tokens[src, :length]
        self.record_views[dst, :length] = self.record_views[src, :length]

    @torch.inference_mode()
    def set_images(self, slot: int, image_kv: list[tuple[torch.Tensor, torch.Tensor]] | None, last: torch.Tensor, *,
                   keys: tuple[str, ...] | None = None) -> None:  # fmt: skip
        """A slot's image K/V (per gated layer (1, h, n*s, hd); None: the slot holds them already, as `keys` says) and
        the images its next tokens see, last (n,) 0/1."""
        images = last.shape[0]
        m = images * self.image_tokens
        if image_kv is None:
            if keys is None or self.image_ids[slot] != keys:
                raise ValueError(f"slot {slot} does not hold the K/V of images {keys}")
        else:
            for dst_k, dst_v, (src_k, src_v) in zip(self.image_k, self.image_v, image_kv, strict=True):
                dst_k[slot, :, :m] = src_k[0]
                dst_v[slot, :, :m] = src_v[0]
            self.image_ids[slot] = keys
        self.image_mask[slot] = False
        self.image_mask[slot, :m] = last.bool().repeat_interleave(self.image_tokens)
        self.gate[slot] = bool(last.any())
        self.images[slot] = images

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
