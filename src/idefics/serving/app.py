"""The OpenAI-compatible HTTP API over one `Engine`: routes, errors and streaming only (no tensors here).

    POST /v1/chat/completions   OpenAI chat; content as a string or `text` / `image_url` parts; SSE with stream=true
    POST /v1/completions        one raw IDEFICS prompt; each `<image>` takes the next of `images`
    GET  /v1/models             the served model name(s)
    GET  /health                200 when serving, 503 while starting or draining
    GET  /metrics               Prometheus text
    GET  /                      the playground (static/index.html)

Images are loaded by `media.py` under the server's policy before the engine sees the request; the engine's
`submit` (tokenising, image preprocessing) runs in a worker thread. Every error is OpenAI's
`{"error": {"message", "type", "param", "code"}}`; once a stream has started, an error is sent as one SSE event
carrying that object. A client that goes away cancels its request, which frees its slot.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..generation.constraints import ConstraintError
from ..processing.chat import Text
from ..processing.processor import IMAGE_TOKEN
from .events import FinishEvent, TokenEvent
from .media import MediaError, MediaPolicy, load_image
from .params import ContextLengthError, EngineDraining, EngineOverloaded, SamplingParams
from .prometheus import CONTENT_TYPE, ServerMetrics
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    SamplingRequest,
    Usage,
    chat_logprobs,
    completion_logprobs,
    error_body,
    new_id,
)

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    """What the HTTP layer needs to know; the engine's own limits live in its `EngineConfig`."""

    served_model_names: list[str]  # the first one is reported in responses; requests may name any of them
    api_key: str | None = None  # checked on /v1/* (Authorization: Bearer KEY)
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_images_per_request: int = 4  # checked before any image is fetched
    max_request_bytes: int = 32 * 1024 * 1024
    request_timeout: float | None = None  # seconds from submission (queue included) to the last token
    eos_token_ids: list[int] = field(default_factory=list)  # end-of-turn ids (e.g. <end_of_utterance>) that stop


def _union_member(part: object) -> bool:
    """Whether a pydantic error location part names a union member ("str", "list[...]") rather than a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict"))


class ApiError(HTTPException):
    """An HTTP error rendered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(status_code=status, detail=message)
        self.param, self.code = param, code


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code).model_dump(), status_code=status)


