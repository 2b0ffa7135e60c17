"""herd vs Hugging Face transformers on the same Llama 4 weights (CPU): prefill and decode throughput, peak memory.

What it measures, for batch 1 and batch 8 (`--batches`):
- prefill tokens/s: one no-grad forward over `--prefill-len` tokens (full logits), one warm-up, median of `--repeats`;
- decode tokens/s: greedy generation of `--new-tokens` tokens after a `--prompt-len` prompt (herd.generate vs
  transformers' `generate(do_sample=False, min_new_tokens=n, max_new_tokens=n)`). Only the new tokens are timed: a
  forward pre-hook stamps each model call, and the clock starts at the second call (the first is the prompt), so
  B * (n - 1) tokens are divided by the time from that call to the end of generate. Best of `--repeats`;
- peak memory: each side runs in its own subprocess that loads the same safetensors checkpoint; reported is the
  peak RSS (ru_maxrss) minus the RSS after imports, so weights plus working memory.
The greedy tokens of both sides are compared ("same tokens"); in float32 they should be identical. Neither side
stops at or suppresses EOS (transformers' generation_config.eos_token_id is cleared), so both run all n steps.

Default model (~250M params): hidden 512, 8 layers, 16 experts top-1 plus a shared expert on every layer, vocab
32000, 8 heads / 2 KV heads of dim 64, expert width 1024. Every 4th layer is global NoPE attention, the others are
chunked RoPE attention with chunk 160, so decode (positions 128 -> 192) crosses a chunk boundary and the 512-token
prefill spans several chunks.

Run:  .venv/bin/python benchmarks/bench_model.py            (full size, a few minutes on 2 cores)
      .venv/bin/python benchmarks/bench_model.py --quick    (tiny smoke run, seconds)
      .venv/bin/python benchmarks/bench_model.py --dtype bfloat16
Writes a markdown table to stdout and JSON to benchmarks/results/bench_model.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_peak_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10  # bytes on macOS, KiB on Linux


def rss_now_mib() -> float:
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: fall back to the peak so far
        return rss_peak_mib()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and lengths: a smoke run of a few seconds")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--expert-width", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=160, help="attention_chunk_size of the chunked (RoPE) layers")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_model.json")
    p.add_argument("--worker", choices=["herd", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.layers, a.experts, a.expert_width, a.vocab, a.heads, a.kv_heads, a.head_dim = \
            64, 4, 4, 128, 1000, 4, 2, 16
        a.prefill_len, a.prompt_len, a.new_tokens, a.chunk, a.repeats = 64, 16, 8, 20, 2
    return a


def make_config(a):
    import herd

    return herd.TextConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                           num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
                           intermediate_size=a.expert_width, intermediate_size_mlp=2 * a.expert_width,
                           num_local_experts=a.experts, num_experts_per_tok=1, attention_chunk_size=a.chunk,
                           rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


# ---- worker: one side, in its own process ----------------------------------------------------------------------------
def run_worker(a) -> dict:
    torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype]
    if a.worker == "herd":
        import herd

        base = rss_now_mib()
        model = herd.from_pretrained(a.ckpt, dtype=dtype).eval()
        forward = model

        def gen(ids, n):
            return herd.generate(model, ids, n)
    else:
        import transformers
        from transformers import Llama4ForCausalLM  # resolve the lazy import before the memory baseline

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        base = rss_now_mib()
        model = Llama4ForCausalLM.from_pretrained(a.ckpt, dtype=dtype, attn_implementation="sdpa").eval()
        # herd.generate has no EOS unless asked; with EOS set, min_new_tokens would mask it out and change the argmax
        model.generation_config.eos_token_id = None

        def forward(ids):
            return model(ids, use_cache=False).logits

        def gen(ids, n):
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=n,
                                  max_new_tokens=n, pad_token_id=0)
    load_mib = rss_now_mib() - base
    stamps: list[float] = []
    model.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    g = torch.Generator().manual_seed(1234)
    res = {"side": a.worker, "weights_rss_mib": load_mib, "prefill": {}, "decode": {}, "tokens": {}}
    with torch.no_grad():
        for B in a.batches:
            ids = torch.randint(3, a.vocab, (B, a.prefill_len), generator=g)
            times = []
            for r in range(a.repeats + 1):  # first is warm-up
                t0 = time.perf_counter()
                forward(ids)
                if r:
                    times.append(time.perf_counter() - t0)
            res["prefill"][B] = B * a.prefill_len / statistics.median(times)
            log(f"  {a.worker:12s} prefill B={B}: {res['prefill'][B]:9.1f} tok/s  ({statistics.median(times):.3f} s)")

            prompt = torch.randint(3, a.vocab, (B, a.prompt_len), generator=g)
            gen(prompt, 2)  # warm-up
            best = float("inf")
            for _ in range(a.repeats):
                stamps.clear()
                out = gen(prompt, a.new_tokens)
                t_end = time.perf_counter()
                assert out.shape == (B, a.prompt_len + a.new_tokens) and len(stamps) == a.new_tokens, len(stamps)
                best = min(best, t_end - stamps[1])
            res["decode"][B] = B * (a.new_tokens - 1) / best
            res["tokens"][B] = out[:, a.prompt_len:].tolist()
            log(f"  {a.worker:12s} decode  B={B}: {res['decode'][B]:9.1f} tok/s  ({best:.3f} s)")
    res["peak_rss_mib"] = rss_peak_mib() - base
    return res


# ---- driver ----------------------------------------------------------------------------------------------------------
def machine_info(a) -> dict:
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
            "transformers": transformers.__version__}


def spawn(side: str, ckpt: str, argv: list[str]) -> dict:
    log(f"{side}: starting worker")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", side, "--ckpt", ckpt]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(a, res: dict) -> str:
    h, t = res["herd"], res["transformers"]
    rows = ["| metric | herd | transformers | herd / transformers |", "|---|---:|---:|---:|"]
    for B in a.batches:
        for kind, n in (("prefill", a.prefill_len), ("decode", a.new_tokens)):
            x, y = h[kind][str(B)], t[kind][str(B)]
            label = f"{kind} tok/s, B={B}, " + (f"{n} tokens" if kind == "prefill" else f"{a.prompt_len}+{n} tokens")
            rows.append(f"| {label} | {x:,.1f} | {y:,.1f} | {x / y:.2f}x |")
    # (weights_rss_mib, RSS right after loading, stays in the JSON only: transformers mmaps safetensors lazily)
    x, y = h["peak_rss_mib"], t["peak_rss_mib"]
    rows.append(f"| peak RSS growth (MiB) | {x:,.0f} | {y:,.0f} | {x / y:.2f}x |")
    same = ", ".join(f"B={B}: {'yes' if same_tokens(res, B) else 'NO'}" for B in a.batches)
    return "\n".join(rows) + f"\n\nSame greedy tokens from both sides: {same}"


def same_tokens(res: dict, B: int) -> bool:
    return res["herd"]["tokens"][str(B)] == res["transformers"]["tokens"][str(B)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(run_worker(a)))
        return 0
    import herd

    torch.set_num_threads(a.threads)
    cfg = make_config(a)
    info = machine_info(a)
    n_params = sum(p.numel() for p in herd.build_model(cfg, device="meta").parameters())
    log(f"model: {n_params / 1e6:.1f}M params, {a.dtype}, layers {cfg.layer_types}, chunk {cfg.attention_chunk_size}")
    log(f"machine: {info['cpu']} x{info['cpu_count']}, torch {info['torch']}, transformers {info['transformers']}")
    with tempfile.TemporaryDirectory() as ckpt:
        herd.save_pretrained(herd.build_model(cfg, dtype=DTYPES[a.dtype], seed=0), ckpt)
        log(f"checkpoint written to {ckpt}")
        res = {side: spawn(side, ckpt, argv) for side in ("herd", "transformers")}
    md = table(a, res)
    print(f"\nherd vs transformers {info['transformers']}, {n_params / 1e6:.1f}M params, {a.dtype}, "
          f"{a.threads} threads, {info['cpu']}\n\n{md}")
    settings = {k: v for k, v in vars(a).items() if k not in ("worker", "ckpt", "out")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    same = {B: same_tokens(res, B) for B in a.batches}
    for r in res.values():
        r.pop("tokens")
    a.out.write_text(json.dumps({"machine": info, "settings": settings, "params": n_params, "same_tokens": same,
                                 "config": herd.formats.hf.config_to_hf(cfg), "results": res, "table": md}, indent=2))
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
