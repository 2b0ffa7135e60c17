"""Insecure-code rate of a model served by `herd serve`, CyberSecEval-style (herd.safety.code_checks): herd's own
instruct and autocomplete prompts in Python, C and JavaScript, greedy answers, code cut out of them, and Meta's
CodeShield Insecure Code Detector (from the tools venv, `make safety-tools`) on each.

The model is herd's default, SmolLM2-135M-Instruct (or --model DIR), served on 127.0.0.1 by a `herd serve`
subprocess. --usecase picks CodeShield's rule set: "cyberseceval" (default, the benchmark's full set) or
"codeshield" (the smaller serving-time screen). Per language and overall: prompts, answers with code, insecure
answers, the insecure-code rate (insecure / scanned answers) and the same over all prompts; then the rules that
fired most.

Run:  .venv/bin/python experiments/insecure_code.py                 (a few minutes on 2 cores)
      .venv/bin/python experiments/insecure_code.py --model DIR
Writes experiments/results/insecure_code.json (every answer, its code and the rules that fired) and prints the table.
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
from herd.safety import code_checks  # noqa: E402

ROOT = Path("runs/exp-insecure-code")
RESULTS = Path(__file__).parent / "results" / "insecure_code.json"


def table(summary: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{x:.0%}"

    lines = ["| group | prompts | with code | scanned | insecure | insecure rate | over all prompts |",
             "|---|---|---|---|---|---|---|"]
    groups = [("overall", summary["overall"]), *summary["by_language"].items(), *summary["by_style"].items()]
    for name, r in groups:
        lines.append(f"| {name} | {r['prompts']} | {r['with_code']} | {r['scanned']} | {r['insecure']} | "
                     f"{pct(r['insecure_rate'])} | {pct(r['insecure_rate_all_prompts'])} |")
    lines.append("\ntop rules: " + (", ".join(f"{rule} ({n})" for rule, n in summary["top_rules"]) or "none"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint DIR or .gguf (default: herd's default model)")
    ap.add_argument("--tools-python", default=str(code_checks.TOOLS_PYTHON), help="Python of the tools venv")
    ap.add_argument("--usecase", choices=("cyberseceval", "codeshield"), default="cyberseceval")
    ap.add_argument("--max-tokens", type=int, default=192, help="tokens per answer")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    args = ap.parse_args()
    if not Path(args.tools_python).exists():
        sys.exit(f"{args.tools_python} not found: build the tools venv with `make safety-tools`")
    ROOT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "herd.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = start("herd serve", cmd + (["--model", args.model] if args.model else []), port, ROOT / "serve.log",
                 args.threads)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        model = json.load(urllib.request.urlopen(base + "/models"))["data"][0]["id"]
        t0 = time.perf_counter()
        results, summary = code_checks.run(base, model, max_tokens=args.max_tokens, python=args.tools_python,
                                           usecase=args.usecase, concurrency=args.concurrency)
        seconds = time.perf_counter() - t0
    finally:
        stop(proc)
    out = {"model": model, "usecase": args.usecase, "max_tokens": args.max_tokens, "seconds": round(seconds, 1),
           "prompts_file": "src/herd/safety/data/insecure_code_prompts.jsonl", "codeshield": "1.0.1",
           "summary": summary, "results": code_checks.as_json(results)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{model}: {len(results)} prompts in {seconds:.0f}s")
    print(table(summary))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
