"""The OpenAI-compatible HTTP API over an Engine: /v1/models, /v1/completions, /v1/chat/completions (streamed as
server-sent events with `stream: true`) and /health, with an optional API key."""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from bigmodel_cli.errors import UserError
from bigmodel_cli.serve import engine as engine_lib
from bigmodel_cli.serve.protocol import (
    MAX_BODY_BYTES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    TextStream,
    validation_error,
)
from bigmodel_cli.tasks.chat import ChatFormat

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


@dataclass(frozen=True)
class Served:
    """What the API serves: the engine, how text becomes tokens, the model's name and the key clients need."""

    engine: engine_lib.Engine
    tokenizer: object  # the shared tokenizer interface (bigmodel_cli.data.tokenizer)
    chat: ChatFormat
    name: str  # the model id clients pass as `model`
    api_key: str = ""  # empty: no key needed
    stop_ids: frozenset[int] = frozenset()  # where an answer ends: EOS, and the model's other stop tokens


@dataclass(frozen=True)
class _Job:
    """A validated request: prompt ids and how to decode them."""

    ids: list[int]
    max_tokens: int
    stop_ids: frozenset[int]
    stops: tuple[str, ...]


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="bigmodel serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    def authorised(request: Request) -> None:
        if not served.api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), served.api_key.encode()):
            raise ApiError(
                401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", None, "invalid_api_key"
            )

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorised)])

    @app.get("/health")
    def health() -> dict:
        engine = served.engine
        slots = {"active": engine.active(), "waiting": engine.waiting(), "max_batch": engine.max_batch}
        return {"status": "ok", **slots, "peak_active": engine.peak_active, "cancelled": engine.cancelled}

    @api.get("/models")
    def models() -> dict:
        card = {"id": served.name, "object": "model", "created": created, "owned_by": "bigmodel"}
        return {"object": "list", "data": [{**card, "max_model_len": served.engine.max_len}]}

    @api.post("/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest, served.name)
        job = _job(served, body, _completion_ids(served, body.prompt), served.stop_ids, ())
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        head["model"] = served.name
        if body.stream:
            return _sse(_stream(served, job, body, head, chat=False))
        text, finish, used = await _collect(served, job, body, request)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], "usage": _usage(job, used)}

    @api.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatRequest, served.name)
        messages = [m.as_dict(i) for i, m in enumerate(body.messages)]
        try:
            text = served.chat.render(messages, add_generation_prompt=True)
        except UserError as err:
            raise ApiError(400, f"messages: {err}", "messages") from None
        tokenizer = served.tokenizer
        ids = served.chat.encode(tokenizer, text)
        stop_ids, extra = served.chat.reply_stops(tokenizer, served.stop_ids)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        job = _job(served, body, ids, stop_ids, extra)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time())}
        head["model"] = served.name
        if body.stream:
            return _sse(_stream(served, job, body, {**head, "object": "chat.completion.chunk"}, chat=True))
        text, finish, used = await _collect(served, job, body, request)
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], "usage": _usage(job, used)}

    app.include_router(api)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, err: HTTPException) -> JSONResponse:
        what = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(err.status_code, err.detail)
        return await api_error(_request, ApiError(err.status_code, f"{what}: {_request.url.path}"))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, err: Exception) -> JSONResponse:
        # The traceback goes to the server's log; the client learns only that the fault is the server's.
        return await api_error(_request, ApiError(500, f"internal server error ({type(err).__name__})"))

    return app


async def _parse(request: Request, kind: type[BaseModel], name: str):
    """The request body as `kind`, read up to MAX_BODY_BYTES; any fault in it is a 4xx ApiError."""
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise ApiError(400, "the Content-Length header is not a number") from None
    limit = f"the request body is over {MAX_BODY_BYTES} bytes"
    if declared > MAX_BODY_BYTES:
        raise ApiError(413, limit)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, limit)
    try:
        body = kind.model_validate_json(bytes(raw))
    except ValidationError as err:
        raise validation_error(err.errors(include_input=False)) from None
    if body.model != name:
        message = f"the model {body.model!r} does not exist: this server serves {name!r} (GET /v1/models)"
        raise ApiError(404, message, "model", "model_not_found")
    body.check_unsupported()
    return body


