"""The report card of a post-training recipe: one folder per stage (base, sft, rl, dpo ...), one page comparing them.

    stages = [load_stage("base", "runs/recipe/base"), load_stage("sft", "runs/recipe/sft")]
    write_report("runs/recipe", stages, system_info())     # report.md + report.json
    report_plots("runs/recipe", stages)                    # loss.png, rl.png, pass_at_1.png
    make_report("runs/recipe")                             # all three from the stage folders found there

Modelled on nanochat's report card (karpathy/nanochat, nanochat/report.py): the machine and code it ran on first,
then a section per stage (its time, tokens and evaluation), then ONE summary table of every metric by stage, so what
each stage bought is read along a row. A metric a stage did not measure is "-" in the table and null in the JSON,
never a crash: an RL stage has rollout tokens, a base model has no chat format to score yet.

What a stage folder holds: the trainer's metrics.jsonl (herd.train.trainer), eval/results.json from
herd.post.evaluate.write_results, and stage.json (written by `save_stage`: wall clock and token counts). A folder
without stage.json (a run trained by hand) still reports, with its tokens read from metrics.jsonl.

Every stage is evaluated on the same held-out prompts with the same sample seeds (herd.post.evaluate), so the
columns compare the models, not the draws.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from herd.post.evaluate import markdown_table
from herd.train.plots import plot_rl, pyplot, read_metrics

# headline metrics, in table order: herd.post.evaluate's `total` keys, then its bits per byte
EVAL_METRICS = ("pass@1", "pass@k", "mean_reward", "format_error_rate", "mean_length")
PER_TASK = ("pass@1", "pass@k", "mean_reward", "format_error_rate", "mean_length")
COST_METRICS = ("wall_clock_s", "tokens", "rollout_tokens")
# a multimodal stage's held-out scene questions (herd.train.vision_diagnostics): right image, another, question only
LOOK_METRICS = ("scene_right", "scene_other", "scene_chance")
KNOWN_ORDER = ("base", "sft", "rl", "dpo")  # the recipe's order (herd.post.recipe); other folders follow by name
STAGE_FILE = "stage.json"


# ---- the machine -----------------------------------------------------------------------------------------------------
def system_info() -> dict:
    """Python, torch, CPU, threads, GPU (None without one), platform, herd's git commit (None outside git), date."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        **_git(),
    }


def _cpu_model() -> str | None:
    try:  # Linux names the model here; platform.processor() is often empty or just "x86_64" there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git() -> dict:
    """herd's checkout: commit and whether it has uncommitted changes (both None when herd is not in a git tree)."""
    here = Path(__file__).resolve().parent

    def run(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):  # no git, or it hung
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


# ---- stages ----------------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One stage of a recipe: its folder, what it cost, and its evaluation (herd.post.evaluate's results)."""

    name: str  # base, sft, rl, dpo ...
    run_dir: str
    wall_clock_s: float | None = None  # training plus its evaluation
    tokens: int | None = None  # tokens trained on (the trainer summary's "tokens")
    rollout_tokens: int | None = None  # RL: tokens sampled for rollouts (rl's summary "rollout_tokens")
    eval: dict | None = None


def save_stage(stage: Stage) -> Path:
    """stage.json in the stage's folder: everything but the evaluation, which lives in eval/results.json."""
    path = Path(stage.run_dir) / STAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in asdict(stage).items() if k != "eval"}, indent=2) + "\n")
    return path


def load_stage(name: str, run_dir: str | Path) -> Stage:
    """A stage from its folder (module docstring); what is missing stays None."""
    root = Path(run_dir)
    saved = json.loads((root / STAGE_FILE).read_text()) if (root / STAGE_FILE).is_file() else {}
    results = root / "eval" / "results.json"
    tokens = saved.get("tokens")
    if tokens is None:  # a run without stage.json: the last train record's token count
        tokens = next((r["tokens"] for r in reversed(read_metrics(root)) if r.get("kind") == "train"
                       and "tokens" in r), None)
    return Stage(name, str(root), saved.get("wall_clock_s"), tokens, saved.get("rollout_tokens"),
                 json.loads(results.read_text()) if results.is_file() else None)


def find_stages(out_dir: str | Path) -> list[Stage]:
    """Every sub-folder of out_dir with a metrics.jsonl or an evaluation, the recipe's stages first in its order."""
    root = Path(out_dir)
    found = [p for p in root.iterdir() if p.is_dir() and ((p / "metrics.jsonl").is_file()
                                                         or (p / "eval" / "results.json").is_file())]
    rank = {n: i for i, n in enumerate(KNOWN_ORDER)}
    found.sort(key=lambda p: (rank.get(p.name, len(rank)), p.name))
    return [load_stage(p.name, p) for p in found]


