"""`QuantizedLinear`: what every weight-only quantised Linear shares.

A subclass stores its quantised weight as frozen Parameters (`weight` and `weight_*`; frozen parameters stay out of
training checkpoints and optimizers), keeps the bias in full precision, and implements `quantize_` (float weight in),
`dequantize` (float weight out) and `matmul` (its kernel). Without gradients `forward` runs the kernel; when the
input needs a gradient (QLoRA) the weight stays frozen and dx = dy W uses the dequantised weight, recomputed in the
backward rather than kept, so training holds only the quantised weights.

Legend for shape comments: m rows, k in features, n out features.
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK_ELEMENTS = 1 << 20  # weights quantised per step: temporaries stay small and are reused, whatever the layer


def row_chunks(rows: int, row_length: int) -> list[slice]:
    """Slices of `rows` holding about CHUNK_ELEMENTS weights each. Quantising a large weight in one go would make
    several full-size float32 temporaries, which the C allocator tends to keep (the process's peak then grows
    with every layer); chunks of one size are reused instead."""
    step = max(1, CHUNK_ELEMENTS // row_length)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class QuantizedLinear(nn.Module):
    """A Linear layer (x -> x W^T + b) whose weight is stored quantised; subclasses name their `scheme`."""

    scheme: str = ""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, device=None, bias_dtype=None, **options):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.options = options
        for name, (shape, dtype) in self.tensor_specs().items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device), False))
        bias_tensor = torch.empty(out_features, device=device, dtype=bias_dtype) if bias else None
        self.bias = nn.Parameter(bias_tensor, requires_grad=False) if bias else None

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of the stored quantised tensors (the checkpoint layout)."""
        raise NotImplementedError

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> QuantizedLinear:
        """The quantised counterpart of `linear` (still empty when `linear` is on the meta device)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=weight.device,
                    bias_dtype=weight.dtype if weight.is_floating_point() else None, **options)  # fmt: skip
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        if not weight.is_meta:
            layer.quantize_(weight.detach())
        return layer

    def quantize_(self, weight: torch.Tensor) -> None:
        """Quantise a float (n, k) weight into this layer's tensors, on the weight's device."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (n, k) weight this layer computes with."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(m, k) -> (m, n) in x's dtype, without bias; by default dequantise-then-matmul."""
        return x @ self.dequantize(x.dtype).T

    def finish_loading(self) -> None:
        """Called once the stored tensors are attached: convert them to the layout the device's kernel wants."""

    def _set(self, **tensors: torch.Tensor) -> None:
        for name, tensor in tensors.items():
            setattr(self, name, nn.Parameter(tensor, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (m, k)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _FrozenWeightMatmul.apply(flat, self)
        else:
            y = self.matmul(flat)
        y = y.view(*x.shape[:-1], self.out_features)  # (..., n)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight (quantised values and their scales), bias excluded."""
        return sum(t.numel() * t.element_size() for name, t in self.named_parameters() if name != "bias")

    def extra_repr(self) -> str:
        options = "".join(f", {key}={value}" for key, value in self.options.items())
        return f"{self.in_features} -> {self.out_features}, {self.scheme}{options}, bias={self.bias is not None}"


class _FrozenWeightMatmul(torch.autograd.Function):
    """y = x W^T with a frozen quantised W: the kernel forward, dx = dy W from a dequantised W in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return dy @ ctx.layer.dequantize(dy.dtype), None  # (m, k)
