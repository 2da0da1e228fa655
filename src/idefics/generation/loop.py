"""The generation loop: prefill once, then one cached decode step per token.

The vision encoder, the perceiver and every gated layer's image K/V run once, at prefill. Each decode step embeds
the new token, runs the decoder against the in-place self-attention cache and the cached image K/V, and returns
the last logits. `generate_steps` is the one loop (a generator); `generate`, streaming, the CLI and the server
consume it. Beam search (beam.py) shares `prefill` and `decode_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..cache import IdeficsCache
from ..image_cache import ImageCache, encode_cached, image_keys
from ..modeling.layout import use_decode_layout
from .compiling import compiled_for, dynamic_span, fast_repeat
from .config import GenerationConfig
from .grammar import apply_bitmask_, compiler_for, fill_bitmask, new_bitmask
from .graphs import CudaGraphStep
from .processors import process
from .stopping import StopStrings, eos_hits


@dataclass
class DecodeState:
    """What a request carries from one decode step to the next."""

    cache: IdeficsCache
    positions: torch.Tensor  # (b, 1) rotary position of the next token (left padding does not count)
    pad_mask: torch.Tensor | None  # (b, capacity) bool, False on left padding; None when no row is padded
    cross_mask: torch.Tensor | None  # (b, 1, 1, n*s) which image tokens new tokens attend to
    gate: torch.Tensor | None  # (b, 1) False for rows whose new tokens see no image
    static_step: Callable[[torch.Tensor], torch.Tensor] | None = None  # tokens (b,) -> logits; compile/graphs


@dataclass
class Step:
    tokens: torch.Tensor  # (b,) the token appended to each row (pad for rows finished earlier)
    finished: torch.Tensor  # (b,) bool, rows that are done after this token


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


def resolve_config(model, config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
    config = config or GenerationConfig.from_kwargs(**kwargs)
    if config.eos_token_id is None and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        config.eos_token_id = [eos] if isinstance(eos, int) else list(eos)
    if config.pad_token_id is None:
        config.pad_token_id = (
            model.config.pad_token_id if model.config.pad_token_id is not None else (config.eos_token_id or [0])[0]
        )
    return config


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


def generate_steps(
    model,
    input_ids: torch.Tensor,
    *,
    config: GenerationConfig,
    tokenizer=None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **image_inputs,
) -> Iterator[Step]:
    """Yield one Step per generated position until every row is finished or max_new_tokens is reached."""
    b, t = input_ids.shape
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer: pass tokenizer= (or use the processor's)")
    generator = sampling_generator(model, config, generator, input_ids.device)
    grammars = bitmask = None
    if config.constraint is not None:  # compiled before the prefill, so that a bad schema fails fast
        grammar = compiler_for(tokenizer, model.config.vocab_size + model.config.additional_vocab_size).compile(
            config.constraint
        )
        grammars = [grammar.start(config.eos_token_id or []) for _ in range(b)]
        bitmask = new_bitmask(b, grammar.compiler)
    image_inputs = through_image_cache(model, image_inputs)  # image_cache= in image_inputs: see `generate`
    logits, state = prefill(
        model,
        input_ids,
        attention_mask=attention_mask,
        capacity=t + config.max_new_tokens,
        compile=config.compile,
        cuda_graphs=config.cuda_graphs,
        **image_inputs,
    )
    vocab = logits.shape[-1]
    sequences = torch.empty(b, t + config.max_new_tokens, dtype=torch.long, device=input_ids.device)
    sequences[:, :t] = input_ids
    seen = seen_tokens(input_ids, attention_mask, vocab) if config.repetition_penalty != 1.0 else None
    eos = torch.tensor(config.eos_token_id, device=input_ids.device) if config.eos_token_id else None
    stop = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    for i in range(config.max_new_tokens):
        if grammars is not None:
            live = [(r, g) for r, (g, done) in enumerate(zip(grammars, finished.tolist(), strict=True)) if not done]
            bitmask.fill_(-1)
            fill_bitmask(bitmask, live)
            apply_bitmask_(logits, bitmask)
        scores = process(
            logits, config, seen=seen, history=sequences[:, : t + i], num_generated=i, sampling=config.do_sample
        )
        if config.do_sample:
            tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)  # (b,)
        tokens = tokens.masked_fill(finished, config.pad_token_id)
        sequences[:, t + i] = tokens
        if seen is not None:
            seen[torch.arange(b), tokens] = True
        done = eos_hits(tokens, eos)
        if grammars is not None:  # a complete output that nothing can extend ends its row
            chosen, ends = tokens.tolist(), set(config.eos_token_id or [])
            complete = [r for r, g in live if chosen[r] not in ends and g.accept(chosen[r])]
            done[complete] = True
        if stop is not None:
            hits = stop([row.tolist() for row in sequences[:, t : t + i + 1]])
            done |= torch.tensor(hits, device=tokens.device)
        finished = finished | done
        yield Step(tokens=tokens, finished=finished.clone())
        if bool(finished.all()) or i + 1 == config.max_new_tokens:
            return
        logits = decode_step(model, tokens, state)


def generate(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_encoder_embeddings: torch.Tensor | None = None,
    perceiver_embeddings: torch.Tensor | None = None,
    image_attention_mask: torch.Tensor | None = None,
    interpolate_pos_encoding: bool = False,
    generation_config: GenerationConfig | None = None,
    tokenizer=None,
    generator: torch.Generator | None = None,
    image_cache: ImageCache | None = None,
    **kwargs,
) -> torch.Tensor:
    """Prompt (b, t) -> (b, t + new) token ids; rows that finish early are padded with the pad id. An `image_cache`
    (idefics.image_cache.ImageCache, for this model) encodes each distinct image once across calls."""
    config = resolve_config(model, generation_config, kwargs)
    image_inputs = dict(
        pixel_values=pixel_values,
        image_encoder_embeddings=image_encoder_embeddings,
        perceiver_embeddings=perceiver_embeddings,
        image_attention_mask=image_attention_mask,
        interpolate_pos_encoding=interpolate_pos_encoding,
        image_cache=image_cache,
    )
    image_inputs = through_image_cache(model, image_inputs)
    if config.num_beams > 1:
        from .beam import beam_search

        return beam_search(model, input_ids, config=config, attention_mask=attention_mask, generator=generator,
                           tokenizer=tokenizer, **image_inputs)  # fmt: skip
    steps = [
        s.tokens
        for s in generate_steps(
            model,
            input_ids,
            config=config,
            tokenizer=tokenizer,
            attention_mask=attention_mask,
            generator=generator,
            **image_inputs,
        )
    ]
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)
