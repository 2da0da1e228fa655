"""Beam search with transformers' semantics (vectorised, early-stopping heuristic, length penalty).

Each step scores every (beam, token) continuation of each row, keeps the best `beams_to_keep` candidates, moves the
ones that just finished into a per-row pool of `num_beams` finished hypotheses (scored with the length penalty), and
continues with the best `num_beams` unfinished ones; the self-attention cache is reordered in place to follow them.
Rows are padded with the pad id after their EOS (the reference pads with EOS when the pad id is 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import GenerationConfig
from .processors import process
from .step import decode_step, prefill, sampling_generator, seen_tokens
from .stopping import StopStrings, eos_hits

NEG = -1.0e9


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the beam axis: x (B, K, ...), index (B, K') -> (B, K', ...)."""
    return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.ndim - 2))), dim=1)


@torch.inference_mode()
def beam_search(
    model,
    input_ids: torch.Tensor,
    *,
    config: GenerationConfig,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_encoder_embeddings: torch.Tensor | None = None,
    perceiver_embeddings: torch.Tensor | None = None,
    image_attention_mask: torch.Tensor | None = None,
    interpolate_pos_encoding: bool = False,
    generator: torch.Generator | None = None,
    tokenizer=None,
) -> torch.Tensor:
    """Prompt (B, t) -> best hypothesis per row (B, t + new)."""
    B, t = input_ids.shape
    K = config.num_beams
    device = input_ids.device
    max_len = t + config.max_new_tokens
    n_eos = len(config.eos_token_id or [])
    keep = max(2, 1 + n_eos) * K
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer: pass tokenizer= (or use the processor's)")
    stop = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    eos = torch.tensor(config.eos_token_id, device=device) if config.eos_token_id else None
    generator = sampling_generator(model, config, generator, device)

    # Images are encoded once per row, then shared by its beams.
    image_inputs = {}
    if any(x is not None for x in (pixel_values, image_encoder_embeddings, perceiver_embeddings)):
        if image_attention_mask is None:
            raise ValueError("image_attention_mask (batch, text, images) is required when images are given")
        states = model.model.encode_images(
            pixel_values=pixel_values,
            image_encoder_embeddings=image_encoder_embeddings,
            perceiver_embeddings=perceiver_embeddings,
            num_images=image_attention_mask.shape[-1] if image_attention_mask is not None else None,
            interpolate_pos_encoding=interpolate_pos_encoding,
        ).repeat_interleave(K, dim=0)  # (B*K, n, s, d)
        key = "perceiver_embeddings" if model.config.use_resampler else "image_encoder_embeddings"
        image_inputs = {key: states, "image_attention_mask": image_attention_mask.repeat_interleave(K, dim=0)}
    flat_mask = attention_mask.repeat_interleave(K, dim=0) if attention_mask is not None else None
    logits, state = prefill(
        model, input_ids.repeat_interleave(K, dim=0), attention_mask=flat_mask, capacity=max_len, **image_inputs
    )
    vocab = logits.shape[-1]

    running = torch.full((B, K, max_len), config.pad_token_id, dtype=torch.long, device=device)
    running[:, :, :t] = input_ids[:, None]
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = NEG  # all beams start identical: only the first may expand
    done = running.clone()
    done_scores = torch.full((B, K), NEG, device=device)
    done_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    done_flags = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    first_k = torch.arange(keep, device=device) < K  # candidates ranked within the top K may finish
    seen = None
    row_offset = torch.arange(B, device=device)[:, None] * K  # (B, 1)

    for cur in range(t, max_len):
        log_probs = F.log_softmax(logits, dim=-1)  # (B*K, v)
        history = running[:, :, :cur].flatten(0, 1)
        if config.repetition_penalty != 1.0:
            seen = seen_tokens(history, flat_mask, vocab)
        log_probs = process(
            log_probs, config, seen=seen, history=history, num_generated=cur - t, sampling=config.do_sample
        )
        total = (log_probs.view(B, K, vocab) + running_scores[:, :, None]).view(B, K * vocab)
        if config.do_sample:
            picked = torch.multinomial(total.softmax(dim=-1), keep, generator=generator)
            top_scores, order = total.gather(1, picked).sort(dim=-1, descending=True)
            top_index = picked.gather(1, order)
        else:
            top_scores, top_index = torch.topk(total, keep, dim=-1)  # (B, keep)
        source_beam = top_index // vocab
        tokens = top_index % vocab
        candidates = _take(running, source_beam)  # (B, keep, max_len)
        candidates[:, :, cur] = tokens

        hits = eos_hits(tokens, eos) | (cur + 1 >= max_len)  # (B, keep)
        if stop is not None:
            flat = candidates[:, :, t : cur + 1].flatten(0, 1)
            hits |= torch.tensor(stop([r.tolist() for r in flat]), device=device).view(B, keep)

        # Continue with the best K candidates that did not finish.
        alive_scores = top_scores + hits.float() * NEG
        best = torch.topk(alive_scores, K, dim=-1).indices  # (B, K)
        running = _take(candidates, best)
        running_scores = _take(alive_scores, best)
        parents = _take(source_beam, best)  # (B, K)

        # Move the top-ranked finished candidates into the pool when they beat what it holds.
        finished_now = hits & first_k[None]
        normalised = top_scores / float(cur + 1 - t) ** config.length_penalty
        pool_full = done_flags.all(dim=-1, keepdim=True) & (config.early_stopping is True)
        normalised = normalised + (pool_full | ~improvable | ~finished_now).float() * NEG
        merged_scores = torch.cat([done_scores, normalised], dim=1)
        pick = torch.topk(merged_scores, K, dim=-1).indices
        done = _take(torch.cat([done, candidates], dim=1), pick)
        done_scores = _take(merged_scores, pick)
        new_lengths = torch.full((B, keep), cur + 1 - t, dtype=torch.long, device=device)
        done_lengths = _take(torch.cat([done_lengths, new_lengths], dim=1), pick)
        done_flags = _take(torch.cat([done_flags, finished_now], dim=1), pick)

        # Could a running beam still beat the worst finished one? (transformers' heuristic)
        if config.early_stopping == "never" and config.length_penalty > 0:
            best_length = max_len - t
        else:
            best_length = cur + 1 - t
        best_running = running_scores[:, :1] / float(best_length) ** config.length_penalty
        worst_done = torch.where(done_flags, done_scores.min(dim=1, keepdim=True).values, NEG)
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        open_beams = not (bool(done_flags.all()) and config.early_stopping is True)
        if not bool(improvable.any()) or not open_beams or bool(hits.all()):
            break
        state.cache.kv.reorder((parents + row_offset).flatten())
        logits = decode_step(model, running[:, :, cur].flatten(), state)

    best = done[:, 0]  # (B, max_len), sorted best first
    length = t + int(done_lengths[:, 0].max())
    return best[:, :length]
