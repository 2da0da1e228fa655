"""CLIP vision transformer (ViT-H/14 in the published checkpoints).

IDEFICS feeds the decoder with the last hidden state of every token, CLS included, without the post-layernorm.
Module names follow the checkpoint keys (`pre_layrnorm` is the upstream spelling).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IdeficsVisionConfig
from .layers import ACT_FNS
from .layout import project


class IdeficsVisionEmbeddings(nn.Module):
    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(config.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.embed_dim)

    def interpolated_positions(self, height: int, width: int) -> torch.Tensor:
        """Bicubically resize the patch position grid to an image of (height, width) pixels -> (1 + patches, d)."""
        pos = self.position_embedding.weight  # (1 + p, d)
        grid = math.sqrt(pos.shape[0] - 1)
        rows, cols = height // self.patch_size, width // self.patch_size
        if rows * cols == pos.shape[0] - 1 and height == width:
            return pos
        side = int(grid)
        patch_pos = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, d, g, g)
        # The +0.1 reproduces the reference's (DINO's) scale factors, which makes the rounded output size exact.
        scale = ((rows + 0.1) / grid, (cols + 0.1) / grid)
        resized = F.interpolate(patch_pos.float(), scale_factor=scale, mode="bicubic", align_corners=False)
        if resized.shape[-2:] != (rows, cols):
            raise ValueError(f"cannot interpolate {side}x{side} position grid to {rows}x{cols} patches")
        resized = resized.to(pos.dtype).permute(0, 2, 3, 1).reshape(rows * cols, -1)  # (p', d)
        return torch.cat([pos[:1], resized], dim=0)  # (1 + p', d)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        n, _, height, width = pixel_values.shape  # (n, 3, r, r)
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(
                f"images are {height}x{width} but the vision model expects {self.image_size}x{self.image_size}; "
                "pass interpolate_pos_encoding=True to run at another resolution"
            )
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (n, d, g, g)
        patches = patches.flatten(2).transpose(1, 2)  # (n, p, d)
        cls = self.class_embedding.expand(n, 1, -1)  # (n, 1, d)
        x = torch.cat([cls, patches], dim=1)  # (n, 1 + p, d)
        if interpolate_pos_encoding:
            return x + self.interpolated_positions(height, width)
        return x + self.position_embedding.weight


class IdeficsVisionAttention(nn.Module):
    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        d = config.embed_dim
        self.num_heads = config.num_attention_heads
        self.k_proj, self.v_proj, self.q_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = (
            project(p, x).view(n, s, self.num_heads, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v)  # (n, h, s, hd)
        return project(self.out_proj, y.transpose(1, 2).reshape(n, s, d))


class IdeficsVisionMLP(nn.Module):
    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.embed_dim)
        self.act = ACT_FNS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.fc2, self.act(project(self.fc1, x)))


class IdeficsVisionEncoderLayer(nn.Module):
    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.self_attn = IdeficsVisionAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = IdeficsVisionMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class IdeficsVisionEncoder(nn.Module):
    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(IdeficsVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class IdeficsVisionTransformer(nn.Module):
    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = IdeficsVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.encoder = IdeficsVisionEncoder(config)
        # Kept so checkpoints load strictly; IDEFICS never uses the pooled CLS output.
        self.post_layernorm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, *, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """pixel_values (n, 3, r, r) -> last hidden state (n, 1 + patches, d)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x
