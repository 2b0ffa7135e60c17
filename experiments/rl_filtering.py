"""Continuous + zero-advantage filtering vs plain GRPO, per rollout token.

Filtering costs generation: the pool is re-scored by pass@k every `refilter_every` steps and groups whose answers
all score the same are dropped and refilled (DAPO's dynamic sampling, arXiv:2503.14476), so a filtered step
generates more tokens than a plain one. The Llama 4 recipe pays that cost ("The Llama 4 herd",
https://ai.meta.com/blog/llama-4-multimodal-intelligence/); this experiment asks whether it pays back at an equal
generation budget rather than an equal number of optimizer steps (experiments/rl_vs_sft.py compares those).

For each seed, from one SFT model:
- `filtered`: herd rl's defaults (pool re-filtering by pass@k, curriculum, zero-advantage filtering with refill)
  for --steps optimizer steps;
- `plain GRPO`: none of the three, run for --plain-steps steps, enough to generate at least as many rollout tokens.
Both log held-out greedy pass@1 (herd rl's own evaluation, 16 prompts per task and difficulty) every few steps
against the rollout tokens generated so far (the curves), and the final models are evaluated with the sampled
pass@1 of experiments/rl_vs_sft.py (the table). A difference counts only beyond the seed-to-seed spread.

Run:  .venv/bin/python experiments/rl_filtering.py --sft DIR [--seeds 0 1] [--steps 40 --plain-steps 100]
      .venv/bin/python experiments/rl_filtering.py --sft DIR --quick       (smoke)
Writes experiments/results/rl_filtering.{json,png} and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rl_vs_sft import RESULTS, VARIANTS, evaluate, run_rl, sft_model  # noqa: E402 (the experiments' shared steps)

ROOT = Path("runs/exp-rl-filtering")


def curve(metrics: str) -> list[tuple[float, float]]:
    """(rollout tokens so far, held-out greedy pass@1) at every evaluation of a run."""
    tokens, out = {}, []
    for line in Path(metrics).read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            tokens[rec["step"]] = rec["rollout_tokens"]
        elif rec["kind"] == "eval" and "val_pass@1" in rec:
            out.append((tokens.get(rec["step"], 0.0), rec["val_pass@1"]))
    return out


def plot(rows: list[dict], sft_pass: float, path: Path) -> None:
    from herd.train.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, color in zip(VARIANTS, ("tab:blue", "tab:orange"), strict=True):
        for i, r in enumerate(x for x in rows if x["variant"] == name):
            xs, ys = zip(*[(0.0, r["sft_greedy"])] + r["curve"], strict=True)
            ax.plot([x / 1e3 for x in xs], ys, color=color, alpha=0.8, ls="-" if i == 0 else "--",
                    label=f"{name} (seed {r['seed']})")
    ax.axhline(sft_pass, color="gray", ls=":", label="SFT model (sampled pass@1)")
    ax.set_xlabel("rollout tokens generated (thousands, pool scoring included)")
    ax.set_ylabel("held-out greedy pass@1")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", help="the SFT model to start from (default: trained as experiments/rl_vs_sft.py does)")
    ap.add_argument("--base", default="runs/tiny-multimodal/hf")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of the filtered runs")
    ap.add_argument("--plain-steps", type=int, default=100, help="optimizer steps of the plain GRPO runs")
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = {"filtered": 2, "plain GRPO": 4} if args.quick else {"filtered": args.steps,
                                                                  "plain GRPO": args.plain_steps}
    n = 4 if args.quick else args.eval_prompts
    sft = args.sft or sft_model(args.base, 20 if args.quick else 600)
    sft_eval = evaluate(sft, n, 4)
    print(f"SFT model {sft}: held-out pass@1 {sft_eval['pass@1']:.3f} {sft_eval['per_task']}", flush=True)
    rows = []
    for seed in args.seeds:
        for name, variant in VARIANTS.items():
            every = max(1, steps[name] // 8)
            r = run_rl(sft, ROOT / f"{name.replace(' ', '-')}-s{seed}", seed, steps[name], args.quick,
                       **variant, eval_every=every, ckpt_every=steps[name])
            points = curve(r["metrics"])
            rows.append({"variant": name, "seed": seed, "steps": steps[name], **r, "curve": points,
                         "sft_greedy": _sft_greedy(r["metrics"]), **evaluate(r["hf"], n, 4)})
            print(f"{name} seed {seed}: pass@1 {rows[-1]['pass@1']:.3f} after {steps[name]} steps and "
                  f"{r['rollout_tokens']:.0f} rollout tokens ({r['time_s']:.0f}s)", flush=True)
    print("\n| RL | optimizer steps | rollout tokens (mean) | held-out pass@1 (each seed) | mean | greedy pass@1 at "
          "the last evaluation (each seed) |\n|---|---|---|---|---|---|")
    print(f"| none (SFT model) | 0 | 0 | {sft_eval['pass@1']:.3f} | {sft_eval['pass@1']:.3f} | - |")
    for name in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        each = ", ".join(f"{r['pass@1']:.3f}" for r in mine)
        last = ", ".join(f"{r['curve'][-1][1]:.3f}" for r in mine)
        print(f"| {name} | {steps[name]} | {statistics.mean(r['rollout_tokens'] for r in mine):.0f} | {each} | "
              f"{statistics.mean(r['pass@1'] for r in mine):.3f} | {last} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "rl_filtering_quick" if args.quick else "rl_filtering"
    (RESULTS / f"{name}.json").write_text(json.dumps({"sft": sft, "sft_eval": sft_eval, "steps": steps,
                                                      "eval_prompts": n, "runs": rows}, indent=2) + "\n")
    plot(rows, sft_eval["pass@1"], RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


def _sft_greedy(metrics: str) -> float:
    """The SFT model's held-out greedy pass@1 as herd rl measured it before its first step (the curves' start)."""
    for line in Path(metrics).read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "eval" and rec["step"] == 0:
            return rec["val_pass@1"]
    return float("nan")


if __name__ == "__main__":
    main()
