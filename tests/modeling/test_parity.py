"""Whole-model parity with transformers on perturbed random weights, loaded from sharded checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_CONFIGS
from reference import config_dict, make_batch

import idefics

ATOL = 1e-4


def inputs_for(name, **kw):
    ids, am, pv, iam = make_batch(config_dict(name), **kw)
    return dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_attention_mask=iam)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_logits_match_reference(name, reference_checkpoints):
    ref, folder = reference_checkpoints(name)
    ours = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    batch = inputs_for(name)
    with torch.no_grad():
        expected = ref(**batch).logits
        got = ours(**batch).logits
    real = batch["attention_mask"].bool()  # padding positions carry no meaning in either implementation
    assert got.shape == expected.shape
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_loss_is_full_vocabulary_cross_entropy(name, reference_checkpoints):
    ref, folder = reference_checkpoints(name)
    ours = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    batch = inputs_for(name)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        logits = ref(**batch).logits
        loss = ours(**batch, labels=labels).loss
    vocab = logits.shape[-1]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=0)


def test_reference_loss_crashes_with_additional_vocab(reference_checkpoints):
    """The reference views logits as (-1, vocab_size), which fails whenever additional_vocab_size > 0."""
    ref, _ = reference_checkpoints("resampler_qk_interval2")
    batch = inputs_for("resampler_qk_interval2")
    with pytest.raises(Exception):  # noqa: B017 - whatever the reference raises, it is not a loss
        ref(**batch, labels=batch["input_ids"])


@pytest.mark.parametrize("name", ["resampler_qk_interval2", "plain_vector_zeros"])
def test_gradients_match_reference(name, reference_checkpoints):
    ref, folder = reference_checkpoints(name)
    ours = idefics.IdeficsForVisionText2Text.from_pretrained(folder).train()
    ref.train()
    batch = inputs_for(name)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    try:
        ours(**batch, labels=labels).loss.backward()
        logits = ref(**batch).logits
        vocab = logits.shape[-1]
        F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100).backward()
        ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
        our_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
        assert set(ref_grads) == set(our_grads)
        for key, grad in our_grads.items():
            if ref_grads[key] is None:
                assert grad is None or not grad.any(), key
                continue
            torch.testing.assert_close(grad, ref_grads[key], atol=ATOL, rtol=1e-4, msg=key)
    finally:
        ref.eval().zero_grad(set_to_none=True)


def test_image_embedding_inputs_match_reference(reference_checkpoints):
    name = "resampler_qk_interval2"
    ref, folder = reference_checkpoints(name)
    ours = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    batch = inputs_for(name)
    real = batch["attention_mask"].bool()
    pixel_values = batch.pop("pixel_values")
    b, n = pixel_values.shape[:2]
    with torch.no_grad():
        expected = ref(**batch, pixel_values=pixel_values).logits
        vision = ours.model.vision_model(pixel_values.flatten(0, 1))  # (b*n, 1+p, d)
        perceived = ours.model.perceiver_resampler(vision)  # (b*n, l, d)
        for kwargs in (
            dict(image_encoder_embeddings=vision.view(b, n, *vision.shape[1:])),
            dict(perceiver_embeddings=perceived),
            dict(perceiver_embeddings=perceived.view(b, n, *perceived.shape[1:])),  # 4D: ours only
        ):
            got = ours(**batch, **kwargs).logits
            torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
        ref_out = ref(**batch, perceiver_embeddings=perceived).logits
    torch.testing.assert_close(ref_out[real], expected[real], atol=ATOL, rtol=0)


def test_interpolate_pos_encoding_matches_reference(reference_checkpoints):
    name = "plain_vector_zeros"
    ref, folder = reference_checkpoints(name)
    ours = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    batch = inputs_for(name)
    batch["pixel_values"] = torch.randn(*batch["pixel_values"].shape[:3], 42, 56)  # 3x4 patches instead of 2x2
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = ref(**batch, interpolate_pos_encoding=True).logits
        got = ours(**batch, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours(**batch)


def test_text_only_equals_reference_with_unattended_images(reference_checkpoints):
    """No image input at all == every token attending to no image: the dense branch of the gated layers still runs."""
    name = "resampler_vector_ones_interval4"
    ref, folder = reference_checkpoints(name)
    ours = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    batch = inputs_for(name)
    batch["image_attention_mask"].zero_()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = ref(**batch).logits
        got = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["resampler_qk_interval2", "plain_qk_float_zeros"])
def test_padding_does_not_change_a_row(name, reference_checkpoints):
    _, folder = reference_checkpoints(name)
    ours = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    batch = inputs_for(name)
    with torch.no_grad():
        full = ours(**batch).logits
        pad = 3  # row 1 has 3 padding tokens
        alone = ours(
            input_ids=batch["input_ids"][1:2, pad:],
            pixel_values=batch["pixel_values"][1:2],
            image_attention_mask=batch["image_attention_mask"][1:2, pad:],
        ).logits
    torch.testing.assert_close(full[1, pad:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["resampler_qk_interval2", "plain_vector_zeros"])
def test_cached_steps_equal_uncached_forward(name, reference_checkpoints):
    _, folder = reference_checkpoints(name)
    ours = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    batch = inputs_for(name)
    with torch.no_grad():
        full = ours(**batch).logits
        split = 7
        first = ours(
            input_ids=batch["input_ids"][:, :split],
            attention_mask=batch["attention_mask"][:, :split],
            pixel_values=batch["pixel_values"],
            image_attention_mask=batch["image_attention_mask"][:, :split],
            use_cache=True,
        )
        cache = first.past_key_values
        steps = [first.logits]
        for i in range(split, batch["input_ids"].shape[1]):  # one token at a time, images from the cache
            out = ours(
                input_ids=batch["input_ids"][:, i : i + 1],
                attention_mask=batch["attention_mask"][:, : i + 1],
                image_attention_mask=batch["image_attention_mask"][:, i : i + 1],
                past_key_values=cache,
            )
            steps.append(out.logits)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=0)
    assert cache.get_seq_length() == batch["input_ids"].shape[1]
    assert cache.nbytes()["image"] > 0


def test_zero_gates_equal_plain_llama(reference_checkpoints):
    """With both tanh gates at zero every gated layer is the identity: the model is its LLaMA decoder."""
    import transformers

    name = "plain_vector_zeros"
    _, folder = reference_checkpoints(name)
    ours = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    with torch.no_grad():
        for layer in ours.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.zero_()
            layer.alpha_dense.zero_()
    c = ours.config
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            rms_norm_eps=c.rms_norm_eps,
            max_position_embeddings=c.max_position_embeddings,
        )
    ).eval()
    state = {k: v for k, v in ours.state_dict().items() if ".gated_cross_attn_layers." not in k}
    state = {k: v for k, v in state.items() if not k.startswith(("model.vision_model", "model.perceiver"))}
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    batch = inputs_for(name)
    with torch.no_grad():
        got = ours(**batch).logits
        expected = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_backbone_matches_reference(name, reference_checkpoints):
    import transformers

    ref, folder = reference_checkpoints(name)
    ours = idefics.IdeficsModel.from_pretrained(folder)
    ref_backbone = transformers.IdeficsModel.from_pretrained(folder, config=ref.config).eval()
    batch = inputs_for(name)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = ref_backbone(**batch).last_hidden_state
        got = ours(**batch).last_hidden_state
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
