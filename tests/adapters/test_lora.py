"""LoRA adapters against peft 0.21 on the transformers model: PEFT's files both ways, the same trainable parameters,
merge / delete, generation through the packed decode layout, and the errors."""

import copy
import json

import pytest
import torch
from reference import config_dict, make_batch
from safetensors.torch import load_file, save_file

import idefics
from idefics.adapters import LoraConfig, LoraLinear, adapter_state_dict
from idefics.loading import CheckpointError

NAME = "resampler_vector_ones_interval4"  # resampler, 3 additional tokens; transformers can build it (AutoPeftModel)
QKV = ["q_proj", "k_proj", "v_proj"]
EXTRA = ["lm_head.additional_fc", "model.embed_tokens.additional_embedding"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is fastest, and far faster than a pool on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch_for(name: str = NAME) -> dict:
    ids, am, pv, iam = make_batch(config_dict(name))
    return dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_attention_mask=iam)


def load(reference_checkpoints, name: str = NAME):
    ref, folder = reference_checkpoints(name)
    return copy.deepcopy(ref), folder, idefics.IdeficsForVisionText2Text.from_pretrained(folder)


@torch.no_grad()
def perturb_trainable(model: torch.nn.Module, seed: int) -> None:
    """Noise on every trainable parameter: LoRA B non-zero, modules_to_save moved off their base values."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def lora_names(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, LoraLinear)}


@pytest.mark.parametrize("options", [dict(), dict(use_rslora=True, lora_alpha=16, modules_to_save=EXTRA)])
def test_our_adapter_loads_in_peft(options, reference_checkpoints, tmp_path):
    import peft

    ref, folder, ours = load(reference_checkpoints)
    batch = batch_for()
    ours.add_adapter(LoraConfig(r=4, target_modules=QKV, **options))
    perturb_trainable(ours, seed=1)
    ours.save_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["bias"] == "none" and saved["inference_mode"] is True
    assert saved["base_model_name_or_path"] == str(folder)  # from_pretrained's folder, for AutoPeftModel
    assert saved["auto_mapping"]["base_model_class"] == "IdeficsForVisionText2Text"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.gated_cross_attn_layers.0.cross_attn.k_proj.lora_A.weight"].shape == (4, 24)
    assert tensors["base_model.model.model.perceiver_resampler.blocks.1.0.v_proj.lora_B.weight"].shape == (16, 4)
    assert tensors["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"].abs().sum() > 0
    assert ("base_model.model.lm_head.additional_fc.weight" in tensors) == bool(options)

    expected = logits(ours, batch)
    assert not torch.allclose(expected, logits(ref, batch), atol=1e-3)  # the adapter changes the outputs
    theirs = peft.PeftModel.from_pretrained(ref, tmp_path)
    torch.testing.assert_close(logits(theirs, batch), expected, atol=1e-4, rtol=0)
    if options:
        auto = peft.AutoPeftModel.from_pretrained(tmp_path)  # builds the base from base_model_name_or_path
        torch.testing.assert_close(logits(auto, batch), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(target_modules=QKV, use_rslora=True, modules_to_save=EXTRA, safe_serialization=True),
        dict(target_modules=r".*self_attn\.(q|v)_proj", lora_dropout=0.1, safe_serialization=False),
    ],
    ids=["qkv-rslora-modules_to_save", "regex-bin"],
)
def test_peft_adapter_loads_in_ours(options, reference_checkpoints, tmp_path):
    import peft

    ref, folder, ours = load(reference_checkpoints)
    batch = batch_for()
    options = dict(options)
    safe = options.pop("safe_serialization")
    theirs = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, **options))
    perturb_trainable(theirs, seed=2)
    trainable = theirs.get_nb_trainable_parameters()[0]
    theirs.eval().save_pretrained(tmp_path, safe_serialization=safe)
    expected = logits(theirs, batch)

    ours.load_adapter(tmp_path)
    assert ours.num_parameters(only_trainable=True) == trainable
    targets, got = options["target_modules"], ours.adapter_config.target_modules
    assert sorted(got) == sorted(targets) if isinstance(targets, list) else got == targets  # peft saves a set
    torch.testing.assert_close(logits(ours, batch), expected, atol=1e-4, rtol=0)
    again = idefics.IdeficsForVisionText2Text.from_pretrained(folder, adapter=tmp_path)
    assert not again.training  # dropout off
    torch.testing.assert_close(logits(again, batch), expected, atol=1e-4, rtol=0)
    merged = idefics.IdeficsForVisionText2Text.from_pretrained(folder, adapter=tmp_path, merge=True)
    assert not lora_names(merged) and merged.adapter_config is None
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(target_modules=QKV),
        dict(target_modules=["fc", "o_proj", "out_proj"], modules_to_save=["lm_head"], r=2),
        dict(target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj", r=3),
        dict(target_modules=r".*cross_attn\.[qkv]_proj", modules_to_save=["additional_fc"]),
        dict(target_modules=["q_proj", "additional_fc"], modules_to_save=["lm_head.additional_fc"]),  # excluded
    ],
)
def test_trainable_parameters_match_peft(options, reference_checkpoints):
    import peft

    ref, _, ours = load(reference_checkpoints)
    theirs = peft.get_peft_model(ref, peft.LoraConfig(**options))
    ours.add_adapter(LoraConfig(**options))
    assert ours.num_parameters(only_trainable=True) == theirs.get_nb_trainable_parameters()[0]
    wrapped = {n for n, m in theirs.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert lora_names(ours) == wrapped


def test_idefics_9b_count_on_meta():
    """r=16 on q/k/v of idefics-9b: PEFT's suffix match hits the q/k/v of the text layers 32*3*16*(4096+4096),
    the gated cross-attention 8*16*(2*4096 + 2*(1280+4096)), the vision tower 32*3*16*(1280+1280) and the perceiver
    6*3*16*(1280+1536): 12,582,912 + 2,424,832 + 3,932,160 + 811,008 = 19,750,912 trainable parameters."""
    vision = dict(embed_dim=1280, image_size=224, intermediate_size=5120, patch_size=14, num_attention_heads=16,
                  num_hidden_layers=32)  # fmt: skip
    perceiver = dict(use_resampler=True, resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                     resampler_head_dim=96, qk_layer_norms_perceiver=False)  # fmt: skip
    config = idefics.IdeficsConfig(vocab_size=32000, additional_vocab_size=2, hidden_size=4096, intermediate_size=11008,
                                   num_hidden_layers=32, num_attention_heads=32, cross_layer_interval=4,
                                   use_resampler=True, qk_layer_norms=False, vision_config=vision,
                                   perceiver_config=perceiver)  # fmt: skip
    with torch.device("meta"):
        model = idefics.IdeficsForVisionText2Text(config)
    model.add_adapter(LoraConfig(r=16, target_modules=QKV))
    assert model.num_parameters(only_trainable=True) == 19_750_912
    wrapped = lora_names(model)
    parts = ("model.layers.", "model.gated_cross_attn_layers.", "model.vision_model.", "model.perceiver_resampler.")
    assert [sum(n.startswith(p) for n in wrapped) for p in parts] == [96, 24, 96, 18]
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.is_meta


def greedy(model, batch: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by full forwards (no cache): each step appends the argmax of the last position."""
    ids, mask, image_mask = batch["input_ids"], batch["attention_mask"], batch["image_attention_mask"]
    for _ in range(steps):
        with torch.no_grad():
            out = model(ids, mask, pixel_values=batch["pixel_values"], image_attention_mask=image_mask)
        ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        image_mask = torch.cat([image_mask, image_mask[:, -1:]], dim=1)
    return ids


