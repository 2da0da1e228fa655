"""Batched prefill: the requests admitted between two decode steps run through the model together.

Their prompts are left-padded into one batch (b, T) with an attention mask, so each row keeps rotary positions
0..t_i-1 and never attends to padding. Their images are encoded in one call over all of them (the vision tower and
perceiver see a flat batch of every image), then laid out per row, padded to the batch's most images; a padded image
is attended by no token. The resulting cache is copied slot by slot (`SlotCache.load` with the row's offset).

Legend: b requests, T longest prompt, t_i a request's prompt, n most images in a request, s image tokens per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generation.step import DecodeState, prefill
from .requests import Request


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
def prefill_batch(model, requests: list[Request]) -> Prefilled:
    """Prefill `requests` together; their caches are rows of the returned state."""
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
        image_inputs = batch_images(model, requests, counts, offsets, longest)
    padded = attention_mask if max(offsets) > 0 else None  # the longest prompt has no padding
    logits, state = prefill(model, input_ids, attention_mask=padded, capacity=longest, **image_inputs)
    return Prefilled(logits, state, offsets, counts)


def batch_images(model, requests: list[Request], counts: list[int], offsets: list[int], longest: int) -> dict:
    """Every request's images encoded in one call, laid out (b, n, s, d) with the padded image attention mask."""
    backbone = model.model
    pixels = torch.cat([r.image_inputs["pixel_values"] for r, c in zip(requests, counts, strict=True) if c], dim=1)
    states = backbone.encode_images(pixel_values=pixels)  # (1, N, s, d): all images of all requests
    b, most = len(requests), max(counts)
    laid_out = states.new_zeros(b, most, *states.shape[2:])  # (b, n, s, d)
    mask = torch.zeros(b, longest, most, dtype=torch.long, device=states.device)  # (b, T, n)
    start = 0
    for i, (r, c) in enumerate(zip(requests, counts, strict=True)):
        if c:
            laid_out[i, :c] = states[0, start : start + c]
            mask[i, offsets[i] :, :c] = r.image_inputs["image_attention_mask"][0]
            start += c
    key = "perceiver_embeddings" if model.config.use_resampler else "image_encoder_embeddings"
    return {key: laid_out, "image_attention_mask": mask}
