"""int8 weight-only: one symmetric scale per output channel, w ~ q * scale with q in [-127, 127]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import ACTIVATION_DTYPE, int8_matmul
from .linear import QuantizedLinear, row_chunks


def int8_rows(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., k) times int8 `weight` (n, k) with per-row `scale` (n,) -> (..., n) in x's dtype, on CPU or CUDA.
    Conversions are skipped where the dtype already fits: a decode step makes ~65 of these calls."""
    flat = x.reshape(-1, x.shape[-1])  # (m, k)
    y = int8_matmul(flat if flat.dtype == ACTIVATION_DTYPE else flat.to(ACTIVATION_DTYPE), weight, scale)  # (m, n)
    y = y.view(*x.shape[:-1], weight.shape[0])  # (..., n)
    return y if y.dtype == x.dtype else y.to(x.dtype)


class Int8Linear(QuantizedLinear):
    """`weight` int8 (n, k) and `weight_scale` (n,) in bfloat16 (the kernel's activation dtype)."""

    scheme = "int8"

    def tensor_specs(self):
        n, k = self.out_features, self.in_features
        return {"weight": ((n, k), torch.int8), "weight_scale": ((n,), ACTIVATION_DTYPE)}

    def quantize_(self, weight: torch.Tensor) -> None:
        n, k = weight.shape
        q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
        scale = torch.empty(n, dtype=ACTIVATION_DTYPE, device=weight.device)
        for rows in row_chunks(n, k):
            w = weight[rows].float()  # (rows, k)
            scale[rows] = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # rounded as the kernel will use it
            q[rows] = torch.round(w / scale[rows].float()[:, None]).clamp(-127, 127)
        self._set(weight=q, weight_scale=scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.float()[:, None]).to(dtype)  # (n, k)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type not in ("cpu", "cuda"):
            return super().matmul(x)
        return int8_matmul(x.to(ACTIVATION_DTYPE), self.weight, self.weight_scale).to(x.dtype)  # (m, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel straight away when no gradient is wanted: a decode step runs ~100 of these, and the generic
        # path's few extra small operations per call add up to a tenth of the step.
        if (x.requires_grad and torch.is_grad_enabled()) or not (x.is_cpu or x.is_cuda):
            return super().forward(x)
        y = int8_rows(x, self.weight, self.weight_scale)  # (..., n)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def finish_loading(self) -> None:
        # A memory-mapped weight is copied into memory of its own: the CPU kernel reads past the end of the weight
        # (a crash when it is the last tensor of a mapped file). A loader may have cast the scale.
        self._set(weight=self.weight.clone(), weight_scale=self.weight_scale.to(ACTIVATION_DTYPE))


@dataclass(eq=False)
class Int8Pack:
    """Bias-free Int8Linears of one input run as one kernel call (q/k/v, gate/up; see `modeling/layout.py`): their
    weights and scales become row blocks (views) of `weight` and `scale`, so values and checkpoints are unchanged."""

    weight: torch.Tensor  # int8 (sum of n, k)
    scale: torch.Tensor  # (sum of n,) in ACTIVATION_DTYPE

    @classmethod
    def of(cls, layers: list[Int8Linear]) -> Int8Pack:
        pack = cls(torch.cat([lin.weight.detach() for lin in layers]), torch.cat([lin.weight_scale for lin in layers]))
        start = 0
        for lin in layers:
            rows = slice(start, start + lin.out_features)
            lin.weight.data, lin.weight_scale.data = pack.weight[rows], pack.scale[rows]  # (n, k), (n,) views
            start = rows.stop
        return pack

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., k) -> (..., sum of n) in x's dtype."""
        return int8_rows(x, self.weight, self.scale)
