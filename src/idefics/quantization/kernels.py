"""Every low-level quantised operation in one place: PyTorch's weight-only kernels and their weight layouts.

- int8: `torch._weight_int8pack_mm(x, w, scales)` with x (m, k) and scales (n,) in the activation dtype, w int8
  (n, k), on CPU and CUDA. bfloat16 activations are the fast case (see `ACTIVATION_DTYPE`).
- int4: `torch._weight_int4pack_mm_for_cpu` (CPU) and `torch._weight_int4pack_mm` (CUDA, tinygemm), both taking
  a weight repacked for the device by `torch._convert_weight_to_int4pack[_for_cpu]` and one (k / g, n, 2) tensor of
  (scale, zero) pairs; w = (q - 8) * scale + zero for a 4-bit value q in [0, 15]. Group sizes 32, 64, 128, 256.
- NF4 has no kernel here: its layers dequantise and run `F.linear`.

The repacked int4 layouts are opaque and differ between devices (and between CPU instruction sets), so checkpoints
store a plain one (`pack_nibbles`) and `int4_unpack` recovers it from any device layout: the repacking only moves
4-bit values around, so repacking the digits of every value's index, four bits at a time, shows where each went.
"""

from __future__ import annotations

import math

import torch

# Activations go into the int8 and int4 kernels as bfloat16: on CPU it is the dtype they are fast with (measured
# here, one 2048x2048 row product, 2 threads: int8 0.07 ms with bf16 against 1.37 ms with fp32 activations, and
# 0.29 ms for fp32 F.linear; int4 0.07 ms against 3.1 ms); on CUDA tinygemm takes bf16 only.
ACTIVATION_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept
INT8_K_MULTIPLE = 16  # the int8 kernel reads k in vectors of 16: other widths crash or go wrong (torch 2.13, CPU)


def int8_kernel_fits(in_features: int) -> bool:
    """Whether the int8 kernel takes a layer of this width (any number of rows; measured on CPU, torch 2.13)."""
    return in_features % INT8_K_MULTIPLE == 0


def int4_group_fits(in_features: int, group_size: int) -> bool:
    """Whether int4 can store a layer of this width in groups of `group_size`: the groups tile the row, and the
    values pack two a byte (`pack_nibbles`). The kernels take only `INT4_GROUP_SIZES` (`int4_kernel_fits`)."""
    return in_features % group_size == 0 and in_features % 2 == 0


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(m, k) x int8 (n, k) with per-row `scale` (n,) -> (m, n); x and scale in ACTIVATION_DTYPE. A width the
    kernel cannot take (k not a multiple of 16: small test models, odd adapters) dequantises and multiplies in
    float32 instead."""
    if not int8_kernel_fits(weight.shape[1]):
        return (x.float() @ (weight.float() * scale.float()[:, None]).T).to(x.dtype)  # (m, n)
    return torch._weight_int8pack_mm(x, weight, scale)


def int4_kernel_fits(out_features: int, in_features: int, group_size: int, device: torch.device) -> bool:
    """Whether the int4 kernel of `device` takes a layer of this shape (otherwise it dequantises)."""
    if group_size not in INT4_GROUP_SIZES or not int4_group_fits(in_features, group_size):
        return False
    if device.type == "cpu":
        return out_features % 16 == 0 and in_features % 2 == 0
    if device.type == "cuda":
        return out_features % 8 == 0 and _inner_k_tiles(in_features) is not None
    return False


def _inner_k_tiles(in_features: int) -> int | None:
    return next((tiles for tiles in (8, 4, 2) if in_features % (tiles * 16) == 0), None)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, k) values in [0, 15] -> uint8 (n, k / 2), the even column in the high nibble (the stored int4 layout)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (n, k / 2) -> uint8 (n, k) values in [0, 15]; the inverse of `pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """(n, k) values in [0, 15] on the kernel's device -> that device's int4 kernel layout."""
    if q.device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    return torch._convert_weight_to_int4pack(pack_nibbles(q), _inner_k_tiles(q.shape[1]))


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit field of a packed tensor's bytes, in storage order (n * k,)."""
    data = packed.contiguous().view(torch.uint8).flatten()
    return torch.stack([data & 15, data >> 4], dim=-1).flatten()


def int4_unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """A kernel-layout int4 weight -> uint8 (n, k) values in [0, 15], whatever the device's layout."""
    n, k = out_features, in_features
    index = torch.arange(n * k, device=packed.device)  # (n * k,) each value's position
    source = torch.zeros(n * k, dtype=torch.int64, device=packed.device)  # slot -> position of the value there
    for shift in range(0, max(4, math.ceil(math.log2(n * k) / 4) * 4), 4):
        digits = ((index >> shift) & 15).view(n, k)
        source |= _nibbles(int4_pack(digits)).long() << shift
    values = torch.empty(n * k, dtype=torch.uint8, device=packed.device)
    values[source] = _nibbles(packed)
    return values.view(n, k)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_zero: torch.Tensor) -> torch.Tensor:
    """(m, k) x a kernel-layout int4 weight -> (m, n); x and scale_zero (k / g, n, 2) in ACTIVATION_DTYPE."""
    if packed.device.type == "cpu":
        return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zero)
    return torch._weight_int4pack_mm(x, packed, group_size, scale_zero)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314), ascending in [-1, 1].

    Quantiles of N(0, 1) spaced so that both ends and an exact 0 are representable: 8 non-negative and 7 negative
    levels, scaled so that the ends are -1 and 1."""
    offset = 0.9677083  # the outermost quantile the paper uses: (1 - 1/(2*15) + 1 - 1/(2*16)) / 2
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # (8,) descending
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # (7,)
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    values = values / values.abs().max()
    return values.sort().values.to(device=device, dtype=torch.float32)
