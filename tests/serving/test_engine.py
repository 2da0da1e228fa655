"""The continuous-batching engine: exact under load against generate() alone, per-row parameters, slots, queue,
cancellation, n > 1, async streams and shutdown. Tiny perturbed fp32 models (tests/reference.py) and the demo model."""

import asyncio

import pytest
import torch
from PIL import Image

import idefics
from idefics.generation import GenerationConfig, compiling, processors
from idefics.serving import (
    Completion,
    ContextLengthError,
    Engine,
    EngineConfig,
    EngineDraining,
    EngineOverloaded,
    FinishEvent,
    SamplingParams,
    TokenEvent,
)
from idefics.serving.sampler import RowSampling, warp

NAME = "resampler_qk_interval2"  # perceiver (s = 3 latents), qk norms, a gated layer every 2nd decoder layer


@pytest.fixture(scope="module")
def tiny(reference_checkpoints):
    _, folder = reference_checkpoints(NAME)
    return idefics.IdeficsForVisionText2Text.from_pretrained(folder)


@pytest.fixture(scope="module")
def demo():
    return (
        idefics.IdeficsForVisionText2Text.from_pretrained(idefics.DEMO_MODEL),
        idefics.IdeficsProcessor.from_pretrained(idefics.DEMO_MODEL),
    )


def encoded(seed: int, length: int, images: int, *, vocab: int = 66, size: int = 28) -> dict:
    """One encoded prompt: random ids; image j is seen from position 2 + 3j on (one-hot, as the processor builds)."""
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(3, vocab, (1, length), generator=g)}
    if images:
        mask = torch.zeros(1, length, images, dtype=torch.long)
        for j in range(images):
            mask[0, 2 + 3 * j :, :] = 0
            mask[0, 2 + 3 * j :, j] = 1
        out |= {"pixel_values": torch.randn(1, images, 3, size, size, generator=g), "image_attention_mask": mask}
    return out


def alone(model, prompt: dict, max_tokens: int, *, ignore_eos: bool = False) -> list[int]:
    """generate() on the request alone, cut after its first EOS (generate pads after it)."""
    ids = prompt["input_ids"]
    images = {k: v for k, v in prompt.items() if k != "input_ids"}
    eos = {"eos_token_id": []} if ignore_eos else {}
    out = model.generate(ids, max_new_tokens=max_tokens, **images, **eos)[0, ids.shape[1] :].tolist()
    return out[: out.index(2) + 1] if 2 in out and not ignore_eos else out


def min_margin(model, prompt: dict, tokens: list[int]) -> float:
    """The smallest top-1 minus top-2 logit along the greedy trajectory (uncached forward): the room that batched
    arithmetic (last-bit differences) has before it could flip an argmax."""
    ids = torch.cat([prompt["input_ids"], torch.tensor([tokens[:-1]])], 1)
    extra = {}
    if "pixel_values" in prompt:
        iam = prompt["image_attention_mask"]
        iam = torch.cat([iam, iam[:, -1:].expand(-1, len(tokens) - 1, -1)], 1)  # new tokens see the last row's image
        extra = {"pixel_values": prompt["pixel_values"], "image_attention_mask": iam}
    with torch.no_grad():
        logits = model(input_ids=ids, **extra).logits[0, prompt["input_ids"].shape[1] - 1 :]  # (new, v)
    top2 = logits.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def drive(engine: Engine, schedule: dict[int, list], *, limit: int = 500) -> dict:
    """Run the engine step by step in this thread; schedule: step number -> [(key, prompt, params)] submitted
    before that step. Returns key -> stream."""
    streams = {}
    for step in range(limit):
        for key, prompt, params in schedule.get(step, []):
            streams[key] = engine.submit(prompt, params)
        busy = engine.step()
        if not busy and step >= max(schedule):
            return streams
    raise AssertionError("the engine did not finish")


# (seed, prompt length, images, max_tokens), submitted at the step given in SCHEDULE
REQUESTS = {
    "a": (1, 20, 2, 12), "b": (2, 7, 0, 30), "c": (3, 12, 3, 8), "d": (4, 5, 1, 16), "e": (5, 16, 0, 5),
    "f": (6, 9, 2, 20), "g": (7, 24, 1, 10),
}  # fmt: skip
SCHEDULE = {0: ["a", "b"], 2: ["c"], 3: ["d", "e"], 9: ["f"], 40: ["g"]}  # "g" comes after most others finished


