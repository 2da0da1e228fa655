"""LLaMA decoder layer: pre-norm self-attention and SwiGLU MLP, each with a residual."""

import torch
from torch import nn

from ..cache import KVCache
from ..config import IdeficsConfig
from .attention import IdeficsAttention
from .layers import IdeficsMLP, IdeficsRMSNorm, dropout


class IdeficsDecoderLayer(nn.Module):
    def __init__(self, config: IdeficsConfig):
        super().__init__()
        self.self_attn = IdeficsAttention(config)
        self.mlp = IdeficsMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = IdeficsRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = IdeficsRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        """x (b, t, d) -> (b, t, d)."""
        h = self.self_attn(self.input_layernorm(x), rope, mask, cache=cache, layer_idx=layer_idx)
        x = x + dropout(h, self.dropout, self.training)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + dropout(h, self.dropout, self.training)
