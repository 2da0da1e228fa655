"""Prefill into slots: the requests admitted between two decode steps run through the model together.

`prefill_into` is the one operation that fills slots (a tensor-parallel rank replays it with the same arguments and
makes the same cache decisions): every image of every request is looked up in the image cache and the missing ones
are encoded in one call; a request whose prompt shares at least PREFIX_MIN_TOKENS leading positions with a slot's
record (the prefix cache, prefix.py) prefills only the rest, straight into its slot, together with the other such
requests (`slot_prefill`); the others are prefilled as one left-padded batch (`prefill_batch`) and copied into
their slots.

Their prompts are left-padded into one batch (b, T) with an attention mask, so each row keeps rotary positions
0..t_i-1 and never attends to padding. Their images are encoded in one call over all of them (the vision tower and
perceiver see a flat batch of every image), then laid out per row, padded to the batch's most images; a padded image
is attended by no token. The resulting cache is copied slot by slot (`SlotCache.load` with the row's offset).

Legend: b requests, T longest prompt, t_i a request's prompt, n most images in a request, s image tokens per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..generation.step import DecodeState, prefill
from ..image_cache import ImageCache, encode_cached
from ..modeling.masks import image_masks
from .prefix import PREFIX_MIN_TOKENS
from .requests import Request
from .slots import SlotCache


@dataclass
class Prefilled:
    logits: torch.Tensor  # (b, v) float32, each request's next-token logits
    state: DecodeState  # the batch's cache: row i holds request i's positions at offsets[i]..T-1
    offsets: list[int]  # left padding of each row
    images: list[int]  # images of each request


Emit = Callable[[list[int], torch.Tensor], None]  # (request indices, their first-token logits (g, v))

# What one more forward pass costs, in prefilled positions: its fixed part (reading every weight once, the per-call
# work) against the padding it saves. CPU, bench model, 2 threads: a 26-token row alone takes 88 ms, 15 rows of 59
# tokens ~1.0 s (~1.1 ms a position), so a pass costs ~50-60 positions there. On an accelerator a position costs far
# less next to a pass (kernel launches, weight reads), so splitting is worth it only for large padding.
PASS_COST = {"cpu": 64}
PASS_COST_OTHER = 1024


def pass_cost(device: torch.device) -> int:
    return PASS_COST.get(device.type, PASS_COST_OTHER)


def width_groups(widths: list[int], cost: int) -> list[list[int]]:
    """Split rows of these widths into batches (each padded to its widest) so that the padded positions plus `cost`
    per batch are fewest; returns the rows' indices per batch, widest batch first, each in the given order. Optimal
    over batches of consecutive widths in sorted order (the best split is always of that form)."""
    if not widths:
        return []
    order = sorted(range(len(widths)), key=lambda i: (widths[i], i))
    n = len(order)
    best = [0] + [None] * n  # best[j]: the least cost of the first j rows (sorted); cut[j]: where its last batch starts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # the last batch: sorted rows i..j-1, as wide as row j-1
            total = best[i] + (j - i) * widths[order[j - 1]] + cost
            if best[j] is None or total < best[j]:
                best[j], cut[j] = total, i
    groups, j = [], n
    while j:
        groups.append(sorted(order[cut[j] : j]))
        j = cut[j]
    return groups  # the last sorted batch (the widest) first


def padded_tokens(prompt_lengths: list[int], cost: int | None = None) -> int:
    """Positions prompts of these lengths take, padding included, when prefilled in the `width_groups` batches a pass
    cost of `cost` gives (None: as one batch)."""
    groups = width_groups(prompt_lengths, cost) if cost is not None else [list(range(len(prompt_lengths)))]
    return sum(len(g) * max(prompt_lengths[i] for i in g) for g in groups if g)


@torch.inference_mode()
def prefill_into(model, cache: SlotCache, requests: list[Request], slots: list[list[int]],
                 image_cache: ImageCache | None, emit: Emit | None = None) -> torch.Tensor:  # fmt: skip
    """Prefill each request into its slots (request i into slots[i], n of them); returns each request's first-token
    logits (b, v) in float32. Reuses the longest prefix a slot records (with `cache.retain`) and the cached images.
    The requests run in batches of similar width, narrowest first; `emit(indices, logits)` is called after each
    batch with its requests' indices and logits (g, v), so that their first tokens need not wait for the others."""
    states = encode_requests(model, requests, image_cache)
    given = {s for group in slots for s in group}
    logits: list[torch.Tensor | None] = [None] * len(requests)
    batched, reused = [], []  # requests prefilled whole; (request, prefix length) prefilled after a reused prefix
    for i, (request, group) in enumerate(zip(requests, slots, strict=True)):
        start, source = 0, None
        if cache.retain:
            shared = cache.shared_prefix(request.record)
            usable = [s for s in range(cache.num_slots) if s not in given or s == group[0]]
            source = max(usable, key=lambda s: (shared[s], s == group[0], -s))
            start = int(shared[source])
        if start < PREFIX_MIN_TOKENS:
            batched.append(i)
            if cache.retain:
                cache.prefix_stats.misses += 1
            continue
        cache.prefix_stats.hits += 1
        cache.prefix_stats.tokens_reused += start
        if source != group[0]:
            cache.prefix_stats.copied += 1
            cache.copy_positions(source, group[0], start)
        set_slot_images(model, cache, group[0], request, states[i])
        cache.set_record(group[0], request.record)
        reused.append((i, start))
    cost = pass_cost(cache.positions.device)
    for group in reversed(width_groups([requests[i].prompt_tokens - start for i, start in reused], cost)):
        part = [reused[g] for g in group]
        out = slot_prefill(model, cache, [slots[i][0] for i, _ in part], [requests[i] for i, _ in part],
                           [start for _, start in part])  # fmt: skip
        for (i, _), row in zip(part, out, strict=True):
            logits[i] = row
            for other in slots[i][1:]:
                cache.copy_positions(slots[i][0], other, requests[i].prompt_tokens)
                set_slot_images(model, cache, other, requests[i], states[i])
                cache.set_record(other, requests[i].record)
        if emit is not None:
            emit([i for i, _ in part], out)
    for group in reversed(width_groups([requests[i].prompt_tokens for i in batched], cost)):
        part = [batched[g] for g in group]
        batch = prefill_batch(model, [requests[i] for i in part], [states[i] for i in part])
        for row, i in enumerate(part):
            for slot in slots[i]:
                cache.load(slot, batch.state, requests[i].prompt_tokens, row=row, offset=batch.offsets[row],
                           images=batch.images[row], keys=requests[i].image_keys)  # fmt: skip
                cache.set_record(slot, requests[i].record)
            logits[i] = batch.logits[row]
        if emit is not None:
            emit(part, batch.logits)
    return torch.stack(logits)


