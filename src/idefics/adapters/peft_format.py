"""PEFT's adapter files, as peft 0.21 writes and reads them for transformers' IdeficsForVisionText2Text (same
module names):

- `adapter_config.json`: `LoraConfig` (config.py).
- `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` (r, in), `...lora_B.weight` (out, r), and
  for modules_to_save `base_model.model.<module>.<param>` (PEFT's `adapter_model.bin` is read too).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..loading import CheckpointError, resolve_pretrained_dir
from .config import ADAPTER_CONFIG, LoraConfig
from .layers import add_adapter, delete_adapter, in_saved_module, merge_adapter, refuse_tensor_parallel, require_adapter

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"  # PEFT's older format; read, never written
PREFIX = "base_model.model."  # where PEFT's PeftModel puts the wrapped model's keys
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def adapter_state_dict(
    source: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], config: LoraConfig
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys, from a model or from {our parameter name: tensor} (e.g. a gathered
    FSDP state dict): LoRA A/B as `base_model.model.<module>.lora_A.weight`, modules_to_save parameters as
    `base_model.model.<name>`. torch.compile's `_orig_mod.` is dropped from names."""
    named = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    out = {}
    for name, tensor in named.items():
        name = name.replace("_orig_mod.", "")
        if name.endswith(LORA_SUFFIXES) or in_saved_module(config, name):
            out[PREFIX + name] = tensor
    if not any(key.endswith(LORA_SUFFIXES) for key in out):
        raise ValueError(f"no LoRA weights (names ending in {' or '.join(LORA_SUFFIXES)}) among the given tensors")
    return out


def _check_keys(found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str) -> None:
    """CheckpointError naming the first unexpected, missing or mis-shaped key of `found`."""
    for key, tensor in found.items():
        if key not in expected:
            raise CheckpointError(
                f"{where}: key {key!r} matches no LoRA layer or module to save of the model "
                f"(expected keys like {next(iter(expected))!r})"
            )
        if tensor.shape != expected[key].shape:
            given, model = tuple(tensor.shape), tuple(expected[key].shape)
            raise CheckpointError(f"shape mismatch for {key!r} in {where}: given {given}, model {model}")
    missing = [key for key in expected if key not in found]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{where} lacks {missing[0]!r}{more}")


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, *, state_dict: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` (PEFT's format) for the attached adapter.

    `state_dict` ({our parameter name: tensor}, e.g. gathered from FSDP shards) is written instead of the model's
    tensors; it must hold every adapter tensor, and may hold others (they are left out).
    """
    from safetensors.torch import save_file

    attached = require_adapter(model)
    expected = adapter_state_dict(dict(model.named_parameters()), attached.config)
    tensors = expected if state_dict is None else adapter_state_dict(state_dict, attached.config)
    _check_keys(tensors, expected, "the state_dict" if state_dict is not None else "the model")
    meta = [key for key, t in tensors.items() if t.is_meta]
    if meta:
        raise ValueError(f"{meta[0]!r} is on the meta device: load or initialise the weights before saving")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    attached.config.save_pretrained(directory)


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / ADAPTER_WEIGHTS
    try:
        if path.is_file():
            return load_file(path), path
        path = directory / ADAPTER_BIN
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True), path
    except (SafetensorError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} (or {ADAPTER_BIN}) in {directory}")


def load_adapter(model: nn.Module, path_or_id: str | os.PathLike, *, merge: bool = False) -> None:
    """Attach the adapter in a folder (ours or PEFT's) or hub id; with `merge`, fold it in at once.

    The adapter's tensors are cast to the model's (LoRA: its base weights') dtype and device; like `add_adapter`,
    the LoRA weights and modules_to_save are left trainable and the rest frozen.
    """
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model's weights are on the meta device: load them before the adapter")
    refuse_tensor_parallel(model)
    patterns = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_BIN]
    directory = resolve_pretrained_dir(path_or_id, allow_patterns=patterns)
    config = LoraConfig.from_pretrained(directory)
    tensors, path = _read_weights(directory)
    add_adapter(model, config)
    try:
        expected = adapter_state_dict(dict(model.named_parameters()), config)  # PEFT key -> our Parameter
        _check_keys(tensors, expected, str(path))
        with torch.no_grad():
            for key, tensor in tensors.items():
                expected[key].copy_(tensor)
    except Exception:
        delete_adapter(model)
        raise
    if merge:
        merge_adapter(model)
