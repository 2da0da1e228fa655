"""Generation against transformers' generate on perturbed random weights, plus the cache invariants."""

import pytest
import torch
from reference import config_dict, make_batch

import idefics
from idefics.generation import GenerationConfig, compiling, decode_step, generate_steps, prefill, step


def batch_for(name, **kw):
    ids, am, pv, iam = make_batch(config_dict(name), **kw)
    return dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_attention_mask=iam)


def load(reference_checkpoints, name):
    ref, folder = reference_checkpoints(name)
    return ref, idefics.IdeficsForVisionText2Text.from_pretrained(folder)


def pad_after_eos(sequences: torch.Tensor, prompt: int, eos: list[int], pad: int) -> torch.Tensor:
    """Replace everything after each row's first generated EOS with `pad` (the reference's beam search pads with
    EOS when the pad id is 0; ours pads with the pad id)."""
    out = sequences.clone()
    for row in out:
        hits = torch.isin(row[prompt:], torch.tensor(eos)).nonzero()
        if len(hits):
            row[prompt + int(hits[0]) + 1 :] = pad
    return out


GREEDY_CASES = [
    dict(),
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=2.0, min_new_tokens=6),
    dict(repetition_penalty=1.3, eos_token_id=[5, 7, 9]),
    dict(repetition_penalty=1.3, bad_words_ids=[[12], [19], [42, 34], [3, 4, 5]]),
]


@pytest.mark.parametrize("name", ["resampler_qk_interval2", "plain_vector_zeros", "resampler_vector_ones_interval4"])
@pytest.mark.parametrize("case", GREEDY_CASES, ids=lambda c: ",".join(c) or "plain")
def test_greedy_matches_reference(name, case, reference_checkpoints):
    ref, ours = load(reference_checkpoints, name)
    batch = batch_for(name)
    kwargs = dict(max_new_tokens=10, eos_token_id=5, pad_token_id=0) | case
    with torch.no_grad():
        expected = ref.generate(**batch, do_sample=False, **kwargs)
    got = ours.generate(**batch, **kwargs)
    assert torch.equal(got, expected), (got[:, 12:], expected[:, 12:])


@pytest.mark.parametrize("name", ["resampler_qk_interval2", "plain_qk_float_zeros"])
@pytest.mark.parametrize(
    "case",
    [dict(), dict(repetition_penalty=1.5, length_penalty=0.5), dict(eos_token_id=[5, 7], early_stopping=True,
                                                                     repetition_penalty=2.0)],
    ids=["plain", "penalties", "early_stopping"],
)  # fmt: skip
def test_beam_search_matches_reference(name, case, reference_checkpoints):
    ref, ours = load(reference_checkpoints, name)
    batch = batch_for(name)
    kwargs = dict(max_new_tokens=8, num_beams=3, eos_token_id=5, pad_token_id=0) | case
    with torch.no_grad():
        expected = ref.generate(**batch, do_sample=False, **kwargs)
    got = ours.generate(**batch, **kwargs)
    eos = kwargs["eos_token_id"] if isinstance(kwargs["eos_token_id"], list) else [kwargs["eos_token_id"]]
    assert torch.equal(got, pad_after_eos(expected, 12, eos, 0))


def test_min_new_tokens_and_eos_end_rows_early(reference_checkpoints):
    _, ours = load(reference_checkpoints, "resampler_qk_interval2")
    batch = batch_for("resampler_qk_interval2")
    steps = list(generate_steps(ours, batch.pop("input_ids"), config=GenerationConfig(max_new_tokens=12,
                                eos_token_id=[5], pad_token_id=0, min_new_tokens=3), **batch))  # fmt: skip
    tokens = torch.stack([s.tokens for s in steps], 1)
    assert not (tokens[:, :3] == 5).any()
    row = 2  # finishes with EOS at step 8 (see test_greedy_matches_reference), then pads
    first = int((tokens[row] == 5).nonzero()[0])
    assert (tokens[row, first + 1 :] == 0).all() and steps[first].finished[row]


def test_sampling_is_reproducible_with_a_seed(reference_checkpoints):
    _, ours = load(reference_checkpoints, "plain_vector_zeros")
    batch = batch_for("plain_vector_zeros")
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    a = ours.generate(**batch, seed=7, **kwargs)
    b = ours.generate(**batch, seed=7, **kwargs)
    c = ours.generate(**batch, generator=torch.Generator().manual_seed(7), **kwargs)
    d = ours.generate(**batch, seed=8, **kwargs)
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, d)


