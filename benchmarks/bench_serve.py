"""Server throughput and latency percentiles at concurrency 1, 4, 16: `herd serve` under a bounded load generator on
loopback, against `transformers serve` on the same checkpoint.

The model is a random text checkpoint written for the run (hidden 256, 4 MoE layers of 8 experts, vocab 2048, chunk
128: the size of bench_engine.py, big enough that the model and not HTTP is what is measured) with the shipped tiny
tokenizer. Each server is a real subprocess on 127.0.0.1, float32, `--threads` torch threads (OMP_NUM_THREADS).

The load is closed-loop: at concurrency C, C client threads each send one streaming chat completion, read it to the
end, and send the next, until `--requests` requests are done (the same prompts in the same order on both servers:
`--prompt-words` random words each, drawn with `--seed`; greedy, `max_tokens` = `--max-tokens`). herd's API takes
vLLM's `ignore_eos`, transformers' has no such field, so to give both the same work the checkpoint's lm_head rows of
the special ids are zeroed (write_checkpoint): the random model only ever picks text ids and every request runs to
max_tokens. Output tokens
are still the servers' own usage counts, and throughput uses them. Both servers produce the same greedy tokens from
the same weights and prompt ids, so they do the same work; the "same text" column checks it request by request (up
to a last, incomplete UTF-8 character, which herd flushes as U+FFFD and transformers drops).
- requests/s and output tokens/s: over the wall time of the level (first request sent to last stream ended);
- time to first token (TTFT): request sent to the first chunk with content (the role-only chunk does not count);
- inter-token latency (ITL): the gaps between consecutive content chunks, pooled over all requests (a chunk is one
  token, except where a token decodes to no text yet);
- end-to-end latency (E2E): request sent to stream ended; errors: a status other than 200, a broken stream, or no
  usage in it. herd's /metrics completion-token counter is read before and after each level as a cross-check.

The peer: `transformers serve` (transformers 5.23, transformers/cli/serve.py) serves a local checkpoint directory
with OpenAI-shaped streaming chat completions, but here it runs one request at a time. Its continuous batching
(`--continuous-batching`) fails on this model: the paged cache has no allocator for Llama 4's `chunked_attention`
layers (ValueError "Invalid layer type: chunked_attention" in continuous_batching/cache.py), so it serves through
`model.generate()` on a single inference thread and queues concurrent requests. Loading on the CPU also needs a
patch: it always passes `device_map` to `from_pretrained`, which requires `accelerate` (not a dependency of this
project), so the peer is started from a few lines (PEER below) that clear `device_map` (a plain CPU load, the same
weights) and then run transformers' own `Serve`. Its chat template is transformers' Llama 4 template, written into
the checkpoint's tokenizer_config.json (herd ignores it; the prompt ids are the same on both sides).

The client runs on the same machine as the server; on a 2-core VM its threads take some of the cores the server
would use, on both sides alike.

Run:  .venv/bin/python benchmarks/bench_serve.py              (a few minutes on 2 cores)
      .venv/bin/python benchmarks/bench_serve.py --quick      (concurrency 1 and 4, few requests; under a minute)
      .venv/bin/python benchmarks/bench_serve.py --no-peer    (herd alone)
Writes a markdown table and JSON to benchmarks/results/bench_serve.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

import herd
from herd.tokenizer import tiny_tokenizer

SIZE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            intermediate_size=512, intermediate_size_mlp=1024, num_local_experts=8, vocab_size=2048,
            attention_chunk_size=128)
WORDS = ("the river stone light house winter garden letter morning king horse bread silver window mountain old "
         "quiet road city small green night fire ship story friend water tree cloud iron voice field").split()

PEER = r"""
import sys
from transformers.cli.serve import Serve
from transformers.cli.serving import model_manager

load = model_manager.ModelManager._load_model
def _load_model(self, *args, **kwargs):  # device_map=None: a plain CPU load (any device_map needs accelerate)
    self.device = None
    return load(self, *args, **kwargs)
