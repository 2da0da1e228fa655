"""Test helpers: tiny configs that flip every switch, perturbed transformers reference models, and batches."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VISION = dict(
    embed_dim=24, image_size=28, patch_size=14, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40
)
PERCEIVER = dict(resampler_n_latents=3, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8)
BASE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=64,
    freeze_text_layers=False,
    freeze_vision_layers=False,
)

# name -> (top-level overrides, perceiver overrides). Together they flip every architectural switch.
CONFIGS = {
    "resampler_qk_interval2": (
        dict(use_resampler=True, qk_layer_norms=True, alpha_type="float", alpha_initializer="normal",
             alphas_initializer_range=0.5, cross_layer_interval=2, additional_vocab_size=2),
        dict(use_resampler=True, qk_layer_norms_perceiver=True),
    ),
    "plain_vector_zeros": (
        dict(use_resampler=False, qk_layer_norms=False, alpha_type="vector", alpha_initializer="zeros",
             cross_layer_interval=1, additional_vocab_size=0),
        dict(),
    ),
    "resampler_vector_ones_interval4": (
        dict(use_resampler=True, qk_layer_norms=False, alpha_type="vector", alpha_initializer="ones",
             cross_layer_interval=4, additional_vocab_size=3),
        dict(use_resampler=True, qk_layer_norms_perceiver=False),
    ),
    "plain_qk_float_zeros": (
        dict(use_resampler=False, qk_layer_norms=True, alpha_type="float", alpha_initializer="zeros",
             cross_layer_interval=1, additional_vocab_size=2),
        dict(),
    ),
    "resampler_vector_normal": (
        dict(use_resampler=True, qk_layer_norms=True, alpha_type="vector", alpha_initializer="normal",
             alphas_initializer_range=0.3, cross_layer_interval=2, additional_vocab_size=0),
        dict(use_resampler=True, qk_layer_norms_perceiver=True),
    ),
}  # fmt: skip


def config_dict(name: str, **extra) -> dict:
    top, perceiver = CONFIGS[name]
    return {**BASE, **top, "vision_config": dict(VISION), "perceiver_config": {**PERCEIVER, **perceiver}, **extra}


def reference_model(name: str, *, seed: int = 0, **extra):
    """A transformers IdeficsForVisionText2Text with every parameter replaced by noise (gates included)."""
    import transformers

    data = config_dict(name, **extra)
    if data["alpha_initializer"] in ("normal", "gaussian", "random") and data["alpha_type"] == "float":
        data["alpha_initializer"] = "zeros"  # the reference raises TypeError for normal+float; weights are noise anyway
    config = transformers.IdeficsConfig(**data)
    torch.manual_seed(seed)
    model = transformers.IdeficsForVisionText2Text(config)
    perturb(model, seed=seed)
    return model.eval()


@torch.no_grad()
def perturb(model: torch.nn.Module, *, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "alpha" in name:
            p.copy_(noise)  # tanh gates well away from 0
        elif p.ndim == 1:  # norms and biases: around their init
            p.copy_(p + 0.3 * noise)
        else:
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(noise / fan_in**0.5)


def save_reference(model, directory: Path, *, name: str | None = None, max_shard_size: str = "20KB") -> Path:
    """Save sharded; restore the real alpha_initializer in config.json (see `reference_model`)."""
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if name is not None:
        path = directory / "config.json"
        data = json.loads(path.read_text())
        data["alpha_initializer"] = CONFIGS[name][0]["alpha_initializer"]
        path.write_text(json.dumps(data))
    return directory


def make_batch(config: dict, *, seed: int = 0, batch: int = 3, length: int = 12, images: int = 2):
    """Left-padded batch: row 0 text then images; row 1 starts with an image, two images; row 2 no image at all.

    Returns input_ids, attention_mask, pixel_values, image_attention_mask (the reference's conventions).
    """
    g = torch.Generator().manual_seed(seed)
    vocab = config["vocab_size"] + config.get("additional_vocab_size", 0)
    r = config["vision_config"]["image_size"]
    input_ids = torch.randint(3, vocab, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    attention_mask[2, :5] = 0
    input_ids[attention_mask == 0] = 0
    pixel_values = torch.randn(batch, images, 3, r, r, generator=g)
    image_attention_mask = torch.zeros(batch, length, images, dtype=torch.long)
    image_attention_mask[0, 4:, 0] = 1  # text precedes the first image
    image_attention_mask[0, 8:, 0] = 0
    image_attention_mask[0, 8:, 1] = 1
    image_attention_mask[1, 3:7, 0] = 1  # first token after padding is an image
    image_attention_mask[1, 7:, 1] = 1
    pixel_values[2] = 0  # row 2: no image
    return input_ids, attention_mask, pixel_values, image_attention_mask
