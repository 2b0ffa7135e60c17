"""Decode throughput and time to first token: herd's engine vs transformers' `generate`, same weights, one run.

For batch sizes 1, 8 and 32 (`--batches`): B prompts of `--prompt-len` random tokens, greedy, `--new-tokens` new
tokens each (EOS ignored on both sides, so both run every step).
- time to first token: the time to produce the first token of all B requests (herd: submit B requests and step
  until each has one token, i.e. one batched prefill; transformers: `generate(max_new_tokens=1)`), best of
  `--repeats`;
- decode tokens/s: B x (new tokens - 1) / (time for the whole generation - time to first token), best of repeats.
Both sides load the same safetensors checkpoint in this process, float32, `--threads` torch threads. The greedy
tokens are compared (they should be equal).

Where herd's decode step goes: a few extra decode steps run under torch.profiler, and the self time of the matrix
multiplies (aten::mm / addmm / bmm: everything that reads weights) is reported as a share of the step. The step
time minus nothing else is the bound on what cutting overhead could give with the same BLAS kernels: "ceiling
tok/s" = B / (matmul ms per step), and "ceiling / transformers" says how far even a zero-overhead herd could get.
A second measure of the same bound, without the profiler: "matmul loop ms" times a loop of only the step's weight
products (every linear and both grouped expert products of every layer at B rows, random top-1 routing, the LM head
at B rows; the same weights, nothing else).

A mixed workload (`--mixed`, 4 x B requests per batch size): prompts of 16-128 random tokens and 8-64 new tokens
each (EOS ignored, so every request has its own known length), all arriving at once, greedy. herd's engine runs them
with `max_batch=B` (continuous batching: a finished request's row is refilled from the queue at the next step);
transformers runs them as `generate` does, in batches of B in arrival order, left-padded, each batch until its
longest request is done. Reported: useful tokens (each request's own new tokens) per second of wall time, both
sides (best of `--repeats` runs of the same workload), and whether every request's tokens are equal. This is the
workload continuous batching exists for; the uniform table above is the one where static batching wastes nothing.

The checkpoint is random: the tiny preset's decoder at hidden 256 (below), with Scout's attention temperature
floor_scale 8192 (the tiny preset's 8 would let transformers' temperature count left padding as positions, which
changes its padded rows' tokens; see herd.model.text).

On a GPU (`--device cuda --dtype bfloat16`) the same tables are measured there; the matmul share is not (the
profiler's CPU self time says nothing of kernels), and greedy tokens may differ in bfloat16 (different kernels round
differently; a near-tie flips).

`--slot` adds the engine on the fixed-shape batch layout (herd.infer.slot_batch.SlotBatch: CUDA graphs on a GPU) to
both tables, `--compile` its step compiled with torch.compile (one engine per batch size, warmed up - every graph
compiled - and reused across runs, as a server would).

Run:  .venv/bin/python benchmarks/bench_engine.py            (a few minutes on 2 cores)
      .venv/bin/python benchmarks/bench_engine.py --compile  (plus compiling: a few more minutes)
      .venv/bin/python benchmarks/bench_engine.py --quick
      python benchmarks/bench_engine.py --device cuda --dtype bfloat16
Writes a markdown table and JSON to benchmarks/results/bench_engine.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import herd
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams
from herd.infer.slot_batch import SlotBatch
from herd.tokenizer import tiny_tokenizer


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


_SLOT_ENGINES: dict[tuple[int, bool], Engine] = {}


def slot_engine(model, tok, B: int, compile: bool) -> Engine:
    """One engine on a SlotBatch per batch size, reused from run to run as a server reuses its engine (a compiled
    one keeps its graphs; a new engine would compile its step again)."""
    key = (B, compile)
    if key not in _SLOT_ENGINES:
        _SLOT_ENGINES[key] = Engine(model, tok, layout=SlotBatch(model, B, compile=compile))
        _SLOT_ENGINES[key].warmup()  # compiles (or captures) every batch size up front, as herd serve does
    return _SLOT_ENGINES[key]


def herd_run(model, tok, prompts, n, make=None) -> tuple[float, float, list]:
    """(time to first token, total time, tokens) of one engine run; `make(B)` builds the engine (default: Engine)."""
    engine = make(len(prompts)) if make else Engine(model, tok, max_batch=len(prompts))
    t0 = time.perf_counter()
    reqs = [engine.submit(p, SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=n)) for p in prompts]
    while not all(r.output_ids for r in reqs):
        engine.step()
    ttft = time.perf_counter() - t0
    engine.run()
    return ttft, time.perf_counter() - t0, [r.output_ids for r in reqs]


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_share(model, tok, prompts, steps: int = 8) -> tuple[float, float]:
    """(ms per decode step without the profiler, ms of matrix multiplies per step under it) at batch len(prompts)."""
    from torch.profiler import profile

    engine = Engine(model, tok, max_batch=len(prompts))
    for p in prompts:
        engine.submit(p, SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=3 * steps + 4))
    engine.step()  # admits every request
    if model.device.type == "cuda":  # the step syncs itself (it reads the sampled ids); the profiler's CPU time
        t0 = time.perf_counter()  # below would not see the kernels, so only the step time is reported
        for _ in range(steps):
            engine.step()
        return (time.perf_counter() - t0) / steps * 1e3, float("nan")
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    with profile() as prof:
        for _ in range(steps):
            engine.step()
    mm_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMULS)
    return step_ms, mm_us / steps / 1e3


@torch.no_grad()
def matmul_loop_ms(model, B: int, repeats: int = 30) -> float:
    """Median ms of one pass of only the weight products a decode step of B rows runs (module docstring)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, model.config.hidden_size, dtype=model.dtype, device=model.device)
    routes = {}  # per MoE layer: the group ends of a random top-1 routing, drawn before the timing
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe:
            E = layer.feed_forward.n_experts
            counts = torch.bincount(torch.randint(0, E, (B,), generator=g), minlength=E)
            routes[i] = counts.cumsum(0).to(torch.int32).to(x.device)

    widths = {n: x.new_ones(B, n) for layer in model.model.layers for n in (
        layer.self_attn.o_proj.in_features, (layer.feed_forward.shared_expert if layer.is_moe else
                                             layer.feed_forward).down_proj.in_features)}  # inputs of other widths

    def once():
        for i, layer in enumerate(model.model.layers):
            at, ff = layer.self_attn, layer.feed_forward
            for proj in (at.q_proj, at.k_proj, at.v_proj):
                proj(x)
            at.o_proj(widths[at.o_proj.in_features])
            mlp = ff.shared_expert if layer.is_moe else ff
            mlp.gate_proj(x)
            mlp.up_proj(x)
            mlp.down_proj(widths[mlp.down_proj.in_features])
            if layer.is_moe:
                ff.router(x)
                torch._grouped_mm(x, ff.experts.gate_up_proj, offs=routes[i])
                torch._grouped_mm(widths[ff.experts.down_proj.shape[1]], ff.experts.down_proj, offs=routes[i])
        model.lm_head(x)

    times = []
    for i in range(repeats + 5):
        t0 = time.perf_counter()
        once()
        sync(model.device)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def hf_run(model, prompts, n) -> tuple[float, float, list]:
    ids = torch.tensor(prompts, device=model.device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync(model.device)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    sync(model.device)
    return ttft, time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()


def mixed_run(ours, theirs, tok, B: int, g: torch.Generator, repeats: int, slot=None) -> dict:
    """4 x B requests of mixed prompt and output lengths: useful tokens/s of herd (max_batch B) and of transformers
    (static batches of B), best of `repeats` runs of the same workload (the first run on a GPU also pays for loading
    the kernels of every new shape); `same` says every request got the same tokens on both sides."""
    n = 4 * B
    lens = torch.randint(16, 129, (n,), generator=g).tolist()
    outs = torch.randint(8, 65, (n,), generator=g).tolist()
    prompts = [torch.randint(3, 900, (m,), generator=g).tolist() for m in lens]
    makers = {"herd": lambda: Engine(ours, tok, max_batch=B)} | ({"slot": lambda: slot(B)} if slot else {})
    seconds, tokens, theirs_s = dict.fromkeys(makers, float("inf")), {}, float("inf")
    for _ in range(repeats):
        for side, make in makers.items():
            t0 = time.perf_counter()
            engine = make()
            reqs = [engine.submit(p, SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=k))
                    for p, k in zip(prompts, outs, strict=True)]
            engine.run()
            seconds[side], tokens[side] = min(seconds[side], time.perf_counter() - t0), [r.output_ids for r in reqs]
        theirs_tokens, t0 = [], time.perf_counter()
        for i in range(0, n, B):
            group, k = prompts[i:i + B], max(outs[i:i + B])
            width = max(len(p) for p in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=theirs.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=theirs.device)
            out = theirs.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
            theirs_tokens += [row[width:width + m] for row, m in zip(out.tolist(), outs[i:i + B], strict=True)]
        theirs_s = min(theirs_s, time.perf_counter() - t0)
    useful = sum(outs)
    out = {"requests": n, "useful_tokens": useful, "transformers_tok_s": useful / theirs_s}
    for side in makers:
        out |= {f"{side}_tok_s": useful / seconds[side],
                "same" if side == "herd" else f"{side}_same": tokens[side] == theirs_tokens}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True,
                   help="also the mixed-length workload (default on)")
    p.add_argument("--slot", action=argparse.BooleanOptionalAction, default=None,
                   help="also the SlotBatch layout (CUDA graphs on a GPU); default on for cuda only")
    p.add_argument("--compile", action="store_true", help="the slot layout's step through torch.compile (implies "
                   "--slot; every batch size is compiled before the runs, as herd serve does)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/bench_engine.json")
    a = p.parse_args(argv)
    if a.slot is None:
        a.slot = torch.device(a.device).type == "cuda" or a.compile
    a.slot = a.slot or a.compile
    torch.set_num_threads(a.threads)
    size = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                intermediate_size=512, intermediate_size_mlp=1024, num_local_experts=8, vocab_size=2048,
                attention_chunk_size=128, floor_scale=8192)
    if a.quick:
        a.batches, a.new_tokens, a.repeats, size = "1,4", 8, 1, {"floor_scale": 8192}
    cfg = herd.preset("tiny", **size)
    import transformers
    from transformers import Llama4ForCausalLM

    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        herd.save_pretrained(herd.build_model(cfg, seed=0), tmp)
        dtype = getattr(torch, a.dtype)
        ours = herd.from_pretrained(tmp, dtype=dtype, device=a.device).eval()
        theirs = Llama4ForCausalLM.from_pretrained(tmp, dtype=dtype).to(a.device).eval()
    tok, rows, results = tiny_tokenizer(), [], {}

    def make_slot(B):
        return slot_engine(ours, tok, B, a.compile)
    g = torch.Generator().manual_seed(0)
    for B in [int(b) for b in a.batches.split(",")]:
        prompts = torch.randint(3, 900, (B, a.prompt_len), generator=g).tolist()
        best = {}
        for side in ("herd", "transformers") + (("slot",) if a.slot else ()):
            runs = [herd_run(ours, tok, prompts, a.new_tokens) if side == "herd" else
                    herd_run(ours, tok, prompts, a.new_tokens, make_slot) if side == "slot" else
                    hf_run(theirs, prompts, a.new_tokens) for _ in range(a.repeats)]
            ttft = min(r[0] for r in runs)
            decode = max(B * (a.new_tokens - 1) / max(r[1] - r[0], 1e-9) for r in runs)
            best[side] = {"ttft_s": ttft, "decode_tok_s": decode, "tokens": runs[-1][2]}
            print(f"[{time.strftime('%H:%M:%S')}] B={B} {side}: TTFT {ttft:.3f}s, decode {decode:,.0f} tok/s",
                  file=sys.stderr, flush=True)
        h, t = best["herd"], best["transformers"]
        same = h["tokens"] == t["tokens"]
        slot_cells = ""
        if a.slot:
            sl = best["slot"]
            ratio, ok = sl["decode_tok_s"] / t["decode_tok_s"], sl["tokens"] == t["tokens"]
            slot_cells = f"{sl['ttft_s']:.3f} | {sl['decode_tok_s']:,.0f} | {ratio:.2f}x | {ok} |"
        step_ms, mm_ms = matmul_share(ours, tok, prompts)
        measured = mm_ms == mm_ms  # NaN on a GPU (matmul_share)
        ceiling = B / (mm_ms / 1e3) if measured else None
        loop_ms = matmul_loop_ms(ours, B) if measured else None
        results[B] = {k: {x: y for x, y in v.items() if x != "tokens"} for k, v in best.items()} | {
            "same": same, "slot_same": best["slot"]["tokens"] == t["tokens"] if a.slot else None,
            "herd_step_ms": step_ms, "herd_matmul_ms": mm_ms if measured else None, "matmul_loop_ms": loop_ms,
            "ceiling_tok_s": ceiling}
        print(f"[{time.strftime('%H:%M:%S')}] B={B} herd step {step_ms:.2f} ms, matmuls {mm_ms:.2f} ms, "
              f"matmul loop {loop_ms} ms", file=sys.stderr, flush=True)
        share = f"{mm_ms / step_ms:.0%} | {loop_ms:.2f} | {ceiling:,.0f} | {ceiling / t['decode_tok_s']:.2f}x" \
            if measured else "n/a | n/a | n/a | n/a"
        rows.append(f"| {B} | {h['ttft_s']:.3f} | {t['ttft_s']:.3f} | {h['decode_tok_s']:,.0f} | "
                    f"{t['decode_tok_s']:,.0f} | {h['decode_tok_s'] / t['decode_tok_s']:.2f}x | {share} | {same} | "
                    f"{slot_cells}".rstrip())
    slot_head = ("TTFT slot (s) | decode slot tok/s | slot / transformers | slot same tokens |",
                 "---:|---:|---:|---|") if a.slot else ("", "")
    print("| batch | TTFT herd (s) | TTFT transformers (s) | decode herd tok/s | decode transformers tok/s | "
          "herd / transformers | matmuls in herd's step | matmul loop ms | ceiling tok/s | ceiling / transformers | "
          f"same tokens |{' ' * a.slot}{slot_head[0]}\n"
          f"|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|{slot_head[1]}")
    print("\n".join(rows))
    mixed = {}
    if a.mixed:
        for B in [int(b) for b in a.batches.split(",")]:
            m = mixed[B] = mixed_run(ours, theirs, tok, B, g, a.repeats, make_slot if a.slot else None)
            print(f"[{time.strftime('%H:%M:%S')}] mixed B={B}: herd {m['herd_tok_s']:,.0f} tok/s, transformers "
                  f"{m['transformers_tok_s']:,.0f} tok/s", file=sys.stderr, flush=True)
        print("\n| batch | requests | useful tokens | herd tok/s | transformers tok/s | herd / transformers | "
              "same tokens |" + (" slot tok/s | slot / transformers | slot same tokens |" if a.slot else "") +
              "\n|---:|---:|---:|---:|---:|---:|---|" + ("---:|---:|---|" if a.slot else ""))
        for B, m in mixed.items():
            extra = (f" {m['slot_tok_s']:,.0f} | {m['slot_tok_s'] / m['transformers_tok_s']:.2f}x | {m['slot_same']} |"
                     if a.slot else "")
            print(f"| {B} | {m['requests']} | {m['useful_tokens']:,} | {m['herd_tok_s']:,.0f} | "
                  f"{m['transformers_tok_s']:,.0f} | {m['herd_tok_s'] / m['transformers_tok_s']:.2f}x | {m['same']} |"
                  + extra)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name() if torch.device(a.device).type == "cuda" else \
        platform.processor() or platform.machine()
    out.write_text(json.dumps({"machine": machine, "device": a.device, "dtype": a.dtype, "threads": a.threads,
                               "torch": torch.__version__, "transformers": transformers.__version__,
                               "config": size or "tiny", "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                               "slot_engine": a.slot, "slot_compiled": a.compile, "results": results,
                               "mixed": mixed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
