"""What a request needs besides HTTP: the Service (the ServeConfig's limits, model name, tokenizer, engine worker,
metrics) and the way an OpenAI request body becomes engine inputs: sampling parameters, prompt token ids, images,
tools; and the prompt logprobs that the completions API's `echo` with `logprobs` returns (herd.serve.scoring).

Every check here raises APIError with OpenAI's error shape and the matching status before anything reaches the
engine: unknown model, prompts longer than the context or outside the vocabulary, too many or too large images, local
image paths outside the operator's media folder, pushed weights outside its weights folder or unlike the served
model, what herd cannot honour (tool_choice "required", a response_format,
`suffix`, `best_of`), a missing API key, more generations in flight than the server takes. A body's shape and its
values' bounds were checked before (herd.serve.schemas), so these take typed requests. herd.serve.app calls only
the Service's public methods (the routes never reach the worker) and turns the results into HTTP responses.

Large inputs never stall the server. `prompts` first refuses a prompt whose text is too long for the context by a
bound from its length alone (no tokenizing: Tokenizer.max_token_bytes), and images whose pixels, read from their
headers, exceed the request's budget (`max_image_pixels`, before any is decoded); then it tokenizes and decodes the
images on a small pool of threads, never on the event loop, which goes on serving other requests and /health. The
pool's size (PREP_THREADS) also bounds how many requests' images are decoded at once, and so the memory they take.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from herd.formats.chat_template import load_template
from herd.infer.sampling import SamplingParams
from herd.serve import scoring, weights
from herd.serve.schemas import ChatCompletionRequest, CompletionRequest, WeightsRequest

if TYPE_CHECKING:
    from herd.serve.serve_config import ServeConfig

PREP_THREADS = 4  # requests tokenized or having their images decoded at once


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


def sampling_params(req: ChatCompletionRequest | CompletionRequest, defaults: dict,
                    context: int) -> tuple[SamplingParams, int, bool]:
    """SamplingParams, n, and whether max_tokens was given, from a request whose values herd.serve.schemas bounded
    (`defaults`: the model's generation config, for what the request leaves out). Without max_tokens a request may
    generate up to the end of the context (check_length fits it)."""
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        raise APIError(400, f"response_format {fmt.type!r} needs constrained decoding, which this server does not "
                            "do; only {\"type\": \"text\"} is accepted", "response_format")
    if isinstance(req, ChatCompletionRequest):  # chat: logprobs true/false, top_logprobs 0-20
        logprobs, top = bool(req.logprobs), req.top_logprobs or 0
    else:  # the legacy completions API: logprobs is the number of alternatives
        logprobs, top = req.logprobs is not None, req.logprobs or 0

    def given(value, default):
        return default if value is None else value

    try:
        params = SamplingParams(
            temperature=given(req.temperature, defaults.get("temperature", 1.0)),
            top_p=given(req.top_p, defaults.get("top_p", 1.0)), top_k=given(req.top_k, defaults.get("top_k")),
            min_p=given(req.min_p, 0.0), repetition_penalty=given(req.repetition_penalty, 1.0),
            presence_penalty=given(req.presence_penalty, 0.0), frequency_penalty=given(req.frequency_penalty, 0.0),
            ignore_eos=req.ignore_eos, stop_token_ids=req.stop_token_ids,
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()}, seed=req.seed,
            # max_tokens 0 (echo scoring) generates nothing: Service.start never queues it; 1 is a placeholder
            max_new_tokens=context if req.limit is None else max(req.limit, 1), stop=req.stop, logprobs=logprobs,
            top_logprobs=top)
    except ValueError as e:  # a bad generation default of the model's
        raise APIError(400, str(e)) from None
    return params, req.n, req.limit is not None


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

    def __init__(self, config: ServeConfig, worker, tokenizer, defaults: dict | None = None, guarding=None):
        self.config, self.worker, self.tokenizer, self.defaults = config, worker, tokenizer, defaults or {}
        self.guarding = guarding  # herd.serve.guarding.Guarding with --guard, else None
        self.model = model = worker.engine.model
        self.text_config, self.vision_config = model.text_config, model.vision_config
        self.context = self.text_config.max_position_embeddings
        self.name = config.name or Path(config.model).resolve().name
        self.media_dir = Path(config.media_dir).resolve() if config.media_dir else None
        self.weights_dir = Path(config.weights_dir).resolve() if config.weights_dir else None
        self.weights = weights.Loaded()
        self.pushing = asyncio.Lock()  # one weight push at a time: each waits for the one before to be swapped in
        self.metrics = Metrics()
        self.created = int(time.time())
        self.max_token_bytes = tokenizer.max_token_bytes  # computed once, here, not on a first request
        # None: herd's format. Without --chat-template, a tokenizer lacking Llama 4's chat tokens chats in its own
        # template (herd.chat.default_template_spec: the rule herd chat and herd eval follow too)
        from herd.chat import default_template_spec

        spec = config.chat_template or default_template_spec(tokenizer)
        self.chat_template = load_template(spec, tokenizer.chat_template)
        self.prep = ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="herd-prep")

    # ---- who may ask, for which model ------------------------------------------------------------------------------
    def authorize(self, headers: Mapping[str, str]) -> None:
        """401 unless the request's headers carry the API key (when the server has one). compare_digest takes as
        long whatever the bytes, so response times do not tell how much of a guess was right."""
        key = self.config.api_key
        if key is not None and not hmac.compare_digest(headers.get("authorization", "").encode(),
                                                       f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key",
                           kind="authentication_error")

    def check_model(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        if req.model not in (self.name, None):
            raise APIError(404, f"the model {req.model!r} does not exist; this server has {self.name!r}",
                           "model", "model_not_found")

    def model_card(self) -> dict:
        """This server's one model, as /v1/models lists it."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "herd",
                "max_model_len": self.context}

    # ---- request -> (prompt ids, images, params) ------------------------------------------------------------------
    def sampling(self, req: ChatCompletionRequest | CompletionRequest) -> tuple[SamplingParams, int, bool]:
        """sampling_params with this model's generation defaults and context."""
        return sampling_params(req, self.defaults, self.context)

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
            if self.media_dir is None:
                raise APIError(400, "local image paths are not allowed: the server has no --media-dir; send the "
                                    "image as a data: URL", "messages")
            try:
                path = Path(s).resolve()
            except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
                path = None
            if path is None or self.media_dir not in path.parents:
                raise APIError(400, "local image paths must name a file inside the server's --media-dir; send other "
                                    "images as data: URLs", "messages")
            if path.is_file() and path.stat().st_size > max_bytes:
                raise APIError(413, f"an image is larger than {max_bytes} bytes", "messages")
        self._check_pixels(sources)

    def _check_pixels(self, sources: list[str]) -> None:
        """413 when the images' pixels, read from their headers, exceed max_image_pixels: decoding takes memory in
        proportion to pixels, not bytes (an 11000 x 11000 one-bit PNG is a few kB)."""
        from herd.image import ImageError, image_size

        total, budget = 0, self.config.max_image_pixels
        for s in sources:
            try:
                w, h = image_size(s)
            except ImageError as e:
                raise APIError(400, f"could not decode an image: {e}", "messages") from None
            total += w * h
            if total > budget:
                raise APIError(413, f"the images have more than {budget / 1e6:g} megapixels together (the server's "
                                    "--max-image-mp): send smaller images", "messages")

    def chat_prompt(self, req: ChatCompletionRequest):
        """(prompt ids, pixel values or None, the tools the prompt shows or None) of a chat request."""
        from herd.chat import prepare_chat, tiling
        from herd.image import ImageError

        # herd.chat takes OpenAI's dicts: the validated messages and tools as the client sent them (unset fields
        # left out, a tool's extra keys kept: the model sees the tool's JSON)
        messages = [m.model_dump(exclude_unset=True) for m in req.messages]
        tools = [t.model_dump(exclude_unset=True) for t in req.tools] if req.tools is not None else None
        choice = req.tool_choice
        use_tools = tools_for(choice if isinstance(choice, str | None) else choice.model_dump(), tools or [])
        self._images(messages)
        kw = tiling(self.vision_config)
        try:
            ids, batch = prepare_chat(messages, self.tokenizer, tools=use_tools, template=self.chat_template, **kw)
        except ImageError as e:
            raise APIError(400, f"could not decode an image: {e}", "messages") from None
        except (ValueError, TypeError, KeyError) as e:
            raise APIError(400, f"bad messages: {e}", "messages") from None
        return ids, batch.pixel_values if batch is not None else None, use_tools

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """`prompt`: a string, token ids, or a list of either (a batch: each gets `n` choices, in order). Token ids
        must be ones the tokenizer can decode (an echo shows them) and the model can embed."""
        vocab = min(self.text_config.vocab_size, self.tokenizer.vocab_size)
        bad = next((t for p in req.prompts if isinstance(p, list) for t in p if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (size {vocab})", "prompt")
        return [p if isinstance(p, list) else [self.tokenizer.bos_id] + self.tokenizer.encode(p) for p in req.prompts]

    def echoes(self, req: CompletionRequest) -> list[str] | None:
        """The completions API's `echo`: each prompt's text, to put before its choices' text (None without echo).
        `suffix` (insertion) and `best_of` > 1 are refused rather than ignored, as vLLM refuses `suffix`."""
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported; use n", "best_of")
        if not req.echo:
            return None
        return [p if isinstance(p, str) else self.tokenizer.decode(p) for p in req.prompts]

    async def prompt_logprobs(self, req: CompletionRequest, prompts: list[list[int]]) -> list[dict] | None:
        """`echo` with `logprobs`: each prompt's part of the logprobs columns (herd.serve.scoring), computed on the
        engine thread between two steps, one prompt at a time; None unless both are asked. 500 if the model fails
        on a prompt (the engine and other requests go on)."""
        if not req.echo or req.logprobs is None:
            return None
        engine, out = self.worker.engine, []
        for p, ids in zip(req.prompts, prompts, strict=True):
            job = functools.partial(scoring.prompt_logprobs, engine.model, ids, req.logprobs, engine.banned)
            try:
                scored = await asyncio.wrap_future(self.worker.call(job))
            except (ValueError, RuntimeError) as e:
                raise APIError(500, f"scoring the prompt failed: {type(e).__name__}: {e}", code="engine_error",
                               kind="server_error") from None
            out.append(scoring.echo_columns(self.tokenizer, ids, scored, isinstance(p, str),
                                            req.return_tokens_as_token_ids))
        return out

    async def prompts(self, req: ChatCompletionRequest | CompletionRequest) -> tuple[list[list[int]], object, list]:
        """(prompt ids per prompt, pixel values or None, the tools the prompt shows or None): chat_prompt or
        completion_prompts run on the prep threads, after a prompt that cannot fit is refused without tokenizing."""
        if (least := self._least_tokens(req)) >= self.context:
            raise APIError(400, f"the prompt is at least {least} tokens: more than the model's context of "
                                f"{self.context}", "messages", "context_length_exceeded")
        loop = asyncio.get_running_loop()
        if isinstance(req, ChatCompletionRequest):
            ids, pixels, tools = await loop.run_in_executor(self.prep, self.chat_prompt, req)
            return [ids], pixels, tools
        return await loop.run_in_executor(self.prep, self.completion_prompts, req), None, None

    def _least_tokens(self, req: ChatCompletionRequest | CompletionRequest) -> int:
        """A lower bound on the longest prompt's token count from its text's UTF-8 length: every token stands for at
        most max_token_bytes bytes (the chat template and images only add tokens)."""
        def size(text) -> int:
            return len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else 0

        if isinstance(req, ChatCompletionRequest):
            parts = [p for m in req.messages for p in (m.content if isinstance(m.content, list) else [m.content])]
            longest = sum(size(getattr(p, "text", p)) for p in parts)
        else:
            longest = max((size(p) for p in req.prompts), default=0)
        return longest // self.max_token_bytes

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

    def submit(self, ids: list[int], params: SamplingParams, pixels=None, generate: bool = True):
        """(engine request, asyncio queue of (text delta, finished)); ValueError for a prompt the engine refuses.
        generate=False (max_tokens 0): a request that is finished at once, never queued."""
        return self.worker.submit(ids, params, pixels, generate)

    def cancel(self, req) -> None:
        self.worker.cancel(req)

    def start(self, prompts: list[list[int]], params: list[SamplingParams], n: int, pixels=None,
              generate: bool = True, skip: list[bool] | None = None) -> list:
        """Submit `n` choices of each prompt (with its own params), in order; returns their (request, queue) pairs
        (generate=False: max_tokens 0, each finished at once with nothing generated; so are the prompts `skip`
        marks, which the guard blocked).
        429 when they would take the generations in flight past max_concurrent; 400 (and nothing left running) for
        what the engine's own checks refuse (an empty prompt, the context, images on a text model)."""
        in_flight, limit = self.in_flight, self.config.max_concurrent
        if in_flight + n * len(prompts) > limit:
            raise APIError(429, f"the server is busy: {in_flight} generations in flight (at most {limit}); retry "
                                "later", kind="rate_limit_error")
        self.metrics.count_request()
        subs = []
        try:
            for k, (ids, p) in enumerate(zip(prompts, params, strict=True)):
                go = generate and not (skip and skip[k])
                # choice i of a seeded request draws with seed + i (vLLM's rule): n different, reproducible answers
                subs += [self.submit(ids, p if p.seed is None else dataclasses.replace(p, seed=p.seed + i), pixels,
                                     go) for i in range(n)]
        except ValueError as e:
            self.cancel_all(subs)
            raise APIError(400, str(e)) from None
        return subs

    def cancel_all(self, subs: list) -> None:
        for req, _ in subs:
            self.cancel(req)

    # ---- weights pushed by a trainer (herd.serve.weights) ------------------------------------------------------------
    def weights_info(self) -> dict:
        """GET /v1/weights: the version being served (0 and path None: the weights the server started with)."""
        self._weights_on()
        return {"version": self.weights.version, "path": self.weights.path,
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}

    async def push_weights(self, req: WeightsRequest) -> dict:
        """POST /v1/weights: check and stage the export in weights_dir/req.path off the event loop, then swap it in
        on the engine thread between two steps. 403 for a path outside weights_dir, 400 for an export that does not
        match the served model (nothing changed then)."""
        root = self._weights_on()
        async with self.pushing:
            try:
                folder = weights.resolve(root, req.path)
                staged = await asyncio.to_thread(weights.stage, self.model, folder)
            except weights.OutsideError as e:
                raise APIError(403, str(e), "path", "path_outside_weights_dir", "permission_error") from None
            except (ValueError, OSError) as e:  # CheckpointError and ConfigError are ValueErrors
                raise APIError(400, f"the weights were not loaded: {e}", "path") from None

            def swap() -> None:  # the version is recorded with the swap, even if the client has left meanwhile
                weights.swap(self.model, staged)
                self.weights = weights.Loaded(req.version, req.path)

            await asyncio.wrap_future(self.worker.call(swap))
        return {"version": req.version, "loaded": req.path}

    def _weights_on(self) -> Path:
        if self.weights_dir is None:
            raise APIError(404, "weight updates are off on this server: start herd serve with --weights-dir DIR (the "
                                "folder a trainer exports its weights into)", code="weights_disabled")
        return self.weights_dir

    async def moderate(self, req) -> dict:
        """POST /v1/moderations (herd.serve.guarding): 404 on a server without --guard."""
        if self.guarding is None:
            raise APIError(404, "this server has no guard, so /v1/moderations is off: start herd serve with --guard "
                                "DIR (a Llama Guard checkpoint)", code="guard_disabled")
        return await self.guarding.moderate(req)

    def metrics_text(self) -> str:
        text = self.metrics.text(self.queue_length, self.running)
        return text + "".join(f"{line}\n" for line in self.guarding.metrics_lines()) if self.guarding else text
