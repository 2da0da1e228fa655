"""Logits processors, applied in transformers' order: repetition penalty, bad words, min new tokens, then (sampling
only) temperature, top-k, top-p. Each works on (rows, vocab) float32 scores and returns new scores."""

from __future__ import annotations

import torch

from .config import GenerationConfig


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """seen (rows, vocab) bool: tokens already in the row (its left padding excluded)."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def ban_bad_words(scores: torch.Tensor, history: torch.Tensor, bad_words_ids: list[list[int]]) -> torch.Tensor:
    """Ban the last token of each bad sequence where the row's history ends with the sequence's prefix."""
    scores = scores.clone()
    for seq in bad_words_ids:
        *prefix, last = seq
        if not prefix:
            scores[:, last] = -float("inf")
            continue
        if history.shape[1] < len(prefix):
            continue
        match = (history[:, -len(prefix) :] == torch.tensor(prefix, device=history.device)).all(dim=1)  # (rows,)
        scores[match, last] = -float("inf")
    return scores


def ban_eos(scores: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    scores = scores.clone()
    scores[:, eos_ids] = -float("inf")
    return scores


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, scores.shape[-1])
    threshold = torch.topk(scores, k, dim=-1).values[:, -1:]  # (rows, 1)
    return scores.masked_fill(scores < threshold, -float("inf"))


def top_p_filter(scores: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least `min_keep`)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[:, -min_keep:] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, -float("inf"))


def process(
    scores: torch.Tensor,
    config: GenerationConfig,
    *,
    seen: torch.Tensor | None,
    history: torch.Tensor,
    num_generated: int,
    sampling: bool,
) -> torch.Tensor:
    """Apply every processor the config asks for. history (rows, prompt + generated) is used by bad words."""
    if config.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seen, config.repetition_penalty)
    if config.bad_words_ids:
        scores = ban_bad_words(scores, history, config.bad_words_ids)
    if config.eos_token_id and num_generated < config.min_new_tokens:
        scores = ban_eos(scores, config.eos_token_id)
    if sampling:
        min_keep = 1 if config.num_beams == 1 else max(2, 1 + len(config.eos_token_id or []))
        if config.temperature != 1.0:
            scores = scores / config.temperature
        if config.top_k:
            scores = top_k_filter(scores, max(config.top_k, min_keep))
        if config.top_p < 1.0:
            scores = top_p_filter(scores, config.top_p, min_keep)
    return scores