def stage_metrics(stage: Stage) -> dict:
    """The report.json entry of a stage: headline metrics, per-task metrics, cost; None where not measured."""
    ev = stage.eval or {}
    total = ev.get("total", {})
    out = {m: total.get(m) for m in EVAL_METRICS}
    out["bits_per_byte"] = ev.get("bits_per_byte")
    out["per_task"] = {name: {m: t.get("all", {}).get(m) for m in PER_TASK} for name, t in ev.get("tasks", {}).items()}
    out |= {m: ev.get("look", {}).get(m) for m in LOOK_METRICS}
    out |= {"wall_clock_s": stage.wall_clock_s, "tokens": stage.tokens, "rollout_tokens": stage.rollout_tokens}
    return out


# ---- the report ------------------------------------------------------------------------------------------------------
def summary_rows(metrics: dict[str, dict]) -> list[tuple[str, list]]:
    """(row label, one value per stage) for every metric any stage has: headline, per-task pass@1, cost."""
    stages = list(metrics.values())
    tasks = list(dict.fromkeys(t for m in stages for t in m.get("per_task", {})))
    rows = [(m, [s.get(m) for s in stages]) for m in (*EVAL_METRICS, "bits_per_byte")]
    rows += [(f"pass@1 {t}", [s.get("per_task", {}).get(t, {}).get("pass@1") for s in stages]) for t in tasks]
    rows += [(m, [s.get(m) for s in stages]) for m in LOOK_METRICS if any(s.get(m) is not None for s in stages)]
    rows += [(m, [s.get(m) for s in stages]) for m in COST_METRICS]
    return rows


def summary_table(metrics: dict[str, dict]) -> str:
    """The markdown table: rows = metrics, columns = stages in order; "-" where a stage lacks the metric."""
    names = list(metrics)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += ["| " + label + " | " + " | ".join(_fmt(v, 1 if label == "wall_clock_s" else 4) for v in values) + " |"
              for label, values in summary_rows(metrics)]
    return "\n".join(lines) + "\n"


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _stage_section(stage: Stage, m: dict) -> str:
    lines = [f"## {stage.name}", "", f"- folder: `{stage.run_dir}`", f"- wall clock: {_clock(stage.wall_clock_s)}",
             f"- tokens trained: {_fmt(stage.tokens)}"]
    if stage.rollout_tokens is not None:
        lines.append(f"- rollout tokens: {_fmt(stage.rollout_tokens)}")
    if stage.eval is None:
        return "\n".join([*lines, "- not evaluated", ""]) + "\n"
    ev = stage.eval
    lines += [f"- pass@1 {_fmt(m['pass@1'])}, pass@{ev.get('k', 'k')} {_fmt(m['pass@k'])}, mean reward "
              f"{_fmt(m['mean_reward'])}, format errors {_fmt(m['format_error_rate'])}, bits per byte "
              f"{_fmt(m['bits_per_byte'])}", "", markdown_table(ev)]
    return "\n".join(lines) + "\n"


def _system_section(info: dict) -> str:
    gpu = f"{info.get('gpu_count', 1)}x {info['gpu']}" if info.get("gpu") else "none"
    commit = info.get("git_commit") or "unknown (not a git checkout)"
    if info.get("git_dirty"):
        commit += " (with uncommitted changes)"
    return "\n".join([
        "## System", "",
        f"- date: {info.get('date', '-')}",
        f"- platform: {info.get('platform', '-')}",
        f"- CPU: {info.get('cpu') or '-'} ({info.get('cpu_count', '-')} logical cores, "
        f"torch threads {info.get('torch_threads', '-')})",
        f"- GPU: {gpu}",
        f"- Python {info.get('python', '-')}, torch {info.get('torch', '-')}",
        f"- herd commit: {commit}", "", ""])


def _eval_settings(stages: list[Stage]) -> dict | None:
    ev = next((s.eval for s in stages if s.eval), None)
    keys = ("k", "n_per_task", "difficulties", "temperature", "max_new_tokens", "seed", "split")
    return {k: ev.get(k) for k in keys} if ev else None


