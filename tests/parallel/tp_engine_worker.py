"""Run under torchrun by the tensor-parallel engine test: rank 0 serves 8 concurrent requests (4 slots, so they
queue, prefill in batches and finish at different steps) through the engine on the sharded model while the other
ranks follow; rank 0 writes each request's tokens as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from idefics import IdeficsForVisionText2Text
from idefics.parallel import leave
from idefics.serving import Engine, EngineConfig, SamplingParams

# (seed, prompt length, images, max_tokens); the tiny test models have 64 + extra ids and 28-pixel images
REQUESTS = [(1, 20, 2, 12), (2, 7, 0, 30), (3, 12, 3, 8), (4, 5, 1, 16), (5, 16, 0, 5), (6, 9, 2, 20), (7, 24, 1, 10),
            (8, 11, 1, 14)]  # fmt: skip


def encoded(seed: int, length: int, images: int, *, vocab: int = 66, size: int = 28) -> dict:
    """One encoded prompt: random ids; image j is seen from position 2 + 3j on."""
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(3, vocab, (1, length), generator=g)}
    if images:
        mask = torch.zeros(1, length, images, dtype=torch.long)
        for j in range(images):
            mask[0, 2 + 3 * j :, :] = 0
            mask[0, 2 + 3 * j :, j] = 1
        out |= {"pixel_values": torch.randn(1, images, 3, size, size, generator=g), "image_attention_mask": mask}
    return out


def main() -> None:
    folder, out = sys.argv[1], Path(sys.argv[2])
    model = IdeficsForVisionText2Text.from_pretrained(folder, tp_plan="auto")
    engine = Engine(model, None, EngineConfig(max_batch_size=4, max_images_per_request=3, prefill_token_budget=64))
    if engine.follower:
        engine.follow()
    else:
        with engine:
            streams = [engine.submit(encoded(s, t, n), SamplingParams(max_tokens=m, temperature=0))
                       for s, t, n, m in REQUESTS]  # fmt: skip
            results = [stream.result()[0].token_ids for stream in streams]
        out.write_text(json.dumps(results))
    leave()


if __name__ == "__main__":
    main()
