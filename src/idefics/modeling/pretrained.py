"""`from_pretrained` / `save_pretrained` and the small conveniences transformers users expect on a model."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..config import CONFIG_NAME, IdeficsConfig
from ..loading import TensorSink, load_checkpoint, resolve_pretrained_dir, save_checkpoint
from ..parallel import TensorParallel, TensorParallelError, apply_plan, join, local_device
from ..quantization import QuantizationConfig, QuantizationError, QuantizedLinear, quantize_model
from ..quantization.swap import METADATA_PATTERN, finish_loading

# Non-persistent buffers that older checkpoints carry; they are recomputed, never loaded.
IGNORED_KEYS = (r"rotary_emb\.inv_freq$", r"embeddings\.position_ids$")
WEIGHT_PATTERNS = ["*.json", "*.safetensors"]
BIN_PATTERNS = ["*.json", "pytorch_model*.bin"]


def _parse_dtype(dtype: torch.dtype | str | None, directory: Path) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        raw = json.loads((directory / CONFIG_NAME).read_text())
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. torch.bfloat16, 'bfloat16', 'float16', 'float32', 'auto'")
    return value


def _has_weights(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin"))


def _requested_quantization(
    quantize: str | QuantizationConfig | None, group_size: int, strict: bool, directory: Path
) -> tuple[QuantizationConfig | None, bool]:
    """The quantisation to apply and whether the checkpoint is stored quantised already (config.json's
    `quantization_config`); QuantizationError when a request contradicts a quantised checkpoint."""
    path = directory / CONFIG_NAME  # absent when the caller passes `config=`
    stored = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    stored = QuantizationConfig.from_dict(stored) if stored is not None else None
    if isinstance(quantize, str):
        quantize = QuantizationConfig(quantize, group_size=group_size)
    if stored is not None and quantize is not None:
        if quantize.overrides is None:  # the per-layer choices are the checkpoint's
            quantize = replace(quantize, overrides=stored.overrides)
        if quantize != stored:
            raise QuantizationError(
                f"{directory} is stored quantised as {stored}; load it without quantize= (a quantised checkpoint "
                "cannot be quantised again: quantise the full-precision checkpoint instead)"
            )
    chosen = quantize or stored
    return replace(chosen, strict=True) if chosen is not None and strict else chosen, stored is not None


def _quantizing_sinks(model: nn.Module) -> dict[str, TensorSink]:
    """Checkpoint key of each quantised layer's float weight -> a sink that quantises it into the layer."""
    sinks = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear):
            fills = tuple(f"{name}.{tensor}" for tensor in layer.tensor_specs())
            shape = torch.Size((layer.out_features, layer.in_features))
            sinks[f"{name}.weight"] = TensorSink(shape, fills, layer.quantize_)
    return sinks


