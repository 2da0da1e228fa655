"""The engine's image cache and prefix cache: exact (caches on == off == generate() alone, token for token) under
load with hits, misses and evictions forced by tiny caches; a changed image is a miss; bytes stay within bounds."""

import pytest
import torch
from test_engine import NAME, alone, encoded, min_margin

import idefics
from idefics.image_cache import ImageCache, encode_cached, image_key
from idefics.serving import Engine, EngineConfig, SamplingParams, prefill


@pytest.fixture(scope="module")
def tiny(reference_checkpoints):
    _, folder = reference_checkpoints(NAME)
    return idefics.IdeficsForVisionText2Text.from_pretrained(folder)


def next_turn(prompt: dict, answer: list[int], seed: int, new: int, *, image: torch.Tensor | None = None) -> dict:
    """The history resent with the answer and `new` user tokens; with `image`, one more image seen from its first new
    token on (as the processor builds the mask: each token sees the latest image)."""
    g = torch.Generator().manual_seed(seed)
    added = torch.tensor([answer], dtype=torch.long), torch.randint(3, 66, (1, new), generator=g)
    out = {"input_ids": torch.cat([prompt["input_ids"], *added], 1)}
    mask = prompt["image_attention_mask"]
    mask = torch.cat([mask, mask[:, -1:].expand(-1, len(answer) + new, -1)], 1)  # (1, t, n)
    pixels = prompt["pixel_values"]
    if image is not None:
        start = prompt["input_ids"].shape[1] + len(answer)
        mask = torch.cat([mask, torch.zeros_like(mask[..., :1])], -1)
        mask[0, start:] = 0
        mask[0, start:, -1] = 1
        pixels = torch.cat([pixels, image[None, None]], 1)
    return out | {"pixel_values": pixels, "image_attention_mask": mask}


def run_chats(model, config: EngineConfig, chats: dict, *, turns: int, max_tokens: int, late=()) -> tuple[dict, Engine]:
    """Each chat's turns, the next submitted once the previous answered (several chats at once; those in `late` once
    the others are done); key (chat, turn) -> (prompt, tokens)."""
    engine = Engine(model, None, config)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    prompts = dict(chats)
    streams = {c: engine.submit(p, params) for c, p in prompts.items() if c not in late}
    turn = dict.fromkeys(chats, 0)
    out = {}
    for _ in range(2000):
        busy = engine.step()
        for c, stream in list(streams.items()):
            if stream.done:
                done = stream.result()[0]
                assert done.finish_reason == "length", done.error
                tokens = done.token_ids
                out[c, turn[c]] = (prompts[c], tokens)
                del streams[c]
                turn[c] += 1
                if turn[c] < turns:
                    seed = 100 * hash(c) % 997 + turn[c]
                    image = torch.randn(3, 28, 28, generator=torch.Generator().manual_seed(seed)) if turn[c] == 2 and \
                        c % 2 else None  # fmt: skip
                    prompts[c] = next_turn(prompts[c], tokens, seed, 5, image=image)
                    streams[c] = engine.submit(prompts[c], params)
        if not streams and late:
            streams = {c: engine.submit(prompts[c], params) for c in late}
            late = ()
        elif not busy and not streams:
            return out, engine
    raise AssertionError("the engine did not finish")


