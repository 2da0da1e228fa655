"""Stop rules and answer clean-up, so that a runaway continuation ("red\\nQuestion: ... Short answer: ...") is never
scored: generation stops at the end tokens or any stop string, and the answer is cut again at the first stop string
(a batch row may run past one while others finish) and stripped of surrounding spaces and quotes.
"""

from __future__ import annotations

import re

from ..processing.processor import IMAGE_TOKEN
from .prompts import ANSWER_FIELDS, PromptTemplate

# Where a few-shot prompt's next example (or the next chat turn) would begin.
STOP_STRINGS = ("\n", "Question:", "Short answer:", "Answer:", "Output:", "User:", "Assistant:")
MAX_NEW_TOKENS = {"vqa": 10, "caption": 20}  # defaults per task (OpenFlamingo uses 5 and 20 with its tokenizer)


def stop_strings(template: PromptTemplate) -> list[str]:
    """STOP_STRINGS plus the literal pieces of the base template (e.g. "Question:", "Short answer:")."""
    fields = "|".join(re.escape(f) for f in (*ANSWER_FIELDS, "{question}", IMAGE_TOKEN))
    pieces = [piece.strip() for piece in re.split(fields, template.base)]
    stops = list(STOP_STRINGS)
    for piece in pieces:
        if len(piece) >= 2 and piece not in stops:
            stops.append(piece)
    return stops


def clean_answer(text: str, *, stops: list[str]) -> str:
    """The generated text (leading spaces dropped) cut at the first stop string, stripped of spaces and enclosing
    quotes."""
    text = text.lstrip()  # a leading newline or space is not a stop
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    answer = text[:cut].strip()
    if len(answer) >= 2 and answer[0] == answer[-1] and answer[0] in "\"'":
        answer = answer[1:-1].strip()
    return answer