@pytest.mark.parametrize("budget", [24, 1024], ids=["prefill-one-by-one", "prefill-batched"])
def test_greedy_under_load_equals_generate_alone(tiny, budget):
    prompts = {k: encoded(seed, t, n) for k, (seed, t, n, _) in REQUESTS.items()}
    expected = {k: alone(tiny, prompts[k], REQUESTS[k][3]) for k in REQUESTS}
    for k, tokens in expected.items():  # precondition: no near-tie that last-bit differences could flip
        assert min_margin(tiny, prompts[k], tokens) > 1e-3, k
    # budget 24 admits one request per step; 1024 prefills the ones arriving together as one left-padded batch
    engine = Engine(tiny, None, EngineConfig(max_batch_size=4, max_images_per_request=3, prefill_token_budget=budget))
    schedule = {
        step: [(k, prompts[k], SamplingParams(max_tokens=REQUESTS[k][3], temperature=0)) for k in keys]
        for step, keys in SCHEDULE.items()
    }
    streams = drive(engine, schedule)
    for k, stream in streams.items():
        (done,) = stream.result()
        assert done.token_ids == expected[k], k
        assert done.finish_reason == ("stop" if expected[k][-1] == 2 else "length")
        assert done.prompt_tokens == REQUESTS[k][1] and done.completion_tokens == len(expected[k])
    stats = engine.stats()
    assert stats["slots_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["generation_tokens_total"] == sum(map(len, expected.values()))
    assert stats["prompt_tokens_total"] == sum(r[1] for r in REQUESTS.values())
    assert stats["ttft"]["count"] == len(REQUESTS) and stats["cache_bytes"] == engine.slots.nbytes > 0


def test_seeded_sampling_is_the_same_alone_and_under_load(tiny):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=11,
                            ignore_eos=True)  # fmt: skip
    prompt = encoded(8, 10, 1)
    by_itself = Engine(tiny, None, EngineConfig(max_batch_size=4))
    solo = drive(by_itself, {0: [("x", prompt, params)]})["x"].result()[0].token_ids
    loaded = Engine(tiny, None, EngineConfig(max_batch_size=4))
    noise = [(f"n{i}", encoded(20 + i, 6 + i, i % 2), SamplingParams(max_tokens=9, temperature=1.2)) for i in range(3)]
    streams = drive(loaded, {0: noise[:2], 2: [("x", prompt, params)], 3: noise[2:]})
    assert streams["x"].result()[0].token_ids == solo
    other_seed = drive(by_itself, {0: [("y", prompt, SamplingParams(**{**vars(params), "seed": 12}))]})["y"]
    assert other_seed.result()[0].token_ids != solo


def test_logit_bias_changes_its_own_row_only(tiny):
    # Three requests in one batch: one biased towards token 9, one with its greedy first token banned, one without.
    prompts = [encoded(60 + i, 8 + i, i % 2) for i in range(3)]
    plain = [alone(tiny, p, 6, ignore_eos=True) for p in prompts]
    assert min_margin(tiny, prompts[2], plain[2]) > 1e-3  # precondition: no near-tie that batching could flip
    banned = plain[1][0]
    biased = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias=bias)
              for bias in ({9: 100.0}, {banned: -100}, None)]  # fmt: skip
    engine = Engine(tiny, None, EngineConfig(max_batch_size=4))
    streams = drive(engine, {0: [(i, p, params) for i, (p, params) in enumerate(zip(prompts, biased, strict=True))]})
    got = [streams[i].result()[0].token_ids for i in range(3)]
    assert got[0] == [9] * 6
    assert banned not in got[1] and got[1] != plain[1]
    assert got[2] == plain[2]
    with pytest.raises(ValueError, match="logit_bias names token id 66, outside the model's 66 ids"):
        engine.submit([5, 6], SamplingParams(logit_bias={66: 1.0}))
    for bad in ({3: 101}, {-1: 1.0}, {3: float("nan")}, {"3": 1.0}, [3]):
        with pytest.raises(ValueError, match="SamplingParams.logit_bias must be"):
            SamplingParams(logit_bias=bad)


