"""The OpenAI-compatible HTTP API over the engine (FastAPI): /v1/models, /v1/chat/completions, /v1/completions,
/v1/weights (a trainer's weight pushes, herd.serve.weights), /health, /metrics.

Request and response shapes follow OpenAI's API reference (platform.openai.com/docs/api-reference): SSE streaming
ending in `data: [DONE]`, `stream_options.include_usage`, usage counts, finish_reason stop / length / tool_calls,
`max_tokens` and `max_completion_tokens` as aliases, `n`, `seed`, `stop`, `logprobs` / `top_logprobs` (the
completions API: `logprobs` N and its legacy columns), `logit_bias`, a batch of prompts in one /v1/completions
request (n choices each, in order), tools (parsed from the output by herd.tools), images as `image_url` parts (data:
URLs; file paths only inside the operator's `media_dir`), and vLLM's extras `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`, `stop_token_ids`, `return_tokens_as_token_ids` (the openai client sends them through `extra_body`).
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}} with the matching status, and a bad request
never takes the server down. Every body is read as JSON only with `Content-Type: application/json` (415
otherwise: any web page can make a browser send a text/plain POST, with no CORS preflight) and validated against
herd.serve.schemas (400 that names the field), which /openapi.json shows. 404 and 405 are OpenAI-shaped too, and
any exception a route still lets escape becomes a 500 in that shape on a connection that stays open.
A `response_format` other than text, and tool_choice "required", need constrained decoding, which herd does
not do: they get 400 rather than being silently ignored. A client that disconnects mid-stream cancels its requests.
A generation that fails inside the engine answers 500 (type "server_error"; in a stream, an error event before
`data: [DONE]`) and the server goes on; a stream that fails after its 200 for any other reason ends the same way, and
its generations are cancelled. A request cancelled by a graceful shutdown ends with finish_reason
"cancelled".

The routes are module-level functions on an APIRouter. Each finds the Service (herd.serve.service: the checks, the
limits, the engine worker, the metrics) at `request.app.state.service` and calls only its public methods; this module
keeps to HTTP: bodies, OpenAI's response and chunk shapes, SSE. `create_app(service)` puts the two together.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from herd.serve import schemas
from herd.serve.schemas import ChatCompletionRequest, CompletionRequest, WeightsRequest
from herd.serve.service import APIError, Service
from herd.tools import ToolCallStreamParser, finish_reason, parse_tool_calls

log = logging.getLogger("herd.serve")

DRAIN_BYTES = 64 * 2**20  # how much of an oversized body is read and dropped so that its sender sees the 413
PAGE = Path(__file__).parent / "static" / "index.html"

BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
          "/v1/weights": WeightsRequest}

router = APIRouter()


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="herd", docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.page = PAGE.read_text()
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_middleware(CatchAll)
    app.include_router(router)
    app.openapi = lambda: _openapi(app)
    if service.config.allowed_origins:  # else no CORS headers at all: pages of other origins cannot read answers
        app.add_middleware(CORSMiddleware, allow_origins=list(service.config.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    return app


def _service(request: Request) -> Service:
    return request.app.state.service


async def _client_gone(request: Request, e: ClientDisconnect) -> Response:
    """The client left (or herd.serve.server dropped it as too slow) while its body was being read: nobody is left
    to answer, and it is no server error."""
    return Response(status_code=499)


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    _service(request).metrics.count_error()
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's 404 / 405 (and any other HTTPException) in OpenAI's shape instead of {"detail": ...}."""
    where = f"{request.method} {request.url.path}"
    text = {404: f"there is no route {where}; the API is under /v1 (its routes are listed in /openapi.json)",
            405: f"{where} is not allowed; allowed: {(e.headers or {}).get('allow', 'see /openapi.json')}"}
    err = APIError(e.status_code, text.get(e.status_code, str(e.detail)), code="not_found" if e.status_code == 404
                   else None)
    return JSONResponse(err.body(), status_code=e.status_code, headers=e.headers)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return await _api_error(request, APIError(400, f"bad request: {e.errors()[0]['msg']}"))


