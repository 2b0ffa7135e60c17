"""Does online RL raise held-out pass@1 over the SFT model it starts from, and does filtering pay per rollout token?

The Llama 4 recipe puts online RL after a light SFT, on medium-to-hard prompts re-filtered by the policy and with
zero-advantage groups dropped ("The Llama 4 herd", https://ai.meta.com/blog/llama-4-multimodal-intelligence/; DAPO,
arXiv:2503.14476). This experiment starts from one SFT model and runs, for each seed:
- `filtered`: herd rl's defaults: continuous pool re-filtering by pass@k, curriculum, zero-advantage filtering with
  refill (DAPO's dynamic sampling);
- `plain GRPO`: the same budget of optimizer steps with none of the three (every sampled group trains, prompts
  drawn fresh at the start difficulty).
Each model is evaluated on the same held-out prompts (herd.post.evaluate: pass@1 from k samples at temperature 1,
the unbiased estimator), and the table gives pass@1 with the rollout tokens each run generated (pool scoring
included). A difference counts only beyond the seed-to-seed spread.

The SFT model: --sft DIR, or trained here from --base (default runs/tiny-multimodal/hf, what
`herd train --preset tiny-multimodal steps=1200 warmup=50` trains; the recorded results started from it) on the same
tasks at difficulty 1 (a few minutes).

Run:  .venv/bin/python experiments/rl_vs_sft.py [--seeds 0 1] [--steps 40]     (~30 min on 2 CPU cores)
      .venv/bin/python experiments/rl_vs_sft.py --quick                          (smoke, a minute)
Writes experiments/results/rl_vs_sft.{json,png} and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path("runs/exp-rl")
RESULTS = Path("experiments/results")
TASKS = "arithmetic@2,counting@2"  # sorting stays at 0 after SFT at this size: no signal for RL
VARIANTS = {"filtered": {}, "plain GRPO": dict(filter_groups=False, refilter_every=0, curriculum=False)}


def sft_model(base: str, steps: int) -> str:
    from herd.post.sft import sft
    from herd.train.train_config import train_preset

    out = ROOT / "sft"
    if (out / "hf" / "config.json").is_file():
        return str(out / "hf")
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_preset("sft", init=base, sft_data="tasks:arithmetic,counting,sorting@1", sft_examples=3000,
                       steps=steps, lr=2e-3, min_lr=2e-4, warmup=20, eval_every=steps, ckpt_every=steps,
                       log_every=50, out_dir=str(out))
    return sft(cfg)["hf"]


def evaluate(model_dir: str, n: int, k: int) -> dict:
    import torch

    from herd.formats.hf import from_pretrained
    from herd.post.evaluate import evaluate as run_eval
    from herd.tokenizer import Tokenizer

    model, tok = from_pretrained(model_dir, dtype=torch.float32), Tokenizer.from_pretrained(model_dir)
    res = run_eval(model, tok, ["arithmetic", "counting"], n_per_task=n, difficulties=[1, 2], k=k,
                   temperature=1.0, max_new_tokens=48, seed=1234, bpb_batches=0)
    return {"pass@1": res["total"]["pass@1"],
            "per_task": {t: v["all"]["pass@1"] for t, v in res["tasks"].items()},
            "format_error_rate": res["total"]["format_error_rate"], "answer_tokens": res["total"]["mean_length"]}


def run_rl(sft: str, out: Path, seed: int, steps: int, quick: bool, **variant) -> dict:
    """herd rl from `sft` into `out` with this experiment's settings (shared by the other post-training experiments);
    `variant`: TrainConfig fields that differ."""
    from herd.post.rl import rl
    from herd.train.train_config import train_preset

    shutil.rmtree(out, ignore_errors=True)
    settings = dict(init=sft, out_dir=str(out), seed=seed, rl_tasks=TASKS, steps=steps, lr=1e-3, min_lr=1e-3,
                    batch_size=4 if quick else 8, group_size=8, max_new_tokens=48, eval_every=steps, ckpt_every=steps,
                    refilter_every=10, pool_size=32, rl_eval_prompts=16, log_every=10)
    cfg = train_preset("rl", **{**settings, **variant})
    t0 = time.perf_counter()
    summary = rl(cfg)
    return {"hf": summary["hf"], "rollout_tokens": summary["rollout_tokens"], "time_s": time.perf_counter() - t0,
            "metrics": str(out / "metrics.jsonl")}


def plot(rows: list[dict], sft_pass: float, path: Path) -> None:
    from herd.train.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, color in zip(VARIANTS, ("tab:blue", "tab:orange"), strict=True):
        mine = [r for r in rows if r["variant"] == name]
        ax.scatter([r["rollout_tokens"] / 1e3 for r in mine], [r["pass@1"] for r in mine], color=color, label=name)
    ax.axhline(sft_pass, color="gray", ls="--", label="SFT model")
    ax.set_xlabel("rollout tokens generated (thousands)")
    ax.set_ylabel("held-out pass@1")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", help="the SFT model to start from (default: trained here from --base)")
    ap.add_argument("--base", default="runs/tiny-multimodal/hf")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps, n = (3, 4) if args.quick else (args.steps, args.eval_prompts)
    sft = args.sft or sft_model(args.base, 20 if args.quick else 600)
    cached = RESULTS / "rl_vs_sft.json"  # the SFT model's evaluation does not change between invocations
    old = json.loads(cached.read_text()) if cached.is_file() and not args.quick else {}
    base_eval = old["sft_eval"] if old.get("sft") == sft and old.get("eval_prompts") == n else evaluate(sft, n, 4)
    print(f"SFT model {sft}: held-out pass@1 {base_eval['pass@1']:.3f} {base_eval['per_task']}", flush=True)
    rows = []
    for seed in args.seeds:
        for name in VARIANTS:
            r = run_rl(sft, ROOT / f"{name.replace(' ', '-')}-s{seed}", seed, steps, args.quick, **VARIANTS[name])
            rows.append({"variant": name, "seed": seed, **r, **evaluate(r["hf"], n, 4)})
            print(f"{name} seed {seed}: pass@1 {rows[-1]['pass@1']:.3f} {rows[-1]['per_task']} "
                  f"({r['rollout_tokens']:.0f} rollout tokens, {r['time_s']:.0f}s)", flush=True)
    print("\n| model | seeds | held-out pass@1 (each seed) | mean | rollout tokens (mean) |\n|---|---|---|---|---|")
    print(f"| SFT | - | {base_eval['pass@1']:.3f} | {base_eval['pass@1']:.3f} | - |")
    for name in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        each = ", ".join(f"{r['pass@1']:.3f}" for r in mine)
        print(f"| RL {name} | {len(mine)} | {each} | {statistics.mean(r['pass@1'] for r in mine):.3f} | "
              f"{statistics.mean(r['rollout_tokens'] for r in mine):.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "rl_vs_sft_quick" if args.quick else "rl_vs_sft"
    (RESULTS / f"{name}.json").write_text(json.dumps({"sft": sft, "sft_eval": base_eval, "steps": steps,
                                                      "eval_prompts": n, "runs": rows}, indent=2) + "\n")
    plot(rows, base_eval["pass@1"], RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
