"""The OpenAI-compatible HTTP API over the engine (FastAPI): /v1/models, /v1/chat/completions, /v1/completions,
/health, /metrics.

Request and response shapes follow OpenAI's API (spec: serving-and-safety.md): SSE streaming ending in `data:
[DONE]`, `stream_options.include_usage`, usage counts, finish_reason stop / length / tool_calls, `max_tokens` and
`max_completion_tokens` as aliases, `n`, `seed`, `stop`, `logprobs` / `top_logprobs` (the completions API:
`logprobs` N and its legacy columns), `logit_bias`, a batch of prompts in one /v1/completions request (n choices
each, in order), tools (parsed from the output by herd.tools), images as `image_url` parts (data: URLs; file paths
only inside the operator's `media_dir`), and vLLM's extras `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids` (the openai client sends them through `extra_body`). Errors use OpenAI's shape {"error":
{"message", "type", "param", "code"}} with the matching status, and a bad request never takes the server down. A
`response_format` other than text, and tool_choice "required", need constrained decoding, which herd does not do:
they get 400 rather than being silently ignored. A client that disconnects mid-stream cancels its requests. A
generation that fails inside the engine answers 500 (type "server_error"; in a stream, an error event before `data:
[DONE]`) and the server goes on. A request cancelled by a graceful shutdown ends with finish_reason "cancelled".
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from herd.serve.service import APIError, Service, sampling_params
from herd.tools import ToolCallStreamParser, finish_reason, parse_tool_calls

DRAIN_BYTES = 64 * 2**20  # how much of an oversized body is read and dropped so that its sender sees the 413


def _logprobs(tok, req, start: int, end: int, chat: bool, offset: int = 0) -> dict:
    """Tokens start..end of a request's logprobs in OpenAI's shape: chat's `content` list, or the completions API's
    legacy columns (`text_offset` counts characters of the completion from `offset`)."""
    items = req.logprobs[start:end]
    if chat:
        return {"content": [{"token": tok.decode([lp["token"]]), "logprob": lp["logprob"], "bytes": None,
                             "top_logprobs": [{"token": tok.decode([t]), "logprob": v, "bytes": None}
                                              for t, v in lp["top"]]} for lp in items]}
    tokens = [tok.decode([lp["token"]]) for lp in items]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))[:len(tokens)]
    return {"tokens": tokens, "token_logprobs": [lp["logprob"] for lp in items],
            "top_logprobs": [{tok.decode([t]): v for t, v in lp["top"]} for lp in items], "text_offset": offsets}


async def _collect(req, queue, is_disconnected=None):
    """Wait for a request to finish (cancelling it if the client leaves)."""
    while not req.finished:
        try:
            await asyncio.wait_for(queue.get(), timeout=0.25)
        except TimeoutError:
            if is_disconnected is not None and await is_disconnected():
                return False
    return True


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="herd", docs_url=None, redoc_url=None)
    svc = service

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        svc.metrics.errors += 1
        return JSONResponse(e.body(), status_code=e.status)

    def authorize(request: Request) -> None:
        if svc.api_key is not None and request.headers.get("authorization") != f"Bearer {svc.api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key",
                           kind="authentication_error")

    async def read_limited(request: Request) -> bytes:
        """The body, read in chunks and kept only up to the size limit (a chunked upload declares no length). An
        oversized body is still read on and discarded, up to DRAIN_BYTES more: answering 413 while the client is
        still sending would close the connection under it, and it would see a reset instead of the 413."""
        limit = svc.max_request_bytes
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

    async def body_of(request: Request) -> dict:
        authorize(request)
        raw = await read_limited(request)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    page = (Path(__file__).parent / "static" / "index.html").read_text()

    @app.get("/")
    async def index():
        return HTMLResponse(page)  # the web chat (static HTML + JS over this API)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(svc.metrics.text(svc.worker))

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": svc.name, "object": "model", "created": svc.created,
                                            "owned_by": "herd", "max_model_len": svc.cfg.max_position_embeddings}]}

    async def run(request: Request, body: dict, chat: bool):
        svc._check_model(body)
        params, n, explicit = sampling_params(body, svc.defaults, svc.cfg.max_position_embeddings, chat)
        if chat:
            ids, pixels, tools = svc.chat_prompt(body)
            prompts = [ids]
        else:
            prompts, pixels, tools = svc.completion_prompts(body), None, None
        echoes = None if chat else svc.echoes(body)  # per prompt; choice j belongs to prompt j // n
        per_prompt = [svc.check_length(ids, params, explicit) for ids in prompts]
        in_flight = svc.worker.queue_length + svc.worker.running  # unfinished generations in the engine
        if in_flight + n * len(prompts) > svc.max_concurrent:
            raise APIError(429, f"the server is busy: {in_flight} generations in flight (at most "
                                f"{svc.max_concurrent}); retry later", kind="rate_limit_error")
        svc.metrics.requests += 1
        t0 = time.perf_counter()
        subs = []
        try:
            for ids, p in zip(prompts, per_prompt, strict=True):
                # choice i of a seeded request draws with seed + i (vLLM's rule): n different, reproducible answers
                subs += [svc.worker.submit(ids, p if p.seed is None else dataclasses.replace(p, seed=p.seed + i),
                                           pixels) for i in range(n)]
        except ValueError as e:  # the engine's own checks (empty prompt, context, images on a text model)
            for r, _ in subs:
                svc.worker.cancel(r)
            raise APIError(400, str(e)) from None
        n_prompt = sum(len(ids) for ids in prompts)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": svc.name}
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            heads = [echoes[j // n] for j in range(len(subs))] if echoes else None
            return StreamingResponse(_stream(request, subs, head, chat, tools, usage, n_prompt, t0, heads),
                                     media_type="text/event-stream")
        for req, queue in subs:
            if not await _collect(req, queue, request.is_disconnected):
                for r, _ in subs:
                    svc.worker.cancel(r)
                return JSONResponse({}, status_code=499)
        failed = next((r for r, _ in subs if r.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(500, failed.error, code="engine_error", kind="server_error")
        choices = []
        for i, (req, _) in enumerate(subs):
            lp = _logprobs(svc.tok, req, 0, len(req.logprobs), chat) if req.params.logprobs else None
            if chat:
                parsed = parse_tool_calls(req.text, tools) if tools else None
                msg = {"role": "assistant", "content": parsed.content if parsed else req.text}
                if parsed and parsed.tool_calls:
                    msg["tool_calls"] = parsed.tool_calls
                reason = finish_reason(parsed, req.finish_reason) if parsed else req.finish_reason
                choices.append({"index": i, "message": msg, "logprobs": lp, "finish_reason": reason})
            else:
                text = (echoes[i // n] if echoes else "") + req.text
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": req.finish_reason})
        done = sum(len(r.output_ids) for r, _ in subs)
        svc.metrics.prompt_tokens += n_prompt
        svc.metrics.completion_tokens += done
        svc.metrics.latencies.append(time.perf_counter() - t0)
        return {**head, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done}}

    async def _stream(request, subs, head, chat, tools, include_usage, n_prompt, t0, echoes=None):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices, **extra) -> str:
            return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **extra})}\n\n"

        parsers = [ToolCallStreamParser(tools) if tools else None for _ in subs]
        sent = [0] * len(subs)
        fed = [0] * len(subs)  # characters of each request's text passed on so far
        offs = [0] * len(subs)  # characters of the tokens whose logprobs were sent (the completions API's offsets)
        if chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(len(subs))])
        elif echoes:
            yield event([{"index": i, "text": e, "logprobs": None, "finish_reason": None}
                         for i, e in enumerate(echoes)])
        try:
            live = set(range(len(subs)))
            while live:
                for i in sorted(live):
                    req, queue = subs[i]
                    try:
                        delta, finished = await asyncio.wait_for(queue.get(), timeout=0.05)
                    except TimeoutError:
                        if await request.is_disconnected():
                            raise asyncio.CancelledError from None
                        finished = req.finished
                        if not finished:
                            continue
                        # The engine thread sets finish_reason before its last deltas reach the queue: take the rest
                        # from the request's final text, or it would be lost.
                        delta = req.text[fed[i]:]
                    fed[i] += len(delta)
                    lp = None
                    if req.params.logprobs:
                        lp = _logprobs(svc.tok, req, sent[i], len(req.logprobs), chat, offs[i])
                        offs[i] += 0 if chat else sum(len(t) for t in lp["tokens"])
                    sent[i] = len(req.logprobs)
                    calls = []
                    if parsers[i] is not None:
                        out = parsers[i].feed(delta)
                        delta = out.content
                        if finished:
                            end = parsers[i].finish()
                            delta, calls = delta + end.content, end.tool_calls
                    if delta or lp or calls:
                        d = {"content": delta} if chat else None
                        if calls:  # OpenAI sends content null beside tool-call deltas
                            d = {"content": delta or None, "tool_calls": calls}
                        choice = {"index": i, "delta": d} if chat else {"index": i, "text": delta}
                        yield event([{**choice, "logprobs": lp, "finish_reason": None}])
                    if finished and req.finish_reason == "error":  # OpenAI's clients raise on an error event
                        svc.metrics.errors += 1
                        for r, _ in subs:
                            svc.worker.cancel(r)
                        err = APIError(500, req.error, code="engine_error", kind="server_error")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    if finished and req.finished:
                        reason = "tool_calls" if calls else req.finish_reason
                        empty = {"index": i, "delta": {}} if chat else {"index": i, "text": ""}
                        yield event([{**empty, "logprobs": None, "finish_reason": reason}])
                        live.discard(i)
        except (asyncio.CancelledError, GeneratorExit):
            for req, _ in subs:
                svc.worker.cancel(req)  # the client left: free the rows now
            raise
        done = sum(len(r.output_ids) for r, _ in subs)
        svc.metrics.prompt_tokens += n_prompt
        svc.metrics.completion_tokens += done
        svc.metrics.latencies.append(time.perf_counter() - t0)
        if include_usage:
            yield event([], usage={"prompt_tokens": n_prompt, "completion_tokens": done,
                                   "total_tokens": n_prompt + done})
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, await body_of(request), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, await body_of(request), chat=False)

    return app
