"""The masks and positions the backbone builds from a batch's padding and image masks.

Legend: b batch, t new text tokens, T cached + new tokens, n images per row, s image tokens per image.
"""

from __future__ import annotations

import torch


def causal_mask(attention_mask: torch.Tensor | None, t: int, past: int) -> torch.Tensor | None:
    """Boolean mask (b, 1, t, past + t), True = attend, from a 2D padding mask (b, past + t); None when SDPA's own
    causal mode suffices. Fully masked rows (queries on left padding) come out of SDPA as zeros, as in the reference."""
    if attention_mask is None and (past == 0 or t == 1):
        return None  # SDPA's is_causal (t > 1) or attend-to-all (t == 1)
    device = attention_mask.device if attention_mask is not None else None
    query_pos = torch.arange(past, past + t, device=device)[:, None]  # (t, 1)
    allowed = torch.arange(past + t, device=device)[None, :] <= query_pos  # (t, T)
    if attention_mask is not None:
        allowed = allowed[None] & attention_mask[:, None, :].bool()  # (b, t, T)
    return allowed.view(-1, 1, t, past + t)  # (b or 1, 1, t, T)


def image_masks(image_attention_mask: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, t, n) 0/1 -> boolean cross-attention mask (b, 1, t, n*s) and gate (b, t), False where no image is seen."""
    attends = image_attention_mask.bool()  # (b, t, n)
    return attends.repeat_interleave(s, dim=-1)[:, None], attends.any(dim=-1)


def position_ids_from(attention_mask: torch.Tensor | None, t: int, past: int, device) -> torch.Tensor:
    """Positions of the t new tokens (b or 1, t); with a mask, left padding does not count (the reference's rule)."""
    if attention_mask is None:
        return torch.arange(past, past + t, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill_(attention_mask == 0, 1)[:, -t:]
