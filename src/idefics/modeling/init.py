"""Random initialisation for training from scratch (the demo model): the reference's scheme.

Linear, Conv2d and embedding weights ~ N(0, initializer_range) with zero biases, norms at 1 / 0, the vision class
embedding and the perceiver latents ~ N(0, 1), and the gates as `alpha_initializer` says. Rotary and position-id
buffers are recomputed. Models built by `from_pretrained` never need this: their tensors come from the checkpoint.
"""

import torch
from torch import nn

from .cross_attention import IdeficsGatedCrossAttentionLayer
from .embeddings import IdeficsDecoupledEmbedding, IdeficsDecoupledLinear
from .layers import IdeficsRMSNorm
from .perceiver import IdeficsPerceiverResampler
from .vision import IdeficsVisionEmbeddings


@torch.no_grad()
def init_weights(model: nn.Module, *, seed: int | None = None) -> None:
    """Fill every parameter of an IDEFICS model (or backbone) in place; `seed` makes it reproducible."""
    config = model.config
    if seed is not None:
        torch.manual_seed(seed)
    std = config.initializer_range
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding | IdeficsDecoupledEmbedding | IdeficsDecoupledLinear):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, IdeficsRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, IdeficsVisionEmbeddings):
            module.class_embedding.normal_()
        elif isinstance(module, IdeficsPerceiverResampler):
            module.latents.normal_()
        elif isinstance(module, IdeficsGatedCrossAttentionLayer):
            module.reset_gates(config)
    device = next(model.parameters()).device
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device)
