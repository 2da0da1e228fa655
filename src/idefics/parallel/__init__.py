"""Tensor parallelism: one model's weights split over the processes of a `torchrun` group (NCCL or gloo).

    # torchrun --nproc_per_node=8 app.py
    model = IdeficsForVisionText2Text.from_pretrained(path, dtype=torch.bfloat16, tp_plan="auto")

`plan.py` says which weights each rank holds (column/row-parallel Linears, a vocabulary-parallel LM head, the
vision side replicated) and shards a meta-built model; `world.py` joins the group and holds the few collectives
the ranks use to agree (a seed, settings, JSON messages). The model's own collectives are in `idefics.collectives`.
Sharded weights with PyTorch's functional all-reduce, rather than DTensor: the model needs two reductions per layer
and one gather, and plain tensors keep the decode layout, the quantised kernels and CUDA graphs as they are.
"""

from .plan import Slice, apply_plan, vocab_shards
from .world import TensorParallel, TensorParallelError, join, leave, local_device

__all__ = [
    "Slice",
    "TensorParallel",
    "TensorParallelError",
    "apply_plan",
    "join",
    "leave",
    "local_device",
    "vocab_shards",
]
