"""Light DPO on the policy's own answers: does its target preference move without costing task accuracy?

Llama 4 ends post-training with a light DPO for response-quality corner cases ("The Llama 4 herd",
https://ai.meta.com/blog/llama-4-multimodal-intelligence/). The preference here is length: of two correct answers
to the same prompt, the shorter is preferred (herd's prefer=shorter, after Kimi k1.5's long2short DPO,
arXiv:2501.12599), built from groups of answers the starting model samples itself (`dpo_rollouts=tasks:...`). The
target metric is the mean answer length on held-out prompts; the guard metric is held-out pass@1 on the same
prompts (the evaluation of experiments/rl_vs_sft.py). As a control, the same DPO run with prefer=correct (a right
answer over a wrong one) shows what DPO does to length when length is not the preference.

For each seed: the pairs are sampled with that seed, DPO trains with it, and the result is evaluated on the same
held-out prompts and sample seeds as the starting model. A difference counts only beyond the seed-to-seed spread.

Run:  .venv/bin/python experiments/dpo_preference.py --init DIR [--seeds 0 1] [--steps 60]
      .venv/bin/python experiments/dpo_preference.py --init DIR --quick       (smoke)
DIR: the model to tune, e.g. an RL run's hf folder (experiments/rl_vs_sft.py writes runs/exp-rl/filtered-s0/hf).
Writes experiments/results/dpo_preference.{json,png} and prints a table.
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
from rl_vs_sft import RESULTS, evaluate  # noqa: E402 (the experiments' shared steps)

ROOT = Path("runs/exp-dpo")
PREFER = ("shorter", "correct")


def run_dpo(init: str, prefer: str, seed: int, steps: int, prompts: int, lr: float) -> dict:
    from herd.post.dpo import dpo
    from herd.train.train_config import train_preset

    out = ROOT / f"{prefer}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_preset("dpo", init=init, dpo_rollouts="tasks:arithmetic,counting@1-2", prefer=prefer,
                       sft_examples=prompts,
                       group_size=8, temperature=1.0, max_new_tokens=48, seed=seed, steps=steps, lr=lr,
                       min_lr=lr / 10, warmup=min(5, steps), eval_every=steps, ckpt_every=steps, log_every=10,
                       out_dir=str(out))
    t0 = time.perf_counter()
    summary = dpo(cfg)
    n_pairs = sum(1 for _ in (out / "dpo_pairs.jsonl").open())
    return {"hf": summary["hf"], "pairs": n_pairs, "time_s": time.perf_counter() - t0}


def plot(start: dict, rows: list[dict], path: Path) -> None:
    from herd.train.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([start["answer_tokens"]], [start["pass@1"]], color="black", marker="*", s=120, label="start")
    for prefer, color in zip(PREFER, ("tab:green", "tab:purple"), strict=True):
        mine = [r for r in rows if r["prefer"] == prefer]
        ax.scatter([r["answer_tokens"] for r in mine], [r["pass@1"] for r in mine], color=color,
                   label=f"DPO prefer={prefer} (seeds)")
    ax.set_xlabel("mean answer length on held-out prompts (tokens)")
    ax.set_ylabel("held-out pass@1")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="the model to tune (a Hugging Face folder herd wrote)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--prompts", type=int, default=200, help="prompts per task sampled for pairs")
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps, prompts, n = (2, 8, 4) if args.quick else (args.steps, args.prompts, args.eval_prompts)
    start = evaluate(args.init, n, 4)
    print(f"start {args.init}: pass@1 {start['pass@1']:.3f}, answer length {start['answer_tokens']:.1f}", flush=True)
    rows = []
    for seed in args.seeds:
        for prefer in PREFER:
            r = run_dpo(args.init, prefer, seed, steps, prompts, args.lr)
            rows.append({"prefer": prefer, "seed": seed, **r, **evaluate(r["hf"], n, 4)})
            print(f"prefer={prefer} seed {seed}: {r['pairs']} pairs; pass@1 {rows[-1]['pass@1']:.3f}, answer length "
                  f"{rows[-1]['answer_tokens']:.1f} ({r['time_s']:.0f}s)", flush=True)
    print("\n| model | pairs (each seed) | answer tokens (each seed) | mean | held-out pass@1 (each seed) | mean |\n"
          "|---|---|---|---|---|---|")
    print(f"| start | - | {start['answer_tokens']:.1f} | {start['answer_tokens']:.1f} | {start['pass@1']:.3f} | "
          f"{start['pass@1']:.3f} |")
    for prefer in PREFER:
        mine = [r for r in rows if r["prefer"] == prefer]
        lens, acc = [r["answer_tokens"] for r in mine], [r["pass@1"] for r in mine]
        print(f"| DPO prefer={prefer} | {', '.join(str(r['pairs']) for r in mine)} | "
              f"{', '.join(f'{x:.1f}' for x in lens)} | {statistics.mean(lens):.1f} | "
              f"{', '.join(f'{x:.3f}' for x in acc)} | {statistics.mean(acc):.3f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "dpo_preference_quick" if args.quick else "dpo_preference"
    (RESULTS / f"{name}.json").write_text(json.dumps({"init": args.init, "start": start, "steps": steps,
                                                      "lr": args.lr, "prompts_per_task": prompts,
                                                      "eval_prompts": n, "runs": rows}, indent=2) + "\n")
    plot(start, rows, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
