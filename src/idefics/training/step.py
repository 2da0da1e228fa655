"""One optimizer step and one evaluation pass, with the loss normalised by the global count of label tokens.

Every micro-batch's loss is a *sum* of token cross-entropies divided by the number of label tokens in the whole
step: all micro-batches of all processes (counted before the first backward). Gradient accumulation and the split
between processes therefore change nothing: batch 4 x accumulation 1, batch 1 x accumulation 4 and 2 processes x 2
give the same update. FSDP averages gradients over processes, so each process scales its loss by the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .data import SFTDataset, collate
from .distributed import World, all_sum, set_gradient_sync

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_attention_mask")


def label_count(labels: torch.Tensor) -> int:
    """How many positions of labels (b, t) carry a loss (the first position predicts nothing)."""
    return int((labels[:, 1:] != -100).sum())


def _forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, device: torch.device, bf16: bool):
    """The summed token loss of one micro-batch; the LM head runs only where there is a label."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in (*MODEL_INPUTS, "labels")}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(**inputs, return_logits=False, loss_reduction="sum").loss


@dataclass
class StepStats:
    loss: float  # mean cross-entropy per label token over the whole step, all processes
    grad_norm: float
    label_tokens: int  # over all processes
    tokens: int  # non-padding input tokens, over all processes


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: SFTDataset,
    micro_batches: list[list[int]],
    *,
    world: World,
    pad_token_id: int,
    max_grad_norm: float,
    bf16: bool,
) -> StepStats:
    """Forward/backward every micro-batch of this process, clip, step the optimizer (the scheduler is the
    caller's)."""
    batches = [collate([dataset[i] for i in rows], pad_token_id=pad_token_id) for rows in micro_batches]
    local_labels = sum(label_count(b["labels"]) for b in batches)
    local_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    global_labels, global_tokens = all_sum(world, local_labels, local_tokens)
    scale = world.world_size / max(global_labels, 1.0)
    loss_sum = 0.0
    for j, batch in enumerate(batches):
        if world.distributed:
            set_gradient_sync(model, j == len(batches) - 1)
        loss = _forward_loss(model, batch, device=world.device, bf16=bf16)
        (loss * scale).backward()
        loss_sum += loss.item()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    (total_loss,) = all_sum(world, loss_sum)
    return StepStats(
        loss=total_loss / max(global_labels, 1.0),
        grad_norm=float(grad_norm),
        label_tokens=int(global_labels),
        tokens=int(global_tokens),
    )


@torch.no_grad()
def evaluate(model: nn.Module, dataset: SFTDataset, *, world: World, batch_size: int, pad_token_id: int, bf16: bool):
    """Mean cross-entropy per label token over the whole dataset, every process taking its share. Each process runs
    the same number of forwards (FSDP gathers layers collectively): one without rows repeats row 0 and counts 0."""
    was_training = model.training
    model.eval()
    loss_sum, labels = 0.0, 0
    chunk = batch_size * world.world_size
    for start in range(0, len(dataset), chunk):
        rows = list(range(start, min(start + chunk, len(dataset))))[world.rank * batch_size :][:batch_size]
        batch = collate([dataset[i] for i in rows or [0]], pad_token_id=pad_token_id)
        loss = _forward_loss(model, batch, device=world.device, bf16=bf16).item()
        if rows:
            loss_sum, labels = loss_sum + loss, labels + label_count(batch["labels"])
    model.train(was_training)
    total_loss, total_labels = all_sum(world, loss_sum, labels)
    return total_loss / max(total_labels, 1.0)
