"""The OpenAI-compatible server: `herd serve --model DIR` (herd.serve.app over herd.serve.worker over the engine)."""

from __future__ import annotations

import json
from pathlib import Path


def build_service(model_dir: str, name: str | None = None, dtype=None, device: str = "cpu",
                  quantize: str | None = None, group_size: int | None = 128, max_batch: int = 32,
                  cuda_graphs: bool = False, compile: bool = False, warmup: bool = True,
                  media_dir: str | None = None, api_key: str | None = None, max_request_bytes: int = 64 * 2**20,
                  max_concurrent: int = 64, max_images: int = 8, max_image_bytes: int = 20 * 2**20):
    """Load a checkpoint with its tokenizer and generation defaults (on `device`, optionally quantized with a
    herd.infer.quant scheme), start the engine thread; returns a Service. `cuda_graphs` / `compile`: decode with
    herd.infer.slot_engine.SlotEngine, its step captured as CUDA graphs (a CUDA device only) / torch.compiled, for
    every batch size before this returns (`warmup`)."""
    from herd.checkpoint import from_pretrained
    from herd.infer.engine import Engine
    from herd.serve.service import Service
    from herd.serve.worker import EngineWorker
    from herd.tokenizer import Tokenizer

    root = Path(model_dir)
    if not (root / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{root} has no tokenizer.json: the server needs the checkpoint's tokenizer")
    model = from_pretrained(root, dtype=dtype, device=device).eval()
    if quantize:
        from herd.infer.quant import describe, quantize_scheme

        print(describe(quantize_scheme(model, quantize, group_size)), flush=True)
    tok = Tokenizer.from_pretrained(root)
    gen = root / "generation_config.json"
    defaults = {k: v for k, v in json.loads(gen.read_text()).items() if k in ("temperature", "top_p", "top_k")} \
        if gen.is_file() else {}
    if cuda_graphs or compile:
        from herd.infer.slot_engine import SlotEngine

        engine = SlotEngine(model, tok, max_batch=max_batch, cuda_graphs=cuda_graphs, compile=compile)
        if warmup:  # before the server listens: a first request would otherwise wait for the compiler
            engine.warmup(lambda i, n, b: print(f"preparing the decode step for {b} rows ({i + 1}/{n})", flush=True))
    else:
        engine = Engine(model, tok, max_batch=max_batch)
    worker = EngineWorker(engine)
    return Service(worker, tok, name or root.resolve().name, defaults, media_dir, api_key=api_key,
                   max_request_bytes=max_request_bytes, max_concurrent=max_concurrent, max_images=max_images,
                   max_image_bytes=max_image_bytes)
