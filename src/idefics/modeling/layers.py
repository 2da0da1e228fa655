"""Small building blocks shared by the decoder and the gated cross-attention layers."""

import torch
import torch.nn.functional as F
from torch import nn

from ..collectives import reduce_sum
from .layout import dense, fused_weight, project

ACT_FNS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, skipped outright when it is the identity (no call per layer per decoding step)."""
    return F.dropout(x, p, True) if training and p > 0 else x


class IdeficsRMSNorm(nn.Module):
    """LLaMA RMSNorm: the statistic is computed in fp32, the result cast back to a half-precision weight's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32:  # one fused call; the same arithmetic as below
            return F.rms_norm(x.float(), x.shape[-1:], self.weight, eps=self.variance_epsilon)
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.variance_epsilon)  # fp32 statistic and scaling
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            normed = normed.to(self.weight.dtype)  # cast before the weight multiplies, as the reference does
        return self.weight * normed


class IdeficsMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT_FNS[hidden_act]
        self.gate_up_packed: torch.Tensor | None = None  # see layout.py
        self.tp_group = None  # tensor parallelism: this rank's share of f, down_proj's partial sums added

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = fused_weight(self.gate_up_packed, self.gate_proj, self.up_proj)
        if packed is not None:
            gate, up = dense(x, packed).chunk(2, dim=-1)  # (..., f) x2
            hidden = self.act_fn(gate) * up
        else:
            hidden = self.act_fn(project(self.gate_proj, x)) * project(self.up_proj, x)
        return reduce_sum(project(self.down_proj, hidden), self.tp_group)
