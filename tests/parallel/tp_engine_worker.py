"""Run under torchrun by the tensor-parallel engine test: rank 0 serves 8 concurrent requests (4 slots, so they
queue, prefill in batches and finish at different steps) through the engine on the sharded model while the other
ranks follow, then a second turn of each that resends the first turn and its answer (prefix-cache and image-cache
hits). Before those, driven step by step, 3 short one-token requests and a long one admitted together: two prefill
batches, the short rows done (their slots freed) inside the prefill that the other ranks are still running. Every
rank writes its cache counters and rank 0 the tokens, as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "serving"))  # the engine tests' prompts

from test_engine import encoded  # noqa: E402

from idefics import IdeficsForVisionText2Text
from idefics.parallel import leave
from idefics.serving import Engine, EngineConfig, SamplingParams, prefill

# (seed, prompt length, images, max_tokens); the tiny test models have 64 + extra ids and 28-pixel images
REQUESTS = [(1, 20, 2, 12), (2, 7, 0, 30), (3, 12, 3, 8), (4, 5, 1, 16), (5, 16, 0, 5), (6, 9, 2, 20), (7, 24, 1, 10),
            (8, 11, 1, 14)]  # fmt: skip
TOGETHER = [(11, 5, 1, 1), (12, 5, 0, 1), (13, 6, 1, 1), (14, 30, 1, 6)]  # prefilled as [5, 5, 6] then [30]


def second_turn(prompt: dict, answer: list[int], extra: int) -> dict:
    """The first turn's prompt and answer, then `extra` more tokens (the same images, seen by the new tokens)."""
    more = torch.arange(3, 3 + extra)[None]
    ids = torch.cat([prompt["input_ids"], torch.tensor([answer]), more], dim=1)
    out = {"input_ids": ids}
    if "pixel_values" in prompt:
        mask = prompt["image_attention_mask"]
        mask = torch.cat([mask, mask[:, -1:].expand(-1, ids.shape[1] - mask.shape[1], -1)], dim=1)
        out |= {"pixel_values": prompt["pixel_values"], "image_attention_mask": mask}
    return out


def main() -> None:
    folder, out = sys.argv[1], Path(sys.argv[2])
    model = IdeficsForVisionText2Text.from_pretrained(folder, tp_plan="auto")
    prefill.PASS_COST["cpu"] = 8  # every rank: batches split at smaller savings than by default
    engine = Engine(model, None, EngineConfig(max_batch_size=4, max_images_per_request=3, prefill_token_budget=64))
    if engine.follower:
        engine.follow()
    else:
        streams = [engine.submit(encoded(s, t, n), SamplingParams(max_tokens=m, temperature=0))
                   for s, t, n, m in TOGETHER]  # fmt: skip
        while engine.step():
            pass
        together = [s.result()[0].token_ids for s in streams]
        with engine:
            prompts = [encoded(s, t, n) for s, t, n, _ in REQUESTS]
            greedy = [SamplingParams(max_tokens=m, temperature=0) for *_, m in REQUESTS]
            first = [
                s.result()[0].token_ids for s in [engine.submit(p, g) for p, g in zip(prompts, greedy, strict=True)]
            ]
            turns = [second_turn(p, a, 4) for p, a in zip(prompts, first, strict=True)]
            # the last conversations first: their slots still hold their first turns (4 slots for 8 conversations)
            streams = {i: engine.submit(turns[i], greedy[i]) for i in reversed(range(len(turns)))}
            second = [streams[i].result()[0].token_ids for i in range(len(turns))]
        out.write_text(json.dumps({"first": first, "second": second, "together": together}))
    stats = engine.stats()
    counters = {"image_cache": stats["image_cache"], "lengths": engine.slots.lengths,
                "prefix_hits": stats["prefix_cache"]["hits"]}  # fmt: skip
    Path(f"{out}.rank{engine._channel.tp.rank if engine._channel else 0}").write_text(json.dumps(counters))
    leave()


if __name__ == "__main__":
    main()
