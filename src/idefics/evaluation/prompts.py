"""Few-shot prompts: templates per task, in-context examples drawn per query, base or instruct (chat) style.

A base-style template is one example's text with `<image>` where its image goes and `{question}` / `{answer}`
fields (`{caption}` and `{label}` are aliases of `{answer}`). Shots are the template filled in, each followed by
the separator; the query is the template cut just before its answer field:

    <image>Question:What color is it? Short answer:red\\n<image>Question:Is it round? Short answer:

An instruct-style template is the user's words of one chat turn (`<image>` places the image; without one the
image comes first). Shots are earlier user/assistant turns and the query is the last user turn, through the chat
template (`idefics.processing.chat`): `User:<image>What color is it?<end_of_utterance>\\nAssistant: red...`.

Shots are drawn at random for each query (the IDEFICS protocol) from a generator seeded by (seed, trial, shots,
query id), so a rerun draws the same ones, and never include the query itself (same id or same image file).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image

from ..processing.chat import apply_chat_template
from ..processing.processor import IMAGE_TOKEN
from .data import CaptionExample, DataError, Example, VqaExample, example_id

ANSWER_FIELDS = ("{answer}", "{caption}", "{label}")
STYLES = ("base", "instruct")


@dataclass(frozen=True)
class PromptTemplate:
    base: str  # one base-style example: `<image>`, `{question}`, `{answer}`
    instruct: str  # the user's words in one chat turn: `<image>` (optional), `{question}`
    separator: str = "\n"  # after each base-style shot

    def __post_init__(self) -> None:
        if not any(field in self.base for field in ANSWER_FIELDS):
            raise ValueError(f"the base template {self.base!r} has no {{answer}} field")


TEMPLATES = {
    "vqa": PromptTemplate(base="<image>Question:{question} Short answer:{answer}", instruct="{question}"),
    "caption": PromptTemplate(base="<image>Output:{caption}", instruct="Describe the image."),
    "classification": PromptTemplate(base="<image>Output:{label}", instruct="What is in this image?"),
}


def answer_of(example: Example) -> str:
    """The answer a shot shows: the most common human answer (VQA), the first caption, or the label."""
    if isinstance(example, VqaExample):
        if not example.answers:
            raise DataError(f"question_id {example.question_id!r} has no answers to show as an in-context example")
        return Counter(example.answers).most_common(1)[0][0]
    if isinstance(example, CaptionExample):
        return example.captions[0]
    return example.label


@lru_cache(maxsize=256)
def open_image(path: Path) -> Image.Image:
    """The decoded RGB image at `path` (cached: shots reuse support images)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:
        raise DataError(f"cannot read image {str(path)!r}: {err}") from None


def sample_shots(support: list[Example], query: Example, *, shots: int, seed: int, trial: int) -> list[Example]:
    """`shots` distinct support examples for `query`, never the query itself (same id or same image file)."""
    if shots == 0:
        return []
    rng = random.Random(f"{seed}/{trial}/{shots}/{example_id(query)}")

    def allowed(example: Example) -> bool:
        return example_id(example) != example_id(query) and example.image != query.image

    picked = [support[i] for i in rng.sample(range(len(support)), min(len(support), shots + 8))]
    picked = [example for example in picked if allowed(example)]
    if len(picked) < shots:  # many excluded among the first draws: draw from the allowed ones
        eligible = [example for example in support if allowed(example)]
        if len(eligible) < shots:
            raise DataError(
                f"{shots} in-context examples were asked for but the support set has only {len(eligible)} besides"
                f" the query {example_id(query)!r}"
            )
        picked = rng.sample(eligible, shots)
    return picked[:shots]


def fill(template: str, example: Example, *, answer: str | None) -> str:
    """The template with the example's fields; `answer=None` cuts it just before the answer field."""
    if answer is None:
        template = template[: min(template.index(f) for f in ANSWER_FIELDS if f in template)]
    question = example.question if isinstance(example, VqaExample) else ""
    value = answer or ""
    return template.format(question=question, answer=value, caption=value, label=value)


def _items(text: str, image: Image.Image | None) -> list:
    """Text with `<image>` marks to processor items (the image at each mark; marks dropped without an image)."""
    pieces = text.split(IMAGE_TOKEN)
    items: list = [pieces[0]] if pieces[0] else []
    for piece in pieces[1:]:
        if image is not None:
            items.append(image)
        if piece:
            items.append(piece)
    return items


def _merge_text(items: list) -> list:
    """Consecutive text items joined (the processor would otherwise strip the spaces between them)."""
    merged: list = []
    for item in items:
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] += item
        else:
            merged.append(item)
    return merged


def build_prompt(
    query: Example, shots: list[Example], *, template: PromptTemplate, style: str, text_only_shots: bool = False
) -> list:
    """The processor prompt (text and PIL images) for `query` after `shots`; text-only shots carry no image."""
    if style == "base":
        items: list = []
        for shot in shots:
            image = None if text_only_shots else open_image(shot.image)
            items += _items(fill(template.base, shot, answer=answer_of(shot)), image) + [template.separator]
        items += _items(fill(template.base, query, answer=None), open_image(query.image))
        return _merge_text(items)
    if style != "instruct":
        raise ValueError(f"prompt style must be one of {STYLES}, got {style!r}")
    messages = []
    for shot in shots:
        image = None if text_only_shots else open_image(shot.image)
        messages += [_user_turn(template.instruct, shot, image), {"role": "assistant", "content": answer_of(shot)}]
    messages.append(_user_turn(template.instruct, query, open_image(query.image)))
    return apply_chat_template(messages, add_generation_prompt=True)


def _user_turn(template: str, example: Example, image: Image.Image | None) -> dict:
    text = fill(template, example, answer="")
    if image is not None and IMAGE_TOKEN not in text:
        text = IMAGE_TOKEN + text
    content = [
        {"type": "image", "image": item} if isinstance(item, Image.Image) else {"type": "text", "text": item}
        for item in _items(text, image)
    ]
    return {"role": "user", "content": content}
