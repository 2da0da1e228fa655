"""int4 weight-only, group-wise asymmetric: each run of `group_size` input features of a row has a scale and a
zero, w ~ (q - 8) * scale + zero with q in [0, 15] (the layout of PyTorch's int4 kernels, as gpt-fast uses them)."""

from __future__ import annotations

import torch

from .kernels import (
    ACTIVATION_DTYPE,
    int4_kernel_fits,
    int4_matmul,
    int4_pack,
    int4_unpack,
    pack_nibbles,
    unpack_nibbles,
)
from .linear import QuantizedLinear, row_chunks


class Int4Linear(QuantizedLinear):
    """`weight` uint8 (n, k / 2), two values a byte (`kernels.pack_nibbles`), and `weight_scale_zero` (k / g, n, 2)
    in bfloat16. In memory, on a device whose kernel takes the shape, `weight` is repacked into the kernel's layout;
    `state_dict` always gives the plain one."""

    scheme = "int4"

    def __init__(self, in_features: int, out_features: int, *, group_size: int, **kwargs):
        super().__init__(in_features, out_features, group_size=group_size, **kwargs)
        self.group_size = group_size
        self.packed_for: str | None = None  # the device type whose kernel layout `weight` is in, if any

    @property
    def packed(self) -> bool:
        return self.packed_for is not None

    def tensor_specs(self):
        n, k, g = self.out_features, self.in_features, self.options["group_size"]
        return {"weight": ((n, k // 2), torch.uint8), "weight_scale_zero": ((k // g, n, 2), ACTIVATION_DTYPE)}

    def quantize_(self, weight: torch.Tensor) -> None:
        n, k, g = self.out_features, self.in_features, self.group_size
        packed = torch.empty(n, k // 2, dtype=torch.uint8, device=weight.device)
        scale_zero = torch.empty(k // g, n, 2, dtype=ACTIVATION_DTYPE, device=weight.device)
        for rows in row_chunks(n, k):
            w = weight[rows].float().view(-1, k // g, g)  # (rows, k / g, g)
            low, high = w.amin(dim=-1), w.amax(dim=-1)  # (rows, k / g)
            scale = ((high - low) / 15).clamp(min=1e-6).to(ACTIVATION_DTYPE)
            zero = (low + 8 * scale.float()).to(ACTIVATION_DTYPE)  # rounded as the kernel will use them
            q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
            packed[rows] = pack_nibbles(q.view(-1, k))
            scale_zero[:, rows] = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (k / g, rows, 2)
        self._set(weight=packed, weight_scale_zero=scale_zero)
        self.packed_for = None
        self.finish_loading()

    def finish_loading(self) -> None:
        self._set(weight_scale_zero=self.weight_scale_zero.to(ACTIVATION_DTYPE))
        device = self.weight.device
        if not self.packed and int4_kernel_fits(self.out_features, self.in_features, self.group_size, device):
            self._set(weight=int4_pack(unpack_nibbles(self.weight)))
            self.packed_for = device.type

    def _check_device(self) -> None:
        if self.weight.device.type != self.packed_for:
            raise RuntimeError(
                f"int4 weights packed for the {self.packed_for} kernel were moved to {self.weight.device}: load the "
                "model with device= instead of moving it"
            )

    def values(self) -> torch.Tensor:
        """uint8 (n, k) values in [0, 15]."""
        if self.packed:
            self._check_device()
            return int4_unpack(self.weight, self.out_features, self.in_features)
        return unpack_nibbles(self.weight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        scale, zero = self.weight_scale_zero.float().transpose(0, 1).unbind(-1)  # (n, k / g) each
        q = self.values().float().view(n, k // g, g)
        return ((q - 8) * scale[..., None] + zero[..., None]).view(n, k).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return super().matmul(x)
        self._check_device()
        y = int4_matmul(x.to(ACTIVATION_DTYPE), self.weight, self.group_size, self.weight_scale_zero)
        return y.to(x.dtype)  # (m, n)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "weight"] = pack_nibbles(self.values())