def test_processors_match_reference_on_fixed_logits():
    from transformers.generation import logits_process as lp

    from idefics.generation import processors as ours

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=g) * 3
    history = torch.randint(0, 50, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, :3] = 0
    history[1, :3] = 0
    for temperature in (0.3, 0.7, 2.0):
        expected = lp.TemperatureLogitsWarper(temperature)(history, scores.clone())
        got = ours.process(scores, GenerationConfig(temperature=temperature, top_k=0), seen=None, history=history,
                           num_generated=0, sampling=True)  # fmt: skip
        torch.testing.assert_close(got, expected)
    for k in (1, 5, 49):
        torch.testing.assert_close(ours.top_k_filter(scores, k), lp.TopKLogitsWarper(k)(history, scores.clone()))
    for p in (0.1, 0.5, 0.93):
        torch.testing.assert_close(ours.top_p_filter(scores, p), lp.TopPLogitsWarper(p)(history, scores.clone()))
    for penalty in (0.7, 1.3, 2.0):
        padding = (mask != 0).int().argmax(dim=1)
        expected = lp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=padding)(history, scores.clone())
        seen = step.seen_tokens(history, mask, 50)
        torch.testing.assert_close(ours.repetition_penalty(scores, seen, penalty), expected)
    expected = lp.MinNewTokensLengthLogitsProcessor(5, 7, eos_token_id=[3, 4])(history, scores.clone())
    got = ours.process(scores, GenerationConfig(min_new_tokens=7, eos_token_id=[3, 4]), seen=None, history=history,
                       num_generated=4, sampling=False)  # fmt: skip
    torch.testing.assert_close(got, expected)
    bad = [[7], [history[0, -1].item(), 11], [history[2, -2].item(), history[2, -1].item(), 13]]
    expected = lp.NoBadWordsLogitsProcessor(bad, eos_token_id=2)(history, scores.clone())
    torch.testing.assert_close(ours.ban_bad_words(scores, history, bad), expected)


@pytest.mark.parametrize("name", ["resampler_qk_interval2", "plain_vector_zeros"])
def test_decode_steps_equal_uncached_forward(name, reference_checkpoints):
    _, ours = load(reference_checkpoints, name)
    batch = batch_for(name)
    ids = batch.pop("input_ids")
    am = batch.pop("attention_mask")
    logits, state = prefill(ours, ids, attention_mask=am, capacity=ids.shape[1] + 4, **batch)
    new = torch.tensor([[7, 8, 9, 10]] * ids.shape[0])
    step_logits = [logits]
    for i in range(3):
        step_logits.append(decode_step(ours, new[:, i], state))
    full_ids = torch.cat([ids, new[:, :3]], 1)
    full_am = torch.cat([am, torch.ones_like(new[:, :3])], 1)
    iam = batch["image_attention_mask"]
    full_iam = torch.cat([iam, iam[:, -1:].expand(-1, 3, -1)], 1)  # new tokens see the last prompt token's image
    with torch.no_grad():
        full = ours(input_ids=full_ids, attention_mask=full_am, pixel_values=batch["pixel_values"],
                    image_attention_mask=full_iam).logits  # fmt: skip
    torch.testing.assert_close(torch.stack(step_logits, 1), full[:, -4:].float(), atol=1e-5, rtol=0)
    # image K/V from the cache == recomputed from the image states
    with torch.no_grad():
        recomputed = ours.model.project_images(state.cache.image_hidden_states)
    for (k, v), (k2, v2) in zip(state.cache.image_kv, recomputed, strict=True):
        torch.testing.assert_close(k, k2, atol=0, rtol=0)
        torch.testing.assert_close(v, v2, atol=0, rtol=0)
    sizes = state.cache.nbytes()
    assert sizes["total"] == sizes["self_attention"] + sizes["image"] and sizes["image"] > 0


def test_vision_and_perceiver_run_once_per_request(reference_checkpoints):
    _, ours = load(reference_checkpoints, "resampler_qk_interval2")
    calls = {"vision": 0, "perceiver": 0, "k_proj": 0}
    ours.model.vision_model.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1))
    ours.model.perceiver_resampler.register_forward_hook(
        lambda *a: calls.__setitem__("perceiver", calls["perceiver"] + 1)
    )
    ours.model.gated_cross_attn_layers[0].cross_attn.k_proj.register_forward_hook(
        lambda *a: calls.__setitem__("k_proj", calls["k_proj"] + 1)
    )
    ours.generate(**batch_for("resampler_qk_interval2"), max_new_tokens=6, eos_token_id=None)
    assert calls == {"vision": 1, "perceiver": 1, "k_proj": 1}