def test_merge_delete_and_generation(reference_checkpoints):
    _, _, ours = load(reference_checkpoints)
    batch = batch_for()
    generate = dict(max_new_tokens=4, eos_token_id=[10_000], pad_token_id=0)
    base_logits, base_state = logits(ours, batch), {k: v.clone() for k, v in ours.state_dict().items()}
    flags = {n: p.requires_grad for n, p in ours.named_parameters()}
    base_tokens = ours.generate(**batch, **generate)  # packs q/k/v and gate/up for decoding
    attn = ours.model.layers[0].self_attn
    assert attn.qkv_packed is not None

    ours.add_adapter(LoraConfig(r=4, target_modules=[*QKV, "up_proj"], modules_to_save=EXTRA))
    perturb_trainable(ours, seed=3)
    adapted = logits(ours, batch)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    tokens = ours.generate(**batch, **generate)
    assert torch.equal(tokens, greedy(ours, batch, 4)) and not torch.equal(tokens, base_tokens)
    assert attn.qkv_packed is None and ours.model.layers[0].mlp.gate_up_packed is None  # adapters are never bypassed
    with pytest.raises(ValueError, match="unmerged LoRA adapter"):
        ours.save_pretrained("unused")

    ours.train()  # a training step after generation: the packed weights are not inference tensors
    ours(**batch, labels=batch["input_ids"]).loss.backward()
    assert attn.k_proj.lora_B.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad is None
    ours.eval()

    merged = copy.deepcopy(ours)
    merged.merge_adapter()
    assert not lora_names(merged) and merged.adapter_config is None
    torch.testing.assert_close(logits(merged, batch), adapted, atol=1e-5, rtol=0)
    assert torch.equal(merged.generate(**batch, **generate), tokens)
    assert merged.model.layers[0].self_attn.qkv_packed is not None  # plain Linears again: packed again
    assert {n: p.requires_grad for n, p in merged.named_parameters()} == flags

    ours.delete_adapter()
    assert not lora_names(ours) and ours.adapter_config is None
    assert torch.equal(logits(ours, batch), base_logits)
    assert all(torch.equal(v, base_state[k]) for k, v in ours.state_dict().items())
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == flags
    assert torch.equal(ours.generate(**batch, **generate), base_tokens)


