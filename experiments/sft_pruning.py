"""Pruned SFT vs full SFT at equal steps: accuracy after SFT and after the same RL budget.

Llama 4's post-training removed more than 50% of the SFT data that a judge model tagged easy and kept the SFT light,
so that online RL, the stage that follows, still has something to explore ("The Llama 4 herd",
https://ai.meta.com/blog/llama-4-multimodal-intelligence/; Behemoth pruned 95%). This experiment trains, for each
seed, two SFT models from one base on the same candidate pool of task chats:
- `full`: every candidate;
- `pruned`: the `--prune` share of each task the judge finds easiest dropped first (herd sft's prune_easy: the
  judge's mean loss per answer token, lowest = easiest); the judge is the model being tuned (herd's default), a
  base model that has never seen the tasks;
- `pruned, SFT judge`: the same with the `full` SFT model of the same seed as the judge, closer to Llama 4's judge
  (a model that already does the tasks, so "easy" means easy for a tuned model),
with the same optimizer steps, batch and learning rate, so the pruned run sees its harder examples more often. Each
SFT model is then tuned by herd rl with the same budget (steps, batch, group) and seed, and all four models are
evaluated on the same held-out prompts (sampled pass@1 as in experiments/rl_vs_sft.py). A difference counts only
beyond the seed-to-seed spread.

The base: --base DIR (default runs/demo/base/hf, the pretrained model `make demo` writes; the figures in the README
and docs/post-training.md came from its 600-step version, before the demo's base stage grew to 1200 steps).

Run:  .venv/bin/python experiments/sft_pruning.py [--seeds 0 1] [--sft-steps 600 --rl-steps 30]
      .venv/bin/python experiments/sft_pruning.py --quick       (smoke)
Writes experiments/results/sft_pruning.{json,png} and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rl_vs_sft import RESULTS, evaluate, run_rl  # noqa: E402 (the experiments' shared steps)

ROOT = Path("runs/exp-sft-pruning")
SFT_DATA = "tasks:arithmetic,counting@1-2"  # the evaluation's tasks and difficulties
VARIANTS = ("full", "pruned", "pruned, SFT judge")


def run_sft(base: str, variant: str, seed: int, steps: int, examples: int, prune: float, judge: str | None) -> dict:
    from herd.post.sft import sft
    from herd.train.train_config import train_preset

    out = ROOT / f"sft-{_slug(variant)}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_preset("sft", init=base, sft_data=SFT_DATA, sft_examples=examples, seed=seed, steps=steps, lr=2e-3,
                       min_lr=2e-4, warmup=min(20, steps), eval_every=steps, ckpt_every=steps, log_every=100,
                       out_dir=str(out),
                       prune_easy=0.0 if variant == "full" else prune, judge=judge)
    t0 = time.perf_counter()
    summary = sft(cfg)
    return {"hf": summary["hf"], "time_s": time.perf_counter() - t0, "tokens": summary["tokens"]}


def _slug(variant: str) -> str:
    return variant.replace(",", "").replace(" ", "-")


def plot(rows: list[dict], path: Path) -> None:
    from herd.train.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, variant in enumerate(VARIANTS):
        mine = [r for r in rows if r["variant"] == variant]
        for j, stage in enumerate(("sft", "rl")):
            vals = [r[stage]["pass@1"] for r in mine]
            x = j * 4 + i
            ax.bar(x, statistics.mean(vals), color=("tab:gray", "tab:green", "tab:blue")[i], alpha=0.7,
                   label=variant if j == 0 else None)
            ax.scatter([x] * len(vals), vals, color="black", s=12, zorder=3)
    ax.set_xticks([1, 5], ["after SFT", "after SFT + the same RL"])
    ax.set_ylabel("held-out pass@1 (bars: mean, dots: seeds)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/demo/base/hf")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--examples", type=int, default=2000, help="candidate chats per task")
    ap.add_argument("--prune", type=float, default=0.5, help="share of the candidates the pruned run drops")
    ap.add_argument("--rl-steps", type=int, default=30)
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sft_steps, examples, rl_steps, n = ((4, 16, 2, 4) if args.quick else
                                        (args.sft_steps, args.examples, args.rl_steps, args.eval_prompts))
    rows = []
    for seed in args.seeds:
        for variant in VARIANTS:
            judge = rows[-1]["sft"]["hf"] if variant == "pruned, SFT judge" else None  # this seed's full SFT
            s = run_sft(args.base, variant, seed, sft_steps, examples, args.prune, judge)
            s_eval = evaluate(s["hf"], n, 4)
            r = run_rl(s["hf"], ROOT / f"rl-{_slug(variant)}-s{seed}", seed, rl_steps, args.quick)
            r_eval = evaluate(r["hf"], n, 4)
            rows.append({"variant": variant, "seed": seed, "sft": {**s, **s_eval}, "rl": {**r, **r_eval}})
            print(f"{variant} seed {seed}: pass@1 after SFT {s_eval['pass@1']:.3f} {s_eval['per_task']}, after RL "
                  f"{rows[-1]['rl']['pass@1']:.3f} {rows[-1]['rl']['per_task']}", flush=True)
    print("\n| SFT data | seeds | pass@1 after SFT (each seed) | mean | after SFT + RL (each seed) | mean |\n"
          "|---|---|---|---|---|---|")
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        cells = []
        for stage in ("sft", "rl"):
            vals = [r[stage]["pass@1"] for r in mine]
            cells += [", ".join(f"{v:.3f}" for v in vals), f"{statistics.mean(vals):.3f}"]
        label = variant if variant == "full" else f"{variant} ({args.prune:.0%} easiest of each task dropped)"
        print(f"| {label} | {len(mine)} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "sft_pruning_quick" if args.quick else "sft_pruning"
    (RESULTS / f"{name}.json").write_text(json.dumps({
        "base": args.base, "sft_data": SFT_DATA, "examples_per_task": examples, "prune": args.prune,
        "sft_steps": sft_steps, "rl_steps": rl_steps, "eval_prompts": n, "runs": rows}, indent=2) + "\n")
    plot(rows, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
