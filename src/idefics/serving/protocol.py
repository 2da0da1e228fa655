"""The OpenAI API's request and response bodies as pydantic models: all request validation happens here.

Requests follow OpenAI's chat and completions schemas (`logit_bias` included) plus the sampling extras vLLM users
send (`top_k`, `min_tokens`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`); unknown
fields are ignored. Structured outputs: OpenAI's `response_format` (chat) and vLLM's `structured_outputs` and older
`guided_json` / `guided_regex` / `guided_choice` (both endpoints), at most one per request. `/v1/completions`
takes one raw IDEFICS prompt in which each `<image>` marks where the next of `images` (data URIs or URLs) goes.
Responses and stream chunks have exactly OpenAI's shape, so official clients parse them.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..generation.constraints import Constraint, ConstraintError

MAX_TOP_LOGPROBS = 20
INT32 = 2**31 - 1  # bounds integer fields, so a huge number is a clear 400 rather than an overflow somewhere deeper


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- requests ------------------------------------------------------------------------------------------------------


class TextPart(Request):
    type: Literal["text"]
    text: str


class ImageURL(Request):
    url: str = Field(min_length=1)
    detail: str | None = None  # accepted, ignored: IDEFICS sees every image at one resolution


class ImagePart(Request):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: object) -> object:
        return {"url": value} if isinstance(value, str) else value  # some clients send the URL string directly


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]  # "developer" is OpenAI's new name for "system"
    content: str | list[ContentPart]
    name: str | None = None  # accepted, ignored


class StreamOptions(Request):
    include_usage: bool = False


class JsonSchemaFormat(Request):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict | bool = Field(alias="schema")
    strict: bool | None = None  # accepted; the schema is always enforced


class ResponseFormat(Request):
    """OpenAI's `response_format`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema: {"name": ..., "schema": {...}}')
        return self


class StructuredOutputs(Request):
    """vLLM's `structured_outputs`: one of json (a schema), json_object, regex, choice."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    json_schema: dict | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # refused: not supported
    structural_tag: str | dict | None = None  # refused: not supported


class SamplingRequest(Request):
    """The fields shared by chat and completions requests."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1, le=INT32)  # None: up to the model's context length
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (a JSON key, so a string) -> [-100, 100]
    # vLLM's extras
    top_k: int = Field(0, ge=-1, le=INT32)  # 0 or -1: off
    min_tokens: int = Field(0, ge=0, le=INT32)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32)]] | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # refused: not supported

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.strip().isdigit() or int(key) > INT32:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_kwargs(self, *, logprobs: int | None, eos_ids: list[int]) -> dict:
        """Keyword arguments for the engine's `SamplingParams`; `eos_ids` (the chat format's end of turn) are added
        to the request's own `stop_token_ids` unless it asks for `ignore_eos`."""
        return dict(
            max_tokens=self.max_tokens,  # None: as many as the context leaves
            min_tokens=self.min_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []) + ([] if self.ignore_eos else eos_ids),
            ignore_eos=self.ignore_eos,
            n=self.n,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            constraint=self.constraint(),
            logit_bias={int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias else None,
        )

    def constraints(self) -> list[Constraint]:
        """Every structured-output constraint the request names (the server takes at most one)."""
        found = []
        so = self.structured_outputs
        for param, unsupported in (("structured_outputs.grammar", so and so.grammar),
                                   ("structured_outputs.structural_tag", so and so.structural_tag),
                                   ("guided_grammar", self.guided_grammar)):  # fmt: skip
            if unsupported:
                raise ConstraintError("grammars are not supported; use a JSON schema, a regex or choices", param=param)
        if so is not None:
            if so.json_schema is not None:
                found.append(Constraint.json_schema(so.json_schema, param="structured_outputs.json"))
            if so.json_object:
                found.append(Constraint.json_object(param="structured_outputs.json_object"))
            if so.regex is not None:
                found.append(Constraint.regex(so.regex, param="structured_outputs.regex"))
            if so.choice is not None:
                found.append(Constraint.choice(so.choice, param="structured_outputs.choice"))
        if self.guided_json is not None:
            found.append(Constraint.json_schema(self.guided_json, param="guided_json"))
        if self.guided_regex is not None:
            found.append(Constraint.regex(self.guided_regex, param="guided_regex"))
        if self.guided_choice is not None:
            found.append(Constraint.choice(self.guided_choice, param="guided_choice"))
        return found

    def constraint(self) -> Constraint | None:
        """The request's one constraint, or None; ConstraintError (naming the field) for a bad or second one."""
        found = self.constraints()
        if len(found) > 1:
            raise ConstraintError(f"one structured-output constraint per request, got {len(found)}: "
                                  f"{', '.join(c.param for c in found)}", param=found[1].param)  # fmt: skip
        return found[0] if found else None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None

    def constraints(self) -> list[Constraint]:
        found = super().constraints()
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.json_schema
            found.insert(0, Constraint.json_schema(schema, param="response_format.json_schema.schema"))
        elif fmt is not None and fmt.type == "json_object":
            found.insert(0, Constraint.json_object(param="response_format"))
        return found

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's: nothing would be left to answer")
        return self

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] = Field(min_length=1)  # a list of strings: one prompt (batches unsupported)
    images: list[str] = []  # data URIs or URLs, one per <image> in the prompt, in order
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError(f"one prompt per request, got a batch of {len(self.prompt)}")
            self.prompt = self.prompt[0]
        if isinstance(self.prompt, list) and self.images:
            raise ValueError("a prompt of token ids cannot have images")
        if self.echo:
            raise ValueError("echo is not supported")
        return self


# ---- responses -----------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "idefics"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> ErrorResponse:
    """OpenAI's error shape for an HTTP status."""
    detail = ErrorDetail(message=message, type=ERROR_TYPES.get(status, "error"), param=param, code=code)
    return ErrorResponse(error=detail)


# ---- logprobs in OpenAI's two shapes ---------------------------------------------------------------------------------


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(items: list) -> ChatLogprobs:
    """The engine's `TokenLogprob`s as chat's `logprobs.content`."""
    return ChatLogprobs(
        content=[
            TokenLogprobOut(
                token=item.token,
                logprob=item.logprob,
                bytes=_bytes(item.token),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=_bytes(t)) for _, t, lp in item.top],
            )
            for item in items
        ]
    )


def completion_logprobs(items: list, *, offset: int = 0) -> CompletionLogprobs:
    """The engine's `TokenLogprob`s as the completions API's parallel lists (`offset`: text before them)."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return CompletionLogprobs(
        tokens=[item.token for item in items],
        token_logprobs=[item.logprob for item in items],
        top_logprobs=[{t: lp for _, t, lp in item.top} for item in items],
        text_offset=offsets,
    )
