"""`Int8Head`: the LM head with its vocabulary rows in int8 per output channel.

The head is the largest single matrix a decode step reads: on the `bench` preset (32000 x 512) it took 1.6 ms of a
~6 ms int8 decode step in bfloat16 and takes 0.5 ms in int8 (2 threads, weights not in cache). Its logits stay within
cosine 0.9999 of full precision on their own (`tests/quantization/test_quant_layers.py`); in a whole int8 model of
that preset the logits' cosine to float32 moved from 0.99867 to 0.99865 (KL 1.30e-3 -> 1.33e-3). The 2-row
`additional_fc` of the decoupled head stays in full precision. A head tied to the embedding table is not quantised
(the table would have to exist twice)"""

from __future__ import annotations

import torch
from torch import nn

from ..collectives import gather_vocab
from .int8 import Int8Linear


class Int8Head(Int8Linear):
    """`IdeficsDecoupledLinear` with `weight` int8 (vocab, d) and `weight_scale` (vocab,); the same checkpoint keys
    (`lm_head.weight`, `lm_head.additional_fc.weight`) plus `lm_head.weight_scale`."""

    def __init__(self, in_features: int, out_features: int, additional_fc: nn.Linear | None = None, *, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)
        self.out_additional_features = additional_fc.out_features if additional_fc is not None else 0
        if additional_fc is not None:
            self.additional_fc = additional_fc  # kept as it is, full precision
        self.tp_group, self.tp_sizes = None, ()  # tensor parallelism: as in IdeficsDecoupledLinear

    @classmethod
    def from_head(cls, head: nn.Module) -> Int8Head:
        """The int8 counterpart of an `IdeficsDecoupledLinear` (still empty when `head` is on the meta device)."""
        weight = head.weight
        layer = cls(head.in_features, head.out_features, getattr(head, "additional_fc", None), device=weight.device)
        layer.tp_group, layer.tp_sizes = getattr(head, "tp_group", None), getattr(head, "tp_sizes", ())
        if not weight.is_meta:
            layer.quantize_(weight.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> logits (..., vocab + additional) in x's dtype."""
        logits = gather_vocab(super().forward(x), self.tp_group, self.tp_sizes)  # (..., vocab)
        if self.out_additional_features > 0:
            logits = torch.cat([logits, self.additional_fc(x).to(logits.dtype)], dim=-1)
        return logits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, additional={self.out_additional_features}"