def test_images_are_encoded_once_per_request_and_n_shares_the_prefill(tiny):
    calls = {"vision": 0, "perceiver": 0, "k_proj": 0}
    hooks = [
        tiny.model.vision_model.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1)),
        tiny.model.perceiver_resampler.register_forward_hook(
            lambda *a: calls.__setitem__("perceiver", calls["perceiver"] + 1)
        ),
        tiny.model.gated_cross_attn_layers[0].cross_attn.k_proj.register_forward_hook(
            lambda *a: calls.__setitem__("k_proj", calls["k_proj"] + 1)
        ),
    ]
    try:
        engine = Engine(tiny, None, EngineConfig(max_batch_size=6))
        sampled = SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=5, ignore_eos=True)
        greedy = SamplingParams(max_tokens=8, temperature=0, n=2, ignore_eos=True)
        streams = drive(engine, {0: [("s", encoded(1, 12, 2), sampled)], 1: [("g", encoded(2, 9, 1), greedy)]})
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"vision": 2, "perceiver": 2, "k_proj": 2}  # two requests, five rows
    s = streams["s"].result()
    assert [c.index for c in s] == [0, 1, 2] and all(len(c.token_ids) == 8 for c in s)
    assert len({tuple(c.token_ids) for c in s}) > 1  # each choice has its own seed (seed + index)
    g = streams["g"].result()
    expected = alone(tiny, encoded(2, 9, 1), 8)
    assert g[0].token_ids == g[1].token_ids and g[0].token_ids[: len(expected)] == expected


def test_requests_arriving_together_share_one_prefill(tiny):
    calls = []
    hook = tiny.model.vision_model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    prompts = {k: encoded(10 + k, 6 + 3 * k, k) for k in range(4)}  # 0-3 images, prompts of 6-15 tokens
    try:
        engine = Engine(tiny, None, EngineConfig(max_batch_size=4, max_images_per_request=3))
        greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        streams = drive(engine, {0: [(k, prompt, greedy) for k, prompt in prompts.items()]})
    finally:
        hook.remove()
    assert calls == [0 + 1 + 2 + 3]  # one vision call over every image of the four requests
    for k, prompt in prompts.items():
        assert streams[k].result()[0].token_ids == alone(tiny, prompt, 6, ignore_eos=True), k


def test_cancel_frees_the_slot_and_leaves_others(tiny):
    engine = Engine(tiny, None, EngineConfig(max_batch_size=2))
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    a, b = engine.submit(encoded(1, 8, 1), long), engine.submit(encoded(2, 8, 0), long)
    waiting = engine.submit(encoded(3, 8, 0), long)
    for _ in range(3):
        engine.step()
    assert engine.stats()["slots_used"] == 2 and engine.stats()["waiting"] == 1
    waiting.cancel()  # never started: finished at once
    assert [e.finish_reason for e in waiting] == ["cancelled"] and engine.stats()["waiting"] == 0
    a.cancel()
    a.cancel()  # idempotent
    engine.step()
    (done,) = a.result()
    assert done.finish_reason == "cancelled" and 0 < done.completion_tokens < 40
    assert engine.stats()["slots_used"] == 1
    while engine.step():
        pass
    assert b.result()[0].token_ids == alone(tiny, encoded(2, 8, 0), 40, ignore_eos=True)
    assert engine.stats()["finished_total"]["cancelled"] == 2 and engine.stats()["slots_used"] == 0


def test_no_max_tokens_generates_what_the_positions_leave(tiny):
    engine = Engine(tiny, None, EngineConfig(max_batch_size=1, max_model_len=40))
    (done,) = drive(engine, {0: [("x", list(range(3, 33)), SamplingParams(max_tokens=None, ignore_eos=True))]})[
        "x"
    ].result()
    assert done.completion_tokens == 10 and done.finish_reason == "length"
    with pytest.raises(ContextLengthError, match="you asked for 41 tokens \\(40 in the prompt, 1 to generate\\)"):
        engine.submit(list(range(3, 43)), SamplingParams(max_tokens=None))


