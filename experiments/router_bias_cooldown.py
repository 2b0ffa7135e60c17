"""What does it cost to end a run without router biases, so that every engine reads the export as it was evaluated?

herd's default MoE balancing (aux-loss-free: Wang et al. 2024, arXiv:2408.15664) trains a selection bias per router.
Llama 4's Hugging Face format and the engines that read it (transformers, vLLM) have no router bias, so a model that
still needs its biases is served differently by them. herd decays the biases to exactly zero over the last
`bias_cooldown` share of the planned steps (herd.train.balance). This experiment trains the tiny preset with:
- `keep`: bias_cooldown=0, the biases kept to the end. Evaluated with them (what herd serves) and without them (what
  transformers computed on such an export: the bug this replaces);
- `cooldown 0.1` / `0.2` (the default) / `0.4`: the biases decayed to zero over that share of the run;
- `aux_loss`: no bias at all, Switch auxiliary loss (transformers' router_aux_loss_coef), which the format expresses.
For each: the final validation loss and bits per byte of the model as evaluated, the loss once its biases are dropped
(equal when there are none), and the expert-load imbalance (max / mean tokens per expert, averaged over MoE layers) of
the routing an engine without biases computes, over the validation batches. Several seeds: a difference counts only
beyond the seed-to-seed spread.

Run:  .venv/bin/python experiments/router_bias_cooldown.py             (600 steps x 5 variants x 3 seeds: ~20 min)
      .venv/bin/python experiments/router_bias_cooldown.py --quick     (smoke, seconds)
Writes experiments/results/router_bias_cooldown.{json,png} and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from herd.train import balance, train_preset
from herd.train.trainer import Run

ROOT = Path("runs/exp-router-bias")
RESULTS = Path("experiments/results")
VARIANTS = {"keep": dict(bias_cooldown=0.0), "cooldown 0.1": dict(bias_cooldown=0.1),
            "cooldown 0.2": dict(bias_cooldown=0.2), "cooldown 0.4": dict(bias_cooldown=0.4),
            "aux_loss": dict(balance="aux_loss", aux_coef=1e-2)}


@torch.no_grad()
def imbalance(run: Run) -> float:
    """Mean over MoE layers of max / mean expert load on the validation batches, routing as the model is now."""
    loads = 0
    for b in run.val_batches:
        _, router_logits = run.model(b["input_ids"], doc_ids=b["doc_ids"], return_router_logits=True)
        loads = loads + balance.expert_loads(run.model, router_logits)  # (L, E)
    return float((loads.max(1).values / loads.mean(1)).mean())


def one(name: str, seed: int, steps: int) -> dict:
    out = ROOT / f"{name.replace(' ', '-')}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_preset("tiny", seed=seed, steps=steps, warmup=max(1, steps // 20), eval_every=max(1, steps // 4),
                       log_every=max(1, steps // 6), ckpt_every=steps, out_dir=str(out), export=False, plots=False,
                       samples=False, **VARIANTS[name])
    t0 = time.perf_counter()
    run = Run(cfg)
    summary = run.fit()
    run.model.eval()
    res = {"val_loss": summary["val_loss"], "val_bpb": summary["val_bpb"], "time_s": time.perf_counter() - t0,
           "max_abs_bias": max(float(r.expert_bias.abs().max()) for r in balance.routers(run.model)),
           "imbalance_as_evaluated": imbalance(run)}
    balance.shrink_biases(run.model, 0.0)  # what an engine without router biases computes
    dropped = run.evaluate()
    res |= {"val_loss_without_biases": dropped["val_loss"], "val_bpb_without_biases": dropped["val_bpb"],
            "imbalance_without_biases": imbalance(run)}
    shutil.rmtree(out, ignore_errors=True)
    return res


def spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    steps, seeds = (12, 1) if a.quick else (a.steps, a.seeds)
    runs: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    total, done, t0 = len(VARIANTS) * seeds, 0, time.perf_counter()
    for seed in range(seeds):
        for name in VARIANTS:
            runs[name].append(one(name, seed, steps))
            done += 1
            eta = (time.perf_counter() - t0) / done * (total - done)
            r = runs[name][-1]
            print(f"[{done}/{total}] {name}, seed {seed}: val loss {r['val_loss']:.4f} "
                  f"(without biases {r['val_loss_without_biases']:.4f}), load max/mean without biases "
                  f"{r['imbalance_without_biases']:.2f}; ETA {eta / 60:.1f} min", flush=True)
    table = ["| variant | val loss as evaluated | val loss, biases dropped | bits/byte as evaluated | "
             "load max/mean as evaluated | load max/mean, biases dropped |", "|---|---:|---:|---:|---:|---:|"]
    for name, rs in runs.items():
        col = {k: spread([r[k] for r in rs]) for k in rs[0]}
        table.append(f"| {name} | {col['val_loss']} | {col['val_loss_without_biases']} | {col['val_bpb']} | "
                     f"{col['imbalance_as_evaluated']} | {col['imbalance_without_biases']} |")
    print(f"\ntiny preset, {steps} steps, seeds 0..{seeds - 1} (mean ± standard deviation over seeds):")
    print("\n".join(table))
    if a.quick:
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "router_bias_cooldown.json").write_text(json.dumps({"steps": steps, "seeds": seeds, "runs": runs,
                                                                   "table": table}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(runs)
    for ax, (key, label) in zip(axes, [("val_loss", "validation loss (nats/token)"),
                                       ("imbalance", "expert load max / mean")], strict=True):
        for j, (suffix, what, marker) in enumerate([("", "as evaluated", "o"), ("_without_biases",
                                                                                 "biases dropped", "x")]):
            k = key + (suffix if key == "val_loss" else ("_as_evaluated" if not suffix else suffix))
            for i, name in enumerate(names):
                ys = [r[k] for r in runs[name]]
                ax.scatter([i + (j - 0.5) * 0.2] * len(ys), ys, marker=marker, color=f"C{j}",
                           label=what if i == 0 else None)
        ax.set_xticks(range(len(names)), names, rotation=15)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"Router biases at the end of a run: tiny preset, {steps} steps, {seeds} seeds")
    fig.tight_layout()
    fig.savefig(RESULTS / "router_bias_cooldown.png", dpi=120)
    print(f"wrote {RESULTS / 'router_bias_cooldown.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
