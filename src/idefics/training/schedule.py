"""The learning-rate schedule: linear warmup from 0, then cosine decay to 0 at the last step."""

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor is step/warmup for the first `warmup` steps, then half a cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)  # never exactly 0: the first step already learns
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
