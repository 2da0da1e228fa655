"""The language-modelling loss: next-token cross-entropy over the regular and the additional vocabulary.

Legend: b batch, t text tokens, d width, v vocabulary (regular + additional).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the whole vocabulary (regular + additional); label -100 is ignored.
    logits (b, t, v), labels (b, t); `reduction` "mean" (per label token) or "sum"."""
    logits = logits[:, :-1].float()  # (b, t-1, v)
    targets = labels[:, 1:].to(logits.device)  # (b, t-1)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction=reduction
    )


def labelled_lm_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *, reduction: str) -> torch.Tensor:
    """The same loss with the LM head applied only where a next token is labelled: hidden (b, t, d), labels (b, t).
    On instruction data most positions are prompt, so this skips most of the head's work and its (b, t, v) logits."""
    targets = labels[:, 1:].to(hidden.device)  # (b, t-1)
    keep = targets != -100
    logits = lm_head(hidden[:, :-1][keep]).float()  # (labelled, v)
    return F.cross_entropy(logits, targets[keep], reduction=reduction)
