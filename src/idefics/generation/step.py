"""The cached step that every decoder shares: `prefill` once, then one `decode_step` per token.

The vision encoder, the perceiver and every gated layer's image K/V run once, at prefill. Each decode step embeds
the new token, runs the decoder against the in-place self-attention cache and the cached image K/V, and returns
the last logits. The sampling loop (loop.py), beam search (beam.py) and the serving engine build on these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..cache import IdeficsCache
from ..image_cache import ImageCache, encode_cached, image_keys
from ..modeling.layout import use_decode_layout
from .compiling import compiled_for, dynamic_span, fast_repeat
from .config import GenerationConfig
from .graphs import CudaGraphStep


@dataclass
class DecodeState:
    """What a request carries from one decode step to the next."""

    cache: IdeficsCache
    positions: torch.Tensor  # (b, 1) rotary position of the next token (left padding does not count)
    pad_mask: torch.Tensor | None  # (b, capacity) bool, False on left padding; None when no row is padded
    cross_mask: torch.Tensor | None  # (b, 1, 1, n*s) which image tokens new tokens attend to
    gate: torch.Tensor | None  # (b, 1) False for rows whose new tokens see no image
    static_step: Callable[[torch.Tensor], torch.Tensor] | None = None  # tokens (b,) -> logits; compile/graphs


@torch.inference_mode()
def prefill(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_encoder_embeddings: torch.Tensor | None = None,
    perceiver_embeddings: torch.Tensor | None = None,
    image_attention_mask: torch.Tensor | None = None,
    interpolate_pos_encoding: bool = False,
    capacity: int,
    compile: bool = False,
    cuda_graphs: bool | None = None,
) -> tuple[torch.Tensor, DecodeState]:
    """Run the prompt (b, t) through the model, filling a cache sized for `capacity` positions.

    Returns the last position's logits (b, v) in float32 and the state for `decode_step`. With `compile=True` or
    `cuda_graphs=True` the decode steps run a fixed-shape step (the static cache read whole under a mask):
    torch.compile'd with `compile`, captured as a CUDA graph with `cuda_graphs` (default: on CUDA, with `compile`).
    """
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer (batch, tokens), got {input_ids.dtype} {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    limit = int(model.config.max_position_embeddings * model.config.rope_scaling_factor)
    if capacity > limit:
        raise ValueError(
            f"the prompt has {t} tokens and {capacity - t} new ones were asked for: {capacity} positions exceed the "
            f"model's {limit} (max_position_embeddings); shorten the prompt or lower max_new_tokens"
        )
    if cuda_graphs is None:
        cuda_graphs = compile and input_ids.device.type == "cuda"
    if cuda_graphs and input_ids.device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the inputs and model on a CUDA device, got {input_ids.device}")
    static = compile or cuda_graphs
    if static:  # a few capacity buckets, so that compiled shapes repeat across requests
        capacity = min(-(-capacity // STATIC_BUCKET) * STATIC_BUCKET, limit)
    use_decode_layout(model)
    cache = model.model.new_cache(batch_size=b, capacity=capacity)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        image_encoder_embeddings=image_encoder_embeddings,
        perceiver_embeddings=perceiver_embeddings,
        image_attention_mask=image_attention_mask,
        interpolate_pos_encoding=interpolate_pos_encoding,
        past_key_values=cache,
        logits_to_keep=1,
    )
    padded = attention_mask is not None and not bool(attention_mask.all())
    pad_mask = None
    if padded:
        pad_mask = torch.ones(b, capacity, dtype=torch.bool, device=input_ids.device)
        pad_mask[:, :t] = attention_mask.bool()
    if attention_mask is not None:
        positions = attention_mask.long().sum(-1, keepdim=True)  # (b, 1)
    else:
        positions = torch.full((b, 1), t, dtype=torch.long, device=input_ids.device)
    cross_mask = gate = None
    if cache.last_image_mask is not None:
        s = cache.image_hidden_states.shape[2]
        last = cache.last_image_mask.bool()  # (b, n)
        cross_mask = last.repeat_interleave(s, dim=-1)[:, None, None, :]  # (b, 1, 1, n*s)
        gate = last.any(dim=-1, keepdim=True)  # (b, 1)
    state = DecodeState(cache=cache, positions=positions, pad_mask=pad_mask, cross_mask=cross_mask, gate=gate)
    if static:
        cache.kv.static = True
        if state.pad_mask is None:
            state.pad_mask = torch.ones(b, capacity, dtype=torch.bool, device=input_ids.device)
        state.static_step = bind_static_step(model, state, compile=compile, cuda_graphs=cuda_graphs)
    return out.logits[:, -1].float(), state


STATIC_BUCKET = 256  # static caches are sized in multiples of this many positions


def through_image_cache(model, image_inputs: dict) -> dict:
    """Image inputs with their `image_cache` (if any) applied: pixel_values (b, n, 3, r, r) replaced by their states
    (b, n, s, d_img), each distinct image encoded once across calls."""
    image_inputs = dict(image_inputs)
    cache: ImageCache | None = image_inputs.pop("image_cache", None)
    pixels = image_inputs.get("pixel_values")
    if cache is None or pixels is None:
        return image_inputs
    b, n = pixels.shape[:2]
    interpolate = image_inputs.get("interpolate_pos_encoding", False)
    keys = [k for row in image_keys(pixels, interpolate_pos_encoding=interpolate) for k in row]
    states = encode_cached(model, pixels.reshape(1, b * n, *pixels.shape[2:]), keys, cache,
                           interpolate_pos_encoding=interpolate)  # fmt: skip
    key = "perceiver_embeddings" if model.config.use_resampler else "image_encoder_embeddings"
    return image_inputs | {"pixel_values": None, key: states.view(b, n, *states.shape[2:])}  # (b, n, s, d)


def static_step(model, tokens, positions, valid, kv, image_states, image_kv, cross_mask, gate) -> torch.Tensor:
    """One decode step over the static cache: attends over the first `valid.shape[1]` positions of its buffers (all of
    them for CUDA graphs; the filled ones, a dynamic length, when compiled on CPU), masked beyond `kv.pos`."""
    backbone = model.model
    x = backbone.embed_tokens(tokens[:, None])  # (b, 1, d)
    rope = backbone.rotary_emb(positions, x.dtype)
    filled = torch.arange(valid.shape[1], device=valid.device) <= kv.pos  # (T,)
    mask = (valid & filled)[:, None, None, :]  # (b, 1, 1, T)
    x = backbone.run_layers(x, rope, mask, kv, image_states, image_kv, cross_mask, gate)
    return model.lm_head(backbone.norm(x))[:, -1].float()


def bind_static_step(model, state: DecodeState, *, compile: bool, cuda_graphs: bool):
    """tokens (b,) -> logits (b, v) over the request's static buffers, compiled and/or captured as a CUDA graph."""
    cache = state.cache
    device = state.positions.device
    fn = compiled_for(static_step, model, device) if compile else static_step
    span = compile and dynamic_span(device)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        valid = state.pad_mask  # (b, capacity)
        if span:  # only the filled positions, one compiled step for every length
            valid = valid[:, : cache.kv.length + 1]  # (b, T)
            torch._dynamo.mark_dynamic(valid, 1)
        return fn(model, tokens, state.positions, valid, cache.kv, cache.image_hidden_states, cache.image_kv,
                  state.cross_mask, state.gate)  # fmt: skip

    if cuda_graphs:
        return CudaGraphStep(step, state.positions.shape[0], device)
    return fast_repeat(step) if compile else step  # without a graph, every call returns a fresh tensor


