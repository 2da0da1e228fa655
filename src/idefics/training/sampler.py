"""Which rows each process trains on at each optimizer step: a deterministic plan from the seed.

Each epoch is a permutation of the rows drawn from `seed + epoch`. Optimizer step k of an epoch takes the next
`global_batch = batch_size * grad_accum * world_size` rows of it; the last step of an epoch tops up from the start
of the same permutation (as torch's DistributedSampler pads), so every step has the same shape on every process.
Within a step, micro-batch j of rank r holds rows [(j * world_size + r) * batch_size, ... + batch_size): the same
rows train in the same step whatever the split between processes and accumulation, so the update is the same.
The position in the data is the step number alone, which makes resuming exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_rows: int
    batch_size: int  # rows per micro-batch per process
    grad_accum: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.global_batch)

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def step_rows(self, step: int) -> list[int]:
        """The global batch of optimizer step `step` (0-based, counted across epochs)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.permutation(epoch)
        start = k * self.global_batch
        return [order[(start + i) % self.num_rows] for i in range(self.global_batch)]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's `grad_accum` micro-batches (row indices) for optimizer step `step`."""
        rows = self.step_rows(step)
        b, w = self.batch_size, self.world_size
        return [rows[(j * w + self.rank) * b : (j * w + self.rank + 1) * b] for j in range(self.grad_accum)]
