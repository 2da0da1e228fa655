"""Checkpoint I/O: find a checkpoint folder (local or hub cache), attach its tensors to a meta-built model, save one.

Loading follows gpt-fast: the model is built on the meta device and every checkpoint tensor replaces its meta
parameter or buffer, so random weights are never materialised. Safetensors tensors that need no cast stay
memory-mapped (copy-on-write; pages are read on first use). Tensors that are cast or moved to another device are
converted a chunk at a time, and each chunk's file pages are dropped from the process again (`madvise`), so loading
fp32 weights as bf16 costs the bf16 bytes, not the fp32 pages as well. The file layout is transformers': it loads
what `save_checkpoint` writes and vice versa.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from safetensors.torch import save_file
from tqdm.auto import tqdm

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# Every weights file a save may write; anything else in the folder is left alone.
_WEIGHTS_FILE = re.compile(
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json"
)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?", re.IGNORECASE)
_UNITS = dict(B=1, KB=10**3, MB=10**6, GB=10**9, TB=10**12, KIB=2**10, MIB=2**20, GIB=2**30, TIB=2**40)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CHUNK_BYTES = 128 << 20  # a cast holds at most this much of the file in memory; fewer, bigger copies are faster


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model, or a weights file that cannot be read."""


class TensorSink(NamedTuple):
    """Where a checkpoint tensor goes instead of being attached as it is (e.g. a layer that quantises it)."""

    shape: torch.Size  # the checkpoint tensor's expected shape
    fills: tuple[str, ...]  # the model keys that `take` sets
    take: Callable[[torch.Tensor], None]  # receives the float32 tensor on the target device, keeps what it needs


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like "5GB", "500MB", "10KiB" (GB = 10**9, GiB = 2**30)."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.fullmatch(size.strip())
        if match is None:
            raise ValueError(f"cannot parse size {size!r}; expected e.g. 5GB, 500MB, 10KiB or a number of bytes")
        value = int(float(match[1]) * _UNITS[(match[2] or "B").upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def resolve_pretrained_dir(
    path_or_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """The folder holding a checkpoint: a local directory as is, else a hub id downloaded or found in the cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(path_or_id)
    if name.startswith(("/", ".", "~")) or path.exists():
        kind = "is not a directory" if path.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint folder {name!r} {kind}")
    kwargs = dict(revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns)
    try:
        return Path(snapshot_download(name, **kwargs))
    except Exception as error:  # offline, unreachable, gated, ...: the cache may still hold a snapshot
        reason = f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')}"
    try:
        return Path(snapshot_download(name, local_files_only=True, **kwargs))
    except (OSError, ValueError):
        cache = cache_dir or hub_constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"{name!r} is neither a local folder nor a model in the hub cache {os.fspath(cache)!r} ({reason})"
        ) from None


def load_checkpoint(
    model: torch.nn.Module,
    directory: Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
    ignore_unexpected: Sequence[str] = (),
    keep_fp32: Sequence[str] = (),
    sinks: Mapping[str, TensorSink] | None = None,
    slices: Mapping[str, tuple[int, int, int]] | None = None,
) -> list[str]:
    """Attach the checkpoint in `directory` to `model` (built on the meta device), in place.

    Floating-point tensors are cast to `dtype` (float32 when None), except keys matching a regex in `keep_fp32`,
    which stay float32; integer tensors keep their dtype. Tensors land on `device` (cpu when None). Parameters
    keep their `requires_grad`, and parameters shared by several keys (tied weights) stay shared. Checkpoint keys
    matching a regex in `ignore_unexpected` are skipped. With `strict=False`, other unexpected keys and missing
    keys only warn; missing ones stay on meta for the caller to initialise. Returns the missing keys.

    Checkpoint keys in `sinks` are read as float32 on `device` and handed to their sink one at a time (their file
    pages released right after), so a model that quantises while loading never holds more than one full-precision
    tensor.

    Checkpoint keys in `slices` ({key: (dim, start, stop)}, a tensor-parallel rank's shards) are read as that slice
    only: a row slice from its own bytes of the file, a column slice row block by row block with the file pages
    released behind it, so a rank's memory holds its shards, never whole tensors.
    """
    directory = Path(directory)
    dtype = torch.float32 if dtype is None else dtype
    device = torch.device("cpu" if device is None else device)
    files = _weight_files(directory)
    where: dict[str, Path] = {}
    shapes: dict[str, torch.Size] = {}
    for path in files:
        for key, shape in _tensor_shapes(path).items():
            where[key], shapes[key] = path, shape

    state = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}  # tied weights: keys of one tensor
    for key, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(key)
    sinks = {key: sink for key, sink in (sinks or {}).items() if key in where}
    slices = dict(slices or {})
    for key in where.keys() & (state.keys() | sinks.keys()):
        expected = sinks[key].shape if key in sinks else state[key].shape
        if key in slices:
            dim, start, stop = slices[key]
            fits = len(shapes[key]) > dim and shapes[key][dim] >= stop
            sliced = torch.Size((*shapes[key][:dim], stop - start, *shapes[key][dim + 1 :])) if fits else None
            if sliced != expected:
                raise CheckpointError(
                    f"shape mismatch for {key!r} in {where[key]}: checkpoint {tuple(shapes[key])}, this rank's slice "
                    f"[{start}:{stop}] of dim {dim} should be {tuple(expected)}"
                )
        elif shapes[key] != expected:
            raise CheckpointError(
                f"shape mismatch for {key!r} in {where[key]}: checkpoint {tuple(shapes[key])}, model {tuple(expected)}"
            )
    unexpected = [
        k for k in where if k not in state and k not in sinks and not any(re.search(p, k) for p in ignore_unexpected)
    ]
    loaded = {alias for key in where if key in state and key not in sinks for alias in aliases[id(state[key])]}
    loaded |= {filled for sink in sinks.values() for filled in sink.fills}
    missing = [key for key in state if key not in loaded]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model keys missing from the checkpoint in {directory}: {_few(missing)}")
    if unexpected:
        listed = _few([f"{key} ({where[key].name})" for key in unexpected])
        problems.append(f"{len(unexpected)} unexpected checkpoint keys in {directory}: {listed}")
    if problems and strict:
        raise CheckpointError("; ".join(problems))
    for problem in problems:
        warnings.warn(problem, stacklevel=2)

    def target_dtype(key: str, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point:
            return stored
        return torch.float32 if key in sinks or any(re.search(p, key) for p in keep_fp32) else dtype

    for path in tqdm(files, desc="Loading checkpoint shards", disable=len(files) == 1):
        keys = {key for key in where if where[key] == path and (key in state or key in sinks)}
        transient = keys & sinks.keys()
        reads = _read_tensors(path, keys, target_dtype=target_dtype, device=device, transient=transient, slices=slices)
        for key, tensor in reads:
            if key in sinks:
                sinks[key].take(tensor)
            else:
                _attach(model, aliases[id(state[key])], tensor)
    return missing


def save_checkpoint(
    state_dict: dict[str, torch.Tensor],
    directory: Path,
    *,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
) -> None:
    """Write `state_dict` to `directory` as transformers does: one weights file, or shards plus an index.

    Files are `model.safetensors` or `model-00001-of-0000N.safetensors` + `model.safetensors.index.json`
    (`pytorch_model*.bin` when not `safe_serialization`). Weights files left by an earlier save are removed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _standalone(state_dict, safe_serialization=safe_serialization)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += tensor.nbytes

    single, index = (SAFE_WEIGHTS, SAFE_INDEX) if safe_serialization else (BIN_WEIGHTS, BIN_INDEX)
    stem, ext = single.split(".")
    n = len(shards)
    names = [single] if n == 1 else [f"{stem}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)]
    for name, shard in zip(names, shards, strict=True):
        if safe_serialization:
            save_file(shard, directory / name, metadata={"format": "pt"})
        else:
            torch.save(shard, directory / name)
    written = set(names)
    if n > 1:
        weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
        total = sum(tensor.nbytes for tensor in tensors.values())
        content = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / index).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        written.add(index)
    for path in directory.iterdir():
        if _WEIGHTS_FILE.fullmatch(path.name) and path.name not in written:
            path.unlink()


def _weight_files(directory: Path) -> list[Path]:
    """The weights files in `directory`, safetensors first, then pytorch `.bin`; sharded before single."""
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {directory} does not exist")
    for index, single in ((SAFE_INDEX, SAFE_WEIGHTS), (BIN_INDEX, BIN_WEIGHTS)):
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{directory / index} is not a valid index ({error!r})") from None
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            for path in files:
                if not path.is_file():
                    raise FileNotFoundError(f"{directory / index} lists shard {path.name!r}, which does not exist")
            return files
        if (directory / single).is_file():
            return [directory / single]
    contents = sorted(path.name for path in directory.iterdir())
    raise FileNotFoundError(
        f"no weights in {directory} (looked for {SAFE_INDEX}, {SAFE_WEIGHTS}, {BIN_INDEX}, {BIN_WEIGHTS}); "
        f"it contains: {_few(contents, 10) or 'nothing'}"
    )


def _tensor_shapes(path: Path) -> dict[str, torch.Size]:
    if path.suffix == ".safetensors":
        return {key: shape for key, (_, shape, _) in _safetensors_header(path).items()}
    return {key: tensor.shape for key, tensor in _torch_load(path).items()}


def _read_tensors(
    path: Path,
    keys: set[str],
    *,
    target_dtype: Callable[[str, torch.dtype], torch.dtype],
    device: torch.device,
    transient: set[str] = frozenset(),
    slices: Mapping[str, tuple[int, int, int]] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `keys` of the file at `path` as `target_dtype(key, stored dtype)` on `device` (the `slices` of theirs
    only; see `load_checkpoint`). The caller drops the tensors of `transient` keys before asking for the next one:
    their file pages are released then."""
    slices = slices or {}
    if path.suffix != ".safetensors":
        # torch.load's mmap keeps every page it casts resident until the whole file is dropped.
        for key, tensor in _torch_load(path).items():
            if key in keys:
                if key in slices:
                    dim, start, stop = slices[key]
                    tensor = tensor.narrow(dim, start, stop - start).contiguous()
                yield key, tensor.to(device=device, dtype=target_dtype(key, tensor.dtype))
        return
    header = _safetensors_header(path)
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
    data = torch.frombuffer(mapped, dtype=torch.uint8)  # (file bytes,) pages are read on first touch
    for key in sorted(keys, key=lambda k: header[k][2]):  # in file order: sequential reads
        stored, shape, offset = header[key]
        nbytes = math.prod(shape) * stored.itemsize
        dtype = target_dtype(key, stored)
        aligned = offset % stored.itemsize == 0
        if key in slices:
            yield key, _read_slice(mapped, data, offset, stored, shape, slices[key], dtype=dtype, device=device)
            continue
        if dtype == stored and device.type == "cpu" and aligned:
            yield key, data[offset : offset + nbytes].view(stored).view(shape)
            if key in transient:
                _release(mapped, offset, offset + nbytes)
            continue
        out = torch.empty(shape, dtype=dtype, device=device)
        flat = out.view(-1)
        for start in range(0, nbytes, _CHUNK_BYTES):
            end = min(start + _CHUNK_BYTES, nbytes)
            chunk = data[offset + start : offset + end]
            chunk = (chunk if aligned else chunk.clone()).view(stored)  # a view needs an aligned start
            flat[start // stored.itemsize : end // stored.itemsize].copy_(chunk)
            _release(mapped, offset, offset + end)
        yield key, out


def _read_slice(
    mapped: mmap.mmap,
    data: torch.Tensor,
    offset: int,
    stored: torch.dtype,
    shape: torch.Size,
    part: tuple[int, int, int],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """[start, stop) along `dim` of the tensor at `offset`, copied a block of rows at a time, each block's file pages
    released behind it: only the slice's pages (for a column slice, the pages its rows span) are ever read."""
    dim, start, stop = part
    row_bytes = math.prod(shape[1:]) * stored.itemsize  # one row (index along dim 0) of the whole tensor
    first, rows = (start, stop - start) if dim == 0 else (0, shape[0])
    raw = data[offset + first * row_bytes : offset + (first + rows) * row_bytes]
    if offset % stored.itemsize:
        raw = raw.clone()  # a view needs an aligned start
    whole = raw.view(stored).view(rows, *shape[1:])  # (rows, ...) the rows the slice lies in
    view = whole if dim == 0 else whole.narrow(dim, start, stop - start)
    out = torch.empty(view.shape, dtype=dtype, device=device)
    block = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    for a in range(0, rows, block):
        b = min(a + block, rows)
        out[a:b].copy_(view[a:b])
        _release(mapped, offset + (first + a) * row_bytes, offset + (first + b) * row_bytes)
    return out


def _release(mapped: mmap.mmap, start: int, end: int) -> None:
    """Drop the whole pages inside [start, end) of a clean private mapping from this process's RSS.

    They stay in the page cache and fault back in from the file if touched again; pages shared with a
    neighbouring tensor are kept. Without this, casting a memory-mapped file keeps all its pages resident.
    """
    start = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end = end // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)


def _safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, torch.Size, int]]:
    """key -> (dtype, shape, absolute byte offset), checking that every tensor lies inside the file."""
    size = path.stat().st_size

    def corrupt(reason: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file ({reason}); it may be truncated or corrupt")

    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise corrupt(f"{size} bytes long")
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise corrupt(f"header of {length} bytes in a file of {size}")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise corrupt(f"unreadable header: {error}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    entries = {}
    for key, info in header.items():
        try:
            dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], torch.Size(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad entry for {key!r}: {info!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or 8 + length + end > size:
            raise corrupt(f"{key!r} spans bytes {begin}..{end} of a {size - 8 - length}-byte data section")
        entries[key] = (dtype, shape, 8 + length + begin)
    return entries


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None


def _attach(model: torch.nn.Module, keys: list[str], tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the model's meta tensor at `keys` (several when tied), keeping `requires_grad`."""
    for key in keys:
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if name in module._parameters and not isinstance(tensor, torch.nn.Parameter):
            tensor = torch.nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
        setattr(module, name, tensor)


def _standalone(state_dict: dict[str, torch.Tensor], *, safe_serialization: bool) -> dict[str, torch.Tensor]:
    """Contiguous tensors that each own their bytes in the file: tied or overlapping ones are cloned (safetensors
    refuses overlaps), and for torch.save views of a bigger storage too (it would write the whole storage)."""
    spans: dict[tuple[torch.device, int], list[tuple[int, int]]] = {}
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage()
        start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
        taken = spans.setdefault((tensor.device, storage.data_ptr()), [])
        if any(start < e and s < end for s, e in taken) or (not safe_serialization and storage.nbytes() != end - start):
            tensor = tensor.clone()
        else:
            taken.append((start, end))
        out[key] = tensor
    return out


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
