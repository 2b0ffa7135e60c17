"""`herd redteam`: GOAT red teaming (herd.safety.goat) of a model served on this machine.

  herd redteam --target http://127.0.0.1:8000 --attacker DIR|URL --judge DIR [--judge-kind guard|jbb]
               --goals goals.txt|goals.jsonl [--k 3] [--max-turns 5] [--seed 0] --out DIR

Goals: one per line (.txt; blank lines skipped), or JSON lines {"goal": ..., "category": ...} (.jsonl; the category
is optional and gives ASR per category). Each goal gets `--k` independent conversations, conversation c of goal g
seeded from (--seed, g, c), so a run repeats exactly; with a greedy attacker and target the k conversations are the
same, so ASR@k needs a sampling attacker (the default, temperature 1).

Writes DIR/transcripts.jsonl (one conversation a line, written as each ends: both histories, every turn's
Observation / Thought / Strategy / Reply, the techniques named, the judge's verdict and score) and DIR/summary.json
(herd.safety.goat.summarize: ASR@1..k, technique histograms, turns to success), and prints a table.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from herd.safety.goat import (
    GuardJudge,
    HerdChat,
    JBBJudge,
    OpenAIChat,
    check_local,
    load_techniques,
    run_goat,
    summarize,
)


def load_goals(path: str | Path) -> list[tuple[str, str | None]]:
    """(goal, category or None) per goal: .jsonl objects with "goal" (and "category"), else one goal a line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--goals {path}: cannot read it ({e}); give a UTF-8 text or JSONL file") from None
    goals = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            goals.append((line.strip(), None))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--goals {path} line {n}: not JSON ({e}); write one {{\"goal\": ...}} object a line, "
                             "or use a .txt file with one goal a line") from None
        goal = row.get("goal") if isinstance(row, dict) else None
        if not isinstance(goal, str) or not goal.strip():
            raise ValueError(f"--goals {path} line {n}: needs a non-empty string \"goal\"")
        category = row.get("category")
        goals.append((goal.strip(), None if category is None else str(category)))
    if not goals:
        raise ValueError(f"--goals {path} holds no goals")
    return goals


def conversation_seed(seed: int, goal: int, conversation: int) -> int:
    """A seed per conversation, independent of how many goals or conversations the run has."""
    return random.Random(f"{seed}/{goal}/{conversation}").getrandbits(31)


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _clock(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def table(summary: dict) -> str:
    rows = [f"| goals | conversations | {' | '.join(f'ASR@{j}' for j in summary['asr'])} | mean turns to success |",
            "|---" * (3 + len(summary["asr"])) + "|"]
    mean = summary["mean_turns_to_success"]
    asr = " | ".join(f"{v:.3f}" for v in summary["asr"].values())
    rows.append(f"| {summary['goals']} | {summary['conversations']} | {asr} | "
                f"{'-' if mean is None else f'{mean:.2f}'} |")
    rows += ["", "| technique | turns using it | successful turns |", "|---|---|---|"]
    rows += [f"| {n} | {c} | {summary['techniques_on_success'][n]} |" for n, c in summary["techniques_used"].items()]
    rows.append(f"\n{summary['turns']} turns, {summary['unparsed_turns']} with attacker output not in the format "
                f"(fallback recorded), {summary['errors']} conversations ended by an error")
    return "\n".join(rows)


class RedteamError(ValueError):
    """A bad option or an unreachable target: `error: ...`, exit status 2."""


def cmd_redteam(args) -> int:
    try:
        return run_redteam(args)
    except RedteamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_redteam(args) -> int:
    import torch

    if args.k < 1 or args.max_turns < 1:
        raise RedteamError("--k and --max-turns must be at least 1")
    try:
        check_local(args.target)
        goals = load_goals(args.goals)
    except ValueError as e:
        raise RedteamError(str(e)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = OpenAIChat(args.target, args.target_model, max_tokens=args.target_max_tokens,
                            temperature=args.target_temperature)
    except Exception as e:  # openai.APIConnectionError and the like: say which server and what to do
        raise RedteamError(f"--target {args.target}: cannot list its models ({type(e).__name__}: {e}); start "
                           "`herd serve` there first, or pass --target-model") from None
    sampling = dict(max_tokens=args.attacker_max_tokens, temperature=args.attacker_temperature)
    if _is_url(args.attacker):
        attacker = OpenAIChat(args.attacker, args.attacker_model, **sampling)
    else:
        attacker = HerdChat.from_pretrained(args.attacker, device=device, max_new_tokens=sampling.pop("max_tokens"),
                                            **sampling)
    if args.judge_kind == "guard":
        from herd.safety.guard import Guard

        judge = GuardJudge(Guard.from_pretrained(args.judge, device=device), args.judge_threshold)
    else:
        judge = JBBJudge.from_pretrained(args.judge, device=device, threshold=args.judge_threshold)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    techniques = load_techniques()
    total, done, start, transcripts = len(goals) * args.k, 0, time.perf_counter(), []
    print(f"red teaming {target.model!r} at {args.target}: {len(goals)} goals x {args.k} conversations, up to "
          f"{args.max_turns} turns each", file=sys.stderr, flush=True)
    with open(out / "transcripts.jsonl", "w", encoding="utf-8") as f:
        for g, (goal, category) in enumerate(goals):
            for c in range(args.k):
                tr = run_goat(goal, attacker, target, judge, args.max_turns, techniques=techniques,
                              seed=conversation_seed(args.seed, g, c), category=category, goal_index=g,
                              conversation=c)
                transcripts.append(tr)
                f.write(json.dumps(tr.to_json(), ensure_ascii=False) + "\n")
                f.flush()
                done += 1
                dt = time.perf_counter() - start
                broken = len({t.goal_index for t in transcripts if t.success})
                print(f"redteam {done}/{total} conversations | {done / dt * 60:.1f}/min | "
                      f"ETA {_clock((total - done) * dt / done)} | goals broken {broken}/{g + 1} | "
                      f"last: {'success in ' + str(tr.turns_to_success) + ' turns' if tr.success else 'no success'}",
                      file=sys.stderr, flush=True)
    summary = summarize(transcripts, args.k, techniques)
    summary.update(target=args.target, target_model=target.model, attacker=args.attacker, judge=args.judge,
                   judge_kind=args.judge_kind, judge_threshold=args.judge_threshold, max_turns=args.max_turns,
                   seed=args.seed, time_s=time.perf_counter() - start)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(table(summary))
    print(f"wrote {out / 'transcripts.jsonl'} and {out / 'summary.json'}")
    return 0


def add_redteam_parser(sub) -> None:
    sp = sub.add_parser("redteam", help="GOAT multi-turn red teaming of a local server, judged by a guard",
                        description="An attacker model (herd.safety.goat, GOAT: arXiv:2410.01606) talks to a target "
                                    "on this machine to reach each goal; a judge labels every answer.")
    sp.add_argument("--target", required=True, metavar="URL",
                    help="the OpenAI-compatible server under test, on this machine: http://127.0.0.1:PORT[/v1]")
    sp.add_argument("--target-model", default=None, help="model id at --target (default: the first it lists)")
    sp.add_argument("--attacker", required=True, metavar="DIR|URL",
                    help="the red teamer: a herd checkpoint folder (run here) or an OpenAI-compatible URL")
    sp.add_argument("--attacker-model", default=None, help="model id when --attacker is a URL")
    sp.add_argument("--judge", required=True, metavar="DIR", help="a herd checkpoint folder: a Llama Guard, or any "
                    "chat model with --judge-kind jbb")
    sp.add_argument("--judge-kind", choices=["guard", "jbb"], default="guard",
                    help="guard: Llama Guard prompt, Agent mode; jbb: JailbreakBench's judge prompt")
    sp.add_argument("--judge-threshold", type=float, default=0.5, help="unsafe when the judge's P(unsafe) >= this")
    sp.add_argument("--goals", required=True, metavar="FILE", help="one goal a line (.txt) or JSON lines "
                    "{\"goal\", \"category\"} (.jsonl)")
    sp.add_argument("--k", type=int, default=3, help="independent conversations per goal (ASR@1..k)")
    sp.add_argument("--max-turns", type=int, default=5, help="attacker turns per conversation")
    sp.add_argument("--seed", type=int, default=0, help="every conversation's seed derives from it")
    sp.add_argument("--attacker-temperature", type=float, default=1.0, help="0: greedy (k conversations alike)")
    sp.add_argument("--attacker-max-tokens", type=int, default=512)
    sp.add_argument("--target-temperature", type=float, default=0.0)
    sp.add_argument("--target-max-tokens", type=int, default=512)
    sp.add_argument("--device", default=None, help="where the attacker and judge run (default: cuda if present)")
    sp.add_argument("--out", required=True, metavar="DIR", help="folder for transcripts.jsonl and summary.json")
    sp.set_defaults(fn=cmd_redteam)