class CatchAll:
    """ASGI middleware: an exception that escapes a route before its response started becomes OpenAI's 500. Not
    Starlette's handler for Exception: its ServerErrorMiddleware re-raises after answering, and uvicorn closes a
    connection whose application raised, so the client's next request on that keep-alive connection would fail."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:
            if started:  # half a response is out: only closing the connection can end it
                raise
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            scope["app"].state.service.metrics.count_error()
            err = APIError(500, f"the server failed on this request ({type(e).__name__}); its log has the details",
                           code="internal_error", kind="server_error")
            await JSONResponse(err.body(), status_code=500)(scope, receive, send)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the two request bodies: the routes read their bodies themselves (to bound the size and
    check the Content-Type before parsing), so FastAPI cannot see them."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        shared = spec.setdefault("components", {}).setdefault("schemas", {})
        for path, model in BODIES.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            shared.update(schema.pop("$defs", {}))
            shared[model.__name__] = schema
            spec["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = spec
    return app.openapi_schema


# ---- routes ----------------------------------------------------------------------------------------------------------
@router.get("/")
async def index(request: Request):
    return HTMLResponse(request.app.state.page)  # the web chat (static HTML + JS over this API)


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request):
    return PlainTextResponse(_service(request).metrics_text())


@router.get("/v1/models")
async def models(request: Request):
    svc = _service(request)
    svc.authorize(request.headers)
    return {"object": "list", "data": [svc.model_card()]}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _complete(request, chat=True)


@router.post("/v1/completions")
async def completions(request: Request):
    return await _complete(request, chat=False)


@router.get("/v1/weights")
async def weights_version(request: Request):
    svc = _service(request)
    svc.authorize(request.headers)
    return svc.weights_info()


@router.post("/v1/weights")
async def push_weights(request: Request):
    """Load new weights from a folder in --weights-dir, swapped in between two engine steps; requests in flight go
    on with the new weights (herd.serve.weights)."""
    svc = _service(request)
    return await svc.push_weights(await _body(request, svc, WeightsRequest))


# ---- request body ----------------------------------------------------------------------------------------------------
async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, read in chunks and kept only up to `limit` bytes (a chunked upload declares no length). An
    oversized body is still read on and discarded, up to DRAIN_BYTES more: answering 413 while the client is still
    sending would close the connection under it, and it would see a reset instead of the 413."""
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise APIError(400, "the Content-Length header is not a number") from None
    chunks, seen, too_big = [], 0, declared > limit
    async for chunk in request.stream():
        seen += len(chunk)
        too_big = too_big or seen > limit
        if not too_big:
            chunks.append(chunk)
        elif seen > limit + DRAIN_BYTES:
            break
    if too_big:
        raise APIError(413, f"the request is larger than {limit} bytes")
    return b"".join(chunks)