def write_report(out_dir: str | Path, stages: list[Stage], info: dict,
                 plots: list[str | Path] = ()) -> tuple[Path, Path]:
    """report.md and report.json in out_dir (module docstring); `plots` (PNG files in out_dir) are linked."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {s.name: stage_metrics(s) for s in stages}
    if len(metrics) != len(stages):
        raise ValueError(f"stage names must be distinct, got {[s.name for s in stages]}")
    times = [s.wall_clock_s for s in stages if s.wall_clock_s is not None]
    total = sum(times) if times else None
    settings = _eval_settings(stages)
    js = out / "report.json"
    js.write_text(json.dumps({"system": info, "eval": settings, "stages": metrics, "total_wall_clock_s": total},
                             indent=2) + "\n")
    parts = [f"# herd report card: {out}\n", _system_section(info)]
    parts += [_stage_section(s, metrics[s.name]) for s in stages]
    parts += ["## Summary", ""]
    if settings:
        parts.append(f"Evaluated on the {settings['split']} split: {settings['n_per_task']} prompts per task and "
                     f"difficulty {settings['difficulties']}, k={settings['k']} samples each at temperature "
                     f"{settings['temperature']}; the same prompts and seeds for every stage.\n")
    parts.append(summary_table(metrics))
    parts.append(f"Total wall clock: {_clock(total)}\n")
    parts += [f"![{Path(p).stem}]({Path(p).name})\n" for p in plots]
    md = out / "report.md"
    md.write_text("\n".join(parts))
    return md, js


# ---- plots -----------------------------------------------------------------------------------------------------------
def report_plots(out_dir: str | Path, stages: list[Stage]) -> list[Path]:
    """loss.png (each stage's training loss), rl.png (reward and pass@1 over RL steps, when a stage logged them),
    pass_at_1.png (pass@1 by stage, in total and per task); returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = {s.name: read_metrics(s.run_dir) for s in stages}
    written = []
    for name, draw in (("loss.png", _plot_losses), ("rl.png", _plot_rl), ("pass_at_1.png", _plot_pass)):
        if draw(stages, records, out / name):
            written.append(out / name)
    return written


def _plot_losses(stages: list[Stage], records: dict, path: Path) -> bool:
    runs = [(s.name, records[s.name]) for s in stages if any("loss" in r for r in records[s.name]
                                                             if r.get("kind") == "train")]
    if not runs:
        return False
    plt = pyplot()
    # one panel per stage: their losses differ in kind (text cross-entropy, assistant-only, DPO, RL) and scale
    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.2), squeeze=False)
    for ax, (name, recs) in zip(axes[0], runs, strict=True):
        train = [r for r in recs if r.get("kind") == "train" and "loss" in r]
        val = [r for r in recs if r.get("kind") == "eval" and r.get("val_loss") is not None]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train")
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="val")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_rl(stages: list[Stage], records: dict, path: Path) -> bool:
    """The RL stage's run plot (herd.train.plots.plot_rl: rollout reward and pass rate, held-out pass@1)."""
    rl = [s for s in stages if any(r.get("kind") == "train" and "reward_mean" in r for r in records[s.name])]
    return bool(rl) and plot_rl(records[rl[-1].name], path)


def _plot_pass(stages: list[Stage], records: dict, path: Path) -> bool:
    metrics = {s.name: stage_metrics(s) for s in stages}
    if all(m["pass@1"] is None for m in metrics.values()):
        return False
    plt = pyplot()
    tasks = list(dict.fromkeys(t for m in metrics.values() for t in m["per_task"]))
    groups = ["total", *tasks]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(groups) * max(1, len(metrics) / 3)), 3.6))
    for i, (name, m) in enumerate(metrics.items()):
        ys = [m["pass@1"], *(m["per_task"].get(t, {}).get("pass@1") for t in tasks)]
        xs = [g + (i - (len(metrics) - 1) / 2) * width for g in range(len(groups))]
        ax.bar([x for x, y in zip(xs, ys, strict=True) if y is not None], [y for y in ys if y is not None],
               width, label=name, color=f"C{i}")  # one colour per stage, also for one with no bars
        for x, y in zip(xs, ys, strict=True):
            if y is None:  # not measured in this stage: say so where the bar would be
                ax.text(x, 0.01, "-", ha="center", va="bottom")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("pass@1 (held-out)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("pass@1 by stage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def make_report(out_dir: str | Path, stages: list[Stage] | None = None, info: dict | None = None,
                file=None) -> tuple[Path, Path]:
    """Plots, report.md and report.json for out_dir's stage folders (or the `stages` given)."""
    stages = find_stages(out_dir) if stages is None else stages
    if not stages:
        raise FileNotFoundError(f"{out_dir} has no stage folders (sub-folders with metrics.jsonl or "
                                f"eval/results.json); point at a recipe's out_dir (herd.post.recipe)")
    md, js = write_report(out_dir, stages, info or system_info(), report_plots(out_dir, stages))
    print(f"report card: {md} and {js}", file=file or sys.stdout, flush=True)
    return md, js
