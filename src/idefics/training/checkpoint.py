"""Training checkpoints that resume bit-exactly and are never picked up half-written.

`OUTPUT/checkpoint-STEP/` holds:
- the trainable weights and the optimizer state through `torch.distributed.checkpoint` (each process writes its own
  shards; one process writes them all when there is one),
- `trainer_state.json` (the step, which is also the position in the data, and the run's config),
- `state-RANK.pt` per process: the scheduler and every RNG state (torch, CUDA, Python, NumPy),
- `COMPLETE`, written last.

A checkpoint is written under a hidden temporary name and renamed once complete, so a `kill -9` at any moment leaves
either a complete checkpoint or a hidden folder that `latest` ignores (and the next save removes).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .distributed import World, barrier

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"checkpoint-(\d+)")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)  # frozen base weights come from the base model


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def _numpy_state() -> tuple:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return kind, keys.tolist(), pos, has_gauss, cached


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save and load that it assumes one process; that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save(
    folder: str | os.PathLike,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    world: World,
    extra: dict | None = None,
) -> Path:
    """Write `folder/checkpoint-STEP` (every process calls this); returns its path."""
    folder = Path(folder)
    final = folder / f"checkpoint-{step}"
    partial = folder / f".checkpoint-{step}.partial"
    if world.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".checkpoint-*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists() and not (final / MARKER).exists():
            shutil.rmtree(final)
        partial.mkdir()
    barrier(world)
    if (final / MARKER).exists():  # this very step was saved already (a stop right after resuming)
        return final
    model_state, optim_state = get_state_dict(model, optimizer, options=_OPTIONS)
    with _single_process_quiet():
        dcp.save(
            {"model": model_state, "optim": optim_state}, checkpoint_id=str(partial), no_dist=not world.distributed
        )
    torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, partial / f"state-{world.rank}.pt")
    barrier(world)
    if world.is_main:
        info = {"step": step, "world_size": world.world_size, **(extra or {})}
        (partial / STATE_FILE).write_text(json.dumps(info, indent=2))
        _fsync_tree(partial)
        (partial / MARKER).write_text("")
        os.replace(partial, final)
    barrier(world)
    return final


def load(
    checkpoint: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    world: World,
) -> dict:
    """Restore weights, optimizer, scheduler and RNG states in place; returns trainer_state.json."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / MARKER).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {MARKER} file)")
    info = json.loads((checkpoint / STATE_FILE).read_text())
    if info["world_size"] != world.world_size:
        raise ValueError(
            f"{checkpoint} was written by {info['world_size']} processes; resume it with the same number "
            f"(this run has {world.world_size}) so that the RNG streams and data shards line up"
        )
    model_state, optim_state = get_state_dict(model, optimizer, options=_OPTIONS)
    saved = {key.removeprefix("model.") for key in FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
             if key.startswith("model.")}  # fmt: skip
    if saved != set(model_state):
        missing, unexpected = sorted(set(model_state) - saved), sorted(saved - set(model_state))
        raise ValueError(
            f"{checkpoint} holds other trainable weights than this run trains (a different adapter or --full?): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    state = {"model": model_state, "optim": optim_state}
    # Parameters that never had a gradient (e.g. the vision tower's unused post_layernorm) have no optimizer state in
    # the checkpoint; the template has some, which then stays as is (AdamW skips parameters without a gradient).
    planner = DefaultLoadPlanner(allow_partial_load=True)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(checkpoint), planner=planner, no_dist=not world.distributed)
    options = StateDictOptions(ignore_frozen_params=True, strict=False)  # the frozen weights are the base model's
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    local = torch.load(checkpoint / f"state-{world.rank}.pt", weights_only=True)
    scheduler.load_state_dict(local["scheduler"])
    set_rng_state(local["rng"])
    return info


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The complete `checkpoint-STEP` folders in `folder`, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and path.is_dir() and (path / MARKER).is_file():
            found.append((int(match[1]), path))
    return [path for _, path in sorted(found)]


def latest(folder: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def prune(folder: str | os.PathLike, *, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints."""
    for path in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