def test_multiturn_chats_are_exact_with_hits_misses_and_evictions(tiny, monkeypatch):
    # 4 chats over 4 slots, then chat 4 (the same tokens as chat 0 with another image: a miss after position 2, and
    # it evicts a record); an image cache holding two images (evictions); odd chats add an image at turn 2
    chats = {c: encoded(c, 18, 1) for c in range(4)}
    chats[4] = {**chats[0], "pixel_values": torch.randn(1, 1, 3, 28, 28, generator=torch.Generator().manual_seed(9))}
    c = tiny.config
    two_images = 2 * c.perceiver_config.resampler_n_latents * c.vision_config.embed_dim * tiny.model.dtype.itemsize
    base = dict(max_batch_size=4, max_images_per_request=2, prefill_token_budget=64)
    batches = []  # rows of each prefill after reused prefixes
    real = prefill.slot_prefill
    monkeypatch.setattr(prefill, "slot_prefill", lambda model, cache, slots, *a: batches.append(len(slots)) or
                        real(model, cache, slots, *a))  # fmt: skip
    on, on_engine = run_chats(tiny, EngineConfig(**base, image_cache_memory=two_images), chats, turns=4,
                              max_tokens=6, late=[4])  # fmt: skip
    off, off_engine = run_chats(tiny, EngineConfig(**base, image_cache_memory=0, prefix_cache=False), chats, turns=4,
                                max_tokens=6, late=[4])  # fmt: skip
    assert on.keys() == off.keys() and len(on) == 20
    for key in on:
        assert on[key][1] == off[key][1], key
    for key in [(0, 3), (1, 3), (4, 1)]:  # and both equal generate() alone
        assert on[key][1] == alone(tiny, on[key][0], 6, ignore_eos=True), key
    stats = on_engine.stats()
    prefix, images = stats["prefix_cache"], stats["image_cache"]
    assert prefix["hits"] == 15 and prefix["misses"] == 5 and prefix["evictions"] == 1, prefix
    assert prefix["tokens_reused"] > 0 and prefix["bytes"] > 0 and prefix["copied"] == 0  # each turn in its slot
    assert sum(batches) == 15 and max(batches) >= 2  # next turns arriving together are prefilled together
    assert images["hits"] > 0 and images["misses"] > 0 and images["evictions"] > 0, images
    assert 0 < images["bytes"] <= two_images and images["entries"] == 2
    assert off_engine.stats()["prefix_cache"]["hits"] == 0 and off_engine.stats()["image_cache"]["bytes"] == 0


def test_a_changed_image_is_a_miss(tiny):
    prompt = encoded(3, 24, 1)
    other = {**prompt, "pixel_values": prompt["pixel_values"] + 1e-3}
    engine = Engine(tiny, None, EngineConfig(max_batch_size=2))
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    for p in (prompt, other):
        assert engine.submit(p, greedy) is not None
        while engine.step():
            pass
    stats = engine.stats()
    assert stats["image_cache"]["misses"] == 2 and stats["image_cache"]["hits"] == 0
    assert stats["prefix_cache"]["hits"] == 0  # the record differs from position 2 on (the image's view)
    engine.submit(prompt, greedy)
    while engine.step():
        pass
    assert engine.stats()["image_cache"]["hits"] == 1 and engine.stats()["prefix_cache"]["hits"] == 1


def test_image_keys_follow_the_preprocessed_pixels(tmp_path):
    from PIL import Image

    processor = idefics.IdeficsProcessor.from_pretrained(idefics.DEMO_MODEL)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    pixels = lambda: processor.image_processor([image])[0]  # noqa: E731  (3, r, r)
    key = image_key(pixels())
    assert image_key(pixels()) == key
    assert image_key(processor.image_processor([Image.new("RGB", (40, 30), (200, 30, 31))])[0]) != key
    processor.image_processor.image_size += 2  # another size setting
    assert image_key(pixels()) != key
    processor.image_processor.image_size -= 2
    processor.image_processor.image_mean = [0.4, 0.4, 0.4]  # another processor
    assert image_key(pixels()) != key
    assert image_key(pixels().double()) != image_key(pixels())
    assert image_key(pixels(), interpolate_pos_encoding=True) != image_key(pixels())


def test_the_image_cache_stays_within_its_bytes_and_keeps_entries_in_use():
    entry = torch.zeros(4, 8)  # 128 bytes
    cache = ImageCache(3 * entry.nbytes)
    for i in range(5):
        assert cache.insert(f"k{i}", entry.clone())
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 3 and cache.evictions == 2 and cache.lookup(["k0"]) == [None]
    cache.release(["k0"])
    held = cache.lookup(["k2", "k3", "k4"])  # all in use
    assert all(x is not None for x in held)
    assert not cache.insert("k5", entry.clone())  # no room without evicting an entry in use
    assert cache.bytes == 3 * entry.nbytes and "k5" not in cache._entries
    cache.release(["k2"])
    assert cache.insert("k5", entry.clone()) and "k2" not in cache._entries  # the one no longer in use went
    assert not cache.insert("big", torch.zeros(100, 8)) and cache.bytes <= cache.max_bytes
    assert not ImageCache(0).insert("x", entry)
    with pytest.raises(ValueError, match="max_bytes"):
        ImageCache(-1)