def test_full_queue_and_over_long_requests_are_refused(tiny):
    engine = Engine(tiny, None, EngineConfig(max_batch_size=1, max_queue=2, max_model_len=40, max_images_per_request=2))
    engine.submit([5, 6, 7], SamplingParams(max_tokens=3))
    engine.submit([5, 6, 7], SamplingParams(max_tokens=3))
    with pytest.raises(EngineOverloaded, match="2 requests are waiting"):
        engine.submit([5, 6, 7], SamplingParams(max_tokens=3))
    with pytest.raises(ContextLengthError) as err:
        engine.submit(list(range(3, 33)), SamplingParams(max_tokens=20))
    assert (err.value.max_model_len, err.value.requested, err.value.prompt_tokens) == (40, 50, 30)
    assert str(err.value) == ("this model's maximum context length is 40 tokens, you asked for 50 tokens "
                              "(30 in the prompt, 20 to generate)")  # fmt: skip
    with pytest.raises(ValueError, match="3 images; this engine takes at most 2"):
        engine.submit(encoded(1, 12, 3), SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="prompt token 1 is 99, outside the vocabulary"):
        engine.submit([5, 99], SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="SamplingParams.top_p must be"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="SamplingParams.logprobs must be"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="no processor"):
        engine.submit("some text", SamplingParams())
    with pytest.raises(ValueError, match="max_model_len 100 exceeds the model's 64"):
        Engine(tiny, None, EngineConfig(max_model_len=100))


def test_stop_strings_and_eos_end_one_row_only(demo):
    model, processor = demo
    image = Image.open("examples/red_circle.png")
    question = ["User:", image, "What color is the shape?<end_of_utterance>\nAssistant:"]
    other = ["User:", image, "Describe the image.<end_of_utterance>\nAssistant:"]
    free = SamplingParams(max_tokens=16, temperature=0)
    engine = Engine(model, processor, EngineConfig(max_batch_size=4))
    base = drive(engine, {0: [("q", question, free), ("o", other, free)]})
    q, o = base["q"].result()[0], base["o"].result()[0]
    eou = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert eou in q.token_ids and "circle" in q.text
    stop = SamplingParams(max_tokens=16, temperature=0, stop=["circle"])
    eos = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[eou])
    streams = drive(engine, {0: [("s", question, stop), ("o", other, free)], 1: [("e", question, eos)]})
    s, e = streams["s"].result()[0], streams["e"].result()[0]
    assert s.finish_reason == "stop" and s.text == q.text[: q.text.index("circle")]
    assert s.token_ids == q.token_ids[: len(s.token_ids)] and len(s.token_ids) < 16
    first = q.token_ids.index(eou)
    assert e.finish_reason == "stop" and e.token_ids == q.token_ids[: first + 1]
    assert streams["o"].result()[0].token_ids == o.token_ids  # the others go on untouched
    deltas = [ev.text for ev in streams["s"] if isinstance(ev, TokenEvent)]
    assert "".join(deltas) == s.text


def test_prompt_forms_and_async_iteration(demo):
    model, processor = demo
    image = Image.open("examples/red_circle.png")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What color is the shape?"}]}]  # fmt: skip
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=2)

    async def consume(engine):
        stream = engine.submit(messages, params)
        events = [event async for event in stream.aiter()]
        return stream, events, await engine.submit("User: What shape is this?", params).aresult()

    with Engine(model, processor, EngineConfig(max_batch_size=2)) as engine:
        stream, events, text_result = asyncio.run(consume(engine))
    assert isinstance(events[-1], FinishEvent) and all(isinstance(e, TokenEvent) for e in events[:-1])
    (done,) = stream.result()
    assert isinstance(done, Completion) and len(done.logprobs) == done.completion_tokens == len(events) - 1
    entry = done.logprobs[0]
    assert entry.token_id == done.token_ids[0] and len(entry.top) == 2 and entry.top[0][2] >= entry.top[1][2]
    assert entry.logprob == pytest.approx(entry.top[0][2]) and done.timings["ttft"] > 0 and "itl_mean" in done.timings
    enc = processor(processor.apply_chat_template(messages))
    expected = model.generate(**enc, max_new_tokens=6)[0, enc["input_ids"].shape[1] :].tolist()
    assert done.token_ids == expected[: len(done.token_ids)]
    assert text_result[0].prompt_tokens == len(processor(["User: What shape is this?"])["input_ids"][0])


def test_shutdown_drains_or_cancels(tiny):
    engine = Engine(tiny, None, EngineConfig(max_batch_size=2)).start()
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    streams = [engine.submit(encoded(i, 6, i % 2), params) for i in range(4)]
    engine.shutdown(drain=True, timeout=60)
    assert engine.draining and [s.result(timeout=1)[0].finish_reason for s in streams] == ["length"] * 4
    with pytest.raises(EngineDraining):
        engine.submit([4, 5], params)
    engine = Engine(tiny, None, EngineConfig(max_batch_size=1))
    streams = [engine.submit(encoded(i, 6, 0), params) for i in range(2)]
    engine.step()
    engine.shutdown(drain=False)
    assert [s.result(timeout=1)[0].finish_reason for s in streams] == ["cancelled", "cancelled"]


