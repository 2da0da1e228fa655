"""The two collectives a tensor-parallel model runs (`idefics.parallel` shards the weights and sets the groups).

A row-parallel projection (o_proj, down_proj) leaves each rank with a partial sum of the full output: `reduce_sum`
adds them. The column-parallel LM head leaves each rank with its share of the vocabulary's logits: `gather_vocab`
concatenates them. Both are PyTorch's functional collectives, which torch.compile traces and a CUDA graph captures;
with no group (one process) they return their input untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum x over the ranks of `group` (every rank gets the same result); x itself without a group."""
    if group is None:
        return x
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


def gather_vocab(x: torch.Tensor, group: dist.ProcessGroup | None, sizes: tuple[int, ...]) -> torch.Tensor:
    """x (..., sizes[rank]) on each rank -> (..., sum(sizes)) in rank order, every rank the same.

    Shards may differ in width by one (a vocabulary that the world size does not divide): each is padded to the widest
    for the collective and cut back after it."""
    if group is None:
        return x
    from torch.distributed import _functional_collectives as funcol

    widest = max(sizes)
    padded = torch.nn.functional.pad(x, (0, widest - x.shape[-1])).movedim(-1, 0).contiguous()  # (widest, ...)
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed in torch 2.10
    gathered = funcol.wait_tensor(gather(padded, 0, group))  # (ranks * widest, ...)
    parts = [gathered[r * widest : r * widest + size] for r, size in enumerate(sizes)]
    return torch.cat(parts, dim=0).movedim(0, -1)  # (..., vocab)
