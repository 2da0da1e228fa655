"""int8 weight-only: one symmetric scale per output channel, w ~ q * scale with q in [-127, 127]."""

from __future__ import annotations

import torch

from .kernels import ACTIVATION_DTYPE, int8_matmul
from .linear import QuantizedLinear, row_chunks


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

    def finish_loading(self) -> None:
        # A memory-mapped weight is copied into memory of its own: the CPU kernel reads past the end of the weight
        # (a crash when it is the last tensor of a mapped file). A loader may have cast the scale.
        self._set(weight=self.weight.clone(), weight_scale=self.weight_scale.to(ACTIVATION_DTYPE))
