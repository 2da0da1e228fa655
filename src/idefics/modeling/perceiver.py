"""Perceiver resampler (Flamingo): learned latents cross-attend to [image states; latents] and are refined by an MLP.

Each image's (1 + patches) vision states become `resampler_n_latents` states of the same width.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IdeficsConfig
from .layout import project


class IdeficsPerceiverAttention(nn.Module):
    def __init__(self, embed_dim: int, n_heads: int, head_dim: int, qk_layer_norms: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.qk_layer_norms = n_heads, head_dim, qk_layer_norms
        self.context_layer_norm = nn.LayerNorm(embed_dim)
        self.latents_layer_norm = nn.LayerNorm(embed_dim)
        if qk_layer_norms:
            self.q_layer_norm = nn.LayerNorm(head_dim)
            self.k_layer_norm = nn.LayerNorm(head_dim)
        self.q_proj = nn.Linear(embed_dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, n_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, n_heads * head_dim, bias=False)
        self.output_proj = nn.Linear(n_heads * head_dim, embed_dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """context (n, s, d), latents (n, l, d) -> (n, l, d)."""
        context, latents = self.context_layer_norm(context), self.latents_layer_norm(latents)
        kv_input = torch.cat([context, latents], dim=1)  # (n, s + l, d)
        n = context.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(n, x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)  # (n, h, *, hd)

        q = heads(project(self.q_proj, latents))
        k, v = heads(project(self.k_proj, kv_input)), heads(project(self.v_proj, kv_input))
        if self.qk_layer_norms:
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        y = F.scaled_dot_product_attention(q, k, v)  # (n, h, l, hd)
        return project(self.output_proj, y.transpose(1, 2).flatten(2))


class IdeficsPerceiverMLP(nn.Module):
    def __init__(self, embed_dim: int, intermediate_size: int):
        super().__init__()
        self.ln = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, intermediate_size, bias=False)
        self.c_proj = nn.Linear(intermediate_size, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.c_proj, F.relu(project(self.fc, self.ln(x))))


class IdeficsPerceiverResampler(nn.Module):
    def __init__(self, config: IdeficsConfig):
        super().__init__()
        p, d = config.perceiver_config, config.vision_config.embed_dim
        self.latents = nn.Parameter(torch.empty(p.resampler_n_latents, d))
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                [
                    IdeficsPerceiverAttention(d, p.resampler_n_heads, p.resampler_head_dim, p.qk_layer_norms_perceiver),
                    IdeficsPerceiverMLP(d, 4 * d),
                ]
            )
            for _ in range(p.resampler_depth)
        )
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """context (n, s, d) -> (n, l, d)."""
        latents = self.latents.expand(context.shape[0], -1, -1)  # (n, l, d)
        for attn, mlp in self.blocks:
            latents = latents + attn(context, latents)
            latents = latents + mlp(latents)
        return self.layer_norm(latents)
