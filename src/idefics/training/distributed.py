"""Many processes through PyTorch's own engine: `torchrun` sets the environment, FSDP2 shards the model.

`torchrun --nproc_per_node=N -m idefics finetune ...` starts N copies of the command; each joins the process group
(NCCL on GPUs, gloo on CPU), trains on its share of every batch and holds 1/N of every sharded layer. Without
torchrun's variables everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..parallel import leave


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> World:
    """Join the process group if torchrun started us; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
    target = torch.device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if target.type == "cuda" else "gloo", device_id=target if target.type == "cuda" else None
        )
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def teardown(world: World) -> None:
    """Leave the process group once every process is done (the first one may still be writing the final files);
    see `idefics.parallel.leave` (gloo aborted at exit about one run in ten without its collection of cycles)."""
    if world.distributed:
        leave()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_sum(world: World, *values: float) -> list[float]:
    """Sum each number over every process (one collective for all of them)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def repeated_layers(model: nn.Module) -> list[nn.Module]:
    """The units that FSDP shards and `--compile` compiles one by one: every vision, decoder and gated layer."""
    backbone = model.model
    return [*backbone.vision_model.encoder.layers, *backbone.layers, *backbone.gated_cross_attn_layers]


def shard(model: nn.Module, *, bf16: bool) -> None:
    """FSDP2: `fully_shard` each vision, decoder and gated cross-attention layer, then the root.

    With `bf16` the gathered parameters and the computation are bfloat16 while the sharded (master) parameters,
    gradients' reduction and optimizer state stay float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for layer in repeated_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip FSDP's gradient reduce-scatter on all but the last micro-batch of an accumulated step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
