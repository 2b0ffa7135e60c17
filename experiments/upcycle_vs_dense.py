"""Sparse upcycling vs continuing the dense model, at equal training FLOPs.

Question: given a trained dense model, is it better to keep training it, or to turn it into a mixture of experts
(herd upcycle: every FFN copied into a shared and `--experts` routed experts, the first step computing the dense
model exactly; Komatsuzaki et al. 2022, arXiv:2212.05055) and train that for the same compute?

Method:
- Base: the tiny preset with every layer dense (`moe_layers=[]`), trained `--base-steps` steps on the built-in
  corpus (seed 0) and exported.
- Upcycled: herd.train.upcycle.upcycle_checkpoint(base, experts=--experts, every=1); the probe's max |logit
  difference| to the base is printed and saved (it should be float32 rounding).
- Both continue with the same trainer settings (the "tiny" training preset, constant LR `--lr`, the same batches in
  the same order for a given seed): dense for `--steps` steps, upcycled for as many steps as give the same training
  FLOPs (herd's flops_per_token: the upcycled model does about twice the dense FFN work per token, shared + one
  routed expert, so it gets fewer steps). Seeds 0 and 1 (the continuation's data order and balancing).
- Read-out: validation loss (same batches) of each at equal FLOPs, the other curve interpolated; and the curves
  against FLOPs in the plot. A difference counts only beyond the seed-to-seed spread.

Run:  .venv/bin/python experiments/upcycle_vs_dense.py [--seeds 0 1]        (a few minutes on 2 CPU cores)
      .venv/bin/python experiments/upcycle_vs_dense.py --quick              (smoke)
Writes experiments/results/upcycle_vs_dense.{json,png} and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from moe_vs_dense import at, read_curve  # noqa: E402 (the curve reading shared with the MoE experiment)

from herd.formats.hf import load_config  # noqa: E402
from herd.train.train_config import train_preset  # noqa: E402
from herd.train.trainer import flops_per_token, train  # noqa: E402

ROOT = Path("runs/exp-upcycle")
RESULTS = Path("experiments/results")


def _cfg(out: Path, steps: int, seed: int, eval_every: int, lr: float, **kw):
    return train_preset("tiny", steps=steps, warmup=0, lr=lr, min_lr=lr, eval_every=eval_every,
                        log_every=eval_every, eval_batches=8, ckpt_every=steps, keep_last=1, seed=seed,
                        out_dir=str(out), plots=False, samples=False, **kw)


def continue_run(name: str, init: str, steps: int, seed: int, eval_every: int, lr: float) -> dict:
    out = ROOT / f"{name}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = _cfg(out, steps, seed, eval_every, lr, init=init, export=False)
    fpt = flops_per_token(load_config(init), cfg.seq_len)
    train(cfg)
    curve, _ = read_curve(out, fpt)
    return {"name": name, "seed": seed, "steps": steps, "flops_per_token": fpt, "curve": curve}


def plot(rows: list[dict], path: Path) -> None:
    from herd.train.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        color = "tab:blue" if r["name"] == "upcycled" else "tab:gray"
        ax.plot([c["flops"] / 1e12 for c in r["curve"]], [c["val_loss"] for c in r["curve"]], color=color,
                ls="-" if r["seed"] == rows[0]["seed"] else "--", label=f"{r['name']} (seed {r['seed']})")
    ax.set_xlabel("training FLOPs after the base (TFLOP)")
    ax.set_ylabel("validation loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--base-steps", type=int, default=800)
    ap.add_argument("--steps", type=int, default=800, help="steps of the dense continuation")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    base_steps, steps, every = (20, 20, 10) if args.quick else (args.base_steps, args.steps, 100)
    from herd.train.upcycle import upcycle_checkpoint

    base = ROOT / "dense-base"
    if not (base / "hf" / "config.json").is_file() or args.quick:
        shutil.rmtree(base, ignore_errors=True)
        train(_cfg(base, base_steps, 0, base_steps, 3e-3, model_overrides={"moe_layers": []}))
    up = upcycle_checkpoint(base / "hf", ROOT / "upcycled-init", experts=args.experts)
    print(f"upcycled: {args.experts} experts + shared in layers {up.moe_layers}; max |logit difference| to the dense "
          f"model {up.max_logit_diff:.2e}", flush=True)
    seq = train_preset("tiny").seq_len
    dense_fpt, moe_fpt = flops_per_token(load_config(base / "hf"), seq), flops_per_token(up.config, seq)
    moe_steps = max(1, round(steps * dense_fpt / moe_fpt))
    rows = []
    for seed in args.seeds:
        rows.append(continue_run("dense", str(base / "hf"), steps, seed, every, args.lr))
        rows.append(continue_run("upcycled", up.out, moe_steps, seed, max(1, round(every * moe_steps / steps)),
                                 args.lr))
    flops = min(r["curve"][-1]["flops"] for r in rows)
    for r in rows:
        r["at_equal_flops"] = at(r["curve"], "flops", flops)
        r["start"] = r["curve"][0]["val_loss"]
    print(f"\nequal FLOPs: {flops:.3e} (dense {steps} steps, upcycled {moe_steps} steps; FLOPs/token dense "
          f"{dense_fpt / 1e6:.2f}M, upcycled {moe_fpt / 1e6:.2f}M)")
    print("| model | val loss at the start (each seed) | at equal FLOPs (each seed) | mean |\n|---|---|---|---|")
    for name in ("dense", "upcycled"):
        mine = [r for r in rows if r["name"] == name]
        vals = [r["at_equal_flops"]["val_loss"] for r in mine]
        starts = ", ".join(f"{r['start']:.3f}" for r in mine)
        print(f"| {name} | {starts} | {', '.join(f'{v:.3f}' for v in vals)} | {statistics.mean(vals):.3f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "upcycle_vs_dense_quick" if args.quick else "upcycle_vs_dense"
    (RESULTS / f"{name}.json").write_text(json.dumps({
        "base_steps": base_steps, "experts": args.experts, "max_logit_diff": up.max_logit_diff, "flops": flops,
        "dense_steps": steps, "upcycled_steps": moe_steps, "runs": rows}, indent=2) + "\n")
    plot(rows, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
