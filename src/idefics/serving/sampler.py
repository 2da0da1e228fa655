"""Per-row next-token choice for one batched step: every row brings its own sampling parameters.

The processors are those of `generation/processors.py` in the same order (repetition penalty, EOS ban until
min_tokens, then for sampled rows temperature, top-k, top-p; between the first two, a request's logit bias, which
`generate()` does not take), vectorised with per-row values; each op is the identity on a row whose parameter is
off (x * 1, x / 1), so a greedy row picks what `generate()` picks for it alone. Rows with a seed draw from their own
torch.Generator, one row at a time, so their tokens do not depend on the other rows.

Legend: A rows sampled this step, v vocabulary, k logprob alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generation.processors import repetition_penalty


@dataclass
class RowSampling:
    """What the sampler needs from one running row."""

    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    banned: list[int]  # ids banned this step (EOS while fewer than min_tokens were generated)
    generator: torch.Generator | None  # a seeded row's own generator
    logprobs: int | None
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids (k,), values (k,)) added to the row's logits


def choose(
    logits: torch.Tensor, rows: list[RowSampling], *, seen: torch.Tensor | None, generator: torch.Generator | None
) -> tuple[list[int], torch.Tensor | None]:
    """logits (A, v) float32 -> the chosen ids (host list) and, when a row asks for logprobs, log_softmax (A, v)
    of the raw logits (before any bias, penalty or warping, as vLLM's). seen (A, v) bool: tokens in each row's
    prompt and generation (needed for penalties)."""
    device = logits.device
    scores = logits
    if any(r.repetition_penalty != 1.0 for r in rows):
        penalty = torch.tensor([r.repetition_penalty for r in rows], device=device)[:, None]  # (A, 1)
        scores = repetition_penalty(scores, seen, penalty)
    if any(r.bias is not None or r.banned for r in rows):
        scores = scores.clone() if scores is logits else scores  # the raw logits stay for the logprobs
        for i, r in enumerate(rows):
            if r.bias is not None:
                scores[i].index_add_(0, *r.bias)
            if r.banned:
                scores[i, r.banned] = -float("inf")
    sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
    if len(sampled) < len(rows):
        tokens = scores.argmax(dim=-1)  # (A,)
    if sampled:
        picked = sample(scores[sampled], [rows[i] for i in sampled], generator=generator)  # (sampled,)
        if len(sampled) == len(rows):
            tokens = picked
        else:
            tokens = tokens.index_copy(0, torch.tensor(sampled, device=device), picked)
    logprobs = logits.log_softmax(dim=-1) if any(r.logprobs is not None for r in rows) else None
    return tokens.tolist(), logprobs


def sample(scores: torch.Tensor, rows: list[RowSampling], *, generator: torch.Generator | None) -> torch.Tensor:
    """Temperature, top-k and top-p per row, then one draw per row: (A, v) -> (A,)."""
    device = scores.device
    probs = warp(scores, rows).softmax(dim=-1)  # (A, v)
    out = torch.empty(len(rows), dtype=torch.long, device=device)
    shared = [i for i, r in enumerate(rows) if r.generator is None]
    if shared:
        index = torch.tensor(shared, device=device)
        out[index] = torch.multinomial(probs[index], 1, generator=generator).squeeze(1)
    for i, r in enumerate(rows):
        if r.generator is not None:
            out[i] = torch.multinomial(probs[i : i + 1], 1, generator=r.generator)[0, 0]
    return out


def warp(scores: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, each with every row's own value: (A, v) -> (A, v)."""
    device = scores.device
    temperature = torch.tensor([r.temperature for r in rows], device=device)[:, None]  # (A, 1)
    scores = scores / temperature
    if any(r.top_k for r in rows):
        k = torch.tensor([min(r.top_k, scores.shape[-1]) for r in rows], device=device)  # (A,), 0 = off
        ranked = scores.sort(dim=-1, descending=True).values
        threshold = ranked.gather(1, (k - 1).clamp(min=0)[:, None])  # (A, 1)
        threshold = threshold.masked_fill(k[:, None] == 0, -float("inf"))
        scores = scores.masked_fill(scores < threshold, -float("inf"))
    if any(r.top_p < 1.0 for r in rows):
        p = torch.tensor([r.top_p for r in rows], device=device)[:, None]  # (A, 1)
        ascending, order = scores.sort(dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        remove = (cumulative <= 1 - p) & (p < 1.0)
        remove[:, -1:] = False  # the likeliest token always stays
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores


def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """logprobs (v,) -> the chosen token's logprob and the k likeliest (id, logprob), likeliest first."""
    chosen = float(logprobs[token])
    if k == 0:
        return chosen, []
    values, ids = logprobs.topk(k)
    return chosen, list(zip(ids.tolist(), values.tolist(), strict=True))
