"""The OpenAI-compatible server: `herd serve --model DIR` (herd.serve.app over herd.serve.worker over the engine),
configured by one herd.serve.serve_config.ServeConfig."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from herd.serve.serve_config import ServeConfig
    from herd.serve.service import Service


def build_service(cfg: ServeConfig) -> Service:
    """Load `cfg.model` with its tokenizer and generation defaults (on `cfg.device`, optionally quantized with a
    herd.infer.quant scheme), start the engine thread; returns a Service. `cfg.cuda_graphs` / `cfg.compile`: decode
    on a herd.infer.slot_batch.SlotBatch layout, its step captured as CUDA graphs (a CUDA device only) /
    torch.compiled, for every batch size before this returns (`cfg.warmup`). `cfg.guard`: a Llama Guard model loaded
    beside it (herd.serve.guarding)."""
    import torch

    from herd.formats.hf import from_pretrained, generation_defaults
    from herd.infer.engine import Engine
    from herd.serve.service import Service
    from herd.serve.worker import EngineWorker
    from herd.tokenizer import Tokenizer

    root = Path(cfg.model)
    tok = Tokenizer.from_pretrained(root)  # first: a missing or malformed tokenizer.json fails before the weights load
    device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    model = from_pretrained(root, dtype=dtype, device=device).eval()
    if cfg.quantize:
        from herd.infer.quant import describe, quantize_scheme

        print(describe(quantize_scheme(model, cfg.quantize, cfg.group_size)), flush=True)
    defaults = generation_defaults(root)
    layout = None
    if cfg.cuda_graphs or cfg.compile:
        from herd.infer.slot_batch import SlotBatch

        layout = SlotBatch(model, cfg.max_batch, cuda_graphs=cfg.cuda_graphs, compile=cfg.compile)
    engine = Engine(model, tok, max_batch=cfg.max_batch, layout=layout)
    if cfg.warmup:  # before the server listens: a first request would otherwise wait for the compiler
        engine.warmup(lambda i, n, b: print(f"preparing the decode step for {b} rows ({i + 1}/{n})", flush=True))
    guarding = None
    if cfg.guard or cfg.prompt_guard:  # beside the served model, on its device (herd.serve.guarding)
        from herd.serve.guarding import load_guarding

        guarding = load_guarding(cfg, device, dtype)
    return Service(cfg, EngineWorker(engine), tok, defaults, guarding)
