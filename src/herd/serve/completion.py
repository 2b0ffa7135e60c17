"""One completion request in the engine, from its validated body to OpenAI's answer: `start` submits its choices
(a `Job`), then `respond` gives the whole response once every choice has finished, or `stream` gives it as server-sent
events while they generate. herd.serve.app reads and checks the HTTP request and calls these; the shapes (choices,
chunks, usage, logprobs, tool calls, errors in a stream) follow OpenAI's API reference
(platform.openai.com/docs/api-reference), as that module's docstring lists. With --guard, herd.serve.guarding
scans each prompt before it is submitted and each answer before it goes out (in windows, when streamed); a blocked
choice answers the refusal text with finish_reason "content_filter".
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import JSONResponse

from herd.safety import ScanResult
from herd.serve import schemas, scoring
from herd.serve.guarding import StreamGate, conversations
from herd.serve.schemas import ChatCompletionRequest
from herd.serve.service import APIError, Service
from herd.tools import MARKERS, ToolCallStreamParser, finish_reason, parse_tool_calls

log = logging.getLogger("herd.serve")


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
    prompt_lps: list[dict] | None = None  # per choice: echo with logprobs, the prompt's columns (herd.serve.scoring)
    convos: list[list[dict]] | None = None  # per choice with --guard: the conversation its answer is judged in
    blocked: list[ScanResult | None] | None = None  # per choice with --guard: the scan that blocked it, if any


async def start(svc: Service, body: schemas.RequestBody) -> Job:
    """Check what needs the server's state (every APIError before anything reaches the engine) and submit."""
    chat = isinstance(body, ChatCompletionRequest)
    svc.check_model(body)
    params, n, explicit = svc.sampling(body)
    prompts, pixels, tools = await svc.prompts(body)  # tokenized, images decoded, off the event loop
    echoes = None if chat else svc.echoes(body)  # per prompt
    if tools:  # a code-interpreter call is <|python_start|>code<|python_end|>: herd.tools needs the markers' text
        params = replace(params, keep_special=MARKERS)
    per_prompt = [svc.check_length(ids, params, explicit) for ids in prompts]
    convos = verdicts = None
    if svc.guarding is not None:  # blocked prompts are never generated from (their choices finish at once)
        convos = conversations(body, chat, svc.tokenizer)
        verdicts = await svc.guarding.prompts(convos)
    scored = None if chat else await svc.prompt_logprobs(body, prompts)  # echo with logprobs
    t0 = time.perf_counter()
    subs = svc.start(prompts, per_prompt, n, pixels, generate=body.limit != 0,
                     skip=[v is not None for v in verdicts] if verdicts else None)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": svc.name}
    return Job(subs, head, chat, tools, [echoes[j // n] for j in range(len(subs))] if echoes else None,
               sum(len(ids) for ids in prompts), t0, body.return_tokens_as_token_ids,
               [scored[j // n] for j in range(len(subs))] if scored else None,
               [convos[j // n] for j in range(len(subs))] if convos else None,
               [verdicts[j // n] for j in range(len(subs))] if verdicts else None)


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


async def respond(svc: Service, request: Request, job: Job):
    """The non-streamed response: every choice once all have finished (499 and cancelled if the client leaves)."""
    for req, queue in job.subs:
        if not await _collect(req, queue, request.is_disconnected):
            svc.cancel_all(job.subs)
            return JSONResponse({}, status_code=499)
    failed = next((r for r, _ in job.subs if r.finish_reason == "error"), None)
    if failed is not None:
        raise APIError(500, failed.error, code="engine_error", kind="server_error")
    guarding = svc.guarding
    if job.blocked and guarding.output is not None:  # each answer judged in its conversation
        for i, (req, _) in enumerate(job.subs):
            if job.blocked[i] is None:
                job.blocked[i] = await guarding.scan("output", [*job.convos[i], {"role": "assistant",
                                                                                 "content": req.text}])
    choices = [_choice(svc, job, i, req) for i, (req, _) in enumerate(job.subs)]
    return {**job.head, "choices": choices, "usage": _usage(svc, job)}


def _choice(svc: Service, job: Job, i: int, req) -> dict:
    """Choice i of a finished job: a chat message (with the tool calls parsed from its text) or a completion."""
    echo = job.echoes[i] if job.echoes else ""  # with echo, text_offset counts from the start of the prompt
    if job.blocked and job.blocked[i] is not None:
        return _refused(svc, job, i, echo)
    lp = _logprobs(svc.tokenizer, req, 0, len(req.logprobs), job.chat, len(echo), job.as_ids)[0] \
        if req.params.logprobs else None
    if job.prompt_lps:
        lp = scoring.join(job.prompt_lps[i], lp)
    if not job.chat:
        return {"index": i, "text": echo + req.text, "logprobs": lp, "finish_reason": req.finish_reason}
    parsed = parse_tool_calls(req.text, job.tools) if job.tools else None
    msg = {"role": "assistant", "content": parsed.content if parsed else req.text}
    if parsed and parsed.tool_calls:
        msg["tool_calls"] = parsed.tool_calls
    reason = finish_reason(parsed, req.finish_reason) if parsed else req.finish_reason
    return {"index": i, "message": msg, "logprobs": lp, "finish_reason": reason}


def _refused(svc: Service, job: Job, i: int, echo: str = "") -> dict:
    """Choice i blocked by the guard: the refusal, finish_reason "content_filter" (OpenAI's value)."""
    refusal = svc.guarding.refusal
    if job.chat:
        return {"index": i, "message": {"role": "assistant", "content": refusal}, "logprobs": None,
                "finish_reason": "content_filter"}
    return {"index": i, "text": echo + refusal, "logprobs": None, "finish_reason": "content_filter"}


# ---- streaming (SSE) -------------------------------------------------------------------------------------------------
class _StreamedChoice:
    """One choice of a stream: how much of its text and logprobs went out, and its tool-call parser."""

    def __init__(self, i: int, req, queue, tools: list | None, as_ids: bool = False, echo: str = ""):
        self.i, self.req, self.queue, self.as_ids = i, req, queue, as_ids
        self.parser = ToolCallStreamParser(tools) if tools else None
        self.fed = 0  # characters of the request's text passed on so far
        self.sent = 0  # logprobs sent
        # characters before the next token whose logprobs go out (the completions API's text_offset; with echo,
        # the echoed prompt's come first)
        self.offset = len(echo)
        self.upto: int | None = None  # with a guard: logprobs go out for at most this many tokens (the rest is held)

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
        end = len(req.logprobs) if self.upto is None else min(self.upto, len(req.logprobs))
        lp = None
        if req.params.logprobs:
            lp, chars = _logprobs(tok, req, self.sent, end, chat, self.offset, self.as_ids)
            self.offset += chars
        self.sent = end
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


async def stream(svc: Service, request: Request, job: Job, include_usage: bool):
    """The job as server-sent events: a first chunk (the role, or the echoed prompts), each choice's deltas as they
    come, a last chunk per choice with its finish_reason, usage if asked, `data: [DONE]`. An engine failure, or any
    exception here (the 200 is already out), ends the stream with an error event and `data: [DONE]`, and cancels
    every choice; so does a client that leaves (without the events)."""
    kind = "chat.completion.chunk" if job.chat else "text_completion"

    def event(choices, **extra) -> str:
        return f"data: {json.dumps({**job.head, 'object': kind, 'choices': choices, **extra})}\n\n"

    try:
        streams = [_StreamedChoice(i, req, queue, job.tools, job.as_ids, job.echoes[i] if job.echoes else "")
                   for i, (req, queue) in enumerate(job.subs)]
        if job.chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(len(streams))])
        elif job.echoes:
            yield event([{"index": i, "text": e, "logprobs": job.prompt_lps[i] if job.prompt_lps else None,
                          "finish_reason": None} for i, e in enumerate(job.echoes)])
        live = set(range(len(streams)))
        for i in [i for i in live if job.blocked and job.blocked[i] is not None]:  # blocked on input
            yield event([_refused_chunk(svc, job, i, svc.guarding.refusal)])
            yield event([_refused_chunk(svc, job, i)])
            live.discard(i)
        gates = {i: StreamGate(svc.guarding, job.convos[i]) for i in live} \
            if job.blocked and svc.guarding.output is not None else {}
        while live:
            for i in sorted(live):
                s = streams[i]
                news = await s.next_delta(request)
                if news is None:
                    continue
                finished = news[1]
                if i in gates:  # release only text that passed the output scan
                    out = await gates[i].feed(*news)
                    if out is None:
                        continue
                    if isinstance(out, ScanResult):  # blocked: stop generating, end the choice cleanly
                        svc.cancel(s.req)
                        yield event([_refused_chunk(svc, job, i)])
                        live.discard(i)
                        continue
                    news, s.upto = (out, finished), None if finished else gates[i].passed
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
    except APIError as e:  # the guard failed on this request
        for line in _stream_error(svc, job, e):
            yield line
    except Exception as e:
        log.exception("a stream failed after its 200")
        for line in _stream_error(svc, job, APIError(500, f"the stream failed ({type(e).__name__}); the server's "
                                                          "log has the details", code="internal_error",
                                                     kind="server_error")):
            yield line


def _refused_chunk(svc: Service, job: Job, i: int, text: str | None = None) -> dict:
    """A blocked choice's chunk: the refusal text (`text`), or its end with finish_reason "content_filter"."""
    if text is not None:
        return {"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None} if job.chat \
            else {"index": i, "text": text, "logprobs": None, "finish_reason": None}
    end = {"index": i, "delta": {}} if job.chat else {"index": i, "text": ""}
    return {**end, "logprobs": None, "finish_reason": "content_filter"}


def _stream_error(svc: Service, job: Job, err: APIError) -> list[str]:
    """A stream's end after a failure: its generations cancelled, the error counted, an error event, [DONE]."""
    svc.cancel_all(job.subs)
    svc.metrics.count_error()
    return [f"data: {json.dumps(err.body())}\n\n", "data: [DONE]\n\n"]
