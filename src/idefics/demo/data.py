"""Rendering the demo world into a fine-tuning dataset: PNG files and a JSONL file of chat rows.

Each image gets one question, drawn uniformly, so every training row shows a new scene:

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/train-00000.png"},
                                              {"type": "text", "text": "What color is the shape?"}]},
                  {"role": "assistant", "content": "Red."}]}

Image paths are relative to the JSONL file, as `idefics finetune` reads them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .world import QUESTIONS, Scene, random_scene, render


def chat_row(image: str, question: str, answer: str | None = None) -> dict:
    """One user turn (the image, then the question) and, with `answer`, the assistant's reply."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def write_dataset(folder: str | Path, *, name: str, count: int, seed: int) -> list[tuple[Scene, str]]:
    """Render `count` scenes to `folder/img/<name>-NNNNN.png` and write `folder/<name>.jsonl`.

    Returns the (scene, question) of each row, in file order.
    """
    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    with open(folder / f"{name}.jsonl", "w") as f:
        for i in range(count):
            scene = random_scene(rng)
            question = rng.choice(list(QUESTIONS))
            image = f"img/{name}-{i:05d}.png"
            render(scene).save(folder / image, compress_level=1)
            f.write(json.dumps(chat_row(image, question, scene.answer(question))) + "\n")
            rows.append((scene, question))
    return rows
