"""Loading and saving whole models: freeze flags, round trips with transformers, dtypes, errors, import hygiene."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from hub_cache import fake_hub_snapshot
from reference import config_dict, make_batch, reference_model, save_reference

import idefics

FREEZE_CASES = [
    dict(freeze_text_layers=True, freeze_vision_layers=True, freeze_lm_head=True),
    dict(freeze_text_layers=True, freeze_text_module_exceptions=["Linear"], freeze_vision_layers=False),
    dict(freeze_text_layers=False, freeze_vision_layers=True,
         freeze_vision_module_exceptions=["LayerNorm", "Embedding"]),
    dict(freeze_text_layers=True, freeze_text_module_exceptions=["LayerNorm", "Embedding"], freeze_lm_head=True,
         freeze_vision_layers=True, freeze_vision_module_exceptions=["Linear"]),
    dict(freeze_text_layers=False, freeze_vision_layers=False, freeze_lm_head=False),
]  # fmt: skip


def trainable(model) -> set[str]:
    return {k for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("flags", FREEZE_CASES)
def test_freeze_flags_match_reference(flags, tmp_path):
    import transformers

    name = "resampler_qk_interval2"
    ref = reference_model(name, **flags)
    ours = idefics.IdeficsForVisionText2Text(idefics.IdeficsConfig.from_dict(config_dict(name, **flags)))
    assert trainable(ours) == trainable(ref)
    save_reference(ref, tmp_path, name=name)
    loaded = idefics.IdeficsForVisionText2Text.from_pretrained(tmp_path)
    assert trainable(loaded) == trainable(ref)
    # transformers 5.x's from_pretrained loses the flags its constructor set (everything trains again); ours keeps them.
    ref_loaded = transformers.IdeficsForVisionText2Text.from_pretrained(tmp_path, config=ref.config)
    if any(flags.values()):
        assert trainable(ref_loaded) != trainable(ref)
    if flags.get("freeze_text_layers"):  # the additional rows always train
        assert "model.embed_tokens.additional_embedding.weight" in trainable(loaded)
        assert "model.embed_tokens.weight" not in trainable(loaded)


@pytest.mark.parametrize("name", ["resampler_vector_ones_interval4", "plain_qk_float_zeros"])
def test_round_trip_ours_to_transformers_and_back(name, reference_checkpoints, tmp_path):
    import transformers

    ref, folder = reference_checkpoints(name)
    ours = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "ours", max_shard_size="30KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    back, info = transformers.IdeficsForVisionText2Text.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    again = idefics.IdeficsForVisionText2Text.from_pretrained(tmp_path / "ours")
    ids, am, pv, iam = make_batch(config_dict(name))
    batch = dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_attention_mask=iam)
    with torch.no_grad():
        expected = ref(**batch).logits
        assert torch.equal(back.eval()(**batch).logits, expected)
        assert torch.equal(again(**batch).logits, ours(**batch).logits)


def test_backbone_save_loads_in_both(reference_checkpoints, tmp_path):
    import transformers

    _, folder = reference_checkpoints("plain_vector_zeros")
    backbone = idefics.IdeficsModel.from_pretrained(folder)  # from a full-model checkpoint ("model." prefix)
    backbone.save_pretrained(tmp_path)  # bare keys, as transformers saves an IdeficsModel
    ref, info = transformers.IdeficsModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    again = idefics.IdeficsModel.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(backbone.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_bf16_load_keeps_rope_fp32_and_stays_close(reference_checkpoints):
    name = "resampler_qk_interval2"
    _, folder = reference_checkpoints(name)
    fp32 = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    bf16 = idefics.IdeficsForVisionText2Text.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(bf16.model.rotary_emb.inv_freq, fp32.model.rotary_emb.inv_freq, rtol=0, atol=0)
    fp32.to(torch.bfloat16)  # a later cast keeps it fp32 too
    assert fp32.model.rotary_emb.inv_freq.dtype == torch.float32
    fp32.float()
    ids, am, pv, iam = make_batch(config_dict(name))
    with torch.no_grad():
        a = fp32(input_ids=ids, attention_mask=am, pixel_values=pv, image_attention_mask=iam).logits
        b = bf16(input_ids=ids, attention_mask=am, pixel_values=pv, image_attention_mask=iam).logits.float()
    real = am.bool()
    cos = torch.nn.functional.cosine_similarity(a[real], b[real], dim=-1)
    assert cos.min() > 0.98, cos.min()
    assert (a[real].argmax(-1) == b[real].argmax(-1)).float().mean() > 0.8


def test_dtype_auto_and_bad_dtype(reference_checkpoints, tmp_path):
    ref, _ = reference_checkpoints("plain_vector_zeros")
    copy.deepcopy(ref).to(torch.float16).save_pretrained(tmp_path)  # the session's reference stays fp32
    model = idefics.IdeficsForVisionText2Text.from_pretrained(tmp_path, dtype="auto")
    assert model.dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float17'"):
        idefics.IdeficsForVisionText2Text.from_pretrained(tmp_path, dtype="float17")


def test_loads_from_hub_cache_offline(reference_checkpoints, tmp_path, monkeypatch):
    """A hub id resolves through the local hub cache with no network."""
    _, folder = reference_checkpoints("plain_vector_zeros")
    fake_hub_snapshot(tmp_path, "HuggingFaceM4/idefics-tiny", folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = idefics.IdeficsForVisionText2Text.from_pretrained("HuggingFaceM4/idefics-tiny", cache_dir=tmp_path)
    assert model.config.hidden_size == 32
    with pytest.raises(Exception, match="HuggingFaceM4/not-there") as err:
        idefics.IdeficsForVisionText2Text.from_pretrained("HuggingFaceM4/not-there", cache_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_checkpoint_errors_name_the_culprit(reference_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = reference_checkpoints("plain_vector_zeros")
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = tmp_path / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = torch.zeros(5, 7)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"q_proj\.weight") as err:
        idefics.IdeficsForVisionText2Text.from_pretrained(tmp_path)
    assert "(5, 7)" in str(err.value) and "(32, 32)" in str(err.value)
    # a config that does not describe the checkpoint: keys missing
    (shard).write_bytes((folder / shard.name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["use_resampler"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="perceiver_resampler"):
        idefics.IdeficsForVisionText2Text.from_pretrained(tmp_path)


def test_forward_input_errors(reference_checkpoints):
    _, folder = reference_checkpoints("resampler_qk_interval2")
    model = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    ids, am, pv, iam = make_batch(config_dict("resampler_qk_interval2"))
    with pytest.raises(ValueError, match="exactly one of pixel_values"):
        model(input_ids=ids, pixel_values=pv, perceiver_embeddings=torch.zeros(6, 3, 24), image_attention_mask=iam)
    with pytest.raises(ValueError, match="image_attention_mask .* is required"):
        model(input_ids=ids, pixel_values=pv)
    with pytest.raises(ValueError, match=r"image_attention_mask must be .* \(3, 12, 2\), got \(3, 12, 1\)"):
        model(input_ids=ids, pixel_values=pv, image_attention_mask=iam[..., :1])
    with pytest.raises(ValueError, match=r"attention_mask must be"):
        model(input_ids=ids, attention_mask=am[:, 1:], pixel_values=pv, image_attention_mask=iam)
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, images"):
        model(input_ids=ids, pixel_values=pv[0], image_attention_mask=iam)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(pixel_values=pv, image_attention_mask=iam)


def test_gradient_checkpointing_gives_same_gradients(reference_checkpoints):
    _, folder = reference_checkpoints("resampler_qk_interval2")
    ids, am, pv, iam = make_batch(config_dict("resampler_qk_interval2"))
    grads = []
    for enable in (False, True):
        model = idefics.IdeficsForVisionText2Text.from_pretrained(folder).train()
        if enable:
            model.gradient_checkpointing_enable()
        model(input_ids=ids, attention_mask=am, pixel_values=pv, image_attention_mask=iam, labels=ids).loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5, msg=k)


def test_import_does_not_import_transformers():
    code = "import sys, idefics; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tied_embeddings_round_trip(tmp_path):
    import transformers

    name = "plain_vector_zeros"
    ref = reference_model(name, tie_word_embeddings=True)
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    ref.save_pretrained(tmp_path / "ref")
    ours = idefics.IdeficsForVisionText2Text.from_pretrained(tmp_path / "ref")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids, am, pv, iam = make_batch(config_dict(name))
    batch = dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_attention_mask=iam)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.IdeficsForVisionText2Text.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        real = am.bool()
        torch.testing.assert_close(ours(**batch).logits[real], ref(**batch).logits[real], atol=1e-4, rtol=0)
        assert torch.equal(back(**batch).logits, ref(**batch).logits)
