"""The demo world as evaluation sets in the standard formats, for `idefics eval` (`make eval-demo`).

    python -m idefics.demo.eval_sets --output build/eval-demo

writes, for the splits `val` (the queries) and `train` (the support set for shots):

- a shapes VQA set in VQAv2 format: `vqa/<split>_questions.json`, `vqa/<split>_annotations.json` (ten human answers
  per question, mostly right in varied spellings, a few wrong, as crowd answers are) and the images
  `vqa/<split>/shapes_<split>_<image_id, 12 digits>.png` (COCO's naming);
- a shapes caption set in COCO captions format: `caption/<split>_captions.json` (five captions per image) and
  `caption/<split>/shapes_<split>_<image_id, 12 digits>.png`.

The demo model answers "What color is the shape?", "What shape is this?" and "Describe the image.": those are the
questions, and the captions are descriptions like its answers.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .world import COLORS, SHAPES, Scene, random_scene, render

VQA_QUESTIONS = ("What color is the shape?", "What shape is this?")


def human_answers(scene: Scene, question: str, rng: random.Random) -> list[str]:
    """Ten crowd answers: the truth in varied spellings, and 0-3 mistakes."""
    if question == VQA_QUESTIONS[0]:
        truth, others = scene.color, [c for c in COLORS if c != scene.color]
        spellings = [truth, truth, truth, truth.capitalize(), f"{truth}.", f"the {truth}"]
    else:
        truth, others = scene.shape, [s for s in SHAPES if s != scene.shape]
        spellings = [truth, truth, truth, f"a {truth}", truth.capitalize(), f"{truth}!"]
    wrong = rng.choice((0, 0, 1, 1, 2, 3))
    answers = [rng.choice(spellings) for _ in range(10 - wrong)] + [rng.choice(others) for _ in range(wrong)]
    rng.shuffle(answers)
    return answers


def captions(scene: Scene) -> list[str]:
    c, s = scene.color, scene.shape
    return [f"A {c} {s}.", f"A {c} {s} on a plain background.", f"A single {c} {s}.", f"a {c} {s}",
            f"The image shows a {c} {s}."]  # fmt: skip


def write_vqa(folder: Path, *, split: str, count: int, seed: int, questions_per_image: int = 1) -> None:
    """`count` images with `questions_per_image` questions each about them (alternating colour and shape), in VQAv2
    format; question ids are image_id * 10 + j."""
    rng = random.Random(seed)
    (folder / split).mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for image_id in range(1, count + 1):
        scene = random_scene(rng, size=rng.choice((64, 96, 128)))
        render(scene).save(folder / split / f"shapes_{split}_{image_id:012d}.png")
        for j in range(questions_per_image):
            question = VQA_QUESTIONS[(image_id + j) % 2]
            question_id = image_id * 10 + j
            answers = human_answers(scene, question, rng)
            questions.append({"image_id": image_id, "question": question, "question_id": question_id})
            annotations.append({
                "image_id": image_id,
                "question_id": question_id,
                "question_type": question.lower().rsplit(" ", 2)[0],
                "answer_type": "other",
                "multiple_choice_answer": Counter(answers).most_common(1)[0][0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)],
            })  # fmt: skip
    (folder / f"{split}_questions.json").write_text(json.dumps({"questions": questions}, indent=1))
    (folder / f"{split}_annotations.json").write_text(json.dumps({"annotations": annotations}, indent=1))


def write_captions(folder: Path, *, split: str, count: int, seed: int) -> None:
    """`count` images with five captions each, in COCO captions format."""
    rng = random.Random(seed)
    (folder / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        scene = random_scene(rng, size=rng.choice((64, 96, 128)))
        name = f"shapes_{split}_{image_id:012d}.png"
        render(scene).save(folder / split / name)
        images.append({"id": image_id, "file_name": name, "width": scene.size, "height": scene.size})
        for caption in captions(scene):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    data = {"images": images, "annotations": annotations}
    (folder / f"{split}_captions.json").write_text(json.dumps(data, indent=1))


def write_eval_sets(output: str | Path, *, val: int = 100, train: int = 200, seed: int = 0,
                    questions_per_image: int = 1) -> Path:  # fmt: skip
    """Both sets, both splits, under `output` (`val` and `train` images per split); returns it."""
    output = Path(output)
    for offset, (split, count) in enumerate((("val", val), ("train", train))):
        write_vqa(output / "vqa", split=split, count=count, seed=seed + 2 * offset,
                  questions_per_image=questions_per_image)  # fmt: skip
        write_captions(output / "caption", split=split, count=count, seed=seed + 2 * offset + 1)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idefics.demo.eval_sets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="build/eval-demo", help="where to write (default build/eval-demo)")
    parser.add_argument("--val", type=int, default=100, help="query images per set")
    parser.add_argument("--train", type=int, default=200, help="support images per set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {write_eval_sets(args.output, val=args.val, train=args.train, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
