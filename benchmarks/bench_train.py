"""Training-step throughput and MFU: herd vs Hugging Face transformers on the same Llama 4 weights, same batch.

One training step = forward over (B, T) random token ids, cross-entropy on the next tokens (the same code for both
sides, on the logits each model returns), backward, global-norm clipping at 1.0 and an AdamW step (fused on CUDA).
Each side starts from the same safetensors checkpoint (herd writes it, transformers' `from_pretrained` reads it), runs
`--warmup` untimed steps and then `--steps` timed ones; reported is the median step time (CUDA synchronised). The
first step's losses of both sides are printed and compared: on the same weights and batch they must agree (float32:
to ~1e-5), so the two sides compute the same function.

Modes (`--modes`, comma-separated `side:dtype[:compile][:fp8]`):
- side herd | transformers; dtype float32 (plain) or bfloat16 (autocast, float32 master weights as in herd.train);
- compile: `torch.compile` the model (herd's MoE groups tokens per expert with a host sync: a graph break per MoE
  layer, the rest is compiled);
- fp8: herd.train.fp8.apply_fp8 (torchao tensorwise float8 on the large decoder linears; needs an FP8 GPU for speed).

MFU = training FLOPs per token (herd.train.trainer.flops_per_token: 6 x non-embedding ACTIVE parameters + attention)
x tokens/s / peak, where the peak is a large matmul measured in the same run on the same device and dtype (so MFU is
against what this machine really does, not a datasheet). The same FLOPs are credited to transformers: its MoE runs
every expert on every token, so it does E/k times more routed work for the same result; that extra work is the
main reason for the ratio.

Configs: `--config moe` (default) or `dense` (the same shape with every layer a dense SwiGLU of width
`--mlp-width`); `--size cpu` (hidden 256, 4 layers, 8 experts: a few seconds a step on 2 cores) or `gpu` (hidden
2048, 4 layers, 8 experts of width 4096; 1.1B params, ~0.3B active).

Run:  .venv/bin/python benchmarks/bench_train.py                      (CPU, float32 and bfloat16, ~3 minutes)
      .venv/bin/python benchmarks/bench_train.py --quick              (smoke run, seconds)
      python benchmarks/bench_train.py --size gpu --modes herd:bfloat16,transformers:bfloat16,herd:bfloat16:compile
Writes a markdown table to stdout and JSON to benchmarks/results/bench_train[_<tag>].json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SIZES = {
    "quick": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=64, intermediate_size_mlp=128, num_local_experts=4, vocab_size=1024,
                  attention_chunk_size=16),
    "cpu": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                intermediate_size=512, intermediate_size_mlp=1024, num_local_experts=8, vocab_size=8192,
                attention_chunk_size=128),
    "gpu": dict(hidden_size=2048, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                intermediate_size=4096, intermediate_size_mlp=8192, num_local_experts=8, vocab_size=32000,
                attention_chunk_size=2048),
}
SHAPES = {"quick": (2, 32), "cpu": (8, 256), "gpu": (4, 4096)}  # (batch, seq_len)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--quick", action="store_true", help="--size quick with 1 warm-up and 2 timed steps")
    p.add_argument("--config", choices=["moe", "dense"], default="moe")
    p.add_argument("--modes", default="herd:float32,transformers:float32,herd:bfloat16,transformers:bfloat16")
    p.add_argument("--batch", type=int), p.add_argument("--seq-len", type=int)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.warmup, a.steps = "quick", 1, 2
    a.batch = a.batch or SHAPES[a.size][0]
    a.seq_len = a.seq_len or SHAPES[a.size][1]
    return a


def make_config(a):
    import herd

    kw = dict(SIZES[a.size])
    if a.config == "dense":
        kw["moe_layers"] = []
    return herd.preset("tiny", **kw, max_position_embeddings=max(4096, a.seq_len))


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the best of a few large square matmuls on this device and dtype."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for i in range(6 if device.type == "cuda" else 4):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
        sync(device)
        if i:  # the first is a warm-up
            best = min(best, (time.perf_counter() - t0) / (10 if device.type == "cuda" else 1))
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(side: str, ckpt: str, device: torch.device):
    if side == "herd":
        from herd.formats.hf import from_pretrained

        return from_pretrained(ckpt, dtype=torch.float32).to(device)
    import transformers
    from transformers import Llama4ForCausalLM

    transformers.utils.logging.set_verbosity_error()
    return Llama4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device)


def run_mode(mode: str, ckpt: str, mcfg, batches, a) -> dict:
    side, dtype, *flags = mode.split(":")
    device = torch.device(a.device)
    model = load(side, ckpt, device).train()
    if "fp8" in flags:
        from herd.train.fp8 import apply_fp8

        model = apply_fp8(model)
    fwd = torch.compile(model) if "compile" in flags else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1,
                            fused=device.type == "cuda" or None)
    ac = dict(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step(ids, labels) -> float:
        with torch.autocast(**ac):
            out = fwd(ids)
        logits = out if torch.is_tensor(out) else out.logits  # herd returns logits; transformers an output object
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    times, losses = [], []
    torch.manual_seed(0)
    for i, (ids, labels) in enumerate(batches[: a.warmup + a.steps]):
        sync(device)
        t0 = time.perf_counter()
        losses.append(float(step(ids.to(device), labels.to(device))))
        sync(device)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        log(f"  {mode} step {i + 1}/{a.warmup + a.steps}: loss {losses[-1]:.5f}, {time.perf_counter() - t0:.3f}s")
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    t = statistics.median(times)
    return {"mode": mode, "step_s": t, "tok_s": a.batch * a.seq_len / t, "first_loss": losses[0],
            "losses": losses, "peak_gpu_mem_gib": mem}


def main(argv=None) -> int:
    a = parse_args(argv)
    import herd
    from herd.sizes import count_params
    from herd.train.trainer import flops_per_token

    device = torch.device(a.device)
    torch.set_float32_matmul_precision("highest")  # float32 means float32 (no TF32) on both sides
    mcfg = make_config(a)
    counts = count_params(mcfg)
    fpt = flops_per_token(mcfg, a.seq_len)
    log(f"config {a.config}/{a.size}: {counts.total / 1e6:.1f}M params, {counts.active / 1e6:.1f}M active; "
        f"batch {a.batch}x{a.seq_len}; {fpt / 1e9:.3f} GFLOP per token; device {device}")
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(a.warmup + a.steps):
        seq = torch.randint(0, mcfg.vocab_size, (a.batch, a.seq_len + 1), generator=g)
        batches.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        herd.save_pretrained(herd.build_model(mcfg, seed=0), tmp)
        results = []
        for mode in a.modes.split(","):
            dtype = mode.split(":")[1]
            if dtype not in peaks:
                peaks[dtype] = matmul_peak(device, getattr(torch, dtype))
                log(f"measured {dtype} matmul peak: {peaks[dtype] / 1e12:.2f} TFLOP/s")
            r = run_mode(mode, tmp, mcfg, batches, a)
            gc.collect()  # the mode's model and optimizer are gone: free their memory before the next
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            r["mfu"] = fpt * r["tok_s"] / peaks[dtype]
            results.append(r)
    by = {r["mode"]: r for r in results}
    rows = ["| mode | step (s) | tokens/s | MFU | first loss | herd / transformers |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        side, dtype, *flags = r["mode"].split(":")
        peer = by.get(f"transformers:{dtype}")
        ratio = f"{r['tok_s'] / peer['tok_s']:.2f}x" if side == "herd" and peer else ""
        rows.append(f"| {r['mode']} | {r['step_s']:.3f} | {r['tok_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                    f"{r['first_loss']:.5f} | {ratio} |")
    print("\n".join(rows))
    for dtype in peaks:
        h, t = by.get(f"herd:{dtype}"), by.get(f"transformers:{dtype}")
        if h and t:
            print(f"{dtype}: first-step loss herd {h['first_loss']:.6f} vs transformers {t['first_loss']:.6f} "
                  f"(|diff| {abs(h['first_loss'] - t['first_loss']):.2e})")
    import transformers

    info = {"machine": platform.processor() or platform.machine(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.platform(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__}
    out = Path(a.out or f"benchmarks/results/bench_train{'' if a.size == 'cpu' else '_' + a.size}"
               f"{'' if a.config == 'moe' else '_' + a.config}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "config": {"size": a.size, "config": a.config, "batch": a.batch,
                                                        "seq_len": a.seq_len, "params": counts.total,
                                                        "active": counts.active, "flops_per_token": fpt},
                               "peak_flops": peaks, "results": results}, indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
