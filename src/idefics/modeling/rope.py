"""Rotary position embeddings in LLaMA's `rotate_half` layout.

`inv_freq` stays float32 whatever dtype the model is cast to (bf16 frequencies lose whole positions at 2k tokens).
"""

import torch
from torch import nn


class IdeficsRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, *, theta: float = 10000.0, scaling_factor: float = 1.0):
        super().__init__()
        self.head_dim, self.theta, self.scaling_factor = head_dim, theta, scaling_factor
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents) / self.scaling_factor  # (hd/2,)

    def _apply(self, fn, recurse=True):
        # Device moves apply, dtype casts do not: recompute in fp32 on whatever device the buffer landed on.
        super()._apply(fn, recurse)
        self.reset_buffers(self.inv_freq.device)
        return self

    def reset_buffers(self, device: torch.device | str) -> None:
        """(Re)build `inv_freq` in fp32 on `device`; also materialises it after a meta-device build."""
        self.inv_freq = self._inv_freq(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (b, t) -> cos, signed sin (b, t, 1, hd) for `apply_rotary` on (b, t, heads, hd)."""
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # (b, t, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat([cos, cos], dim=-1).to(dtype)  # (b, t, hd)
        sin = torch.cat([-sin, sin], dim=-1).to(dtype)  # the sign of rotate_half folded in
        return cos.unsqueeze(2), sin.unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, t, heads, hd); cos, signed sin (b, t, 1, hd).

    LLaMA's x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1): with the sign folded into sin this is
    x * cos + cat(x2, x1) * sin, and cat(x2, x1) is a roll by hd/2 (the same products, bit for bit).
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
