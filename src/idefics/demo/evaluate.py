"""How often a model answers the demo world's questions exactly, on freshly rendered scenes.

Everything goes through the public API: `IdeficsProcessor` builds the chat prompts
`["User:", image, "<question><end_of_utterance>", "\\nAssistant:"]` and `model.generate` decodes greedily until
`<end_of_utterance>`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..processing.chat import END_OF_UTTERANCE
from .world import QUESTIONS, random_scene, render


@dataclass
class Accuracy:
    right: int
    total: int
    by_question: dict[str, float]
    by_size: dict[int, float]
    mistakes: list[tuple[str, str, str]] = field(default_factory=list)  # (question, expected, answered)

    @property
    def value(self) -> float:
        return self.right / self.total


def ask(model, processor, images: Sequence, questions: Sequence[str], *, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers (b,) to one question per image, in one batch; the reply text without its leading space."""
    prompts = [
        ["User:", image, f"{q}{END_OF_UTTERANCE}", "\nAssistant:"] for image, q in zip(images, questions, strict=True)
    ]
    inputs = processor(prompts, add_end_of_utterance_token=False).to(model.device)
    eou = processor.tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=[eou])  # (b, t + new)
    replies = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [reply.strip() for reply in replies]


def accuracy(model, processor, *, count: int, seed: int, sizes: Sequence[int], batch_size: int = 64) -> Accuracy:
    """Exact-answer rate on `count` new scenes: canvas sizes cycle through `sizes`, questions through QUESTIONS."""
    rng = random.Random(seed)
    questions = list(QUESTIONS)
    cases = [(random_scene(rng, size=sizes[i % len(sizes)]), questions[i % len(questions)]) for i in range(count)]
    answers = []
    for start in range(0, count, batch_size):
        batch = cases[start : start + batch_size]
        answers += ask(model, processor, [render(s) for s, _ in batch], [q for _, q in batch])
    right = [answer == scene.answer(q) for (scene, q), answer in zip(cases, answers, strict=True)]

    def rate(keep) -> float:
        chosen = [r for (scene, q), r in zip(cases, right, strict=True) if keep(scene, q)]
        return sum(chosen) / len(chosen)

    return Accuracy(
        right=sum(right),
        total=count,
        by_question={q: rate(lambda s, qq, q=q: qq == q) for q in questions},
        by_size={size: rate(lambda s, qq, size=size: s.size == size) for size in sizes},
        mistakes=[(q, scene.answer(q), a) for (scene, q), a, r in zip(cases, answers, right, strict=True) if not r],
    )
