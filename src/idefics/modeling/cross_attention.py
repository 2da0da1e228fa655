"""Gated cross-attention layer (Flamingo): text queries attend to image states, scaled by tanh gates.

    x = x + tanh(alpha_cross_attn) * gate * CrossAttn(RMSNorm(x), image)
    x = x + tanh(alpha_dense) * MLP(RMSNorm(x))

`gate` (b, t, 1) is 0 for tokens that attend to no image: their cross-attention output is exactly zero, while the dense
branch still runs for every token. The image keys and values do not depend on the text, so `project_image` computes
them once and the cache reuses them at every decoding step.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..collectives import reduce_sum
from ..config import IdeficsConfig
from .layers import IdeficsMLP, IdeficsRMSNorm, dropout
from .layout import project


class IdeficsCrossAttention(nn.Module):
    def __init__(self, config: IdeficsConfig):
        super().__init__()
        d, kv_dim = config.hidden_size, config.vision_config.embed_dim
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(kv_dim, d, bias=False)
        self.v_proj = nn.Linear(kv_dim, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.qk_layer_norms = config.qk_layer_norms
        if config.qk_layer_norms:
            self.q_layer_norm = IdeficsRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_layer_norm = IdeficsRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.dropout = config.dropout
        self.tp_group = None  # tensor parallelism: as in IdeficsAttention (image K/V of this rank's heads only)

    def project_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (b, n*s, d_img) -> keys, values (b, h, n*s, hd)."""
        b, m, _ = image.shape
        k = project(self.k_proj, image).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        v = project(self.v_proj, image).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        if self.qk_layer_norms:
            k = self.k_layer_norm(k)
        return k, v

    def forward(self, x: torch.Tensor, image_kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """x (b, t, d); image_kv (b, h, n*s, hd) x2; bool mask (b, 1, t, n*s) -> (b, t, d)."""
        b, t, _ = x.shape
        q = project(self.q_proj, x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (b, h, t, hd)
        if self.qk_layer_norms:
            q = self.q_layer_norm(q)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, *image_kv, attn_mask=mask, dropout_p=dropout)  # (b, h, t, hd)
        y = y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # (b, t, h*hd)
        return reduce_sum(project(self.o_proj, y), self.tp_group)


class IdeficsGatedCrossAttentionLayer(nn.Module):
    def __init__(self, config: IdeficsConfig):
        super().__init__()
        self.cross_attn = IdeficsCrossAttention(config)
        self.mlp = IdeficsMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = IdeficsRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = IdeficsRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        shape = (1, 1, config.hidden_size) if config.alpha_type == "vector" else (1,)
        self.alpha_cross_attn = nn.Parameter(torch.empty(shape))
        self.alpha_dense = nn.Parameter(torch.empty(shape))
        self.dropout = config.dropout
        self.reset_gates(config)

    @torch.no_grad()
    def reset_gates(self, config: IdeficsConfig) -> None:
        """Initialise both gates as `alpha_initializer` says (a no-op on the meta device)."""
        for alpha in (self.alpha_cross_attn, self.alpha_dense):
            if config.alpha_initializer == "zeros":
                alpha.zero_()
            elif config.alpha_initializer == "ones":
                alpha.fill_(1.0)
            else:  # normal | gaussian | random, for either alpha_type
                alpha.normal_(0.0, config.alphas_initializer_range)

    def forward(
        self,
        x: torch.Tensor,
        image_kv: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None,
        mask: torch.Tensor | None,
        gate: torch.Tensor | None,
    ) -> torch.Tensor:
        """x (b, t, d); gate (b, t, 1) 0/1 in x's dtype; image_kv None means no token attends to an image.

        `image_kv` is the projected image keys/values, or the image states (b, n, s, d_img) to project here (training,
        so that a sharded or checkpointed layer computes them inside its own call)."""
        if isinstance(image_kv, torch.Tensor):
            image_kv = self.cross_attn.project_image(image_kv.flatten(1, 2).to(x.dtype))
        if image_kv is not None:
            h = self.cross_attn(self.input_layernorm(x), image_kv, mask)
            h = dropout(h, self.dropout, self.training) * gate
            x = x + torch.tanh(self.alpha_cross_attn) * h
        h = dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training)
        return x + torch.tanh(self.alpha_dense) * h
