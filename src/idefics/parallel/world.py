"""The tensor-parallel process group: joined from torchrun's environment, every collective under a timeout.

Nothing here pickles: objects that ranks exchange travel as JSON bytes in a uint8 tensor.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a collective may wait for the other ranks before it fails (seconds; IDEFICS_DIST_TIMEOUT overrides).
DEFAULT_TIMEOUT_S = 600.0


class TensorParallelError(ValueError):
    """A setup that tensor parallelism cannot run: no process group, a config the world size does not split, ..."""


def timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("IDEFICS_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group: every rank holds 1/size of the sharded weights."""

    group: dist.ProcessGroup
    rank: int
    size: int
    device: torch.device  # where this group's collectives run (the rank's GPU with NCCL, the CPU with gloo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_json(self, obj=None):
        """Rank 0's JSON-serialisable `obj`, on every rank (the others pass nothing)."""
        data = json.dumps(obj).encode() if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.long, device=self.device)
        dist.broadcast(size, 0, group=self.group)
        buffer = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        if self.is_main:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buffer, 0, group=self.group)
        return obj if self.is_main else json.loads(buffer.cpu().numpy().tobytes().decode())

    def broadcast_tensor(self, tensor: torch.Tensor | None, *, shape, dtype: torch.dtype) -> torch.Tensor:
        """Rank 0's `tensor` (shape and dtype known to every rank) on every rank, on this group's device."""
        out = tensor.to(self.device) if self.is_main else torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(out, 0, group=self.group)
        return out

    def shared_seed(self) -> int:
        """A random seed drawn on rank 0 and given to every rank, so that sampling draws the same tokens."""
        seed = torch.randint(0, 2**62, (1,)) if self.is_main else None
        return int(self.broadcast_tensor(seed, shape=(1,), dtype=torch.long))

    def check_same(self, value, what: str) -> None:
        """TensorParallelError on every rank unless all ranks passed an equal JSON-serialisable `value`."""
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
        mine = torch.tensor(list(digest[:16]), dtype=torch.uint8, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(gathered, mine, group=self.group)
        different = [r for r, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
        if different:
            ranks = ", ".join(map(str, different))
            raise TensorParallelError(f"rank(s) {ranks} of {self.size} have different {what} than rank 0")


def local_device(device: str | torch.device | None) -> torch.device:
    """The device a tensor-parallel rank runs on: its own GPU (LOCAL_RANK) when CUDA is asked for or available."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device(f"cuda:{local_rank}")
    return device


def join(device: torch.device) -> TensorParallel:
    """The tensor-parallel group of this process: the default group, initialised from torchrun's environment if no
    one has (NCCL for CUDA, gloo for CPU). TensorParallelError when there is neither a group nor torchrun."""
    if not dist.is_available():
        raise TensorParallelError("tp_plan needs torch.distributed, which this PyTorch build lacks")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise TensorParallelError(
                "tp_plan='auto' needs a process group: start the program with torchrun --nproc_per_node=N (or call "
                "torch.distributed.init_process_group first)"
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timeout(), device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout())
    backend = dist.get_backend()
    if device.type == "cuda" and backend != "nccl":
        raise TensorParallelError(f"a CUDA model needs an NCCL process group, this one is {backend}")
    if device.type != "cuda" and backend != "gloo":
        raise TensorParallelError(f"a {device.type} model needs a gloo process group, this one is {backend}")
    return TensorParallel(group=dist.group.WORLD, rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def leave() -> None:
    """Leave the process group once every rank is done with it.

    Reference cycles that hold the group are collected first: objects still holding it at interpreter exit let
    gloo's worker threads be destroyed during finalisation, which aborts the process ("terminate called without an
    active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
