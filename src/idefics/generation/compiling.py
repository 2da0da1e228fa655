"""How decode steps over a static cache are compiled, on every device.

`compile_step(fn, device)` is `torch.compile(fn, fullgraph=True)` with Inductor options chosen per device by
measurement (BENCHMARKS.md, "Compiled decode on CPU"):

- CPU: `freezing` (the weights become constants of the graph) and `cpp_wrapper` (the step's kernels are called from
  C++, not Python): int8 decode ~1.4x its eager speed, ~3x float32 eager. Freezing bakes the weights' values in, so
  `FrozenWeights` recompiles when they change; it copies float32 Linear weights (bench fp32: RSS 757 MB eager,
  931 compiled without options, 1200 with), not int8 ones (577 / 691 / 679).
  Left out: `max_autotune`, which with freezing picks Inductor's own GEMM kernels and makes float32 decode ~1.6x
  eager, but (torch 2.13) those kernels ignore a frozen weight's storage offset: a Linear whose weight is a slice of
  a larger tensor gets wrong products. Every weight `from_pretrained` attaches is such a slice (a view into its
  memory-mapped shard), and a loaded tiny model decoded all-zero logits.
  On CPU the step also attends over the filled positions only (`dynamic_span`: a dynamic length, one graph for
  every step of a request) rather than its whole 256-position bucket: on a 16-layer shape attention read 1.3 MB of
  K/V per layer and step where ~80 positions were filled (1.3 -> 0.9 ms of a 7 ms int8 step).
- CUDA: the defaults and fixed shapes; the caller captures the step in a CUDA graph, which removes the launch
  overhead.

`fast_repeat(step)` calls a compiled step with Dynamo's guards checked on its first call only: the later calls of
one request pass the same buffers with the same shapes (but for the dynamic length, which the graph takes whatever
its value), and on a small CPU step the guards on every parameter of the model cost ~10% of the step (`bench` int8:
0.37 ms of 3.4; 0.15 ms remains).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch

CPU_OPTIONS = {"freezing": True, "cpp_wrapper": True}


def compile_options(device: torch.device, *, collectives: bool = False) -> dict:
    """Inductor options for a decode step on `device` (IDEFICS_COMPILE_OPTIONS=none turns them off, for A/B runs).
    A step that runs collectives (a tensor-parallel model) keeps Python's wrapper: Inductor's C++ wrapper cannot call
    them (torch 2.13: "arg type Any is not yet supported by custom_op_wrapper")."""
    if device.type != "cpu" or os.environ.get("IDEFICS_COMPILE_OPTIONS") == "none":
        return {}
    options = dict(CPU_OPTIONS)
    if collectives:
        del options["cpp_wrapper"]
    return options


def runs_collectives(model: torch.nn.Module) -> bool:
    """Whether `model`'s forward runs collectives: its weights are sharded over several processes."""
    tp = getattr(model, "tensor_parallel", None)
    return tp is not None and tp.size > 1


def dynamic_span(device: torch.device) -> bool:
    """Whether a compiled step on `device` attends over the filled positions only (a dynamic length) rather than its
    whole fixed-size cache: on CPU, where no CUDA graph needs fixed shapes."""
    return device.type == "cpu"


def compile_step(fn: Callable, device: torch.device, *, collectives: bool = False) -> Callable:
    """`fn` compiled for `device`. The options are set as Inductor's configuration around each call rather than
    passed as `torch.compile(options=)`: Dynamo reads `freezing` when it traces (to keep parameters as attributes
    of the graph), before those per-call options apply, and without it the frozen graph is as slow as unfrozen."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=None if dynamic_span(device) else False)
    options = compile_options(device, collectives=collectives)
    if not options:
        return compiled

    def call(*args, **kwargs):
        with torch._inductor.config.patch(options):
            return compiled(*args, **kwargs)

    return call


class FrozenWeights:
    """Recompiles when weights a frozen graph has baked in change: records, per model, which tensors its parameters
    and buffers were (storage and in-place version) when a step was compiled, and resets Dynamo when a later call
    finds them different (an in-place update, `load_state_dict`, a merged adapter)."""

    def __init__(self):
        self.seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @staticmethod
    def fingerprint(model: torch.nn.Module) -> int:
        tensors = [*model.parameters(), *model.buffers()]
        return hash(tuple((t.data_ptr(), t._version) for t in tensors))

    def check(self, model: torch.nn.Module, device: torch.device) -> None:
        if not compile_options(device).get("freezing"):
            return
        now = self.fingerprint(model)
        before = self.seen.get(model)
        if before is not None and before != now:
            torch._dynamo.reset()  # every compiled step: rare (weights changed under a compiled model), and safe
        self.seen[model] = now


FROZEN = FrozenWeights()  # one record per process: a reset clears every compiled step
_COMPILED: dict[tuple[Callable, str, bool], Callable] = {}


def compiled_for(fn: Callable, model: torch.nn.Module, device: torch.device) -> Callable:
    """`fn` compiled once per process, device type and whether the model runs collectives (Dynamo specialises it per
    model and shape), after checking that the weights a frozen graph of `model` baked in are still the model's."""
    FROZEN.check(model, device)
    key = (fn, device.type, runs_collectives(model))
    if key not in _COMPILED:
        _COMPILED[key] = compile_step(fn, device, collectives=key[2])
    return _COMPILED[key]


def fast_repeat(step: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`step` with Dynamo's guards evaluated on its first call only (see the module docstring)."""
    first = True

    def call(tokens: torch.Tensor) -> torch.Tensor:
        nonlocal first
        if first:
            first = False
            return step(tokens)
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return step(tokens)

    return call