def _checkpoint_has_prefix(directory: Path, prefix: str) -> bool:
    """Whether the checkpoint's keys start with `prefix` (a full-model save) rather than being a bare backbone."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            return any(k.startswith(prefix) for k in json.loads(index.read_text())["weight_map"])
    single = directory / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return any(k.startswith(prefix) for k in f.keys())
    return True


class PretrainedMixin:
    """Mixed into the nn.Modules of the public API. `checkpoint_prefix` is where the class sits in a full save."""

    config: IdeficsConfig
    checkpoint_prefix: str = ""
    name_or_path: str | None = None  # the folder or hub id `from_pretrained` read (an adapter's base model)
    quantization_config: QuantizationConfig | None = None  # how `from_pretrained` quantised the Linear layers
    tensor_parallel: TensorParallel | None = None  # the group whose ranks share the weights (`tp_plan`)

    @property
    def dtype(self) -> torch.dtype:
        return self.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.get_input_embeddings().weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens if hasattr(self, "embed_tokens") else self.model.embed_tokens

    def num_parameters(self, *, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder, gated and vision layer in the backward pass instead of storing activations."""
        self._set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_gradient_checkpointing(False)

    def _set_gradient_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        strict: bool = True,
        config: IdeficsConfig | None = None,
        torch_dtype: torch.dtype | str | None = None,
        adapter: str | os.PathLike | None = None,
        merge: bool = False,
        quantize: str | QuantizationConfig | None = None,
        group_size: int = 128,
        quantize_strict: bool = False,
        tp_plan: str | None = None,
    ):
        """Load a checkpoint from a local folder or a hub id (the local hub cache works offline).

        The model is built on the meta device and the memory-mapped checkpoint tensors are attached, cast to `dtype`
        on the way (default float32; "auto" keeps the checkpoint's dtype): no random init, no second copy.
        `torch_dtype` is accepted as an alias of `dtype`. `adapter` (a LoRA folder or hub id, ours or peft's) is
        attached after the weights, and folded into them with `merge`. The returned model is in eval mode.

        `quantize` ("int8", "int4", "nf4" or a QuantizationConfig; `group_size` for int4) quantises the Linear layers
        while loading, tensor by tensor, never holding the full-precision model (see `idefics.quantization`). A layer
        the group size does not divide takes another size, int8 or full precision (one logged line counts them);
        `quantize_strict` refuses it instead. A checkpoint saved quantised loads quantised without it, layer for layer
        as it was saved. Quantised layers use the kernels of the device they are loaded on: pass `device=` rather
        than moving the model afterwards.

        `tp_plan="auto"` (under `torchrun --nproc_per_node=N`) shards the decoder, the gated layers and the LM head
        over the N processes (`idefics.parallel`): each rank reads only its slices of the checkpoint and holds 1/N
        of those weights; every rank then runs the same calls (generate, the engine) and gets the same results.
        The device defaults to the rank's GPU (LOCAL_RANK) where CUDA is available.
        """
        if (adapter is not None or merge) and not hasattr(cls, "load_adapter"):
            raise TypeError(f"{cls.__name__} takes no adapter; load it into IdeficsForVisionText2Text")
        if merge and adapter is None:
            raise ValueError("merge=True needs an adapter=")
        if torch_dtype is not None:
            if dtype is not None:
                raise ValueError("pass dtype or torch_dtype, not both")
            dtype = torch_dtype
        directory = resolve_pretrained_dir(
            path_or_id, revision=revision, cache_dir=cache_dir, allow_patterns=WEIGHT_PATTERNS
        )
        if not _has_weights(directory) and not Path(path_or_id).is_dir():
            directory = resolve_pretrained_dir(
                path_or_id, revision=revision, cache_dir=cache_dir, allow_patterns=BIN_PATTERNS
            )
        config = config or IdeficsConfig.from_pretrained(directory)
        dtype = _parse_dtype(dtype, directory)
        quantization, stored_quantized = _requested_quantization(quantize, group_size, quantize_strict, directory)
        if quantization is not None and merge:
            raise QuantizationError("merge=True folds an adapter into full-precision weights; load without quantize=")
        tp = None
        if tp_plan is not None:
            if tp_plan != "auto":
                raise TensorParallelError(f"tp_plan must be 'auto' or None, got {tp_plan!r}")
            if stored_quantized:
                raise TensorParallelError(
                    f"{directory} is stored quantised, and quantised weights cannot be sliced per rank: load the "
                    "full-precision checkpoint with tp_plan='auto' and quantize="
                )
            device = local_device(device)
            tp = join(device)
            settings = dict(config=config.to_dict(), dtype=str(dtype), device=device.type, cls=cls.__name__,
                            quantize=quantization.to_dict() if quantization is not None else None)  # fmt: skip
            tp.check_same(settings, "model settings (config, dtype, device type, quantize)")
        with torch.device("meta"):
            model = cls(config)
        sharded = apply_plan(model, tp) if tp is not None else {}
        sharded = {name: sharded[m] for name, m in model.named_modules() if m in sharded}  # before any swap
        prefixed = bool(cls.checkpoint_prefix) and _checkpoint_has_prefix(directory, cls.checkpoint_prefix)
        if quantization is not None:
            if prefixed and stored_quantized:  # the full model's per-layer record, read by its backbone
                prefix, recorded = cls.checkpoint_prefix, quantization.overrides.items()
                overrides = {key.removeprefix(prefix): value for key, value in recorded if key.startswith(prefix)}
                quantization = replace(quantization, overrides=overrides)
            quantization = quantize_model(model, quantization, device=device or "cpu")  # per-layer choices recorded
        target: nn.Module = model
        ignored = list(IGNORED_KEYS)
        if prefixed:
            target = nn.Module()  # a parent so that the module's keys gain the full-model prefix
            setattr(target, cls.checkpoint_prefix.rstrip("."), model)
            ignored.append(r"^(?!" + cls.checkpoint_prefix.replace(".", r"\.") + ")")  # e.g. lm_head.* for the backbone
        prefix = "" if target is model else cls.checkpoint_prefix
        slices = {f"{prefix}{name}.weight": part for name, part in sharded.items()}
        options = dict(dtype=dtype, device=device, strict=strict, ignore_unexpected=ignored, slices=slices)
        if stored_quantized:
            options["keep_fp32"] = [METADATA_PATTERN]
        elif quantization is not None:
            options["sinks"] = _quantizing_sinks(target)
        load_checkpoint(target, directory, **options)
        if stored_quantized:
            finish_loading(model)
        model.quantization_config = quantization
        model.tensor_parallel = tp
        for module in model.modules():
            if hasattr(module, "reset_buffers"):
                module.reset_buffers(device or "cpu")
        model.name_or_path = os.fspath(path_or_id)
        if adapter is not None:
            model.load_adapter(adapter, merge=merge)
        return model.eval()

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        max_shard_size: int | str = "5GB",
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write `config.json` and (sharded) safetensors that both this package and transformers load.

        `state_dict` (the model's own names) is written instead of the model's tensors: the trainer passes the full
        weights gathered from FSDP shards.

        Refused while an unmerged LoRA adapter is attached: neither the base alone (the training would be silently
        dropped) nor base + `lora_*` keys (a checkpoint nobody loads) is what the caller wants. `save_adapter` writes
        the adapter; `merge_adapter` first saves a model with it folded in; `delete_adapter` first saves the base.
        """
        if any(getattr(module, "adapter_layer", False) for module in self.modules()):  # idefics.adapters.LoraLinear
            raise ValueError(
                "an unmerged LoRA adapter is attached: save_adapter() writes it; call merge_adapter() first to save "
                "the model with it folded in, or delete_adapter() to save the base model"
            )
        if self.tensor_parallel is not None and self.tensor_parallel.size > 1 and state_dict is None:
            raise TensorParallelError(
                f"this model's weights are sharded over {self.tensor_parallel.size} processes (tp_plan): one rank "
                "holds a part of them; load the checkpoint without tp_plan to save it"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        quantization = getattr(self, "quantization_config", None)
        if quantization is not None:  # config.json gains the settings that load the weights back as they are
            raw = json.loads((directory / CONFIG_NAME).read_text())
            raw["quantization_config"] = quantization.to_dict()
            (directory / CONFIG_NAME).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        state = self.state_dict() if state_dict is None else {k: v.contiguous() for k, v in state_dict.items()}
        if self.config.tie_word_embeddings:  # as transformers saves tied weights: once, under the embedding's name
            state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
        save_checkpoint(state, directory, max_shard_size=max_shard_size)