def test_save_adapter_from_a_state_dict(reference_checkpoints, tmp_path):
    """The trainer passes a gathered state dict with our names; it is written instead of the model's tensors."""
    _, _, ours = load(reference_checkpoints)
    ours.add_adapter(LoraConfig(r=2, target_modules=["o_proj"], modules_to_save=["lm_head.additional_fc"]))
    state = {f"_orig_mod.{n}": 2 * p.detach() for n, p in ours.named_parameters() if p.requires_grad}
    ours.save_adapter(tmp_path, state_dict=state)
    written = load_file(tmp_path / "adapter_model.safetensors")
    assert set(written) == {"base_model.model." + n.removeprefix("_orig_mod.") for n in state}
    assert set(written) == set(adapter_state_dict(ours, ours.adapter_config))
    key = "base_model.model.lm_head.additional_fc.weight"
    assert torch.equal(written[key], 2 * ours.lm_head.additional_fc.weight.detach())
    del state["_orig_mod.model.layers.1.self_attn.o_proj.lora_A.weight"]
    with pytest.raises(CheckpointError, match=r"lacks 'base_model\.model\.model\.layers\.1\.self_attn\.o_proj\.lora_A"):
        ours.save_adapter(tmp_path, state_dict=state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=2.0), "r must be a positive integer"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\)"),
        (dict(lora_alpha=0), "lora_alpha must be a positive number"),
        (dict(target_modules=[]), "target_modules is empty"),
        (dict(target_modules="q_proj("), "not a valid regex"),
        (dict(modules_to_save="lm_head"), "modules_to_save must be a list"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


@pytest.mark.parametrize(
    "data, message",
    [
        (dict(peft_type="IA3"), "peft_type 'IA3' is not supported"),
        (dict(use_dora=True), "use_dora=True is not supported"),
        (dict(bias="all"), "bias='all' is not supported"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern="),
        (dict(fan_in_fan_out=True), "fan_in_fan_out=True"),
        (dict(layers_to_transform=0), "layers_to_transform=0"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
        (dict(target_modules=None), "target_modules is missing"),
    ],
)
def test_peft_options_that_change_numbers_are_refused(data, message):
    base = dict(peft_type="LORA", r=4, lora_alpha=8, target_modules=["q_proj"], some_future_field=1)
    assert LoraConfig.from_dict(base).r == 4  # unknown keys are ignored
    with pytest.raises(ValueError, match=message):
        LoraConfig.from_dict(base | data)


def test_add_adapter_errors(reference_checkpoints):
    _, _, ours = load(reference_checkpoints)
    cases = [
        (dict(target_modules=["nope", "qproj"]), r"\['nope', 'qproj'\] match no nn.Linear .*q_proj"),
        (dict(target_modules=["self_attn"]), r"'model\.vision_model\.encoder\.layers\.0\.self_attn', a IdeficsVision"),
        (dict(target_modules=["lm_head"]), "match 'lm_head', a IdeficsDecoupledLinear"),
        (dict(target_modules=QKV, modules_to_save=["lm_head.nope"]), "modules_to_save entry 'lm_head.nope'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ours.add_adapter(LoraConfig(**kwargs))
        assert ours.adapter_config is None and not lora_names(ours)  # nothing was changed
    for method in (ours.merge_adapter, ours.delete_adapter, lambda: ours.save_adapter("unused")):
        with pytest.raises(ValueError, match="no adapter is attached"):
            method()
    ours.add_adapter(LoraConfig(target_modules=QKV))
    with pytest.raises(ValueError, match="already attached"):
        ours.add_adapter(LoraConfig(target_modules=QKV))


def test_load_adapter_errors(reference_checkpoints, tmp_path):
    _, _, ours = load(reference_checkpoints)
    batch = batch_for()
    base = logits(ours, batch)
    good = tmp_path / "good"
    ours.add_adapter(LoraConfig(r=4, target_modules=QKV, modules_to_save=["lm_head.additional_fc"]))
    ours.save_adapter(good)
    ours.delete_adapter()
    tensors = load_file(good / "adapter_model.safetensors")
    key = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"

    def variant(name: str, change=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
        if change is not None:
            changed = dict(tensors)
            change(changed)
            save_file(changed, folder / "adapter_model.safetensors")
        return folder

    cases = [
        (variant("extra", lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(32)})),
         CheckpointError, r"key 'base_model\.model\.model\.norm\.weight' matches no LoRA layer"),
        (variant("shape", lambda t: t.update({key: torch.zeros(32, 5)})),
         CheckpointError, r"shape mismatch for '.*v_proj\.lora_B\.weight' .*: given \(32, 5\), model \(32, 4\)"),
        (variant("missing", lambda t: t.pop(key)), CheckpointError, r"lacks '.*v_proj\.lora_B\.weight'"),
        (tmp_path, FileNotFoundError, "no adapter_config.json in"),
        (variant("no_weights"), FileNotFoundError, r"no adapter_model\.safetensors \(or adapter_model\.bin\) in"),
    ]  # fmt: skip
    corrupt = variant("corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    cases.append((corrupt, CheckpointError, "cannot read"))
    for folder, error, message in cases:
        with pytest.raises(error, match=message):
            ours.load_adapter(folder)
        assert ours.adapter_config is None and torch.equal(logits(ours, batch), base)  # nothing attached
    with pytest.raises(ValueError, match="merge=True needs an adapter"):
        idefics.IdeficsForVisionText2Text.from_pretrained(good, merge=True)
