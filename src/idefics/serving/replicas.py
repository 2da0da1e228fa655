"""The engine on a tensor-parallel model: rank 0 decides, the other ranks replay its model-state operations.

Rank 0 runs the whole engine: the scheduler, sampling, stop conditions, the streams (and so the HTTP server). Before
each operation that touches the model or the slot cache it broadcasts the operation and its arguments, and every
other rank (`Engine.follow`) runs the same operation on its own shards:

    allocate(n)                      slots for an admitted request (the slot heap stays the same on every rank)
    prefill(requests)                the batched prefill of the admitted requests (token ids, pixels, their keys)
    load(slot, row, length, ...)     a prefilled row copied into its slot
    decode(tokens, lengths, b, ...)  one decode step over slots 0..b-1
    release(slot)                    a finished row's slot freed
    heartbeat / stop                 an idle rank 0 is alive / the engine shut down

Every operation is a deterministic function of its arguments and of the operations before it, so each rank's slot
cache (and whatever cache keys off these operations) holds its heads of the same sequences. A rank that finds
itself diverged (another slot than rank 0's for the same request) stops: its collectives could no longer pair with
rank 0's, and rank 0 stops with it (a spawned rank's exit ends rank 0; torchrun ends the others). The logits come
out the same on every rank (the LM head gathers them); only rank 0 reads them. The ranks' collectives wait at most
IDEFICS_DIST_TIMEOUT; an idle rank 0 sends a heartbeat well within it. Messages are a JSON header plus tensors:
nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..parallel import TensorParallel
from ..parallel.world import timeout

DTYPES = {str(t): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool)}
# rank 0's own business, or (record) what each rank derives from the fields it is sent
SKIPPED_FIELDS = {"stream", "params", "arrival", "arrival_clock", "grammar", "record"}


def heartbeat_interval() -> float:
    return min(30.0, timeout().total_seconds() / 4)


class Channel:
    """Rank 0 sends operations, the other ranks receive them, over the model's tensor-parallel group."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp
        self.last_sent = time.monotonic()

    def send(self, op: str, args: dict | None = None, tensors: list[torch.Tensor] = ()) -> None:
        header = {"op": op, "args": args or {}, "tensors": [[str(t.dtype), list(t.shape)] for t in tensors]}
        self.tp.broadcast_json(header)
        for tensor in tensors:
            self.tp.broadcast_tensor(tensor.contiguous(), shape=tensor.shape, dtype=tensor.dtype)
        self.last_sent = time.monotonic()

    def receive(self) -> tuple[str, dict, list[torch.Tensor]]:
        header = self.tp.broadcast_json()
        specs = header["tensors"]
        tensors = [self.tp.broadcast_tensor(None, shape=shape, dtype=DTYPES[dtype]) for dtype, shape in specs]
        return header["op"], header["args"], tensors

    def idle(self) -> bool:
        """Whether rank 0 has sent nothing for a heartbeat interval."""
        return time.monotonic() - self.last_sent >= heartbeat_interval()


def encode_requests(requests: list) -> tuple[list[dict], list[torch.Tensor]]:
    """Requests as JSON-able field dicts, each tensor (also inside dicts) replaced by its index in the tensor list."""
    tensors: list[torch.Tensor] = []

    def encode(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return {"__tensor__": len(tensors) - 1}
        if isinstance(value, dict):
            return {k: encode(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [encode(v) for v in value]
        if value is None or isinstance(value, str | int | float | bool):
            return value
        raise TypeError(f"a request field holds a {type(value).__name__}, which the other ranks cannot be sent")

    fields = [
        {f.name: encode(getattr(r, f.name)) for f in dataclasses.fields(r) if f.name not in SKIPPED_FIELDS}
        | {"n": r.params.n}
        for r in requests
    ]  # fmt: skip (n: the slots a request takes)
    return fields, tensors


def decode_requests(fields: list[dict], tensors: list[torch.Tensor], device: torch.device) -> list:
    """The followers' copies of rank 0's requests (no stream; sampling parameters but `n` left at their defaults:
    never used there; the prefix cache's record rebuilt from the token ids, image mask and image keys, as
    `Engine.submit` builds it)."""
    from .params import SamplingParams
    from .prefix import prompt_record
    from .requests import Request

    def decode(value):
        if isinstance(value, dict):
            if "__tensor__" in value:
                return tensors[value["__tensor__"]].to(device)
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    requests = []
    for f in fields:
        values = {k: decode(v) for k, v in f.items()}
        n = values.pop("n")
        values["image_keys"] = tuple(values.get("image_keys", ()))
        mask = values["image_inputs"].get("image_attention_mask")
        record = prompt_record(values["input_ids"], mask, values["image_keys"])
        requests.append(Request(**values, params=SamplingParams(n=n), stream=None, record=record))
    return requests


class DivergedError(RuntimeError):
    """A rank's engine state no longer matches rank 0's: fatal for the whole group."""
