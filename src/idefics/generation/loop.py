"""The generation loop: `generate_steps` is the one loop (a generator), over step.py's prefill and decode step;
`generate`, streaming, the CLI and the server consume it. Beam search (beam.py) shares the same step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..image_cache import ImageCache
from .config import GenerationConfig
from .grammar import apply_bitmask_, compiler_for, fill_bitmask, new_bitmask
from .processors import process
from .step import decode_step, prefill, sampling_generator, seen_tokens, through_image_cache
from .stopping import StopStrings, eos_hits


@dataclass
class Step:
    tokens: torch.Tensor  # (b,) the token appended to each row (pad for rows finished earlier)
    finished: torch.Tensor  # (b,) bool, rows that are done after this token


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
