"""KV-cache memory vs context length: herd's two-tier cache against a cache that keeps every layer whole.

iRoPE makes 3 of every 4 layers chunked-local (herd.model.cache): a query sees only keys of its own chunk, so those
layers keep at most `attention_chunk_size - 1` positions, and only the global (NoPE) layers grow with the context.
This script measures it instead of computing it: a tiny model (the tiny preset's decoder, with Scout's 8192-token
chunk so the regime is Scout's) prefills one long random sequence in pieces of `--piece` tokens, and after each
piece that reaches a reported length the bytes the cache really holds (`KVCache.nbytes`: valid positions of every
layer's keys and values) are recorded. The "whole" cache is the same class told that no layer is chunked, so it
stores every position of every layer; the model still applies the chunk mask, so both compute the same logits,
which the script checks on the last piece.

Run:  .venv/bin/python benchmarks/bench_kv_memory.py                 (1K..128K tokens; a few minutes on 2 cores)
      .venv/bin/python benchmarks/bench_kv_memory.py --max-len 8192  (quick)
Writes a markdown table to stdout and JSON to benchmarks/results/bench_kv_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import herd
from herd.model.cache import KVCache
from herd.sizes import kv_cache_bytes_per_token


class WholeKVCache(KVCache):
    """Every layer keeps every position (what a plain cache does)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.chunked = [False] * len(self.chunked)

    def window(self, chunked: bool) -> int:
        return self.seen


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def fill(model, cache, ids: torch.Tensor, lengths: list[int], piece: int) -> tuple[dict[int, int], torch.Tensor]:
    """Prefill ids (1, N) piece by piece; {length: cache bytes} at each reported length, and the last logits."""
    sizes, logits, t0 = {}, None, time.perf_counter()
    for start in range(0, ids.shape[1], piece):
        logits = model(ids[:, start:start + piece], cache=cache, logits_to_keep=1)
        n = start + piece
        if n in lengths:
            sizes[n] = cache.nbytes()
            log(f"  {type(cache).__name__} {n:>7} tokens: {sizes[n] / 2**20:8.2f} MiB "
                f"({n / (time.perf_counter() - t0):,.0f} tok/s)")
    return sizes, logits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-len", type=int, default=131072)
    p.add_argument("--piece", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--out", default="benchmarks/results/bench_kv_memory.json")
    a = p.parse_args(argv)
    cfg = herd.preset("tiny", attention_chunk_size=a.chunk, max_position_embeddings=max(a.max_len, 4096))
    model = herd.build_model(cfg, seed=0).eval()
    lengths = [n for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072) if n <= a.max_len]
    ids = torch.randint(0, cfg.vocab_size, (1, lengths[-1]), generator=torch.Generator().manual_seed(0))
    log(f"tiny decoder: {cfg.num_hidden_layers} layers ({sum(map(cfg.uses_rope, range(cfg.num_hidden_layers)))} "
        f"chunked, chunk {a.chunk}), {cfg.num_key_value_heads} KV heads of {cfg.head_dim}, float32")
    two, last_two = fill(model, KVCache(cfg), ids, lengths, a.piece)
    whole, last_whole = fill(model, WholeKVCache(cfg), ids, lengths, a.piece)
    same = float((last_two - last_whole).abs().max())
    per_tok = kv_cache_bytes_per_token(cfg, bytes_per_elem=4)
    rows = ["| context | two-tier (MiB) | whole (MiB) | two-tier / whole |", "|---:|---:|---:|---:|"]
    for n in lengths:
        rows.append(f"| {n:,} | {two[n] / 2**20:.2f} | {whole[n] / 2**20:.2f} | {two[n] / whole[n]:.3f} |")
    print("\n".join(rows))
    print(f"last-piece logits, two-tier vs whole cache: max |diff| {same:.2e}; herd.sizes per token (fp32): {per_tok}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                               "config": {"layers": cfg.num_hidden_layers, "chunk": a.chunk,
                                          "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                                          "dtype": "float32"},
                               "two_tier_bytes": two, "whole_bytes": whole, "logits_max_abs_diff": same}, indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
