"""The OpenAI-compatible HTTP API over the engine (FastAPI): /v1/models, /v1/chat/completions, /v1/completions,
/v1/weights (a trainer's weight pushes, herd.serve.weights), /v1/moderations (with --guard: herd.serve.guarding),
/health, /metrics.

Request and response shapes follow OpenAI's API reference (platform.openai.com/docs/api-reference): SSE streaming
ending in `data: [DONE]`, `stream_options.include_usage`, usage counts, finish_reason stop / length / tool_calls,
`max_tokens` and `max_completion_tokens` as aliases, `n`, `seed`, `stop`, `logprobs` / `top_logprobs` (the
completions API: `logprobs` N and its legacy columns; with `echo`, the prompt's tokens first, and `max_tokens` 0
only scores the prompt: herd.serve.scoring), `logit_bias`, a batch of prompts in one /v1/completions
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
keeps to HTTP (bodies, errors, routes), and herd.serve.completion runs a completion request and writes OpenAI's response
and chunk shapes and the SSE stream. `create_app(service)` puts the routes and the Service together.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from herd.serve import completion, schemas
from herd.serve.schemas import ChatCompletionRequest, CompletionRequest, ModerationRequest, WeightsRequest
from herd.serve.service import APIError, Service

log = logging.getLogger("herd.serve")

DRAIN_BYTES = 64 * 2**20  # how much of an oversized body is read and dropped so that its sender sees the 413
PAGE = Path(__file__).parent / "static" / "index.html"

BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
          "/v1/weights": WeightsRequest, "/v1/moderations": ModerationRequest}

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


@router.post("/v1/moderations")
async def moderations(request: Request):
    """OpenAI's moderation endpoint, answered by the server's Llama Guard (404 without --guard)."""
    svc = _service(request)
    return await svc.moderate(await _body(request, svc, ModerationRequest))


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


# ---- a completion request (herd.serve.completion) -------------------------------------------------------------------
async def _complete(request: Request, chat: bool):
    svc = _service(request)
    body = await _body(request, svc, ChatCompletionRequest if chat else CompletionRequest)
    job = await completion.start(svc, body)
    if body.stream:
        return StreamingResponse(completion.stream(svc, request, job, body.include_usage),
                                 media_type="text/event-stream")
    try:
        return await completion.respond(svc, request, job)
    except BaseException:  # whatever failed, nothing of it keeps generating
        svc.cancel_all(job.subs)
        raise
