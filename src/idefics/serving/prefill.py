"""Prefill into slots: the requests admitted between two decode steps run through the model together.

`prefill_into` is the one operation that fills slots (a tensor-parallel rank replays it with the same arguments and
makes the same cache decisions): every image of every request is looked up in the image cache and the missing ones
are encoded in one call; a request whose prompt shares at least PREFIX_MIN_TOKENS leading positions with a slot's
record (the prefix cache, prefix.py) prefills only the rest, into its slot (`slot_prefill`); the others are
prefilled as one batch (`prefill_batch`) and copied into their slots.

Their prompts are left-padded into one batch (b, T) with an attention mask, so each row keeps rotary positions
0..t_i-1 and never attends to padding. Their images are encoded in one call over all of them (the vision tower and
perceiver see a flat batch of every image), then laid out per row, padded to the batch's most images; a padded image
is attended by no token. The resulting cache is copied slot by slot (`SlotCache.load` with the row's offset).

Legend: b requests, T longest prompt, t_i a request's prompt, n most images in a request, s image tokens per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generation.loop import DecodeState, prefill
from ..image_cache import ImageCache, encode_cached
from .prefix import PREFIX_MIN_TOKENS
from .requests import Request
from .slots import SlotCache, slot_prefill


@dataclass
class Prefilled:
    logits: torch.Tensor  # (b, v) float32, each request's next-token logits
    state: DecodeState  # the batch's cache: row i holds request i's positions at offsets[i]..T-1
    offsets: list[int]  # left padding of each row
    images: list[int]  # images of each request


def padded_tokens(prompt_lengths: list[int]) -> int:
    """Positions a batch of these prompts costs once left-padded to the longest."""
    return len(prompt_lengths) * max(prompt_lengths, default=0)


@torch.inference_mode()
def prefill_into(model, cache: SlotCache, requests: list[Request], slots: list[list[int]],
                 image_cache: ImageCache | None) -> torch.Tensor:  # fmt: skip
    """Prefill each request into its slots (request i into slots[i], n of them); returns each request's first-token
    logits (b, v) in float32. Reuses the longest prefix a slot records (with `cache.retain`) and the cached images."""
    states = encode_requests(model, requests, image_cache)
    given = {s for group in slots for s in group}
    logits: list[torch.Tensor | None] = [None] * len(requests)
    batched = []
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
        slot = group[0]
        if source != slot:
            cache.copy_positions(source, slot, start)
        set_slot_images(model, cache, slot, request, states[i])
        cache.set_record(slot, request.record)
        logits[i] = slot_prefill(model, cache, slot, request.input_ids, start,
                                 request.image_inputs.get("image_attention_mask"))[0]  # fmt: skip
        for other in group[1:]:
            cache.copy_positions(slot, other, request.prompt_tokens)
            set_slot_images(model, cache, other, request, states[i])
            cache.set_record(other, request.record)
    if batched:
        chosen = [requests[i] for i in batched]
        batch = prefill_batch(model, chosen, [states[i] for i in batched])
        for row, i in enumerate(batched):
            for slot in slots[i]:
                cache.load(slot, batch.state, requests[i].prompt_tokens, row=row, offset=batch.offsets[row],
                           images=batch.images[row])  # fmt: skip
                cache.set_record(slot, requests[i].record)
            logits[i] = batch.logits[row]
    return torch.stack(logits)


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
    """Write a request's image K/V into its slot (projected from its image states (1, n, s, d_img))."""
    if states is None:
        cache.images[slot] = 0
        cache.gate[slot] = False
        return
    last = request.image_inputs["image_attention_mask"][0, -1]  # (n,)
    cache.set_images(slot, model.model.project_images(states), last)


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
