"""Structured-output test helpers: a random model over the session's LLaMA-style tokenizer, small schemas, and an
oracle that checks a generated text against its constraint (jsonschema for JSON, `re.fullmatch`, membership)."""

import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from reference import config_dict, perturb, save_reference

from idefics.generation.constraints import Constraint
from idefics.processing import IdeficsTokenizer

# bounded outputs: every one completes within MAX_TOKENS (ASCII only, each token adds >= 1 character)
SCHEMAS = [
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "shape": {"enum": ["circle", "square", "triangle"]}},
     "required": ["color", "shape"], "additionalProperties": False},
    {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "ok": {"type": "boolean"}},
     "required": ["count", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
     "required": ["name", "tags"], "additionalProperties": False},
]  # fmt: skip
REGEXES = [r"(yes|no)", r"[0-9]{1,3}\.[0-9]", r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"]
CHOICES = [["red", "green", "blue"], ["A circle.", "A square.", "A triangle."], ["yes", "no"]]
MAX_TOKENS = 48


def constraints() -> list[Constraint]:
    """One of each kind per entry above, and json_object."""
    return ([Constraint.json_schema(s) for s in SCHEMAS] + [Constraint.regex(r) for r in REGEXES]
            + [Constraint.choice(c) for c in CHOICES] + [Constraint.json_object()])  # fmt: skip


def satisfies(text: str, constraint: Constraint) -> bool:
    """Whether `text` is a complete output of `constraint` (the test oracle, independent of llguidance)."""
    if constraint.kind in ("json_schema", "json_object"):
        try:
            jsonschema.validate(json.loads(text), constraint.schema)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return True
    if constraint.kind == "regex":
        return re.fullmatch(constraint.spec, text) is not None
    return text in json.loads(constraint.spec)


@pytest.fixture(scope="session")
def random_text_model(v5_dir, tmp_path_factory) -> Path:
    """A perturbed random model over the session tokenizer's vocabulary plus 2 additional rows (logits wider than
    the tokenizer), saved with the processor files: a folder that `from_pretrained` and `idefics serve` take."""
    import transformers

    tokenizer = IdeficsTokenizer.from_pretrained(v5_dir)
    data = config_dict(
        "plain_vector_zeros", vocab_size=len(tokenizer), additional_vocab_size=2, max_position_embeddings=256
    )
    torch.manual_seed(0)
    ref = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(**data))
    perturb(ref)
    folder = save_reference(ref.eval(), tmp_path_factory.mktemp("random_text_model"), name="plain_vector_zeros")
    for file in v5_dir.iterdir():
        shutil.copy(file, folder / file.name)
    return folder
