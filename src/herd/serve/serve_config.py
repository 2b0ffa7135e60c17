"""The server's typed config: everything `herd serve` takes, in one dataclass (as TrainConfig is for training).

herd.cli builds a `ServeConfig` from the command line and herd.serve.build_service loads the model from it; the
Service keeps it for the limits every request is checked against. `__post_init__` checks the values before any
weights load, so a bad option fails at once with a ConfigError that names the field, not minutes later (or on the
first request) inside the engine or uvicorn. What needs the model or the device to check (a quantization group size
the layer shapes refuse, CUDA graphs on a CPU model) is refused by the code that loads them.

The security posture on a workstation (the defaults): the server listens on 127.0.0.1 only, sends no CORS headers
(so a web page from another origin cannot read its answers, and its JSON requests fail their preflight) unless
`allowed_origins` names the origins that may, and needs no key unless `api_key` is set. An empty key is refused: it
would turn authentication off without saying so. As in vLLM (`--api-key` guards the `/v1` routes only), the key
guards every `/v1/...` route; `/health`, `/metrics` (counters and latencies, no request content), `/openapi.json`
(the public API shape) and the web page stay open, so probes and Prometheus need no secret. Slow or idle clients
cannot hold connections: a request's headers must arrive within `header_timeout` seconds and its body within
`body_timeout` (longer for a large body, see herd.serve.server), and at most `max_connections` are open at once.

`weights_dir` turns on POST /v1/weights (herd.serve.weights): a trainer pushes new weights, read only from inside
that folder. It is refused with `quantize` (the pushed weights are not quantized) and with `cuda_graphs` (untested).

`guard` turns on guarded serving and /v1/moderations (herd.serve.guarding): a Llama Guard checkpoint scans prompts
and answers. `guard_categories` are the Llama Guard 4 codes its prompt lists (default S1-S13, llama-stack's); an
unknown code is refused here, before any weights load.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from herd.config import ConfigError
from herd.infer.quant import SCHEMES
from herd.safety.taxonomy import DEFAULT, LG4, codes

DTYPES = ("float32", "bfloat16")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's names (any case)
MiB = 2**20
# An origin as browsers send it: scheme://host[:port], no path and no trailing slash (which would never match)
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s]+", re.IGNORECASE)


@dataclass(kw_only=True)
class ServeConfig:
    # --- the model and where it runs ---
    model: str  # Hugging Face checkpoint directory with tokenizer.json, or a .gguf file (herd.default_model's file
    # when `herd serve` is given no --model)
    name: str | None = None  # the model id in the API (None: the directory's name)
    device: str = "auto"  # auto (cuda if present), cpu, cuda, cuda:1 ...
    dtype: str | None = None  # float32 | bfloat16 (None: the checkpoint's)
    quantize: str | None = None  # a herd.infer.quant scheme: int8 | int4 | fp8 | fp8-dynamic
    group_size: int = 128  # int4: input features per scale
    # --- the engine ---
    max_batch: int = 32  # requests decoded together
    compile: bool = False  # decode on a fixed-shape SlotBatch whose step goes through torch.compile
    cuda_graphs: bool = False  # ... replayed as CUDA graphs (a CUDA device only)
    warmup: bool = True  # compile / capture every batch size before the server listens
    # --- HTTP and the limits on a request ---
    host: str = "127.0.0.1"
    port: int = 8000
    media_dir: str | None = None  # the one folder whose image files requests may name by path
    weights_dir: str | None = None  # the one folder POST /v1/weights may load new weights from (None: off)
    # Jinja chat template for chat requests (herd.formats.chat_template): None for herd's own chat format,
    # "checkpoint" for the checkpoint's own template, or a template file (a fine-tune trained on another format)
    chat_template: str | None = None
    api_key: str | None = None  # None: no Authorization header needed; else every /v1 route needs it (not "")
    allowed_origins: tuple[str, ...] | None = None  # web origins CORS lets read responses (None: no CORS headers)
    max_request_bytes: int = 64 * MiB  # a larger request body gets 413
    max_concurrent: int = 64  # more generations in flight get 429
    max_images: int = 8  # more images in one request get 400
    max_image_bytes: int = 20 * MiB  # a larger image (data URL or file) gets 413
    max_image_pixels: int = 32_000_000  # all images of a request together (from their headers, before decoding)
    header_timeout: float = 10.0  # seconds a request's line and headers may take to arrive; then it is dropped
    body_timeout: float = 30.0  # seconds its body may take (plus time for a large body at a minimum rate)
    max_connections: int = 512  # open HTTP connections; a request beyond gets 503
    shutdown_timeout: float = 30.0  # on SIGTERM / Ctrl-C, seconds in-flight requests may still run
    log_level: str = "warning"  # uvicorn's
    # --- guarded serving (herd.serve.guarding) ---
    guard: str | None = None  # a Llama Guard checkpoint directory (None: no guard, /v1/moderations answers 404)
    guard_categories: tuple[str, ...] | None = None  # codes listed in the guard prompt (None: S1-S13)
    guard_threshold: float = 0.5  # block at or above this P(unsafe)
    guard_output: bool = True  # scan answers too, not only prompts
    guard_window: int = 16  # a stream's text is scanned (and released) every this many tokens
    guard_refusal: str = "I can't help with that."  # the content of a blocked choice
    prompt_guard: str | None = None  # a Prompt Guard-style jailbreak classifier (herd.safety.prompt_guard) folder
    prompt_guard_threshold: float = 0.5  # block a prompt at or above this P(malicious)

    def __post_init__(self) -> None:
        checks = [
            (bool(self.model), "model must be a checkpoint directory or a .gguf file (herd.default_model.default_model"
                               "().path is the default model's)"),
            (bool(self.device), "device must be auto, cpu, cuda, cuda:1 ..."),
            (self.dtype is None or self.dtype in DTYPES,
             f"dtype must be one of {DTYPES} (or unset for the checkpoint's), got {self.dtype!r}"),
            (self.quantize is None or self.quantize in SCHEMES,
             f"quantize must be one of {tuple(SCHEMES)} (or unset), got {self.quantize!r}"),
            (self.group_size > 0, f"group_size must be a positive int, got {self.group_size}"),
            (self.max_batch > 0, f"max_batch must be a positive int, got {self.max_batch}"),
            (0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}"),
            (self.max_request_bytes > 0, f"max_request_bytes must be positive, got {self.max_request_bytes}"),
            (self.max_concurrent > 0, f"max_concurrent must be a positive int, got {self.max_concurrent}"),
            (self.max_images >= 0, f"max_images must be >= 0 (0: no images), got {self.max_images}"),
            (self.max_image_bytes > 0, f"max_image_bytes must be positive, got {self.max_image_bytes}"),
            (self.max_image_pixels > 0, f"max_image_pixels must be positive, got {self.max_image_pixels}"),
            (self.header_timeout > 0, f"header_timeout must be positive seconds, got {self.header_timeout}"),
            (self.body_timeout > 0, f"body_timeout must be positive seconds, got {self.body_timeout}"),
            (self.max_connections > 0, f"max_connections must be a positive int, got {self.max_connections}"),
            (self.api_key != "", "api_key must not be empty: an empty key would turn authentication off; give a "
                                 "non-empty --api-key / HERD_API_KEY, or unset both to serve without one"),
            (self.allowed_origins is None or (bool(self.allowed_origins) and all(
                o == "*" or (isinstance(o, str) and ORIGIN.fullmatch(o)) for o in self.allowed_origins)),
             f"allowed_origins must be origins like https://app.example or http://localhost:3000 (scheme://host"
             f"[:port], no path or trailing slash), or *, got {self.allowed_origins!r}"),
            (self.shutdown_timeout >= 0, f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}"),
            (self.chat_template in (None, "checkpoint") or os.path.isfile(self.chat_template),
             f"chat_template {self.chat_template!r} is not a file: pass a Jinja chat template file, or 'checkpoint' "
             "for the template in the checkpoint's tokenizer files"),
            (self.weights_dir is None or os.path.isdir(self.weights_dir),
             f"weights_dir {self.weights_dir!r} is not a directory: create it (the trainer writes each version of "
             "the weights into a subfolder of it)"),
            (self.weights_dir is None or self.quantize is None,
             "weights_dir cannot be combined with quantize: pushed weights would have to be quantized again; serve "
             "the unquantized model to a trainer"),
            (self.weights_dir is None or not self.cuda_graphs,
             "weights_dir cannot be combined with cuda_graphs yet (weight swaps under captured graphs are untested); "
             "use compile, or neither"),
            (self.log_level.lower() in LOG_LEVELS,
             f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}"),
            (self.guard is None or os.path.isdir(self.guard),
             f"guard {self.guard!r} is not a directory: pass a Llama Guard checkpoint folder (Hugging Face layout, "
             "e.g. one written by `herd guard-from-moe`)"),
            (self.guard is not None or self.guard_categories is None,
             "guard_categories needs a guard: pass --guard DIR too"),
            (self.guard_categories is None or (bool(self.guard_categories) and all(
                c in codes(LG4) for c in self.guard_categories)
                and len(set(self.guard_categories)) == len(self.guard_categories)),
             f"guard_categories must be distinct Llama Guard codes among {', '.join(codes(LG4))} (e.g. S1,S2,S10), "
             f"got {','.join(self.guard_categories or ()) or 'none'}"),
            (0.0 <= self.guard_threshold <= 1.0, f"guard_threshold must be in [0, 1], got {self.guard_threshold}"),
            (self.guard_window > 0, f"guard_window must be a positive number of tokens, got {self.guard_window}"),
            (self.prompt_guard is None or os.path.isdir(self.prompt_guard),
             f"prompt_guard {self.prompt_guard!r} is not a directory: pass a checkpoint folder trained as a jailbreak "
             "classifier (herd.safety.prompt_guard; experiments/safety_guard.py)"),
            (0.0 <= self.prompt_guard_threshold <= 1.0,
             f"prompt_guard_threshold must be in [0, 1], got {self.prompt_guard_threshold}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def guard_codes(self) -> tuple[str, ...]:
        """The codes the guard prompt lists, in taxonomy order."""
        chosen = codes(DEFAULT) if self.guard_categories is None else self.guard_categories
        return tuple(c for c in codes(LG4) if c in chosen)

    def replace(self, **kw) -> ServeConfig:
        return dataclasses.replace(self, **kw)