class SlotWrite:
    """The K/V interface `run_layers` expects, for prefilling rows into their slots: row i (right-aligned in a
    (b, h, u, hd) batch, u_i real columns) is written at positions start_i..start_i+u_i-1 of slot i, and the slots'
    first T positions are returned, (b, h, T, hd) (a view for one row, else gathered)."""

    static = False

    def __init__(self, cache: SlotCache, slots: list[int], starts: list[int], widths: list[int], length: int):
        self.cache, self.slots, self.starts, self.widths, self.t = cache, slots, starts, widths, length
        self.index = torch.tensor(slots, device=cache.positions.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = k.shape[2]
        k_buf, v_buf = self.cache.k[layer], self.cache.v[layer]
        for i, (slot, start, width) in enumerate(zip(self.slots, self.starts, self.widths, strict=True)):
            k_buf[slot, :, start : start + width] = k[i, :, u - width :]
            v_buf[slot, :, start : start + width] = v[i, :, u - width :]
        if len(self.slots) == 1:
            s = self.slots[0]
            return k_buf[s : s + 1, :, : self.t], v_buf[s : s + 1, :, : self.t]
        return k_buf[:, :, : self.t].index_select(0, self.index), v_buf[:, :, : self.t].index_select(0, self.index)


@torch.inference_mode()
def slot_prefill(model, cache: SlotCache, slots: list[int], requests: list[Request], starts: list[int]) -> torch.Tensor:
    """Prefill request i into slots[i], whose first starts[i] positions already hold its K/V and whose image K/V
    are set (`set_slot_images`): only its positions starts[i]..t_i-1 run, as one batch right-aligned to the widest
    (u columns), attending to the slot's positions and images. Returns each request's next logits (b, v), float32."""
    backbone = model.model
    device = requests[0].input_ids.device
    b = len(requests)
    widths = [r.prompt_tokens - start for r, start in zip(requests, starts, strict=True)]
    u, t = max(widths), max(r.prompt_tokens for r in requests)
    ids = torch.zeros(b, u, dtype=torch.long, device=device)
    positions = torch.zeros(b, u, dtype=torch.long, device=device)
    mask = torch.zeros(b, 1, u, t, dtype=torch.bool, device=device)  # (b, 1, u, T); padding columns attend nothing
    images = max(r.num_images for r in requests)
    image_mask = torch.zeros(b, u, images, dtype=torch.long, device=device)  # (b, u, n)
    for i, (r, start, width) in enumerate(zip(requests, starts, widths, strict=True)):
        ids[i, u - width :] = r.input_ids[0, start:]
        positions[i, u - width :] = torch.arange(start, r.prompt_tokens, device=device)
        mask[i, 0, u - width :, : r.prompt_tokens] = torch.ones(width, r.prompt_tokens, dtype=torch.bool,
                                                                device=device).tril(start)  # fmt: skip
        if r.num_images:
            image_mask[i, u - width :, : r.num_images] = r.image_inputs["image_attention_mask"][0, start:]
    x = backbone.embed_tokens(ids)  # (b, u, d)
    rope = backbone.rotary_emb(positions, x.dtype)
    image_kv = cross_mask = gate = None
    if images:
        m = images * cache.image_tokens
        index = torch.tensor(slots, device=device)
        image_kv = [
            (k[:, :, :m].index_select(0, index), v[:, :, :m].index_select(0, index))
            for k, v in zip(cache.image_k, cache.image_v, strict=True)
        ]  # fmt: skip  (b, h, M, hd)
        cross_mask, gate = image_masks(image_mask, cache.image_tokens)  # as the model's forward
    kv = SlotWrite(cache, slots, starts, widths, t)
    x = backbone.run_layers(x, rope, mask, kv, None, image_kv, cross_mask, gate)
    return model.lm_head(backbone.norm(x[:, -1:]))[:, -1].float()


def encode_requests(model, requests: list[Request], image_cache: ImageCache | None) -> list[torch.Tensor | None]:
    """Each request's image states (1, n, s, d_img), or None without images: one encoder call for all the images
    the cache lacks."""
    pixels = [r.image_inputs["pixel_values"] for r in requests if r.num_images]
    if not pixels:
        return [None] * len(requests)
    keys = [key for r in requests for key in r.image_keys]
    states = encode_cached(model, torch.cat(pixels, dim=1), keys, image_cache)  # (1, N, s, d)
    out, start = [], 0
    for r in requests:
        out.append(states[:, start : start + r.num_images] if r.num_images else None)
        start += r.num_images
    return out


def set_slot_images(model, cache: SlotCache, slot: int, request: Request, states: torch.Tensor | None) -> None:
    """Write a request's image K/V into its slot (projected from its image states (1, n, s, d_img)); a slot that
    already holds the K/V of exactly these images (a chat's next turn in its own slot) keeps them."""
    if states is None:
        cache.images[slot] = 0
        cache.gate[slot] = False
        return
    last = request.image_inputs["image_attention_mask"][0, -1]  # (n,)
    keys = tuple(request.image_keys) if len(request.image_keys) == states.shape[1] else None
    image_kv = None if keys is not None and cache.image_ids[slot] == keys else model.model.project_images(states)
    cache.set_images(slot, image_kv, last, keys=keys)


@torch.inference_mode()
def prefill_batch(model, requests: list[Request], states: list[torch.Tensor | None] | None = None) -> Prefilled:
    """Prefill `requests` together (their image states (1, n, s, d_img) given, else encoded here); their caches are
    rows of the returned state."""
    lengths = [r.prompt_tokens for r in requests]
    counts = [r.image_inputs["pixel_values"].shape[1] if r.image_inputs else 0 for r in requests]
    b, longest, most = len(requests), max(lengths), max(counts)
    device = requests[0].input_ids.device
    input_ids = torch.zeros(b, longest, dtype=torch.long, device=device)
    attention_mask = torch.zeros(b, longest, dtype=torch.long, device=device)
    offsets = [longest - t for t in lengths]
    for i, (r, offset) in enumerate(zip(requests, offsets, strict=True)):
        input_ids[i, offset:] = r.input_ids[0]
        attention_mask[i, offset:] = 1
    image_inputs = {}
    if most:
        states = states if states is not None else encode_requests(model, requests, None)
        image_inputs = batch_images(model, requests, states, offsets, longest)
    padded = attention_mask if max(offsets) > 0 else None  # the longest prompt has no padding
    logits, state = prefill(model, input_ids, attention_mask=padded, capacity=longest, **image_inputs)
    return Prefilled(logits, state, offsets, counts)


def batch_images(model, requests: list[Request], states: list[torch.Tensor | None], offsets: list[int],
                 longest: int) -> dict:  # fmt: skip
    """The requests' image states (1, n_i, s, d) laid out (b, n, s, d) with the padded image attention mask."""
    first = next(x for x in states if x is not None)
    b, most = len(requests), max(r.num_images for r in requests)
    laid_out = first.new_zeros(b, most, *first.shape[2:])  # (b, n, s, d)
    mask = torch.zeros(b, longest, most, dtype=torch.long, device=first.device)  # (b, T, n)
    for i, (r, x) in enumerate(zip(requests, states, strict=True)):
        if x is not None:
            laid_out[i, : r.num_images] = x[0]
            mask[i, offsets[i] :, : r.num_images] = r.image_inputs["image_attention_mask"][0]
    key = "perceiver_embeddings" if model.config.use_resampler else "image_encoder_embeddings"
    return {key: laid_out, "image_attention_mask": mask}