class Guard:
    """Pure ASGI middleware: the body size limit (413) and the API key on /v1/* (401), before any route runs."""

    def __init__(self, app, *, config: ServerConfig):
        self.app, self.config = app, config
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                response = error_response(401, "invalid API key (send 'Authorization: Bearer KEY')",
                                          code="invalid_api_key")  # fmt: skip
                return await response(scope, receive, send)
        limit = self.config.max_request_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = error_response(413, f"the request body is {int(declared)} bytes, over the limit of {limit}",
                                      code="request_too_large")  # fmt: skip
            return await response(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
            return message

        await self.app(scope, counted_receive, send)


def create_app(engine, *, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving `engine` (started on startup, drained on shutdown)."""
    metrics = ServerMetrics(engine.stats, model_name=config.served_model_names[0])
    state = {"ready": False, "created": int(time.time())}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(engine.start)
        state["ready"] = True
        yield
        state["ready"] = False
        await run_in_threadpool(engine.shutdown, drain=True)

    app = FastAPI(title="idefics", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, config=config)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else str(err.detail)
        return error_response(err.status_code, message, param=getattr(err, "param", None),
                              code=getattr(err, "code", None))  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        # the deepest error is the most specific one (a union field reports one error per member it tried)
        first = max(err.errors(), key=lambda e: len(e.get("loc", ())))
        loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _union_member(part)]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        more = len(err.errors()) - 1
        return error_response(400, message + (f" (and {more} more problems)" if more else ""), param=param)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(err).__name__}: {err}")

    def check_model(name: str | None) -> None:
        if name is not None and name not in config.served_model_names:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                           f"{', '.join(map(repr, config.served_model_names))}", param="model",
                           code="model_not_found")  # fmt: skip
        if not state["ready"] or engine.draining:
            raise ApiError(503, "the server is starting or shutting down; try another replica")

    async def load_images(urls: list[tuple[str, str]]) -> list:
        """(label, url) pairs to decoded images, fetched concurrently; 400 naming the first one that fails."""
        if len(urls) > config.max_images_per_request:
            raise ApiError(400, f"{len(urls)} images in the request, over the limit of "
                           f"{config.max_images_per_request}", code="too_many_images")  # fmt: skip
        results = await asyncio.gather(*(load_image(url, policy=config.media) for _, url in urls),
                                       return_exceptions=True)  # fmt: skip
        for (label, _), result in zip(urls, results, strict=True):
            if isinstance(result, MediaError):
                raise ApiError(400, f"{label}: {result}", param=label, code="invalid_image")
            if isinstance(result, BaseException):
                raise result
        return results

    async def submit(prompt, body: SamplingRequest, *, logprobs: int | None, param: str):
        """`engine.submit` in a worker thread, its errors as HTTP statuses. Without max_tokens, whatever fits."""
        try:
            params = SamplingParams(**body.sampling_kwargs(logprobs=logprobs, eos_ids=config.eos_token_ids))
            return await run_in_threadpool(engine.submit, prompt, params)
        except ContextLengthError as err:
            raise ApiError(400, str(err), param=param, code="context_length_exceeded") from None
        except ConstraintError as err:  # a bad schema, regex or choice list: named by its field
            raise ApiError(400, str(err), param=err.param, code="invalid_constraint") from None
        except EngineOverloaded as err:
            raise ApiError(429, f"the server is overloaded, try again later ({err})") from None
        except EngineDraining:
            raise ApiError(503, "the server is shutting down; try another replica") from None
        except (ValueError, TypeError) as err:
            raise ApiError(400, str(err), param=param) from None

    async def events(stream, request: Request) -> AsyncIterator[TokenEvent | FinishEvent]:
        """The stream's events until all choices finished; cancels it when the client leaves or time runs out."""
        deadline = None if config.request_timeout is None else time.monotonic() + config.request_timeout
        iterator = stream.aiter().__aiter__()
        last_token: dict[int, float] = {}
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    event = await asyncio.wait_for(iterator.__anext__(), timeout)
                except StopAsyncIteration:
                    return
                except (TimeoutError, asyncio.TimeoutError):
                    raise ApiError(408, f"the request took longer than {config.request_timeout} s") from None
                now = time.perf_counter()
                if isinstance(event, TokenEvent):
                    if event.index in last_token:
                        metrics.itl.observe(now - last_token[event.index])
                    last_token[event.index] = now
                else:
                    metrics.observe_finish(event)
                yield event
        finally:
            stream.cancel()  # a no-op once finished; otherwise frees the slot

    @asynccontextmanager
    async def cancel_on_disconnect(stream, request: Request):
        """While inside, a client that disconnects cancels `stream` (its slot is freed at the next step)."""

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            stream.cancel()

        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()

    async def collect(stream, request: Request, n: int) -> tuple[list[FinishEvent], list[list]]:
        """All choices' finish events (in index order) and logprobs."""
        finishes: list[FinishEvent | None] = [None] * n
        logprobs: list[list] = [[] for _ in range(n)]
        async with cancel_on_disconnect(stream, request):
            async for event in events(stream, request):
                if isinstance(event, FinishEvent):
                    finishes[event.index] = event
                elif event.logprobs:
                    logprobs[event.index] += event.logprobs
        failed = [f for f in finishes if f is not None and f.finish_reason == "error"]
        if failed:
            raise finish_error(failed[0])
        return finishes, logprobs

    def usage(stream, finishes: list[FinishEvent]) -> Usage:
        completion = sum(f.completion_tokens for f in finishes)
        return Usage(prompt_tokens=stream.prompt_tokens, completion_tokens=completion,
                     total_tokens=stream.prompt_tokens + completion)  # fmt: skip

    def sse(payload) -> str:
        return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"

    async def sse_events(stream, request: Request, chunks) -> AsyncIterator[str]:
        """SSE text for a stream: `chunks` turns events into payloads; errors become one error event."""
        try:
            async with cancel_on_disconnect(stream, request):
                async for payload in chunks(events(stream, request)):
                    yield sse(payload)
        except ApiError as err:
            yield sse(error_body(err.status_code, err.detail, code=err.code))
        except Exception as err:  # noqa: BLE001 (the response has started: the client must still hear why)
            yield sse(error_body(500, f"internal error: {type(err).__name__}: {err}"))
        finally:
            stream.cancel()
        yield "data: [DONE]\n\n"

    async def deltas(events_: AsyncIterator, n: int, finishes: list[FinishEvent]):
        """(event, text, offset) for each event: a token's text, or at a choice's finish the text still held back
        (a possible stop string that was not one); offset: the characters of that choice streamed before. Finish
        events are appended to `finishes`; a failed choice raises."""
        sent = [0] * n
        async for event in events_:
            if isinstance(event, TokenEvent):
                yield event, event.text, sent[event.index]
                sent[event.index] += len(event.text)
                continue
            if event.finish_reason == "error":
                raise finish_error(event)
            finishes.append(event)
            yield event, event.text[sent[event.index] :], sent[event.index]

    def finish_error(event: FinishEvent) -> ApiError:
        return ApiError(500, f"generation failed: {event.error}")

    def streaming_response(generator) -> StreamingResponse:
        return StreamingResponse(generator, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- routes -----------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if state["ready"] and not engine.draining:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "draining" if engine.draining else "starting"}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=state["created"]) for name in config.served_model_names])

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        urls = [(f"messages.{m}.content.{p}.image_url", part.image_url.url)
                for m, message in enumerate(body.messages) if isinstance(message.content, list)
                for p, part in enumerate(message.content) if part.type == "image_url"]  # fmt: skip
        images = iter(await load_images(urls))
        messages = []
        for message in body.messages:
            role = "system" if message.role == "developer" else message.role
            if isinstance(message.content, str):
                messages.append({"role": role, "content": message.content})
                continue
            parts = [{"type": "text", "text": part.text} if part.type == "text"
                     else {"type": "image", "image": next(images)} for part in message.content]  # fmt: skip
            messages.append({"role": role, "content": parts})
        stream = await submit(messages, body, logprobs=body.engine_logprobs, param="messages")
        rid, model, created = new_id("chatcmpl"), config.served_model_names[0], int(time.time())
        if not body.stream:
            finishes, logprobs = await collect(stream, request, body.n)
            choices = [
                ChatChoice(index=f.index, message=AssistantMessage(content=f.text), finish_reason=f.finish_reason,
                           logprobs=chat_logprobs(logprobs[f.index]) if body.logprobs else None)
                for f in finishes
            ]  # fmt: skip
            return ChatCompletion(id=rid, model=model, choices=choices, usage=usage(stream, finishes))

        def chunk(choices: list[ChunkChoice], usage_: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage_)

        async def chunks(events_: AsyncIterator) -> AsyncIterator[ChatCompletionChunk]:
            for i in range(body.n):
                yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            finishes: list[FinishEvent] = []
            async for event, text, _ in deltas(events_, body.n, finishes):
                if isinstance(event, TokenEvent):
                    lp = chat_logprobs(event.logprobs) if body.logprobs and event.logprobs else None
                    yield chunk([ChunkChoice(index=event.index, delta=Delta(content=text), logprobs=lp)])
                else:
                    delta = Delta(content=text) if text else Delta()
                    yield chunk([ChunkChoice(index=event.index, delta=delta, finish_reason=event.finish_reason)])
            if body.include_usage:
                yield chunk([], usage(stream, finishes))

        return streaming_response(sse_events(stream, request, chunks))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if isinstance(body.prompt, list):  # token ids
            prompt = body.prompt
        else:
            pieces = body.prompt.split(IMAGE_TOKEN)
            if len(pieces) - 1 != len(body.images):
                raise ApiError(400, f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} markers but {len(body.images)}"
                               " images were given", param="images")  # fmt: skip
            images = await load_images([(f"images.{i}", url) for i, url in enumerate(body.images)])
            prompt = [Text(pieces[0])] if pieces[0] else []
            for image, piece in zip(images, pieces[1:], strict=True):
                prompt += [image, Text(piece)] if piece else [image]
            if not prompt:
                raise ApiError(400, "the prompt is empty", param="prompt")
        stream = await submit(prompt, body, logprobs=body.logprobs, param="prompt")
        rid, model, created = new_id("cmpl"), config.served_model_names[0], int(time.time())
        if not body.stream:
            finishes, logprobs = await collect(stream, request, body.n)
            choices = [
                CompletionChoice(index=f.index, text=f.text, finish_reason=f.finish_reason,
                                 logprobs=completion_logprobs(logprobs[f.index]) if body.logprobs is not None else None)
                for f in finishes
            ]  # fmt: skip
            return Completion(id=rid, model=model, choices=choices, usage=usage(stream, finishes))

        def chunk(choices: list[CompletionChoice], usage_: Usage | None = None) -> Completion:
            return Completion(id=rid, created=created, model=model, choices=choices, usage=usage_)

        async def chunks(events_: AsyncIterator) -> AsyncIterator[Completion]:
            finishes: list[FinishEvent] = []
            async for event, text, offset in deltas(events_, body.n, finishes):
                if isinstance(event, TokenEvent):
                    lp = None
                    if body.logprobs is not None and event.logprobs:
                        lp = completion_logprobs(event.logprobs, offset=offset)
                    yield chunk([CompletionChoice(index=event.index, text=text, logprobs=lp)])
                else:
                    yield chunk([CompletionChoice(index=event.index, text=text, finish_reason=event.finish_reason)])
            if body.include_usage:
                yield chunk([], usage(stream, finishes))

        return streaming_response(sse_events(stream, request, chunks))

    return app