@torch.inference_mode()
def decode_step(model, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Append tokens (b,) to every row; return the next logits (b, v) in float32."""
    backbone = model.model
    cache = state.cache
    if state.static_step is not None:
        logits = state.static_step(tokens)
        cache.kv.advance(1)
        state.positions += 1
        return logits
    x = backbone.embed_tokens(tokens[:, None])  # (b, 1, d)
    rope = backbone.rotary_emb(state.positions, x.dtype)
    length = cache.kv.length + 1
    mask = state.pad_mask[:, None, None, :length] if state.pad_mask is not None else None  # (b, 1, 1, T)
    x = backbone.run_layers(
        x, rope, mask, cache.kv, cache.image_hidden_states, cache.image_kv, state.cross_mask, state.gate
    )
    cache.kv.advance(1)
    state.positions += 1
    return model.lm_head(backbone.norm(x))[:, -1].float()


def seen_tokens(ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """(rows, vocab) bool of the tokens each row of ids (rows, T) contains, its leading padding excluded (the
    reference's rule). attention_mask covers the first positions of ids (the prompt)."""
    if attention_mask is not None:
        leading_pad = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        leading_pad[:, : attention_mask.shape[1]] = attention_mask.long().cumsum(-1) == 0
        ids = ids.masked_fill(leading_pad, vocab)  # an extra column, dropped below
    seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab]


def sampling_generator(model, config: GenerationConfig, generator: torch.Generator | None, device):
    """What sampling draws from: the caller's generator, else one seeded with `config.seed`, else (tensor parallel)
    one seeded by rank 0 for every rank, so that all ranks draw the same tokens; None is torch's global generator."""
    if not config.do_sample or generator is not None:
        return generator
    seed, tp = config.seed, getattr(model, "tensor_parallel", None)
    if seed is None and tp is not None and tp.size > 1:
        seed = tp.shared_seed()
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)
