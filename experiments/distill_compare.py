"""Distillation at tiny scale: at equal steps, does the distilled student beat the same student trained alone?

Question: herd.train.distill mixes a frozen teacher's soft targets into the loss (Llama 4's co-distillation, Hinton
et al. arXiv:1503.02531). Given the same student, data, seed and number of steps, is its validation loss lower when
it learns from a stronger teacher than when it learns from the labels alone?

Method (all three runs through `herd.train.trainer.train`, the "tiny" training preset: AdamW, lr 3e-3 cosine to
3e-4 after 30 warmup steps, the built-in corpus packed into 16 x 64-token batches, seed 0):
1. teacher: the tiny preset at twice the width (hidden 128, expert widths 192 / dense 384, same 4 layers, 4 heads of
   32, 4 experts top-1 + shared), trained for `--teacher-steps` steps (more than the students get), so that it is
   clearly better than any student run;
2. student alone: the tiny preset, `--steps` steps, plain cross-entropy;
3. distilled student: the identical run (same init, same batches in the same order, same schedule) with
   `teacher=<run 1's directory>`: loss = alpha * tau^2 * KL(teacher || student) + (1 - alpha) * CE. Default
   alpha linear from 0.7 to 0.1 over the run and tau 1.0. Why: at tau 1 the soft term is the cross-entropy against
   the teacher's full next-token distribution, the same quantity the validation loss scores; leaning on it early
   (when the teacher's distribution carries far more signal per token than a one-hot label) and handing over to the
   labels late keeps the student from being capped by a teacher it may approach. The choice was fixed before the full
   run; other values can be tried with --alpha / --alpha-end / --tau.
Validation loss and bits per byte are measured every `--eval-every` steps on the same `--eval-batches` batches of
the corpus's validation split for all three runs. The teacher's training cost, and the teacher forward pass that
makes each distilled step slower, are not charged to the distilled student: the claim is "at equal steps". One seed:
a gap of a few hundredths of a nat may be within seed-to-seed noise.

Run:  .venv/bin/python experiments/distill_compare.py           (about 9 minutes on an idle 2-core CPU: teacher
                                                                1500 steps at ~115 ms; students 1100 steps at ~80
                                                                ms alone, ~205 ms distilled; plus evals)
      .venv/bin/python experiments/distill_compare.py --quick   (teacher 40, students 30 steps, ~30 s: a smoke test)
Writes experiments/results/distill_compare.json and .png (--quick: runs/exp-distill/quick.json and .png); training
runs go to runs/exp-distill/{teacher,student,distilled}, removed at the start.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

import herd
from herd.sizes import count_params
from herd.train.plots import read_metrics
from herd.train.train_config import train_preset
from herd.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "runs" / "exp-distill"
TEACHER = {"hidden_size": 128, "intermediate_size": 192, "intermediate_size_mlp": 384}  # tiny at twice the width


def read_evals(out_dir: Path) -> list[dict]:
    """One row per evaluation: step, val loss, val bits per byte (and alpha, KL of the step's train line, if any)."""
    recs = read_metrics(out_dir)
    train_recs = {r["step"]: r for r in recs if r["kind"] == "train"}
    rows = []
    for r in recs:
        if r["kind"] == "eval":
            t = train_recs.get(r["step"], {})
            rows.append(
                {"step": r["step"], "val_loss": r["val_loss"], "val_bpb": r["val_bpb"]}
                | {k: t[k] for k in ("alpha", "kl") if k in t}
            )
    return rows


def run_one(name: str, steps: int, args, **settings) -> dict:
    out = RUNS / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_preset(
        "tiny",
        steps=steps,
        warmup=min(30, steps // 10),
        eval_every=args.eval_every,
        log_every=args.eval_every,
        eval_batches=args.eval_batches,
        ckpt_every=steps,
        keep_last=1,
        seed=args.seed,
        out_dir=str(out),
        export=False,
        plots=False,
        samples=False,
        **settings,
    )
    counts = count_params(herd.preset(cfg.model, **cfg.model_overrides))
    what = f"teacher {cfg.teacher}, alpha {cfg.alpha} -> {cfg.alpha_end} ({cfg.alpha_schedule}), tau {cfg.tau}"
    print(
        f"[{name}] {counts.total:,} params, {counts.active:,} active; {steps} steps of {cfg.batch_size}x"
        f"{cfg.seq_len} tokens{'; ' + what if cfg.teacher else ''} -> {out}",
        flush=True,
    )
    t0 = time.perf_counter()
    train(cfg)
    evals = read_evals(out)
    return {
        "steps": steps,
        "model_overrides": cfg.model_overrides,
        "params_total": counts.total,
        "params_active": counts.active,
        "seconds": round(time.perf_counter() - t0, 1),
        "evals": evals,
        "val_loss": evals[-1]["val_loss"],
        "val_bpb": evals[-1]["val_bpb"],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    alone, dist = runs["student"]["evals"], runs["distilled"]["evals"]
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, label in (("student", "student alone"), ("distilled", "distilled student")):
        e = runs[name]["evals"][1:]  # step 0 (the untrained model) would squash the interesting part of the axis
        ax.plot([r["step"] for r in e], [r["val_loss"] for r in e], marker="o", ms=2, label=label)
    t = runs["teacher"]
    ax.axhline(t["val_loss"], color="gray", ls="--", lw=1, label=f"teacher after {t['steps']} steps")
    finals = [runs[k]["val_loss"] for k in runs]
    ax.set_ylim(min(finals) - 0.1, max(finals) + 1.0)
    ax.set_xlabel("student step")
    ax.set_ylabel("validation loss (nats / token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    steps = [r["step"] for r in alone[1:]]
    gap_ax.plot(
        steps,
        [a["val_loss"] - d["val_loss"] for a, d in zip(alone[1:], dist[1:], strict=True)],
        marker="o",
        ms=2,
        color="C2",
        label="val loss: alone - distilled (> 0: distillation helps)",
    )
    gap_ax.axhline(0, color="gray", lw=1)
    gap_ax.set_xlabel("student step")
    gap_ax.set_ylabel("val loss gap (nats / token)")
    gap_ax.grid(alpha=0.3)
    alpha_ax = gap_ax.twinx()
    alpha_ax.plot(
        [r["step"] for r in dist[1:]],
        [r.get("alpha", float("nan")) for r in dist[1:]],
        color="gray",
        ls=":",
        label="alpha (weight of the teacher term)",
    )
    alpha_ax.set_ylim(0, 1)
    alpha_ax.set_ylabel("alpha")
    lines = gap_ax.get_legend_handles_labels(), alpha_ax.get_legend_handles_labels()
    gap_ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8)
    d = result["distill"]
    fig.suptitle(
        f"tiny student, {runs['student']['steps']} steps, with and without a 2x-wide teacher "
        f"(alpha {d['alpha']} -> {d['alpha_end']} {d['alpha_schedule']}, tau {d['tau']}), seed {result['seed']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(result: dict) -> None:
    runs = result["runs"]
    labels = {"teacher": "teacher (2x wide)", "student": "student alone", "distilled": "distilled student"}
    print("\n| run | total params | active params | steps | val loss | bits/byte | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        print(
            f"| {labels[name]} | {r['params_total']:,} | {r['params_active']:,} | {r['steps']} | "
            f"{r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['seconds']:.0f} |"
        )
    gap = runs["student"]["val_loss"] - runs["distilled"]["val_loss"]
    gap_bpb = runs["student"]["val_bpb"] - runs["distilled"]["val_bpb"]
    if gap > 0:
        print(
            f"\nat equal steps the distilled student BEATS the student alone: val loss {gap:.4f} nats lower "
            f"({gap_bpb:.4f} bits/byte)."
        )
    else:
        print(
            f"\nat equal steps the distilled student does NOT beat the student alone: its val loss is "
            f"{-gap:.4f} nats higher ({-gap_bpb:.4f} bits/byte)."
        )
    if runs["teacher"]["val_loss"] >= runs["student"]["val_loss"]:
        print("note: the teacher is not better than the student alone, so this run does not test the claim.")
    print("one seed: gaps of a few hundredths of a nat are within seed-to-seed noise.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=1100, help="steps of each student run")
    ap.add_argument("--alpha", type=float, default=0.7, help="weight of the teacher term at the start")
    ap.add_argument("--alpha-end", type=float, default=0.1, help="... and at the end")
    ap.add_argument("--alpha-schedule", default="linear", choices=("constant", "linear", "cosine"))
    ap.add_argument("--tau", type=float, default=1.0, help="softmax temperature of both distributions in the KL")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=16, help="validation batches of 16 x 64 tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="teacher 40, students 30 steps: a smoke test")
    ap.add_argument("--out", help="results path without suffix (default experiments/results/distill_compare)")
    args = ap.parse_args()
    if args.quick:
        args.teacher_steps, args.steps, args.eval_every, args.eval_batches = 40, 30, 10, 2
    out = Path(args.out or (RUNS / "quick" if args.quick else RESULTS / "distill_compare"))
    torch.set_num_threads(args.threads)
    distill = {"alpha": args.alpha, "alpha_end": args.alpha_end, "alpha_schedule": args.alpha_schedule, "tau": args.tau}
    t0 = time.perf_counter()
    runs = {
        "teacher": run_one("teacher", args.teacher_steps, args, model_overrides=TEACHER),
        "student": run_one("student", args.steps, args),
    }
    runs["distilled"] = run_one("distilled", args.steps, args, teacher=str(RUNS / "teacher"), **distill)
    base = train_preset("tiny")
    result = {
        "question": "at equal steps, does the distilled student beat the same student trained alone on "
        "validation loss?",
        "seed": args.seed,
        "batch": base.batch_size,
        "seq_len": base.seq_len,
        "eval_every": args.eval_every,
        "eval_batches": args.eval_batches,
        "distill": distill,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    report(result)
    print(f"total {result['seconds']:.0f} s; wrote {out}.json / .png")


if __name__ == "__main__":
    main()