def test_encode_cached_equals_encoding_and_skips_the_vision_tower(tiny):
    pixels = torch.randn(1, 3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    pixels[0, 2] = pixels[0, 0]  # the same image twice: encoded once
    keys = [image_key(x) for x in pixels[0]]
    calls = []
    hook = tiny.model.vision_model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        cache = ImageCache(1 << 20)
        first = encode_cached(tiny, pixels, keys, cache)
        again = encode_cached(tiny, pixels, keys, cache)
    finally:
        hook.remove()
    with torch.inference_mode():
        plain = tiny.model.encode_images(pixel_values=pixels)
    assert calls == [2]  # two distinct images, once
    torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(first, again) and cache.hits == 3 and cache.misses == 3
    assert cache.bytes == sum(x.nbytes for x in cache._entries.values()) == 2 * first[0, 0].nbytes


def test_generate_takes_the_image_cache(tiny):
    prompt = encoded(5, 14, 2)
    images = {k: v for k, v in prompt.items() if k != "input_ids"}
    plain = tiny.generate(prompt["input_ids"], max_new_tokens=6, **images)
    cache = ImageCache(1 << 20)
    first = tiny.generate(prompt["input_ids"], max_new_tokens=6, image_cache=cache, **images)
    beams = tiny.generate(prompt["input_ids"], max_new_tokens=6, image_cache=cache, num_beams=2, **images)
    assert torch.equal(first, plain) and cache.misses == 2 and cache.hits == 2
    assert torch.equal(beams, tiny.generate(prompt["input_ids"], max_new_tokens=6, num_beams=2, **images))


def test_a_shared_prefix_is_copied_from_a_running_slot(tiny):
    first = encoded(6, 22, 1)
    second = next_turn(first, [], 7, 6)  # the same 22 positions, then 6 other tokens
    engine = Engine(tiny, None, EngineConfig(max_batch_size=2))
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    a = engine.submit(first, params)
    engine.step()  # the first is running in slot 0
    b = engine.submit(second, params)
    while engine.step():
        pass
    prefix = engine.stats()["prefix_cache"]
    assert prefix["hits"] == 1 and prefix["copied"] == 1 and prefix["tokens_reused"] == 22
    assert a.result()[0].token_ids == alone(tiny, first, 10, ignore_eos=True)
    assert b.result()[0].token_ids == alone(tiny, second, 10, ignore_eos=True)


def test_width_groups_are_the_cheapest_split():
    def partitions(items):  # every set partition of a list
        if not items:
            yield []
            return
        head, *rest = items
        for part in partitions(rest):
            for i in range(len(part)):
                yield part[:i] + [[head, *part[i]]] + part[i + 1 :]
            yield [[head], *part]

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = 1 + trial % 7
        widths = torch.randint(1, 90, (n,), generator=g).tolist()
        cost = [0, 16, 64, 1000][trial % 4]
        price = lambda groups, w=widths, c=cost: sum(len(x) * max(w[i] for i in x) + c for x in groups)  # noqa: E731
        groups = prefill.width_groups(widths, cost)
        assert sorted(i for x in groups for i in x) == list(range(n))  # every row once
        assert price(groups) == min(price(p) for p in partitions(list(range(n)))), (widths, cost, groups)
        assert prefill.padded_tokens(widths, cost) == price(groups) - cost * len(groups)
    assert prefill.padded_tokens([3, 50]) == 100 and prefill.padded_tokens([3, 50], 0) == 53
    assert prefill.width_groups([], 64) == [] and prefill.width_groups([7, 7], 0) == [[0, 1]]  # a tie: fewer batches


def test_prompts_of_very_different_lengths_are_prefilled_in_batches_of_their_width(tiny, monkeypatch):
    # 6 short and 2 long prompts arrive together: two left-padded batches, not one padded to the longest; their next
    # turns (2 and 31 new positions) again in two right-aligned batches; every answer as generate() alone gives it.
    # A pass costs 8 positions here (64 on CPU by default: more than this 64-position model's prompts could save).
    # The narrow batch runs first and its rows have their first token before the wide batch starts.
    monkeypatch.setitem(prefill.PASS_COST, "cpu", 8)
    batches = []
    engine = Engine(tiny, None, EngineConfig(max_batch_size=8, max_images_per_request=1, prefill_token_budget=4096))
    for name in ("prefill_batch", "slot_prefill"):
        real = getattr(prefill, name)
        monkeypatch.setattr(prefill, name, lambda model, *a, _real=real, _name=name:
                            batches.append((_name, len(a[0] if _name == "prefill_batch" else a[1]),
                                            sum(len(r.tokens) for r in engine._rows.values()))) or
                            _real(model, *a))  # fmt: skip
    prompts = {c: encoded(20 + c, 9 if c < 6 else 20, 1) for c in range(8)}
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for turn in range(2):
        streams = {c: engine.submit(p, params) for c, p in prompts.items()}
        while engine.step():
            pass
        for c, stream in streams.items():
            tokens = stream.result()[0].token_ids
            assert tokens == alone(tiny, prompts[c], 4, ignore_eos=True), (turn, c)
            prompts[c] = next_turn(prompts[c], tokens, 30 + c, 1 if c < 6 else 30)
    assert batches == [("prefill_batch", 6, 0), ("prefill_batch", 2, 6), ("slot_prefill", 6, 0), ("slot_prefill", 2, 6)]


def test_rows_done_at_their_first_token_free_their_slots_after_the_whole_prefill(tiny, monkeypatch):
    # One token each: the narrow batch's rows finish inside the prefill; their slots are released once it is over
    # (on a tensor-parallel model the other ranks are still in it), then serve the next requests.
    monkeypatch.setitem(prefill.PASS_COST, "cpu", 8)
    engine = Engine(tiny, None, EngineConfig(max_batch_size=4, max_images_per_request=1, prefill_token_budget=4096))
    free = []
    real = prefill.prefill_batch
    monkeypatch.setattr(prefill, "prefill_batch", lambda model, *a: free.append(engine.slots.free) or
                        real(model, *a))  # fmt: skip
    prompts = [encoded(50 + c, 6 if c < 3 else 24, 1) for c in range(4)]
    expected = [alone(tiny, p, 3, ignore_eos=True) for p in prompts]
    assert all(min_margin(tiny, p, tokens) > 1e-3 for p, tokens in zip(prompts, expected, strict=True))
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    streams = [engine.submit(p, one) for p in prompts]
    while engine.step():
        pass
    assert free == [0, 0]  # the 3 short rows were done before the long batch, their slots not yet free
    assert engine.slots.free == 4 and not engine._rows
    for tokens, stream in zip(expected, streams, strict=True):
        assert stream.result()[0].token_ids == tokens[:1]
    again = [engine.submit(p, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)) for p in prompts]
    while engine.step():
        pass
    for tokens, stream in zip(expected, again, strict=True):
        assert stream.result()[0].token_ids == tokens


def test_a_next_turn_in_its_own_slot_keeps_the_slots_image_kv(tiny, monkeypatch):
    projected = []
    real = tiny.model.project_images
    monkeypatch.setattr(tiny.model, "project_images", lambda states: projected.append(states.shape[1]) or real(states))
    first = encoded(40, 14, 1)
    engine = Engine(tiny, None, EngineConfig(max_batch_size=2))
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    answer = engine.submit(first, params)
    while engine.step():
        pass
    tokens = answer.result()[0].token_ids
    second = next_turn(first, tokens, 41, 4)
    again = engine.submit(second, params)
    while engine.step():
        pass
    assert projected == [1]  # the first turn's prefill only: the second found the image's K/V in its slot
    assert engine.stats()["prefix_cache"]["hits"] == 1 and engine.stats()["prefix_cache"]["copied"] == 0
    third = next_turn(second, again.result()[0].token_ids, 42, 3, image=torch.randn(3, 28, 28))  # a new image
    last = engine.submit(third, params)
    while engine.step():
        pass
    assert projected == [1, 2]  # another image list: projected again
    assert again.result()[0].token_ids == alone(tiny, second, 5, ignore_eos=True)
    assert last.result()[0].token_ids == alone(tiny, third, 5, ignore_eos=True)
