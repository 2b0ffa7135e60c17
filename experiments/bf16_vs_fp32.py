"""Does bfloat16 autocast hold the float32 loss curve? The tiny preset trained twice, identical but for `dtype`.

Method: two runs of the same config (same seed, data order, schedule); the only difference is that matmuls run under
bfloat16 autocast in one (weights, optimizer state, softmax and loss stay float32, herd.train.trainer). Compared:
the per-step training loss (its 20-step moving average, to see the trend through the batch-to-batch noise), the
validation loss and bits per byte at every evaluation, and the wall-clock time of each run. The tolerance stated in
the README is the one measured here.

Run:  .venv/bin/python experiments/bf16_vs_fp32.py            (300 steps each; a few minutes on 2 CPU cores)
      .venv/bin/python experiments/bf16_vs_fp32.py --quick    (smoke, seconds)
Writes experiments/results/bf16_vs_fp32.{json,png} and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from herd.train import train, train_preset
from herd.train.plots import read_metrics

ROOT = Path("runs/exp-bf16-vs-fp32")
RESULTS = Path("experiments/results")


def smooth(xs: list[float], k: int = 20) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    steps = 12 if a.quick else a.steps
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = ROOT / dtype
        shutil.rmtree(out, ignore_errors=True)
        cfg = train_preset("tiny", dtype=dtype, steps=steps, warmup=max(1, steps // 20), eval_every=max(1, steps // 6),
                           log_every=max(1, steps // 10), ckpt_every=steps, out_dir=str(out), export=False,
                           plots=False, samples=False)
        print(f"== {dtype}: {steps} steps", flush=True)
        t0 = time.perf_counter()
        summary = train(cfg)
        recs = read_metrics(out)
        runs[dtype] = {"time_s": time.perf_counter() - t0, "val_loss": summary["val_loss"],
                       "val_bpb": summary["val_bpb"],
                       "loss": [r["loss"] for r in recs if r["kind"] == "train"],
                       "evals": [(r["step"], r["val_loss"], r["val_bpb"]) for r in recs if r["kind"] == "eval"]}
    f, b = runs["float32"], runs["bfloat16"]
    sf, sb = smooth(f["loss"]), smooth(b["loss"])
    skip = len(sf) // 10  # the first steps fall fast: compare the curve after them
    rel = [abs(x - y) / x for x, y in zip(sf[skip:], sb[skip:], strict=True)]
    val_rel = [abs(x[1] - y[1]) / x[1] for x, y in zip(f["evals"], b["evals"], strict=True)]
    result = {"steps": steps, "threads": a.threads, "runs": runs,
              "max_rel_diff_smoothed_train_loss": max(rel), "max_rel_diff_val_loss": max(val_rel),
              "final_val_loss": {"float32": f["val_loss"], "bfloat16": b["val_loss"]},
              "final_val_bpb": {"float32": f["val_bpb"], "bfloat16": b["val_bpb"]},
              "bf16_time_over_fp32": b["time_s"] / f["time_s"]}
    print("\n| dtype | final val loss | val bits/byte | wall time (s) |\n|---|---:|---:|---:|")
    for k, r in runs.items():
        print(f"| {k} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['time_s']:.0f} |")
    print(f"max relative gap: smoothed train loss {100 * max(rel):.2f}% (after step {skip}), "
          f"val loss {100 * max(val_rel):.2f}%; bf16 took {result['bf16_time_over_fp32']:.2f}x the time")
    if a.quick:
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bf16_vs_fp32.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, r), s, c in ((("float32", f), sf, "tab:blue"), (("bfloat16", b), sb, "tab:red")):
        ax.plot(range(1, len(s) + 1), s, color=c, lw=1.2, label=f"{name} train (20-step mean)")
        ax.plot([e[0] for e in r["evals"]], [e[1] for e in r["evals"]], "o--", color=c, ms=3, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("tiny preset: float32 vs bfloat16 autocast")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "bf16_vs_fp32.png", dpi=100)
    print(f"wrote {RESULTS / 'bf16_vs_fp32.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
