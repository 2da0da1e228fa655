"""Dataclass configs that read and write the published IDEFICS `config.json` field for field.

Field names and defaults follow transformers' `IdeficsConfig` (idefics-9b defaults). Unknown keys from older hub
configs (`ffn_dim`, `max_sequence_length`, `cross_layer_activation_function`, `vision_model_name`, ...) are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu")


def _known_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class IdeficsVisionConfig:
    """The CLIP vision transformer (ViT-H/14 in the published checkpoints)."""

    embed_dim: int = 768  # width of the vision transformer (also the perceiver's and cross-attention K/V input width)
    image_size: int = 224  # side of the square input image, in pixels
    intermediate_size: int = 5120  # width of the vision MLP
    patch_size: int = 14  # side of a square patch, in pixels
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"  # exact (erf) GELU, as open_clip's ViT-H
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    @property
    def hidden_size(self) -> int:
        return self.embed_dim

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.embed_dim % self.num_attention_heads:
            raise ValueError(
                f"vision_config.embed_dim ({self.embed_dim}) must be divisible by "
                f"vision_config.num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act {self.hidden_act!r} is not one of {ACTIVATIONS}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IdeficsVisionConfig:
        data = dict(data)
        if "hidden_size" in data and "embed_dim" not in data:
            data["embed_dim"] = data["hidden_size"]
        for key in ("image_size", "patch_size"):  # transformers allows [h, w]; the model only supports squares
            if isinstance(data.get(key), list | tuple):
                h, w = data[key]
                if h != w:
                    raise ValueError(f"vision_config.{key} must be square, got {data[key]}")
                data[key] = h
        return cls(**_known_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "idefics_vision", **dataclasses.asdict(self)}


@dataclass
class IdeficsPerceiverConfig:
    """The perceiver resampler that compresses each image's patch states to a fixed number of latents."""

    use_resampler: bool = False  # informational: the model reads `IdeficsConfig.use_resampler`
    resampler_n_latents: int = 64  # image tokens per image after resampling
    resampler_depth: int = 6  # number of (attention, MLP) blocks
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    qk_layer_norms_perceiver: bool = False  # LayerNorm on per-head queries and keys

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IdeficsPerceiverConfig:
        return cls(**_known_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "idefics_perciever", **dataclasses.asdict(self)}  # sic: the hub's spelling


@dataclass
class IdeficsConfig:
    """The whole model: LLaMA decoder + vision encoder + optional perceiver + gated cross-attention layers."""

    vocab_size: int = 32000  # rows of the regular (freezable) embedding table
    additional_vocab_size: int = 0  # extra always-trainable rows (the published checkpoints use 2)
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    dropout: float = 0.0
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    alpha_initializer: str = "zeros"  # zeros | ones | normal (gaussian, random): initial value of the tanh gates
    alphas_initializer_range: float = 0.0  # std of the "normal" gate initialiser
    alpha_type: str = "float"  # float: one scalar gate per layer; vector: one gate per hidden channel
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    cross_layer_interval: int = 1  # a gated cross-attention layer precedes decoder layer i when i % interval == 0
    qk_layer_norms: bool = False  # RMSNorm on per-head queries and keys of the cross-attention
    freeze_text_layers: bool = True
    freeze_text_module_exceptions: list[str] = field(default_factory=list)
    freeze_lm_head: bool = False
    freeze_vision_layers: bool = True
    freeze_vision_module_exceptions: list[str] = field(default_factory=list)
    use_resampler: bool = False
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # "linear" RoPE scaling divides positions by this factor
    vision_config: IdeficsVisionConfig = field(default_factory=IdeficsVisionConfig)
    perceiver_config: IdeficsPerceiverConfig = field(default_factory=IdeficsPerceiverConfig)

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = IdeficsVisionConfig.from_dict(self.vision_config)
        if isinstance(self.perceiver_config, dict):
            self.perceiver_config = IdeficsPerceiverConfig.from_dict(self.perceiver_config)
        self.freeze_text_module_exceptions = list(self.freeze_text_module_exceptions)
        self.freeze_vision_module_exceptions = list(self.freeze_vision_module_exceptions)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_cross_layers(self) -> int:
        return self.num_hidden_layers // self.cross_layer_interval

    @property
    def total_vocab_size(self) -> int:
        return self.vocab_size + self.additional_vocab_size

    def validate(self) -> None:
        """Raise a ValueError naming the field when the config cannot describe a working model."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim (hidden_size / num_attention_heads = {self.head_dim}) must be even for RoPE")
        if self.cross_layer_interval < 1:
            raise ValueError(f"cross_layer_interval must be >= 1, got {self.cross_layer_interval}")
        if self.num_hidden_layers % self.cross_layer_interval:
            raise ValueError(
                f"num_hidden_layers ({self.num_hidden_layers}) must be a multiple of cross_layer_interval "
                f"({self.cross_layer_interval}): decoder layer "
                f"{self.num_cross_layers * self.cross_layer_interval} would have no gated cross-attention layer"
            )
        if self.alpha_type not in ("float", "vector"):
            raise ValueError(f"alpha_type must be 'float' or 'vector', got {self.alpha_type!r}")
        if self.alpha_initializer not in ("zeros", "ones", "normal", "gaussian", "random"):
            raise ValueError(
                "alpha_initializer must be one of zeros, ones, normal, gaussian, random; "
                f"got {self.alpha_initializer!r}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {ACTIVATIONS}")
        if self.vocab_size < 1 or self.additional_vocab_size < 0:
            raise ValueError(
                f"vocab_size must be >= 1 and additional_vocab_size >= 0, got {self.vocab_size}, "
                f"{self.additional_vocab_size}"
            )
        exceptions = {"LayerNorm", "Linear", "Embedding"}
        for name in ("freeze_text_module_exceptions", "freeze_vision_module_exceptions"):
            unknown = set(getattr(self, name)) - exceptions
            if unknown:
                raise ValueError(f"{name} has unknown module types {sorted(unknown)}; allowed: {sorted(exceptions)}")
        self.vision_config.validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IdeficsConfig:
        """Build from a `config.json` dict; unknown keys are ignored."""
        data = dict(data)
        rope = data.pop("rope_parameters", None) or data.pop("rope_scaling", None)
        if rope:
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "linear"):
                raise ValueError(f"rope type {rope_type!r} is not supported (only 'default' and 'linear')")
            if "rope_theta" in rope:
                data.setdefault("rope_theta", rope["rope_theta"])
            if rope_type == "linear":
                data["rope_scaling_factor"] = float(rope["factor"])
        if data.get("rope_theta") is None:
            data.pop("rope_theta", None)
        return cls(**_known_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` contents, readable by transformers' `IdeficsConfig`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["vision_config"] = self.vision_config.to_dict()
        out["perceiver_config"] = self.perceiver_config.to_dict()
        theta = out.pop("rope_theta")
        factor = out.pop("rope_scaling_factor")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
        if factor != 1.0:
            rope = {"rope_type": "linear", "rope_theta": theta, "factor": factor}
        out["rope_parameters"] = rope
        return {"model_type": "idefics", "architectures": ["IdeficsForVisionText2Text"], **out}

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> IdeficsConfig:
        """Read `config.json` from a local folder, a path to the file itself, or a hub id (cache works offline)."""
        path = Path(path_or_id)
        if path.is_file():
            file = path
        else:
            from .loading import resolve_pretrained_dir

            directory = resolve_pretrained_dir(
                path_or_id, revision=revision, cache_dir=cache_dir, allow_patterns=[CONFIG_NAME]
            )
            file = directory / CONFIG_NAME
            if not file.is_file():
                raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
