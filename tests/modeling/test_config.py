import dataclasses
import json

import pytest

import idefics
from idefics import IdeficsConfig

# The shape of the published config.json files (old keys included), 9b and 80b.
HUB_9B = {
    "additional_vocab_size": 2, "alpha_initializer": "normal", "alpha_type": "float", "alphas_initializer_range": 0.0,
    "architectures": ["IdeficsForVisionText2Text"], "bos_token_id": 1, "cross_layer_activation_function": "swiglu",
    "cross_layer_interval": 4, "dropout": 0.0, "eos_token_id": 2, "ffn_dim": 3072, "freeze_lm_head": True,
    "freeze_text_layers": True, "freeze_text_module_exceptions": [], "freeze_vision_layers": True,
    "freeze_vision_module_exceptions": [], "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 2048, "max_sequence_length": 2048, "model_type": "idefics",
    "num_attention_heads": 32, "num_hidden_layers": 32, "pad_token_id": 0, "qk_layer_norms": True,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.28.0.dev0", "use_cache": True, "use_resampler": True, "vocab_size": 32000,
    "perceiver_config": {"model_type": "idefics_perciever", "qk_layer_norms_perceiver": True, "resampler_depth": 6,
                         "resampler_head_dim": 96, "resampler_n_heads": 16, "resampler_n_latents": 64,
                         "use_resampler": True},
    "vision_config": {"embed_dim": 1280, "image_size": 224, "intermediate_size": 5120, "model_type": "idefics",
                      "num_attention_heads": 16, "num_hidden_layers": 32, "patch_size": 14,
                      "vision_model_name": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"},
}  # fmt: skip
HUB_80B = {**HUB_9B, "hidden_size": 8192, "intermediate_size": 22016, "num_attention_heads": 64,
           "num_hidden_layers": 80, "rms_norm_eps": 1e-05, "rope_theta": 10000.0}  # fmt: skip


def test_defaults_equal_reference():
    import transformers

    ref = transformers.IdeficsConfig()
    ours = IdeficsConfig()
    for f in dataclasses.fields(ours):
        if f.name in ("vision_config", "perceiver_config", "rope_theta", "rope_scaling_factor"):
            continue
        assert getattr(ours, f.name) == (list(v) if isinstance(v := getattr(ref, f.name), tuple) else v), f.name
    for sub in ("vision_config", "perceiver_config"):
        for f in dataclasses.fields(getattr(ours, sub)):
            assert getattr(getattr(ours, sub), f.name) == getattr(getattr(ref, sub), f.name), f"{sub}.{f.name}"
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]


@pytest.mark.parametrize("hub", [HUB_9B, HUB_80B], ids=["9b", "80b"])
def test_reads_published_configs(hub, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hub))
    config = IdeficsConfig.from_pretrained(tmp_path)
    assert config.hidden_size == hub["hidden_size"] and config.num_cross_layers == hub["num_hidden_layers"] // 4
    assert config.vision_config.embed_dim == 1280 and config.perceiver_config.resampler_n_latents == 64
    assert config.total_vocab_size == 32002 and config.qk_layer_norms and config.use_resampler


def test_round_trip_through_transformers(tmp_path):
    import transformers

    ours = IdeficsConfig.from_dict({**HUB_9B, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert ours.rope_theta == 5e5
    ours.save_pretrained(tmp_path)
    ref = transformers.IdeficsConfig.from_pretrained(tmp_path)
    assert ref.hidden_size == 4096 and ref.vision_config.embed_dim == 1280
    assert ref.perceiver_config.qk_layer_norms_perceiver and ref.rope_parameters["rope_theta"] == 5e5
    ref.save_pretrained(tmp_path / "ref")
    again = IdeficsConfig.from_pretrained(tmp_path / "ref")
    assert again == ours


def test_linear_rope_scaling_and_unsupported_rope():
    config = IdeficsConfig.from_dict({"rope_scaling": {"type": "linear", "factor": 2.0}})
    assert config.rope_scaling_factor == 2.0
    assert IdeficsConfig.from_dict(config.to_dict()).rope_scaling_factor == 2.0
    with pytest.raises(ValueError, match="yarn"):
        IdeficsConfig.from_dict({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}})


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden_size=100, num_attention_heads=3), "hidden_size \\(100\\) must be divisible"),
        (dict(num_hidden_layers=6, cross_layer_interval=4), "decoder layer 4 would have no gated"),
        (dict(cross_layer_interval=0), "cross_layer_interval must be >= 1"),
        (dict(alpha_type="matrix"), "alpha_type"),
        (dict(alpha_initializer="xavier"), "alpha_initializer"),
        (dict(hidden_act="swish2"), "hidden_act"),
        (dict(freeze_text_module_exceptions=["Conv2d"]), "Conv2d"),
        (dict(vision_config=dict(embed_dim=30, num_attention_heads=4)), "vision_config.embed_dim"),
    ],
)
def test_invalid_configs_fail_early(overrides, match):
    with pytest.raises(ValueError, match=match):
        IdeficsConfig.from_dict(overrides)


def test_reference_dies_late_on_a_bad_interval():
    """The reference accepts the config and raises IndexError only at forward time; ours refuses it up front."""
    import torch
    import transformers
    from reference import BASE, VISION

    config = transformers.IdeficsConfig(**{**BASE, "num_hidden_layers": 3, "cross_layer_interval": 2},
                                        vision_config=VISION)  # fmt: skip
    model = transformers.IdeficsModel(config).eval()
    with pytest.raises(IndexError):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), pixel_values=torch.zeros(1, 1, 3, 28, 28),
              image_attention_mask=torch.ones(1, 4, 1, dtype=torch.long))  # fmt: skip
    with pytest.raises(ValueError, match="cross_layer_interval"):
        idefics.IdeficsConfig.from_dict({**BASE, "num_hidden_layers": 3, "cross_layer_interval": 2})


def test_normal_float_gates_construct():
    """alpha_initializer=normal with alpha_type=float: the reference raises TypeError, ours draws the gates."""
    import torch

    config = IdeficsConfig.from_dict(
        {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 40, "alpha_initializer": "normal", "alpha_type": "float", "alphas_initializer_range": 1.0,
         "vision_config": {"embed_dim": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "intermediate_size": 20, "image_size": 28}}
    )  # fmt: skip
    model = idefics.IdeficsForVisionText2Text(config)
    alpha = model.model.gated_cross_attn_layers[0].alpha_cross_attn
    assert alpha.shape == (1,) and torch.isfinite(alpha).all() and alpha.item() != 0.0
