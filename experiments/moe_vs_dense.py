"""MoE vs dense at equal active parameters: does the MoE give a lower validation loss for the same training budget?

Question: the Llama 4 claim "for a fixed training budget, MoE beats dense", at tiny scale. Budget is measured two
ways: training FLOPs (what the claim is about) and wall-clock seconds on this machine (what a CPU user pays).

Method:
- MoE: the tiny preset (4 layers, width 64, every layer MoE: top-1 routing over `--experts` routed experts of width
  96 plus a shared expert of width 96, aux-loss-free balancing).
- Dense: the same model with `moe_layers=[]`, every layer a SwiGLU MLP whose width `intermediate_size_mlp` is chosen
  so that `herd.sizes.count_params(...).active` matches the MoE's (both counts are printed; they differ by less than
  one column of the dense MLP per layer). Equal active parameters give equal FLOPs per token: equal steps, equal FLOPs.
- Both train with identical settings through `herd.train.trainer.train`: the "tiny" training preset (AdamW, lr 3e-3
  cosine to 3e-4 after 30 warmup steps), the built-in corpus packed into 16 x 64-token batches in the same order
  (same seed), `--steps` steps, validation loss and bits per byte every `--eval-every` steps on the same
  `--eval-batches` validation batches.
- FLOPs = `flops_per_token(model config, seq_len)` x tokens trained (6 x non-embedding active parameters + the
  attention term; the trainer's definition).
- Wall-clock = training seconds only: the sum of the trainer's own step timings (each logged "train" line carries
  tok_s, the throughput since the previous logged line, so seconds = tokens in that window / tok_s). Evaluation,
  checkpointing and start-up are left out, so they cannot favour either model; the total seconds of each run are
  reported too. The runs are sequential, so other work on the machine slows whichever run it overlaps: run on an
  otherwise idle machine, and compare the mean ms/step with the median over logged windows (the table shows both).
- Reported: val loss and bits per byte of each model at equal FLOPs (the smaller final FLOPs of the two; the other
  curve is interpolated), and of each at the wall-clock time at which the faster run ended (the slower run's curve
  interpolated linearly between its evaluations). One seed: differences of a few hundredths of a nat are within
  what a different seed could move.

Run:  .venv/bin/python experiments/moe_vs_dense.py           (about 6.5 minutes on this 2-core CPU: MoE ~80 ms,
                                                             dense ~62 ms per step, 2400 steps each, plus evals)
      .venv/bin/python experiments/moe_vs_dense.py --quick   (40 steps each, ~20 s when idle: a smoke test)
Writes experiments/results/moe_vs_dense.json and .png (--quick: runs/exp-moe-vs-dense/quick.json and .png);
training runs go to runs/exp-moe-vs-dense/{moe,dense}, removed at the start.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import herd
from herd.sizes import count_params
from herd.train.plots import read_metrics
from herd.train.train_config import train_preset
from herd.train.trainer import flops_per_token, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "runs" / "exp-moe-vs-dense"


def model_shapes(experts: int) -> dict[str, dict]:
    """model_overrides of the MoE and of the dense model whose active parameter count is closest to it."""
    moe = {"num_local_experts": experts}
    target = count_params(herd.preset("tiny", **moe)).active
    width = min(range(8, 4096), key=lambda w: abs(count_params(dense_config(w)).active - target))
    return {"moe": moe, "dense": {"moe_layers": [], "intermediate_size_mlp": width}}


def dense_config(width: int):
    return herd.preset("tiny", moe_layers=[], intermediate_size_mlp=width)


def read_curve(out_dir: Path, fpt: float) -> tuple[list[dict], list[float]]:
    """One row per evaluation (step, tokens, FLOPs, training seconds so far, val loss, val bits per byte), and the
    mean ms per step of every logged window (their median is robust to a moment of contention on the machine)."""
    recs = read_metrics(out_dir)
    train_recs = [r for r in recs if r["kind"] == "train"]
    tokens = {0: 0, **{r["step"]: r["tokens"] for r in train_recs}}
    clock, window_ms, prev, t = {0: 0.0}, [], 0, 0.0
    for r in train_recs:
        if "tok_s" in r:  # throughput over the steps since the previous logged line
            dt = (r["tokens"] - tokens[prev]) / r["tok_s"]
            t += dt
            window_ms.append(1e3 * dt / (r["step"] - prev))
            clock[r["step"]], prev = t, r["step"]
    steps = sorted(clock)
    rows = []
    for r in recs:
        if r["kind"] == "eval":
            sec = float(np.interp(r["step"], steps, [clock[s] for s in steps]))
            rows.append(
                {
                    "step": r["step"],
                    "tokens": tokens[r["step"]],
                    "flops": fpt * tokens[r["step"]],
                    "train_seconds": sec,
                    "val_loss": r["val_loss"],
                    "val_bpb": r["val_bpb"],
                }
            )
    return rows, window_ms


def at(curve: list[dict], x_key: str, x: float) -> dict:
    """val loss and bits per byte interpolated linearly at x (FLOPs or training seconds)."""
    xs = [r[x_key] for r in curve]
    return {k: float(np.interp(x, xs, [r[k] for r in curve])) for k in ("val_loss", "val_bpb")}


def run_one(name: str, overrides: dict, args) -> dict:
    out = RUNS / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_preset(
        "tiny",
        model_overrides=overrides,
        steps=args.steps,
        warmup=min(30, args.steps // 10),
        eval_every=args.eval_every,
        log_every=args.eval_every,
        eval_batches=args.eval_batches,
        ckpt_every=args.steps,
        keep_last=1,
        seed=args.seed,
        out_dir=str(out),
        export=False,
        plots=False,
        samples=False,
    )
    mcfg = herd.preset(cfg.model, **cfg.model_overrides)
    counts, fpt = count_params(mcfg), flops_per_token(mcfg, cfg.seq_len)
    print(
        f"[{name}] {overrides}: {counts.total:,} params, {counts.active:,} active, {fpt / 1e6:.2f} MFLOP/token; "
        f"{args.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens -> {out}",
        flush=True,
    )
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    curve, window_ms = read_curve(out, fpt)
    return {
        "model_overrides": overrides,
        "params_total": counts.total,
        "params_active": counts.active,
        "params_active_non_embedding": counts.active - counts.embedding,
        "flops_per_token": fpt,
        "train_seconds": curve[-1]["train_seconds"],
        "wall_seconds": wall,
        "ms_per_step": 1e3 * curve[-1]["train_seconds"] / args.steps,
        "ms_per_step_median_window": float(np.median(window_ms)),
        "curve": curve,
    }


def compare(models: dict) -> dict:
    """The equal-FLOPs and equal-time read-outs (module docstring)."""
    flops = min(m["curve"][-1]["flops"] for m in models.values())
    first = min(models, key=lambda k: models[k]["train_seconds"])
    seconds = models[first]["train_seconds"]
    return {
        "flops": flops,
        "at_flops": {k: at(m["curve"], "flops", flops) for k, m in models.items()},
        "faster": first,
        "seconds": seconds,
        "at_seconds": {k: at(m["curve"], "train_seconds", seconds) for k, m in models.items()},
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = (("flops", 1e12, "training FLOPs (x 1e12)"), ("train_seconds", 1.0, "training seconds (2-core CPU)"))
    for ax, (key, scale, label) in zip(axes, panels, strict=True):
        for name, m in result["models"].items():
            c = m["curve"][1:]  # step 0 (the untrained model) would squash the interesting part of the axis
            ax.plot(
                [r[key] / scale for r in c],
                [r["val_loss"] for r in c],
                marker="o",
                ms=2,
                label=f"{name} ({m['params_active']:,} active / {m['params_total']:,} total)",
            )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    cmp = result["comparison"]
    axes[0].axvline(cmp["flops"] / 1e12, color="gray", ls=":", lw=1)
    axes[1].axvline(cmp["seconds"], color="gray", ls=":", lw=1, label=f"{cmp['faster']} finished")
    axes[0].set_ylabel("validation loss (nats / token)")
    finals = [m["curve"][-1]["val_loss"] for m in result["models"].values()]
    axes[0].set_ylim(min(finals) - 0.1, min(finals) + 1.2)
    axes[1].legend(fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"tiny MoE vs dense at equal active parameters: {result['steps']} steps of "
        f"{result['batch']}x{result['seq_len']} tokens, built-in corpus, seed {result['seed']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(result: dict) -> None:
    cmp = result["comparison"]
    print(
        f"\n| model | total params | active params | MFLOP/token | ms/step (median) | val loss @ {cmp['flops']:.2e} "
        f"FLOPs | bits/byte @ FLOPs | val loss @ {cmp['seconds']:.0f} s | bits/byte @ s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in result["models"].items():
        f, s = cmp["at_flops"][name], cmp["at_seconds"][name]
        print(
            f"| {name} | {m['params_total']:,} | {m['params_active']:,} | {m['flops_per_token'] / 1e6:.3f} | "
            f"{m['ms_per_step']:.1f} ({m['ms_per_step_median_window']:.1f}) | {f['val_loss']:.4f} | "
            f"{f['val_bpb']:.4f} | {s['val_loss']:.4f} | {s['val_bpb']:.4f} |"
        )
    d_f = cmp["at_flops"]["dense"]["val_loss"] - cmp["at_flops"]["moe"]["val_loss"]
    d_s = cmp["at_seconds"]["dense"]["val_loss"] - cmp["at_seconds"]["moe"]["val_loss"]
    print(
        f"\nequal FLOPs: the MoE's val loss is {abs(d_f):.4f} nats {'lower' if d_f > 0 else 'HIGHER'} than dense's "
        f"({'MoE wins' if d_f > 0 else 'dense wins'})."
    )
    print(
        f"equal wall-clock ({cmp['seconds']:.1f} s of training, when {cmp['faster']} finished): the MoE's val loss "
        f"is {abs(d_s):.4f} nats {'lower' if d_s > 0 else 'HIGHER'} ({'MoE wins' if d_s > 0 else 'dense wins'})."
    )
    print("one seed: gaps of a few hundredths of a nat are within seed-to-seed noise.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=16, help="validation batches of 16 x 64 tokens")
    ap.add_argument("--experts", type=int, default=4, help="routed experts per MoE layer (the tiny preset has 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="40 steps each: a smoke test")
    ap.add_argument("--out", help="results path without suffix (default experiments/results/moe_vs_dense)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.eval_batches = 40, 10, 2
    out = Path(args.out or (RUNS / "quick" if args.quick else RESULTS / "moe_vs_dense"))
    torch.set_num_threads(args.threads)
    shapes = model_shapes(args.experts)
    gap = (
        count_params(herd.preset("tiny", **shapes["moe"])).active
        - count_params(dense_config(shapes["dense"]["intermediate_size_mlp"])).active
    )
    print(
        f"dense width {shapes['dense']['intermediate_size_mlp']} matches the MoE's active parameters "
        f"to {gap:+,} parameters",
        flush=True,
    )
    t0, base = time.perf_counter(), train_preset("tiny")
    models = {name: run_one(name, ov, args) for name, ov in shapes.items()}
    result = {
        "question": "for a fixed training budget (FLOPs, wall-clock), does MoE beat dense at equal active parameters?",
        "steps": args.steps,
        "batch": base.batch_size,
        "seq_len": base.seq_len,
        "seed": args.seed,
        "eval_every": args.eval_every,
        "eval_batches": args.eval_batches,
        "threads": args.threads,
        "time_measure": "training seconds: sum of the trainer's step timings (tok_s windows); evals, "
        "checkpoints and start-up excluded",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "models": models,
        "comparison": compare(models),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    report(result)
    print(f"total {result['seconds']:.0f} s; wrote {out}.json / .png")


if __name__ == "__main__":
    main()