def test_static_compiled_step_gives_the_same_tokens(reference_checkpoints, monkeypatch):
    """compile=True: the fixed-shape step (whole cache under a mask), traced by dynamo with fullgraph=True."""
    _, ours = load(reference_checkpoints, "resampler_qk_interval2")
    batch = batch_for("resampler_qk_interval2")
    kwargs = dict(max_new_tokens=8, eos_token_id=5, repetition_penalty=1.5)
    expected = ours.generate(**batch, **kwargs)
    eager_compiled = torch.compile(step.static_step, backend="eager", fullgraph=True)
    monkeypatch.setitem(compiling._COMPILED, (step.static_step, "cpu"), eager_compiled)
    assert torch.equal(ours.generate(**batch, compile=True, **kwargs), expected)


def test_static_cache_is_bucketed(reference_checkpoints, monkeypatch):
    """Static caches come in multiples of STATIC_BUCKET positions (capped by the model's limit), so that compiled
    shapes repeat across requests of different lengths."""
    _, ours = load(reference_checkpoints, "resampler_qk_interval2")
    batch = batch_for("resampler_qk_interval2")
    monkeypatch.setattr(step, "STATIC_BUCKET", 32)
    _, state = prefill(ours, batch["input_ids"], **{k: v for k, v in batch.items() if k != "input_ids"},
                       capacity=20, cuda_graphs=False, compile=False)  # fmt: skip
    assert state.cache.kv.capacity == 20 and state.static_step is None
    eager_compiled = torch.compile(step.static_step, backend="eager", fullgraph=True)
    monkeypatch.setitem(compiling._COMPILED, (step.static_step, "cpu"), eager_compiled)
    _, state = prefill(ours, batch["input_ids"], **{k: v for k, v in batch.items() if k != "input_ids"},
                       capacity=20, compile=True)  # fmt: skip
    assert state.cache.kv.capacity == 32 and state.cache.kv.static
    _, state = prefill(ours, batch["input_ids"], **{k: v for k, v in batch.items() if k != "input_ids"},
                       capacity=60, compile=True)  # fmt: skip
    assert state.cache.kv.capacity == ours.config.max_position_embeddings == 64


def test_cuda_graphs_need_a_cuda_model(reference_checkpoints):
    _, ours = load(reference_checkpoints, "resampler_qk_interval2")
    with pytest.raises(ValueError, match="cuda_graphs=True needs .* CUDA device, got cpu"):
        ours.generate(**batch_for("resampler_qk_interval2"), max_new_tokens=3, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and CUDA compilation need a GPU")
@pytest.mark.parametrize("mode", [dict(cuda_graphs=True), dict(compile=True)], ids=["cuda_graphs", "compile"])
def test_cuda_static_steps_match_eager(reference_checkpoints, mode):
    """On a GPU: the CUDA-graph step (eager or compiled) gives the eager loop's tokens, request after request."""
    ref, ours = load(reference_checkpoints, "resampler_qk_interval2")
    ours.to("cuda")
    batch = {k: v.cuda() for k, v in batch_for("resampler_qk_interval2").items()}
    kwargs = dict(max_new_tokens=8, eos_token_id=5, pad_token_id=0, repetition_penalty=1.5)
    expected = ours.generate(**batch, **kwargs)
    with torch.no_grad():
        reference = ref.generate(**batch_for("resampler_qk_interval2"), do_sample=False, **kwargs)
    assert torch.equal(expected.cpu(), reference)
    for _ in range(2):  # a second request captures a new graph over its own cache
        assert torch.equal(ours.generate(**batch, **mode, **kwargs), expected)
    one = {k: v[1:2] for k, v in batch.items()}
    assert torch.equal(ours.generate(**one, **mode, **kwargs), ours.generate(**one, **kwargs))


def test_generation_argument_errors(reference_checkpoints):
    _, ours = load(reference_checkpoints, "plain_vector_zeros")
    batch = batch_for("plain_vector_zeros")
    with pytest.raises(TypeError, match="unknown generation arguments \\['max_tokens'\\]"):
        ours.generate(**batch, max_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        ours.generate(**batch, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        ours.generate(**batch, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        ours.generate(**batch, stop_strings=["x"])
    with pytest.raises(ValueError, match="12 tokens and 60 new .* 72 positions exceed the model's 64"):
        ours.generate(**batch, max_new_tokens=60)
    with pytest.raises(ValueError, match="input_ids must be integer"):
        ours.generate(**batch | {"input_ids": batch["input_ids"].float()})
    no_mask = {k: v for k, v in batch.items() if k != "image_attention_mask"}
    for beams in (1, 3):
        with pytest.raises(ValueError, match="image_attention_mask .* is required"):
            ours.generate(**no_mask, num_beams=beams)