model_manager.ModelManager._load_model = _load_model
Serve(force_model=sys.argv[1], host="127.0.0.1", port=int(sys.argv[2]), device="cpu", dtype="float32",
      log_level="error")
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_checkpoint(out: Path, size: dict) -> None:
    """A random checkpoint with the tiny tokenizer, plus transformers' Llama 4 chat template for the peer.

    A random model often picks special ids (1144 of the 2048), which decode to no text, and may pick an end-of-turn
    id. Their lm_head rows are zeroed, so their logit is 0 while the best of the 904 text ids' random logits is
    positive (all 904 negative has probability ~2**-904): every request yields max_tokens tokens of text."""
    from transformers.models.llama4.processing_llama4 import chat_template

    tok, model = tiny_tokenizer(), herd.build_model(herd.preset("tiny", **size), seed=0)
    with torch.no_grad():
        model.lm_head.weight[tok.n_ranks:] = 0  # special ids get logit 0, below the best text logit: never chosen
    herd.save_pretrained(model, out)
    tok.save(out)
    cfg_path = out / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "chat_template": chat_template}, indent=1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, cmd: list[str], port: int, logfile: Path, threads: int) -> subprocess.Popen:
    """Start a server and wait for its /health; its output goes to a file (a full pipe would block it)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(logfile, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 300:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            log(f"{name} up on port {port} after {time.perf_counter() - t0:.1f}s")
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} did not start:\n" + logfile.read_text()[-3000:])


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def stream_one(conn: http.client.HTTPConnection, body: dict) -> dict:
    """Send one streaming chat completion and read it to the end; times are seconds from the send."""
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        return {"error": f"HTTP {resp.status}: {resp.read()[:200]!r}"}
    times, text, usage = [], [], None
    while line := resp.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        now, chunk = time.perf_counter() - t0, json.loads(line[6:])
        usage = chunk.get("usage") or usage
        content = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or [])
        if content:
            times.append(now)
            text.append(content)
    end = time.perf_counter() - t0
    if usage is None or not times:
        return {"error": "stream ended without content or usage"}
    return {"ttft": times[0], "gaps": [b - a for a, b in zip(times, times[1:], strict=False)], "e2e": end,
            "tokens": usage["completion_tokens"], "text": "".join(text)}


def run_level(port: int, bodies: list[dict], concurrency: int) -> tuple[list[dict], float]:
    """Closed loop: `concurrency` threads send the bodies back to back (each on its own keep-alive connection)."""
    results, lock, nxt = [None] * len(bodies), threading.Lock(), iter(range(len(bodies)))

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                break
            try:
                results[i] = stream_one(conn, bodies[i])
            except (OSError, http.client.HTTPException, ValueError) as e:
                results[i] = {"error": f"{type(e).__name__}: {e}"}
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.close()

    t0 = time.perf_counter()
    pool = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    """The q-quantile with linear interpolation (numpy's default)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if "error" not in r]
    ttft, e2e, gaps = [r["ttft"] for r in ok], [r["e2e"] for r in ok], [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(ok), "errors": len(results) - len(ok), "wall_s": wall, "req_s": len(ok) / wall,
            "output_tokens": tokens, "tok_s": tokens / wall, "mean_tokens": tokens / max(len(ok), 1),
            "ttft_s": {f"p{q}": pct(ttft, q / 100) for q in (50, 90, 99)},
            "itl_s": {f"p{q}": pct(gaps, q / 100) for q in (50, 90)},
            "e2e_s": {f"p{q}": pct(e2e, q / 100) for q in (50, 90, 99)},
            "error_messages": sorted({r["error"] for r in results if "error" in r})[:5]}


def herd_completion_tokens(port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("herd_completion_tokens_total")))


