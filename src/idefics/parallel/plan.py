"""The tensor-parallel split: which weights each rank holds, applied to a model built on the meta device.

    decoder layer      q_proj k_proj v_proj  gate_proj up_proj   column-parallel: rows (heads, MLP width) split
                       o_proj                down_proj           row-parallel: columns split, outputs summed
    gated layer        the same for cross_attn and mlp (its image K/V projections by head, so each rank caches
                       only its heads' image keys and values)
    lm_head            the regular vocabulary's rows split (unevenly when the world size does not divide it),
                       logits gathered; the additional rows whole on every rank
    replicated         embeddings, norms, gates, the vision tower and the perceiver

The vision tower and perceiver are replicated: for idefics-80b they are 1.3 of 160 GB (ViT-H/14 in bf16), one image
through them costs ~0.3 TFLOP (well under a millisecond of an H100) against the decoder's prefill, and sharding them
would add two all-reduces per vision layer to every image. A model whose embedding is tied to its LM head keeps the
head whole (the table is replicated).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .world import TensorParallel, TensorParallelError


class Slice(NamedTuple):
    """The part of a checkpoint tensor a rank reads: [start, stop) along `dim`."""

    dim: int
    start: int
    stop: int


def _even(total: int, size: int, field: str, what: str) -> int:
    if total % size:
        raise TensorParallelError(
            f"tensor parallelism over {size} processes splits {what}, but the config's {field} ({total}) is not "
            f"divisible by {size}: use a world size that divides it"
        )
    return total // size


def _resize(linear: nn.Linear, out_features: int, in_features: int) -> None:
    """Give a meta-device Linear its shard's shape (the loader attaches the checkpoint slice)."""
    weight = linear.weight
    linear.weight = nn.Parameter(
        torch.empty(out_features, in_features, dtype=weight.dtype, device="meta"), requires_grad=weight.requires_grad
    )
    linear.out_features, linear.in_features = out_features, in_features


def vocab_shards(vocab: int, size: int) -> tuple[int, ...]:
    """Rows of the regular vocabulary per rank: as even as possible, the first ranks one more."""
    return tuple(vocab // size + (r < vocab % size) for r in range(size))


def apply_plan(model: nn.Module, tp: TensorParallel) -> dict[nn.Module, Slice]:
    """Shard `model` (IdeficsForVisionText2Text or IdeficsModel, on the meta device) for rank `tp.rank` in place.

    Returns, for every module whose `weight` is now a shard, the slice of the checkpoint tensor it must load.
    TensorParallelError names the config field that the world size does not divide.
    """
    if any(not p.is_meta for p in model.parameters()):
        raise TensorParallelError("the tensor-parallel plan applies to a model built on the meta device (loading)")
    c, n, r = model.config, tp.size, tp.rank
    _even(c.num_attention_heads, n, "num_attention_heads", "the attention heads")
    f = _even(c.intermediate_size, n, "intermediate_size", "the MLP width")
    group = tp.group if n > 1 else None  # one rank: the plan changes nothing and no collective runs
    slices: dict[nn.Module, Slice] = {}

    def column(linear: nn.Linear, rows: int) -> None:
        _resize(linear, rows, linear.in_features)
        slices[linear] = Slice(0, r * rows, (r + 1) * rows)

    def row(linear: nn.Linear, cols: int) -> None:
        _resize(linear, linear.out_features, cols)
        slices[linear] = Slice(1, r * cols, (r + 1) * cols)

    backbone = model.model if hasattr(model, "lm_head") else model
    heads = c.num_attention_heads // n
    width = heads * c.head_dim
    attentions = [layer.self_attn for layer in backbone.layers]
    attentions += [gated.cross_attn for gated in backbone.gated_cross_attn_layers]  # image K/V split by head too
    for attention in attentions:
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj):
            column(linear, width)
        row(attention.o_proj, width)
        attention.num_heads, attention.tp_group = heads, group
    for layer in [*backbone.layers, *backbone.gated_cross_attn_layers]:
        mlp = layer.mlp
        column(mlp.gate_proj, f)
        column(mlp.up_proj, f)
        row(mlp.down_proj, f)
        mlp.tp_group = group
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is not backbone.embed_tokens.weight:
        sizes = vocab_shards(head.out_features, n)
        start = sum(sizes[:r])
        weight = head.weight
        head.weight = nn.Parameter(
            torch.empty(sizes[r], head.in_features, dtype=weight.dtype, device="meta"),
            requires_grad=weight.requires_grad,
        )
        head.out_features = sizes[r]
        head.tp_group, head.tp_sizes = group, sizes
        slices[head] = Slice(0, start, start + sizes[r])
    return slices
