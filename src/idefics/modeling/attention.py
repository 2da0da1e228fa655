"""LLaMA self-attention with rotary embeddings and an optional in-place K/V cache."""

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from ..collectives import reduce_sum
from ..config import IdeficsConfig
from .layout import dense, fused_weight, project
from .rope import apply_rotary


class IdeficsAttention(nn.Module):
    def __init__(self, config: IdeficsConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.dropout = config.dropout
        self.qkv_packed: torch.Tensor | None = None  # see layout.py
        # Tensor parallelism (idefics.parallel): this rank's heads only, o_proj's partial sums added over the group.
        self.tp_group = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        *,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        """x (b, t, d); rope cos/sin (b, t, 1, hd); bool mask (b, 1, t, T) or None for plain causal."""
        b, t, _ = x.shape
        h, hd = self.num_heads, self.head_dim
        cos, sin = rope
        packed = fused_weight(self.qkv_packed, self.q_proj, self.k_proj, self.v_proj)
        if packed is not None:
            qkv = dense(x, packed).view(b, t, 3 * h, hd)
            qk = apply_rotary(qkv[:, :, : 2 * h], cos, sin)  # q and k heads rotated together
            q, k, v = qk[:, :, :h], qk[:, :, h:], qkv[:, :, 2 * h :]
        else:
            q = apply_rotary(project(self.q_proj, x).view(b, t, h, hd), cos, sin)
            k = apply_rotary(project(self.k_proj, x).view(b, t, h, hd), cos, sin)
            v = project(self.v_proj, x).view(b, t, h, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, h, t, hd)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (b, h, T, hd)
            if cache.static and mask is not None:  # a static buffer: attend over the positions the mask covers
                k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and t > 1)
        return reduce_sum(project(self.o_proj, y.transpose(1, 2).reshape(b, t, h * hd)), self.tp_group)
