"""Whole models quantised while loading: logits against full precision on perturbed random weights (cosine and KL),
save / load of a quantised checkpoint, the demo model's accuracy on freshly rendered images, and the errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from reference import config_dict, make_batch, reference_model, save_reference

import idefics
from idefics import IdeficsForVisionText2Text, IdeficsProcessor
from idefics.demo.build import EVAL_SIZES
from idefics.demo.evaluate import accuracy
from idefics.modeling.embeddings import IdeficsDecoupledLinear
from idefics.modeling.layout import fused_weight, use_decode_layout
from idefics.quantization import (
    Int4Linear,
    Int8Head,
    Int8Linear,
    Int8Pack,
    Nf4Linear,
    QuantizationConfig,
    QuantizationError,
    QuantizedLinear,
    weight_bytes,
)
from idefics.serving.slots import SlotCache

NAME = "resampler_qk_interval2"  # resampler with q/k norms, gated layers every 2nd decoder layer, 2 extra tokens
# Every Linear's in features a multiple of 32 and its out features of 16, so int4 runs its kernel on every layer.
WIDE = dict(
    hidden_size=64,
    intermediate_size=128,
    vision_config=dict(embed_dim=32, image_size=28, patch_size=14, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64),
    perceiver_config=dict(use_resampler=True, qk_layer_norms_perceiver=True, resampler_n_latents=3,
                          resampler_depth=2, resampler_n_heads=2, resampler_head_dim=16),
)  # fmt: skip
EXAMPLES = ("model.layers.0.self_attn.q_proj", "model.gated_cross_attn_layers.1.mlp.down_proj",
            "model.perceiver_resampler.blocks.0.1.fc", "model.vision_model.encoder.layers.1.mlp.fc2")  # fmt: skip
LAYERS = {"int8": Int8Linear, "int4": Int4Linear, "nf4": Nf4Linear}
# (mean cosine, minimum cosine, KL) limits over the unpadded positions. Measured on this config: int8 0.99947 /
# 0.99898 / 0.0006, int4 0.957 / 0.910 / 0.041, nf4 0.924 / 0.865 / 0.079 (the weights are noise of widths 32-128:
# no averaging hides the rounding, unlike real checkpoints).
LIMITS = {"int8": (0.999, 0.998, 0.002), "int4": (0.95, 0.90, 0.06), "nf4": (0.91, 0.85, 0.1)}


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    model = reference_model(NAME, **WIDE)
    return save_reference(model, tmp_path_factory.mktemp("wide"), name=NAME, max_shard_size="200KB")


@pytest.fixture(scope="module")
def batch():
    ids, am, pv, iam = make_batch(config_dict(NAME, **WIDE))
    return dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_attention_mask=iam)


@pytest.fixture(scope="module")
def full_logits(wide_checkpoint, batch):
    return logits(IdeficsForVisionText2Text.from_pretrained(wide_checkpoint), batch)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def closeness(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """Mean and minimum cosine of the logit rows, and KL(reference || other), over the unpadded positions."""
    a, b = reference[mask.bool()], other[mask.bool()]  # (positions, v)
    cosine = F.cosine_similarity(a, b, dim=-1)
    kl = F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    return cosine.mean().item(), cosine.min().item(), kl.item()


@pytest.mark.parametrize("scheme", LAYERS)
def test_quantised_logits_close_to_full_precision(scheme, wide_checkpoint, batch, full_logits):
    model = IdeficsForVisionText2Text.from_pretrained(wide_checkpoint, quantize=scheme, group_size=32)
    quantised = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear) and name != "lm_head"]
    assert type(model.lm_head) is (IdeficsDecoupledLinear if scheme == "nf4" else Int8Head)  # int8 unless for QLoRA
    assert all(isinstance(model.get_submodule(name), LAYERS[scheme]) for name in quantised)
    assert set(EXAMPLES) <= set(quantised)
    assert type(model.lm_head.additional_fc) is torch.nn.Linear  # the 2-row head stays full precision
    if scheme == "int4":
        assert all(model.get_submodule(name).packed for name in quantised)  # the kernel on every layer
    mean, low, kl = closeness(full_logits, logits(model, batch), batch["attention_mask"])
    print(f"{scheme}: cosine mean {mean:.5f} min {low:.5f}, KL {kl:.5f}")
    assert mean >= LIMITS[scheme][0] and low >= LIMITS[scheme][1] and kl <= LIMITS[scheme][2]
    full = IdeficsForVisionText2Text.from_pretrained(wide_checkpoint)
    assert weight_bytes(model) < weight_bytes(full)


@pytest.mark.parametrize("scheme", LAYERS)
def test_saved_quantised_checkpoint_loads_back_identical(scheme, wide_checkpoint, batch, tmp_path):
    model = IdeficsForVisionText2Text.from_pretrained(wide_checkpoint, quantize=scheme, group_size=32)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "idefics" and saved["scheme"] == scheme
    loaded = IdeficsForVisionText2Text.from_pretrained(tmp_path)
    assert loaded.quantization_config == model.quantization_config
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    again = IdeficsForVisionText2Text.from_pretrained(tmp_path, quantize=model.quantization_config)  # the same: fine
    assert torch.equal(logits(again, batch), logits(model, batch))
    other = "int8" if scheme != "int8" else "nf4"
    with pytest.raises(QuantizationError, match="is stored quantised as .* cannot be quantised again"):
        IdeficsForVisionText2Text.from_pretrained(tmp_path, quantize=other)


def test_generation_with_quantised_layers_matches_without_cache(wide_checkpoint, batch):
    model = IdeficsForVisionText2Text.from_pretrained(wide_checkpoint, quantize="int8")
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)  # (b, t + 4)
        ids, mask, images = out[:, :-1], batch["attention_mask"], batch["image_attention_mask"]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 3)], dim=1)
        images = torch.cat([images, images[:, -1:].expand(-1, 3, -1)], dim=1)
        full = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                     image_attention_mask=images).logits  # fmt: skip
    # Each generated token is the full pass's argmax, or a near tie with it: decode and prefill add in a different
    # order, and int8's activation rounding can turn that into a flip (measured: one of 12 at a gap of 0.006).
    full, picked = full[:, -4:], out[:, -4:]
    gap = full.max(-1).values - full.gather(-1, picked[..., None])[..., 0]  # (b, 4)
    assert gap.max() <= 0.02 and (gap == 0).sum() >= gap.numel() - 1, gap


def test_errors(wide_checkpoint):
    with pytest.raises(
        QuantizationError, match=r"group_size 48 does not divide layer 'model\.vision_model.*in features 32"
    ):
        IdeficsForVisionText2Text.from_pretrained(wide_checkpoint, quantize="int4", group_size=48, quantize_strict=True)
    with pytest.raises(QuantizationError, match="runs on cpu or cuda, not on meta"):
        IdeficsForVisionText2Text.from_pretrained(wide_checkpoint, quantize="int8", device="meta")
    with pytest.raises(QuantizationError, match="unknown quantisation scheme 'int2'"):
        IdeficsForVisionText2Text.from_pretrained(wide_checkpoint, quantize="int2")


# int4 layers per group size and int8 layers: at group 128 the demo's 64-wide layers (vision tower, perceiver,
# cross-attention k/v) take group 64 and its 336-wide down_proj layers (32 does not divide 336) stay int8; group 16
# divides every width (it dequantises: the kernels take 32-256).
DEMO_INT4 = {128: ({64: 24, 128: 24}, 4), 32: ({32: 48}, 4), 16: ({16: 52}, 0)}


@pytest.mark.parametrize(
    ("scheme", "group_size", "least"),
    [("int8", 128, 0.95), ("int4", 128, 0.93), ("int4", 32, 0.93), ("int4", 16, 0.93)],
)
def test_demo_model_keeps_its_accuracy(scheme, group_size, least):
    model = IdeficsForVisionText2Text.from_pretrained(idefics.DEMO_MODEL, quantize=scheme, group_size=group_size)
    if scheme == "int4":
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m is not model.lm_head]
        groups = {}
        for layer in layers:
            if isinstance(layer, Int4Linear):
                groups[layer.group_size] = groups.get(layer.group_size, 0) + 1
        assert (groups, sum(type(m) is Int8Linear for m in layers)) == DEMO_INT4[group_size]
    processor = IdeficsProcessor.from_pretrained(idefics.DEMO_MODEL)
    result = accuracy(model, processor, count=96, seed=2024, sizes=EVAL_SIZES, batch_size=48)
    print(f"demo {scheme} group {group_size}: {result.value:.3f} ({result.mistakes[:3]})")
    assert result.value >= least


def test_int8_groups_run_packed_with_the_same_values(wide_checkpoint, batch, tmp_path):
    """q/k/v and gate/up become one int8 kernel call each for decoding; the layers' tensors become views of it."""
    model = IdeficsForVisionText2Text.from_pretrained(wide_checkpoint, quantize="int8")
    before = logits(model, batch)
    state = {key: t.clone() for key, t in model.state_dict().items()}
    assert use_decode_layout(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.gated_cross_attn_layers[0].mlp
    assert isinstance(attn.qkv_packed, Int8Pack) and isinstance(mlp.gate_up_packed, Int8Pack)
    assert attn.k_proj.weight.data_ptr() == attn.qkv_packed.weight[attn.q_proj.out_features :].data_ptr()
    assert fused_weight(attn.qkv_packed, attn.q_proj, attn.k_proj, attn.v_proj) is None  # gradients on: unpacked
    with torch.no_grad():
        assert fused_weight(attn.qkv_packed, attn.q_proj, attn.k_proj, attn.v_proj) is attn.qkv_packed
    torch.testing.assert_close(logits(model, batch), before, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(t, state[key]) for key, t in model.state_dict().items())
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert torch.equal(logits(IdeficsForVisionText2Text.from_pretrained(tmp_path), batch), logits(model, batch))


def test_quantised_checkpoint_from_before_int8_heads_keeps_its_head(wide_checkpoint, batch, tmp_path):
    """A `quantization_config` without `lm_head` (written before the head was quantised) loads a float head."""
    config = QuantizationConfig("int8", lm_head=False)
    model = IdeficsForVisionText2Text.from_pretrained(wide_checkpoint, quantize=config)
    assert type(model.lm_head) is IdeficsDecoupledLinear
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["quantization_config"].pop("lm_head") is False
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = IdeficsForVisionText2Text.from_pretrained(tmp_path)
    assert type(loaded.lm_head) is IdeficsDecoupledLinear and loaded.quantization_config == model.quantization_config
    assert not loaded.quantization_config.lm_head
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_serving_cache_takes_the_activation_dtype_of_an_int8_headed_model(wide_checkpoint):
    """The int8 head's `weight` is int8: the serving slot cache must take the activations' dtype (`model.dtype`)."""
    model = IdeficsForVisionText2Text.from_pretrained(wide_checkpoint, quantize="int8")
    assert model.lm_head.weight.dtype == torch.int8
    cache = SlotCache(model, num_slots=1, max_len=8, max_images=1)
    assert cache.k[0].dtype == cache.image_k[0].dtype == model.dtype