def measure(servers: dict[str, tuple[int, list[dict]]], levels: list[int]) -> dict:
    """{server: {concurrency: summary}}; the servers take turns at each level."""
    results = {name: {} for name in servers}
    for port, bodies in servers.values():  # warm-up: first-call costs stay out of the figures
        run_level(port, bodies[:2], 2)
    for c in levels:
        texts = {}
        for name, (port, bodies) in servers.items():
            before = herd_completion_tokens(port) if name == "herd" else 0
            out, wall = run_level(port, bodies, c)
            s = results[name][c] = summarize(out, wall)
            if name == "herd":
                s["metrics_tokens_match"] = herd_completion_tokens(port) - before == s["output_tokens"]
            texts[name] = [(r.get("text") or "").rstrip("\ufffd") or None for r in out]
            log(f"{name} C={c}: {s['requests']} requests in {wall:.1f}s, {s['tok_s']:,.0f} tok/s, "
                f"TTFT p50 {s['ttft_s']['p50'] * 1e3:,.0f} ms, E2E p50 {s['e2e_s']['p50']:.2f}s, {s['errors']} errors")
        if len(texts) == 2:
            same = sum(h is not None and h == t for h, t in zip(*texts.values(), strict=True))
            for name in servers:
                results[name][c]["same_text"] = same
    return results


def print_tables(results: dict, levels: list[int], n: int) -> None:
    print("| server | concurrency | requests | req/s | output tok/s | tokens / request | TTFT p50 / p90 / p99 (ms) | "
          "ITL p50 / p90 (ms) | E2E p50 / p90 / p99 (s) | errors | same text |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        for name, by_level in results.items():
            s = by_level[c]
            t, i, e = s["ttft_s"], s["itl_s"], s["e2e_s"]
            same = f"{s['same_text']}/{n}" if "same_text" in s else "-"
            print(f"| {name} | {c} | {s['requests']} | {s['req_s']:.2f} | {s['tok_s']:,.0f} | {s['mean_tokens']:.1f} | "
                  f"{t['p50'] * 1e3:,.0f} / {t['p90'] * 1e3:,.0f} / {t['p99'] * 1e3:,.0f} | "
                  f"{i['p50'] * 1e3:.1f} / {i['p90'] * 1e3:.1f} | {e['p50']:.2f} / {e['p90']:.2f} / {e['p99']:.2f} | "
                  f"{s['errors']} | {same} |")
    if "transformers" in results:
        print("\n| concurrency | output tok/s herd / transformers | TTFT p50 herd / transformers | "
              "E2E p50 herd / transformers |\n|---:|---:|---:|---:|")
        for c in levels:
            h, t = results["herd"][c], results["transformers"][c]
            print(f"| {c} | {h['tok_s'] / t['tok_s']:.2f}x | {h['ttft_s']['p50'] / t['ttft_s']['p50']:.2f}x | "
                  f"{h['e2e_s']['p50'] / t['e2e_s']['p50']:.2f}x |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level and server")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peer", action="store_true", help="herd alone (no transformers serve)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/bench_serve.json")
    a = p.parse_args(argv)
    if a.quick:
        a.concurrency, a.requests, a.max_tokens = "1,4", 8, 16
    levels = [int(c) for c in a.concurrency.split(",")]
    rng = random.Random(a.seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(a.prompt_words)) for _ in range(a.requests)]

    def bodies(model: str, usage: bool) -> list[dict]:
        extra = {"stream_options": {"include_usage": True}} if usage else {}  # transformers always sends usage
        return [{"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": a.max_tokens,
                 "temperature": 0, "stream": True, **extra} for q in prompts]

    import fastapi
    import transformers
    import uvicorn

    procs, servers = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        write_checkpoint(ckpt, SIZE)
        try:
            port = free_port()
            procs.append(start("herd", [sys.executable, "-m", "herd.cli", "serve", "--model", str(ckpt), "--port",
                                        str(port), "--name", "bench"], port, Path(tmp) / "herd.log", a.threads))
            servers["herd"] = (port, bodies("bench", True))
            if not a.no_peer:
                port = free_port()
                procs.append(start("transformers", [sys.executable, "-c", PEER, str(ckpt), str(port)], port,
                                   Path(tmp) / "transformers.log", a.threads))
                servers["transformers"] = (port, bodies(str(ckpt), False))
            results = measure(servers, levels)
        finally:
            for proc in procs:
                stop(proc)
    print_tables(results, levels, len(prompts))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__},
        "config": {"model": SIZE, "dtype": "float32", "threads": a.threads, "requests": a.requests,
                   "max_tokens": a.max_tokens, "prompt_words": a.prompt_words, "seed": a.seed, "greedy": True,
                   "peer": None if a.no_peer else "transformers serve, no continuous batching (see the docstring)"},
        "results": results}, indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