def _completion_ids(served: Served, prompt) -> list[int]:
    """A completion's prompt as token ids: text as transformers encodes it, or the ids themselves."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request, got {len(prompt)}; send them separately", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):  # an empty prompt starts at EOS, the document boundary of training
        return served.tokenizer.encode_prompt(prompt) or [served.tokenizer.eos_id]
    vocab = served.tokenizer.vocab_size
    if not prompt or not all(0 <= t < vocab for t in prompt):
        raise ApiError(400, f"prompt: token ids must be in [0, {vocab}) and at least one", "prompt")
    return list(prompt)


def _job(served: Served, body, ids: list[int], stop_ids: frozenset[int], extra: tuple[str, ...]) -> _Job:
    """Check that the prompt and the answer fit a slot of the engine."""
    limit = served.engine.max_len
    if len(ids) >= limit:
        message = f"the prompt is {len(ids)} tokens; this server's context is {limit} (--max-model-len)"
        raise ApiError(
            400, message, "messages" if isinstance(body, ChatRequest) else "prompt", "context_length_exceeded"
        )
    max_tokens = body.max_tokens if body.max_tokens is not None else limit - len(ids)
    if len(ids) + max_tokens > limit:
        message = (
            f"max_tokens {max_tokens} + the prompt's {len(ids)} tokens exceed this server's context of {limit} "
            f"tokens: ask for at most {limit - len(ids)}"
        )
        raise ApiError(400, message, "max_tokens", "context_length_exceeded")
    return _Job(ids, max_tokens, stop_ids, body.stops() + extra)


async def _pieces(served: Served, job: _Job, body) -> AsyncIterator[tuple[str, str | None, int]]:
    """(new text, finish reason or None, tokens so far) as the engine decodes the job; leaving early (a client
    gone) frees its slot."""
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
    seed = secrets.randbits(32) if body.seed is None else body.seed % 2**32

    def emit(token: int, finish: str | None) -> None:  # called on the engine's thread
        loop.call_soon_threadsafe(tokens.put_nowait, (token, finish))

    request = engine_lib.Request(job.ids, job.max_tokens, emit, body.temperature, body.top_p, seed, job.stop_ids)
    text = TextStream(served.tokenizer, job.stop_ids, job.stops)
    served.engine.submit(request)
    used = 0
    try:
        while True:
            token, finish = await tokens.get()
            if finish == "error":
                raise ApiError(500, f"decoding failed: {served.engine.last_error}", code="engine_error")
            used += 1
            piece = text.add(token)
            finish = "stop" if text.stopped else finish
            if finish:
                yield piece + text.flush(), finish, used
                return
            if piece:
                yield piece, None, used
    finally:
        request.cancel()


async def _collect(served: Served, job: _Job, body, http: Request) -> tuple[str, str, int]:
    """The whole answer: (text, finish reason, completion tokens); decoding stops if the client goes away."""
    parts, last = [], ("stop", 0)

    async def gather() -> None:
        nonlocal last
        async for piece, finish, used in _pieces(served, job, body):
            parts.append(piece)
            last = (finish or "stop", used)

    async def client_gone() -> None:
        while not await http.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    answer, watch = asyncio.create_task(gather()), asyncio.create_task(client_gone())
    try:
        await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        answer.cancel()  # when the client left first: _pieces frees the slot
    if not answer.done() or answer.cancelled():
        raise ApiError(499, "the client closed the connection")
    answer.result()  # an engine failure, as its ApiError
    return "".join(parts), *last


def _usage(job: _Job, used: int) -> dict:
    return {"prompt_tokens": len(job.ids), "completion_tokens": used, "total_tokens": len(job.ids) + used}


async def _stream(served: Served, job: _Job, body, head: dict, chat: bool) -> AsyncIterator[str]:
    """The answer as server-sent events: one chunk per piece of text, the finish reason, [DONE]."""

    def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _event({**head, "choices": [choice]})

    if chat:
        yield chunk(None, None, role=True)
    used = 0
    try:
        async for piece, finish, so_far in _pieces(served, job, body):
            used = so_far
            if piece:
                yield chunk(piece, None)
            if finish:
                yield chunk(None, finish)
    except ApiError as err:  # headers are sent: the error travels as an event, which the openai client raises
        yield _event(err.body())
    if body.include_usage:
        yield _event({**head, "choices": [], "usage": _usage(job, used)})
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