async def _body(request: Request, svc: Service, model: type[BaseModel]):
    """The request body as `model`: 415 unless it is sent as JSON, 400 for bad JSON or a value the schema refuses."""
    svc.authorize(request.headers)
    raw = await _read_limited(request, svc.config.max_request_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"the request must be sent as Content-Type: application/json, not {kind or 'none'!r}",
                       code="unsupported_media_type")
    try:
        body = schemas.parse(raw)
    except ValueError as e:
        why = "nested too deeply" if "recursion limit" in str(e) else f"not valid JSON: {e}"
        raise APIError(400, f"the request body is {why}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise APIError(400, *schemas.message(e, body)) from None


# ---- one completion request: its choices in the engine ---------------------------------------------------------------
@dataclass
class Job:
    """A request's choices in the engine and what its response needs."""

    subs: list  # (engine request, queue) per choice; choice j belongs to prompt j // n
    head: dict  # id, object, created, model: the start of every response and chunk
    chat: bool
    tools: list | None  # the tools the prompt shows (chat), whose calls are parsed from the output
    echoes: list[str] | None  # per choice: the completions API's echoed prompt text
    n_prompt: int  # prompt tokens, all prompts together
    t0: float  # perf_counter at submission, for the latency metric
    as_ids: bool = False  # return_tokens_as_token_ids: logprobs name tokens "token_id:<id>"


async def _complete(request: Request, chat: bool):
    svc = _service(request)
    body = await _body(request, svc, ChatCompletionRequest if chat else CompletionRequest)
    job = await _start(svc, body)
    if body.stream:
        return StreamingResponse(_stream(svc, request, job, body.include_usage), media_type="text/event-stream")
    try:
        return await _respond(svc, request, job)
    except BaseException:  # whatever failed, nothing of it keeps generating
        svc.cancel_all(job.subs)
        raise


async def _start(svc: Service, body: schemas.RequestBody) -> Job:
    """Check what needs the server's state (every APIError before anything reaches the engine) and submit."""
    chat = isinstance(body, ChatCompletionRequest)
    svc.check_model(body)
    params, n, explicit = svc.sampling(body)
    prompts, pixels, tools = await svc.prompts(body)  # tokenized, images decoded, off the event loop
    echoes = None if chat else svc.echoes(body)  # per prompt
    per_prompt = [svc.check_length(ids, params, explicit) for ids in prompts]
    t0 = time.perf_counter()
    subs = svc.start(prompts, per_prompt, n, pixels)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": svc.name}
    return Job(subs, head, chat, tools, [echoes[j // n] for j in range(len(subs))] if echoes else None,
               sum(len(ids) for ids in prompts), t0, body.return_tokens_as_token_ids)


def _usage(svc: Service, job: Job) -> dict:
    """The finished job's usage, counted in the metrics."""
    done = sum(len(r.output_ids) for r, _ in job.subs)
    svc.metrics.record(job.n_prompt, done, time.perf_counter() - job.t0)
    return {"prompt_tokens": job.n_prompt, "completion_tokens": done, "total_tokens": job.n_prompt + done}


def _logprobs(tok, req, start: int, end: int, chat: bool, offset: int = 0, as_ids: bool = False) -> tuple[dict, int]:
    """Tokens start..end of a request's logprobs in OpenAI's shape (chat's `content` list, or the completions API's
    legacy columns, whose `text_offset` counts characters of the completion from `offset`), and the characters of
    their text. `as_ids` (vLLM's return_tokens_as_token_ids): every token, chosen or alternative, is named
    "token_id:<id>", so a trainer reads the ids the engine sampled (the stop token too) without re-tokenizing text
    that may not map back to them (a token holding part of a UTF-8 character decodes to U+FFFD)."""
    items = req.logprobs[start:end]
    texts = [tok.decode([lp["token"]]) for lp in items]

    def name(t: int, text: str | None = None) -> str:
        return f"token_id:{t}" if as_ids else text if text is not None else tok.decode([t])

    chars = sum(len(t) for t in texts)
    if chat:
        return {"content": [{"token": name(lp["token"], text), "logprob": lp["logprob"], "bytes": None,
                             "top_logprobs": [{"token": name(t), "logprob": v, "bytes": None} for t, v in lp["top"]]}
                            for lp, text in zip(items, texts, strict=True)]}, chars
    offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=offset))[:len(texts)]
    return {"tokens": [name(lp["token"], text) for lp, text in zip(items, texts, strict=True)],
            "token_logprobs": [lp["logprob"] for lp in items],
            "top_logprobs": [{name(t): v for t, v in lp["top"]} for lp in items], "text_offset": offsets}, chars


# ---- the whole answer at once ----------------------------------------------------------------------------------------
async def _collect(req, queue, is_disconnected=None):
    """Wait for a request to finish; False if the client left first."""
    while not req.finished:
        try:
            await asyncio.wait_for(queue.get(), timeout=0.25)
        except TimeoutError:
            if is_disconnected is not None and await is_disconnected():
                return False
    return True


async def _respond(svc: Service, request: Request, job: Job):
    """The non-streamed response: every choice once all have finished (499 and cancelled if the client leaves)."""
    for req, queue in job.subs:
        if not await _collect(req, queue, request.is_disconnected):
            svc.cancel_all(job.subs)
            return JSONResponse({}, status_code=499)
    failed = next((r for r, _ in job.subs if r.finish_reason == "error"), None)
    if failed is not None:
        raise APIError(500, failed.error, code="engine_error", kind="server_error")
    choices = [_choice(svc, job, i, req) for i, (req, _) in enumerate(job.subs)]
    return {**job.head, "choices": choices, "usage": _usage(svc, job)}


def _choice(svc: Service, job: Job, i: int, req) -> dict:
    """Choice i of a finished job: a chat message (with the tool calls parsed from its text) or a completion."""
    lp = _logprobs(svc.tokenizer, req, 0, len(req.logprobs), job.chat, as_ids=job.as_ids)[0] \
        if req.params.logprobs else None
    if not job.chat:
        text = (job.echoes[i] if job.echoes else "") + req.text
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": req.finish_reason}
    parsed = parse_tool_calls(req.text, job.tools) if job.tools else None
    msg = {"role": "assistant", "content": parsed.content if parsed else req.text}
    if parsed and parsed.tool_calls:
        msg["tool_calls"] = parsed.tool_calls
    reason = finish_reason(parsed, req.finish_reason) if parsed else req.finish_reason
    return {"index": i, "message": msg, "logprobs": lp, "finish_reason": reason}


# ---- streaming (SSE) -------------------------------------------------------------------------------------------------
class _StreamedChoice:
    """One choice of a stream: how much of its text and logprobs went out, and its tool-call parser."""

    def __init__(self, i: int, req, queue, tools: list | None, as_ids: bool = False):
        self.i, self.req, self.queue, self.as_ids = i, req, queue, as_ids
        self.parser = ToolCallStreamParser(tools) if tools else None
        self.fed = 0  # characters of the request's text passed on so far
        self.sent = 0  # logprobs sent
        self.offset = 0  # characters of the tokens whose logprobs were sent (the completions API's text_offset)

    async def next_delta(self, request: Request) -> tuple[str, bool] | None:
        """(text delta, finished) when there is news within a short wait, else None."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout=0.05)
        except TimeoutError:
            if await request.is_disconnected():
                raise asyncio.CancelledError from None
            if not self.req.finished:
                return None
            # The engine thread sets finish_reason before its last deltas reach the queue: take the rest from the
            # request's final text, or it would be lost.
            return self.req.text[self.fed:], True

    def piece(self, tok, delta: str, finished: bool, chat: bool) -> tuple[dict | None, list]:
        """The chunk choice for a delta (None when there is nothing to send), and the tool calls parsed at the end."""
        req = self.req
        self.fed += len(delta)
        lp = None
        if req.params.logprobs:
            lp, chars = _logprobs(tok, req, self.sent, len(req.logprobs), chat, self.offset, self.as_ids)
            self.offset += chars
        self.sent = len(req.logprobs)
        calls = []
        if self.parser is not None:
            delta = self.parser.feed(delta).content
            if finished:
                end = self.parser.finish()
                delta, calls = delta + end.content, end.tool_calls
        if not (delta or lp or calls):
            return None, calls
        d = {"content": delta} if chat else None
        if calls:  # OpenAI sends content null beside tool-call deltas
            d = {"content": delta or None, "tool_calls": calls}
        choice = {"index": self.i, "delta": d} if chat else {"index": self.i, "text": delta}
        return {**choice, "logprobs": lp, "finish_reason": None}, calls


async def _stream(svc: Service, request: Request, job: Job, include_usage: bool):
    """The job as server-sent events: a first chunk (the role, or the echoed prompts), each choice's deltas as they
    come, a last chunk per choice with its finish_reason, usage if asked, `data: [DONE]`. An engine failure, or any
    exception here (the 200 is already out), ends the stream with an error event and `data: [DONE]`, and cancels
    every choice; so does a client that leaves (without the events)."""
    kind = "chat.completion.chunk" if job.chat else "text_completion"

    def event(choices, **extra) -> str:
        return f"data: {json.dumps({**job.head, 'object': kind, 'choices': choices, **extra})}\n\n"

    try:
        streams = [_StreamedChoice(i, req, queue, job.tools, job.as_ids) for i, (req, queue) in enumerate(job.subs)]
        if job.chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(len(streams))])
        elif job.echoes:
            yield event([{"index": i, "text": e, "logprobs": None, "finish_reason": None}
                         for i, e in enumerate(job.echoes)])
        live = set(range(len(streams)))
        while live:
            for i in sorted(live):
                s = streams[i]
                news = await s.next_delta(request)
                if news is None:
                    continue
                finished = news[1]
                choice, calls = s.piece(svc.tokenizer, *news, job.chat)
                if choice is not None:
                    yield event([choice])
                if finished and s.req.finish_reason == "error":  # OpenAI's clients raise on an error event
                    for line in _stream_error(svc, job, APIError(500, s.req.error, code="engine_error",
                                                                 kind="server_error")):
                        yield line
                    return
                if finished and s.req.finished:
                    empty = {"index": i, "delta": {}} if job.chat else {"index": i, "text": ""}
                    reason = "tool_calls" if calls else s.req.finish_reason
                    yield event([{**empty, "logprobs": None, "finish_reason": reason}])
                    live.discard(i)
        usage = _usage(svc, job)
        if include_usage:
            yield event([], usage=usage)
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        svc.cancel_all(job.subs)  # the client left: free the rows now
        raise
    except Exception as e:
        log.exception("a stream failed after its 200")
        for line in _stream_error(svc, job, APIError(500, f"the stream failed ({type(e).__name__}); the server's "
                                                          "log has the details", code="internal_error",
                                                     kind="server_error")):
            yield line


def _stream_error(svc: Service, job: Job, err: APIError) -> list[str]:
    """A stream's end after a failure: its generations cancelled, the error counted, an error event, [DONE]."""
    svc.cancel_all(job.subs)
    svc.metrics.count_error()
    return [f"data: {json.dumps(err.body())}\n\n", "data: [DONE]\n\n"]
