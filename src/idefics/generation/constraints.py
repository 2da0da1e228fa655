"""Structured outputs: what a generation must match (a JSON schema, any JSON object, a regex, one of some strings).

A `Constraint` is only the specification; `grammar.py` compiles it for a tokenizer with llguidance and turns it
into a per-step token bitmask. The same constraint is accepted by `generate()`, `stream_generate`, the engine
(`SamplingParams.constraint`) and the server (`response_format`, vLLM's `structured_outputs` / `guided_*`).

    Constraint.json_schema({"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}})
    Constraint.json_object()                   # any JSON object
    Constraint.regex(r"\\d{3}-\\d{4}")
    Constraint.choice(["yes", "no"])

JSON is generated without free whitespace (", " between items, ": " after keys, as `json.dumps` writes it), so a
small model cannot wander into endless blanks. With a SentencePiece-style tokenizer, whose first generated word
carries a space marker that decoding strips ("▁Red" decodes to "Red"), the output may begin with that one space:
the model keeps its usual first token and the decoded text still matches exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["json_schema", "json_object", "regex", "choice"]
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """A constraint that cannot be compiled (a bad schema or regex); `param` names the request field it came from."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    """A structured-output specification. `spec` is canonical text (equal constraints compile once); `param` is
    where it came from (a request field, a CLI flag), for error messages only."""

    kind: Kind
    spec: str  # the schema as JSON (property order kept: it is the output's), the regex, the choices as JSON, or ""
    param: str | None = field(default=None, compare=False)

    @classmethod
    def json_schema(cls, schema: dict | str | bool, *, param: str | None = "json_schema") -> Constraint:
        """A JSON schema, as a dict or its JSON text."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise ConstraintError(f"the schema is not valid JSON: {err}", param=param) from None
        if not isinstance(schema, dict | bool):
            raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}", param=param)
        return cls("json_schema", json.dumps(schema), param)

    @classmethod
    def json_object(cls, *, param: str | None = "json_object") -> Constraint:
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls("json_object", "", param)

    @classmethod
    def regex(cls, pattern: str, *, param: str | None = "regex") -> Constraint:
        """The whole output matches `pattern` (Rust regex syntax, as vLLM's llguidance backend takes it)."""
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError("the regex must be a non-empty string", param=param)
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, options, *, param: str | None = "choice") -> Constraint:
        """The output is exactly one of `options` (non-empty strings)."""
        options = list(options) if isinstance(options, list | tuple) else options
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
            raise ConstraintError("choices must be a non-empty list of non-empty strings", param=param)
        return cls("choice", json.dumps(options), param)

    @property
    def schema(self) -> dict | bool | None:
        """The JSON schema the output validates against (json_schema, json_object), else None."""
        if self.kind == "json_object":
            return {"type": "object"}
        return json.loads(self.spec) if self.kind == "json_schema" else None

    def grammar(self, *, leading_space: bool = False) -> str:
        """The llguidance grammar for this constraint (not yet checked: compiling does that); `leading_space`: the
        output may start with one space that decoding strips."""
        from llguidance import LLMatcher

        if self.kind == "choice":
            options = " | ".join(json.dumps(option) for option in json.loads(self.spec))
            space = '" "? ' if leading_space else ""
            return LLMatcher.grammar_from_lark(f"start: {space}({options})")
        if self.kind == "regex":
            text = LLMatcher.grammar_from_regex(self.spec)
        else:
            text = LLMatcher.grammar_from_json_schema(json.dumps(self.schema), overrides=JSON_OPTIONS)
        if not leading_space:
            return text
        grammar = json.loads(text)
        body = grammar["grammars"][0] | {"name": "body"}
        return json.dumps(grammar | {"grammars": [{"name": "start", "lark_grammar": 'start: " "? @body'}, body]})
