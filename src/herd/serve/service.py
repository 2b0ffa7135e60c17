"""What a request needs besides HTTP: the Service (the ServeConfig's limits, model name, tokenizer, engine worker,
metrics) and the way an OpenAI request body becomes engine inputs: sampling parameters, prompt token ids, images,
tools.

Every check here raises APIError with OpenAI's error shape and the matching status before anything reaches the
engine: invalid sampling values, unknown model, prompts longer than the context, too many or too large images, local
image paths outside the operator's media folder, tool_choice values herd cannot honour, a missing API key, more
generations in flight than the server takes. herd.serve.app calls only the Service's public methods (the routes
never reach the worker) and turns the results into HTTP responses.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from herd.infer.sampling import SamplingParams

if TYPE_CHECKING:
    from herd.serve.serve_config import ServeConfig

MAX_N = 8
MAX_PROMPTS = 32  # prompts in one /v1/completions request


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Metrics:
    """The counters and the latency summary that /metrics shows (Prometheus' text format)."""

    def __init__(self):
        self.requests, self.errors, self.prompt_tokens, self.completion_tokens = 0, 0, 0, 0
        self.latencies: deque[float] = deque(maxlen=1000)  # the quantiles are over the latest 1000 requests

    def count_request(self) -> None:
        self.requests += 1

    def count_error(self) -> None:
        self.errors += 1

    def record(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        """A request that ran to its end: its token counts and latency."""
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.latencies.append(seconds)

    def text(self, queue_length: int, running: int) -> str:
        lat = sorted(self.latencies)
        q = {p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0 for p in (0.5, 0.9, 0.99)}
        lines = ["# TYPE herd_requests_total counter", f"herd_requests_total {self.requests}",
                 "# TYPE herd_request_errors_total counter", f"herd_request_errors_total {self.errors}",
                 "# TYPE herd_prompt_tokens_total counter", f"herd_prompt_tokens_total {self.prompt_tokens}",
                 "# TYPE herd_completion_tokens_total counter",
                 f"herd_completion_tokens_total {self.completion_tokens}",
                 "# TYPE herd_queue_length gauge", f"herd_queue_length {queue_length}",
                 "# TYPE herd_running_requests gauge", f"herd_running_requests {running}",
                 "# TYPE herd_request_latency_seconds summary"]
        lines += [f'herd_request_latency_seconds{{quantile="{p}"}} {v:.6f}' for p, v in q.items()]
        return "\n".join(lines) + "\n"


def _number(body: dict, key: str, default, kind=float, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not isinstance(v, int)):
        raise APIError(400, f"{key} must be a{'n integer' if kind is int else ' number'}, got {v!r}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"{key} must be in [{lo}, {hi}], got {v}", key)
    return v


def sampling_params(body: dict, defaults: dict, context: int, chat: bool = True) -> tuple[SamplingParams, int, bool]:
    """SamplingParams, n, and whether max_tokens was given, from an OpenAI request body (400 for a bad value).
    Without max_tokens a request may generate up to the end of the context (check_length fits it)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, int, 1, context)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and
                                                             all(isinstance(s, str) for s in stop))):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if chat:  # chat: logprobs true/false, top_logprobs 0-20
        logprobs = body.get("logprobs") or False
        if not isinstance(logprobs, bool):
            raise APIError(400, f"logprobs must be true or false, got {logprobs!r}", "logprobs")
        top = _number(body, "top_logprobs", 0, int, 0, 20)
    else:  # the legacy completions API: logprobs is the number of alternatives (0-5 at OpenAI; vLLM allows 20)
        top = _number(body, "logprobs", None, int, 0, 20)
        logprobs, top = top is not None, top or 0
    # vLLM's extensions to the OpenAI body, which clients send through `extra_body`
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos")
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict) or not all(isinstance(k, str) and k.isdigit() for k in bias):
        raise APIError(400, "logit_bias must map token ids (as strings) to numbers in [-100, 100]", "logit_bias")
    bias = {int(k): v for k, v in bias.items()}
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise APIError(400, f"response_format {fmt!r} needs constrained decoding, which this server does not do; "
                            "only {\"type\": \"text\"} is accepted", "response_format")
    stop_ids = body.get("stop_token_ids") or []
    if not (isinstance(stop_ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)):
        raise APIError(400, "stop_token_ids must be a list of token ids", "stop_token_ids")
    try:
        params = SamplingParams(
            temperature=_number(body, "temperature", defaults.get("temperature", 1.0), float, 0, 2),
            top_p=_number(body, "top_p", defaults.get("top_p", 1.0), float, 0, 1),
            top_k=body.get("top_k", defaults.get("top_k")),
            presence_penalty=_number(body, "presence_penalty", 0.0, float, -2, 2),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, float, -2, 2),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, float, 0.01, 10),
            min_p=_number(body, "min_p", 0.0, float, 0, 1), ignore_eos=ignore_eos, stop_token_ids=stop_ids,
            logit_bias=bias,
            seed=_number(body, "seed", None, int), max_new_tokens=max_tokens or context,
            stop=stop, logprobs=logprobs or top > 0, top_logprobs=top)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return params, _number(body, "n", 1, int, 1, MAX_N), max_tokens is not None


def tools_for(choice, tools: list) -> list | None:
    """The tools the prompt shows, by OpenAI's `tool_choice`: "auto" (the default with tools) all of them, "none"
    none, {"type": "function", "function": {"name": N}} only N. herd does not constrain decoding, so no choice can
    force a call: a named choice makes the model see only that function (and only its calls are parsed), and
    "required", which promises a call, is refused rather than silently not kept."""
    if choice in (None, "auto"):
        return tools or None
    if choice == "none":
        return None
    if not tools:
        raise APIError(400, "tool_choice needs tools", "tool_choice")
    if choice == "required":
        raise APIError(400, "tool_choice \"required\" needs constrained decoding, which this server does not do; "
                            "use \"auto\" or name the function", "tool_choice")
    name = ((choice.get("function") or {}).get("name") if isinstance(choice, dict) and
            choice.get("type") == "function" else None)
    if not isinstance(name, str):
        raise APIError(400, f"tool_choice must be \"none\", \"auto\" or {{\"type\": \"function\", \"function\": "
                            f"{{\"name\": ...}}}}, got {choice!r}", "tool_choice")
    named = [t for t in tools if isinstance(t, dict) and (t.get("function") or {}).get("name") == name]
    if not named:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return named


class Service:
    """Everything a request needs: the serving config's limits, the model's name and context, the tokenizer, the
    generation defaults, the engine worker (`worker`: for the server's shutdown, never for the routes), the metrics.
    """

    def __init__(self, config: ServeConfig, worker, tokenizer, defaults: dict | None = None):
        self.config, self.worker, self.tokenizer, self.defaults = config, worker, tokenizer, defaults or {}
        model = worker.engine.model
        self.text_config, self.vision_config = model.text_config, model.vision_config
        self.context = self.text_config.max_position_embeddings
        self.name = config.name or Path(config.model).resolve().name
        self.media_dir = Path(config.media_dir).resolve() if config.media_dir else None
        self.metrics = Metrics()
        self.created = int(time.time())

    # ---- who may ask, for which model ------------------------------------------------------------------------------
    def authorize(self, headers: Mapping[str, str]) -> None:
        """401 unless the request's headers carry the API key (when the server has one)."""
        key = self.config.api_key
        if key is not None and headers.get("authorization") != f"Bearer {key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key",
                           kind="authentication_error")

    def check_model(self, body: dict) -> None:
        if body.get("model") not in (self.name, None):
            raise APIError(404, f"the model {body.get('model')!r} does not exist; this server has {self.name!r}",
                           "model", "model_not_found")

    def model_card(self) -> dict:
        """This server's one model, as /v1/models lists it."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "herd",
                "max_model_len": self.context}

    # ---- request -> (prompt ids, images, params) ------------------------------------------------------------------
    def sampling(self, body: dict, chat: bool) -> tuple[SamplingParams, int, bool]:
        """sampling_params with this model's generation defaults and context."""
        return sampling_params(body, self.defaults, self.context, chat)

    def _images(self, messages: list) -> None:
        from herd.chat import collect_images

        sources = collect_images(messages)
        if not sources:
            return
        limit, max_bytes = self.config.max_images, self.config.max_image_bytes
        if self.vision_config is None:
            raise APIError(400, "this model is text-only: it cannot take image_url parts", "messages")
        if len(sources) > limit:
            raise APIError(400, f"too many images: {len(sources)} (at most {limit})", "messages")
        for s in sources:
            if not isinstance(s, str):
                raise APIError(400, "an image_url must be a string", "messages")
            if s.startswith("data:"):
                if len(s) * 3 // 4 > max_bytes:
                    raise APIError(413, f"an image is larger than {max_bytes} bytes", "messages")
                continue
            if s.startswith(("http://", "https://")):
                raise APIError(400, "remote image URLs are not fetched: send the image as a data: URL", "messages")
            path = Path(s).resolve()
            if self.media_dir is None or self.media_dir not in path.parents:
                raise APIError(400, "local image paths are not allowed (the server has no --media-dir for them)",
                               "messages")
            if path.is_file() and path.stat().st_size > max_bytes:
                raise APIError(413, f"an image is larger than {max_bytes} bytes", "messages")

    def chat_prompt(self, body: dict):
        """(prompt ids, pixel values or None, the tools the prompt shows or None) of a chat request."""
        from herd.chat import prepare_chat, tiling
        from herd.image import ImageError

        messages, tools = body.get("messages"), body.get("tools")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m
                                                                      for m in messages):
            raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
        if tools is not None and not isinstance(tools, list):
            raise APIError(400, "tools must be a list", "tools")
        use_tools = tools_for(body.get("tool_choice"), tools or [])
        self._images(messages)
        kw = tiling(self.vision_config)
        try:
            ids, batch = prepare_chat(messages, self.tokenizer, tools=use_tools, **kw)
        except ImageError as e:
            raise APIError(400, f"could not decode an image: {e}", "messages") from None
        except (ValueError, TypeError, KeyError) as e:
            raise APIError(400, f"bad messages: {e}", "messages") from None
        return ids, batch.pixel_values if batch is not None else None, use_tools

    def completion_prompts(self, body: dict) -> list[list[int]]:
        """`prompt`: a string, token ids, or a list of either (a batch: each gets `n` choices, in order)."""
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
            prompt = [prompt]
        if not (isinstance(prompt, list) and 0 < len(prompt) <= MAX_PROMPTS and all(
                isinstance(p, str) or (isinstance(p, list) and p and all(_is_id(t) for t in p)) for p in prompt)):
            raise APIError(400, f"prompt must be a string, a list of token ids, or a list of at most {MAX_PROMPTS} "
                                "of either", "prompt")
        return [p if isinstance(p, list) else [self.tokenizer.bos_id] + self.tokenizer.encode(p) for p in prompt]

    def echoes(self, body: dict) -> list[str] | None:
        """The completions API's `echo`: each prompt's text, to put before its choices' text (None without echo).
        `suffix` (insertion) and `best_of` > 1 are refused rather than ignored, as vLLM refuses `suffix`."""
        if body.get("suffix") is not None:
            raise APIError(400, "suffix is not supported", "suffix")
        if body.get("best_of") not in (None, 1):
            raise APIError(400, "best_of is not supported; use n", "best_of")
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise APIError(400, f"echo must be true or false, got {echo!r}", "echo")
        if not echo:
            return None
        if body.get("logprobs") is not None:
            raise APIError(400, "echo with logprobs (the prompt's logprobs) is not supported", "echo")
        prompt = body["prompt"]
        prompts = [prompt] if isinstance(prompt, str) or all(_is_id(t) for t in prompt) else prompt
        return [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]

    def check_length(self, ids: list[int], params: SamplingParams, explicit: bool) -> SamplingParams:
        """`params` for this prompt: max_new_tokens cut to the context left (400 when nothing is left, or when an
        explicit max_tokens does not fit)."""
        room = self.context - len(ids)
        if room <= 0 or (explicit and params.max_new_tokens > room):
            raise APIError(400, f"the prompt is {len(ids)} tokens" + (f" and max_tokens {params.max_new_tokens}"
                                                                        if explicit else "")
                           + f": more than the model's context of {self.context}",
                           "messages", "context_length_exceeded")
        return dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room))

    # ---- the engine ------------------------------------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return self.worker.queue_length

    @property
    def running(self) -> int:
        return self.worker.running

    @property
    def in_flight(self) -> int:
        """Unfinished generations in the engine: waiting or decoding."""
        return self.worker.queue_length + self.worker.running

    def submit(self, ids: list[int], params: SamplingParams, pixels=None):
        """(engine request, asyncio queue of (text delta, finished)); ValueError for a prompt the engine refuses."""
        return self.worker.submit(ids, params, pixels)

    def cancel(self, req) -> None:
        self.worker.cancel(req)

    def start(self, prompts: list[list[int]], params: list[SamplingParams], n: int, pixels=None) -> list:
        """Submit `n` choices of each prompt (with its own params), in order; returns their (request, queue) pairs.
        429 when they would take the generations in flight past max_concurrent; 400 (and nothing left running) for
        what the engine's own checks refuse (an empty prompt, the context, images on a text model)."""
        in_flight, limit = self.in_flight, self.config.max_concurrent
        if in_flight + n * len(prompts) > limit:
            raise APIError(429, f"the server is busy: {in_flight} generations in flight (at most {limit}); retry "
                                "later", kind="rate_limit_error")
        self.metrics.count_request()
        subs = []
        try:
            for ids, p in zip(prompts, params, strict=True):
                # choice i of a seeded request draws with seed + i (vLLM's rule): n different, reproducible answers
                subs += [self.submit(ids, p if p.seed is None else dataclasses.replace(p, seed=p.seed + i), pixels)
                         for i in range(n)]
        except ValueError as e:
            self.cancel_all(subs)
            raise APIError(400, str(e)) from None
        return subs

    def cancel_all(self, subs: list) -> None:
        for req, _ in subs:
            self.cancel(req)

    def metrics_text(self) -> str:
        return self.metrics.text(self.queue_length, self.running)
