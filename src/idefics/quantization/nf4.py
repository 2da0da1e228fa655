"""NF4 (QLoRA's 4-bit NormalFloat): the flattened weight in blocks of `block_size`, each scaled by its absolute
maximum and rounded to the nearest of the 16 NF4 values; with `double_quant` the absmax values are themselves
stored as int8 (blocks of 256, around their mean). There is no NF4 kernel: `matmul` dequantises the weight to the
activation dtype and multiplies (one layer's weight at a time)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kernels import nf4_code
from .linear import QuantizedLinear, row_chunks

ABSMAX_BLOCK = 256  # absmax values sharing one scale under double quantisation
_CODES: dict[torch.device, torch.Tensor] = {}


def _code(device: torch.device) -> torch.Tensor:
    if device not in _CODES:
        _CODES[device] = nf4_code(device)
    return _CODES[device]


class Nf4Linear(QuantizedLinear):
    """`weight` uint8 (ceil(blocks * block_size / 2),), two codes a byte, and the absmax per block: `weight_absmax`
    float32 (blocks,), or int8 (blocks,) with `weight_absmax_scale` (ceil(blocks / 256),) and
    `weight_absmax_offset` (1,) when double-quantised."""

    scheme = "nf4"

    def __init__(self, in_features: int, out_features: int, *, block_size: int, double_quant: bool, **kwargs):
        super().__init__(in_features, out_features, block_size=block_size, double_quant=double_quant, **kwargs)
        self.block_size, self.double_quant = block_size, double_quant

    @property
    def blocks(self) -> int:
        return math.ceil(self.in_features * self.out_features / self.options["block_size"])

    def tensor_specs(self):
        blocks, size = self.blocks, self.options["block_size"]
        specs = {"weight": ((math.ceil(blocks * size / 2),), torch.uint8)}  # an odd count ends in a padding code
        if not self.options["double_quant"]:
            return specs | {"weight_absmax": ((blocks,), torch.float32)}
        return specs | {
            "weight_absmax": ((blocks,), torch.int8),
            "weight_absmax_scale": ((math.ceil(blocks / ABSMAX_BLOCK),), torch.float32),
            "weight_absmax_offset": ((1,), torch.float32),
        }

    def quantize_(self, weight: torch.Tensor) -> None:
        blocks, size, device = self.blocks, self.block_size, weight.device
        flat = weight.flatten()  # (n * k,) the last block is padded with zeros as it is read
        packed = torch.empty(math.ceil(blocks * size / 2), dtype=torch.uint8, device=device)
        absmax = torch.empty(blocks, dtype=torch.float32, device=device)
        code = _code(device)
        midpoints = (code[1:] + code[:-1]) / 2  # (15,) the nearest code is the number of midpoints below
        for pairs in row_chunks(math.ceil(blocks / 2), 2 * size):  # pairs of blocks: each chunk starts on a byte
            chunk = slice(2 * pairs.start, min(2 * pairs.stop, blocks))
            start, stop = chunk.start * size, chunk.stop * size
            w = F.pad(flat[start:stop].float(), (0, max(0, stop - flat.numel()))).view(-1, size)  # (chunk, size)
            absmax[chunk] = w.abs().amax(dim=1).clamp(min=1e-12)
            index = torch.bucketize(w / absmax[chunk, None], midpoints).to(torch.uint8).flatten()
            index = F.pad(index, (0, index.numel() % 2))  # an odd block size and count: one padding code
            packed[start // 2 : start // 2 + index.numel() // 2] = (index[::2] << 4) | index[1::2]
        tensors = {"weight": packed}
        if not self.double_quant:
            self._set(**tensors, weight_absmax=absmax)
            return
        offset = absmax.mean().view(1)
        centred = F.pad(absmax - offset, (0, -blocks % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)  # (chunks, 256)
        scale = (centred.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (chunks,)
        q = torch.round(centred / scale[:, None]).clamp(-127, 127).to(torch.int8).flatten()[:blocks]
        self._set(**tensors, weight_absmax=q, weight_absmax_scale=scale, weight_absmax_offset=offset)

    def absmax(self) -> torch.Tensor:
        """float32 (blocks,)."""
        if not self.double_quant:
            return self.weight_absmax.float()
        scale = self.weight_absmax_scale.float().repeat_interleave(ABSMAX_BLOCK)[: self.blocks]
        return self.weight_absmax.float() * scale + self.weight_absmax_offset.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        index = torch.stack([self.weight >> 4, self.weight & 15], dim=-1).flatten()[: self.blocks * self.block_size]
        index = index.long()  # (blocks * block_size,)
        w = _code(self.weight.device)[index].view(self.blocks, self.block_size) * self.absmax()[:, None]
        return w.flatten()[: self.out_features * self.in_features].view(self.out_features, self.in_features).to(dtype)