def test_warp_matches_the_generation_processors():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=g) * 3
    settings = [(0.7, 5, 1.0), (1.0, 0, 0.8), (1.3, 10, 0.5), (1.0, 0, 1.0)]  # temperature, top_k, top_p
    rows = [RowSampling(t, k, p, 1.0, [], None, None) for t, k, p in settings]
    got = warp(scores, rows)
    for i, (t, k, p) in enumerate(settings):
        config = GenerationConfig(do_sample=True, temperature=t, top_k=k, top_p=p)
        expected = processors.process(scores[i : i + 1], config, seen=None, history=scores[:1].long(),
                                      num_generated=0, sampling=True)  # fmt: skip
        torch.testing.assert_close(got[i : i + 1], expected, atol=0, rtol=0)


def test_fixed_shape_steps_give_the_same_tokens(tiny, monkeypatch):
    """compile=True: batch-size buckets, length buckets and every image slot, traced by dynamo with fullgraph=True
    (the CUDA-graph path runs the same fixed-shape step)."""
    from idefics.serving import engine as engine_module
    from idefics.serving.slots import slot_decode

    eager_compiled = torch.compile(slot_decode, backend="eager", fullgraph=True)
    monkeypatch.setitem(compiling._COMPILED, (slot_decode, "cpu"), eager_compiled)
    monkeypatch.setattr(engine_module, "LENGTH_BUCKET", 32)
    keys = ["a", "b", "c", "d", "e"]
    prompts = {k: encoded(*REQUESTS[k][:3]) for k in keys}
    greedy = {k: SamplingParams(max_tokens=REQUESTS[k][3], temperature=0) for k in keys}
    schedule = {0: [(k, prompts[k], greedy[k]) for k in keys[:3]], 4: [(k, prompts[k], greedy[k]) for k in keys[3:]]}
    engine = Engine(tiny, None, EngineConfig(max_batch_size=5, max_images_per_request=3, compile=True))
    streams = drive(engine, schedule)
    for k in keys:
        assert streams[k].result()[0].token_ids == alone(tiny, prompts[k], REQUESTS[k][3]), k
    buckets = set(engine._steps)
    assert len(buckets) >= 2 and {b for b, _ in buckets} <= {1, 2, 4, 5} and {t for _, t in buckets} <= {32, 64}


def test_a_failing_request_ends_in_error_and_the_engine_goes_on(tiny):
    engine = Engine(tiny, None, EngineConfig(max_batch_size=2))
    bad = encoded(1, 8, 1, size=42)  # 42 px images: the vision tower's position table does not fit
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    streams = drive(engine, {0: [("bad", bad, params), ("good", encoded(2, 8, 1), params)]})
    (failed,) = streams["bad"].result()
    assert failed.finish_reason == "error" and failed.error and failed.completion_tokens == 0
    assert streams["good"].result()[0].token_ids == alone(tiny, encoded(2, 8, 1), 5, ignore_eos=True)
    assert engine.stats()["finished_total"]["error"] == 1 and engine.stats()["slots_used"] == 0


def test_many_threads_submit_read_and_cancel(tiny):
    """Submitting, reading and cancelling from several threads while the engine thread runs: every stream ends,
    every slot is freed, the counts add up."""
    import threading

    results, errors = [], []

    def client(c: int) -> None:
        try:
            for i in range(5):
                params = SamplingParams(max_tokens=6 + i, temperature=0.8 * (i % 2), seed=i, ignore_eos=True)
                stream = engine.submit(encoded(10 * c + i, 5 + i, i % 3), params)
                if (c + i) % 3 == 0:
                    stream.cancel()
                results.append([e for e in stream if isinstance(e, FinishEvent)][0].finish_reason)
        except Exception as err:  # reported below, with the thread's context lost otherwise
            errors.append(err)

    with Engine(tiny, None, EngineConfig(max_batch_size=3, max_images_per_request=2)) as engine:
        threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        stats = engine.stats()
    assert not errors and len(results) == 20 and set(results) <= {"length", "cancelled"}
    assert results.count("length") >= 20 - 7  # the 7 cancelled ones may have finished before the cancel landed
    assert stats["slots_used"] == 0 and stats["running"] == 0 and sum(stats["finished_total"].values()) == 20
