"""herd.post.report: the report card of a recipe's stage folders, built here from fake stages (metrics.jsonl and
evaluation results written by the test), so every number in report.json and report.md is known in advance.

Run: .venv/bin/python -m pytest tests/post/test_report.py -v
"""

from __future__ import annotations

import json
import subprocess

import pytest

from herd.post import report as report_mod
from herd.post.evaluate import write_results
from herd.post.report import Stage, find_stages, load_stage, make_report, report_plots, save_stage

system_info, write_report = report_mod.system_info, report_mod.write_report

METRICS = ("pass@1", "pass@k", "mean_reward", "format_error_rate", "mean_length")


def summary(p1: float, **kw) -> dict:
    return {"prompts": 4, "samples": 16, "pass@1": p1, "pass@k": min(1.0, 2 * p1), "mean_reward": p1 + 0.01,
            "mean_length": 10 * p1 + 3, "format_error_rate": 1 - p1, "errors": 0, **kw}


def results(per_task: dict[str, float], bpb: float | None) -> dict:
    """herd.post.evaluate's results shape, with pass@1 per task as given and the total their mean."""
    total = sum(per_task.values()) / len(per_task)
    return {"k": 4, "n_per_task": 4, "difficulties": [1], "temperature": 1.0, "max_new_tokens": 16, "seed": 0,
            "split": "heldout", "skipped": {}, "bits_per_byte": bpb, "time_s": 1.0, "prompts": [],
            "tasks": {t: {"all": summary(p), "by_difficulty": {"1": summary(p)}} for t, p in per_task.items()},
            "total": summary(total)}


def fake_stage(root, name, evaluated: dict | None, records: list[dict], **cost) -> Stage:
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if evaluated is not None:
        write_results(evaluated, run / "eval")
    stage = Stage(name, str(run), eval=evaluated, **cost)
    save_stage(stage)
    return stage


def curve(n: int, **extra) -> list[dict]:
    return [{"kind": "train", "step": s, "loss": 5.0 / s, "tokens": 100 * s, **{k: v * s for k, v in extra.items()}}
            for s in range(1, n + 1)] + [{"kind": "eval", "step": n, "val_loss": 2.0, "val_bpb": 1.5}]


@pytest.fixture
def stages(tmp_path):
    """base (no per-task pass for counting, bpb measured), sft, rl (rollout tokens, reward curves), dpo (never
    evaluated): every kind of gap the report must show as "-"."""
    rl_records = curve(3, reward_mean=0.2, pass_rate=0.1) + [{"kind": "eval", "step": 3, "val_pass@1": 0.5}]
    return [
        fake_stage(tmp_path, "base", results({"arithmetic": 0.0, "sorting": 0.25}, 3.5), curve(4),
                   wall_clock_s=10.0, tokens=400),
        fake_stage(tmp_path, "sft", results({"arithmetic": 0.5, "sorting": 0.25, "counting": 0.75}, None), curve(2),
                   wall_clock_s=5.5, tokens=200),
        fake_stage(tmp_path, "rl", results({"arithmetic": 0.75, "sorting": 0.5, "counting": 1.0}, 3.25), rl_records,
                   wall_clock_s=20.0, tokens=300, rollout_tokens=12345),
        fake_stage(tmp_path, "dpo", None, curve(2), wall_clock_s=1.5, tokens=50),
    ]


def table(md: str) -> dict[str, list[str]]:
    """The summary table of report.md: {row label: cells}, with the header row under "metric"."""
    section = md.split("## Summary", 1)[1]
    rows = [ln for ln in section.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    return {c[0]: c[1:] for c in cells}


def test_report_json_is_the_metrics_by_stage(tmp_path, stages):
    info = {"python": "3.x", "torch": "2.x", "gpu": None}
    md, js = write_report(tmp_path, stages, info)
    data = json.loads(js.read_text())
    assert list(data["stages"]) == ["base", "sft", "rl", "dpo"]
    assert data["system"] == info
    assert data["total_wall_clock_s"] == pytest.approx(37.0)
    assert data["eval"]["k"] == 4 and data["eval"]["split"] == "heldout"
    sft = data["stages"]["sft"]
    assert sft["pass@1"] == pytest.approx(0.5) and sft["pass@k"] == pytest.approx(1.0)
    assert sft["mean_reward"] == pytest.approx(0.51) and sft["format_error_rate"] == pytest.approx(0.5)
    assert sft["mean_length"] == pytest.approx(8.0) and sft["bits_per_byte"] is None
    assert sft["per_task"]["counting"] == {"pass@1": 0.75, "pass@k": 1.0, "mean_reward": 0.76,
                                           "format_error_rate": 0.25, "mean_length": 10.5}
    assert (sft["wall_clock_s"], sft["tokens"], sft["rollout_tokens"]) == (5.5, 200, None)
    assert data["stages"]["rl"]["rollout_tokens"] == 12345
    assert data["stages"]["base"]["bits_per_byte"] == 3.5
    assert "counting" not in data["stages"]["base"]["per_task"]
    dpo = data["stages"]["dpo"]  # never evaluated: every eval metric null, its cost still there
    assert all(dpo[m] is None for m in (*METRICS, "bits_per_byte")) and dpo["per_task"] == {}
    assert (dpo["wall_clock_s"], dpo["tokens"]) == (1.5, 50)


def test_markdown_summary_table_has_every_stage_and_every_metric(tmp_path, stages):
    md, _ = write_report(tmp_path, stages, system_info())
    text = md.read_text()
    rows = table(text)
    assert rows["metric"] == ["base", "sft", "rl", "dpo"]  # one column per stage, in order
    labels = [*METRICS, "bits_per_byte", "pass@1 arithmetic", "pass@1 sorting", "pass@1 counting",
              "wall_clock_s", "tokens", "rollout_tokens"]
    assert list(rows)[1:] == labels  # one row per metric, per-task pass@1 included
    assert all(len(cells) == 4 for cells in rows.values())
    assert rows["pass@1"] == ["0.1250", "0.5000", "0.7500", "-"]
    assert rows["pass@1 counting"] == ["-", "0.7500", "1.0000", "-"]  # base never saw counting, dpo not evaluated
    assert rows["bits_per_byte"] == ["3.5000", "-", "3.2500", "-"]
    assert rows["rollout_tokens"] == ["-", "-", "12,345", "-"]
    assert rows["tokens"] == ["400", "200", "300", "50"]
    assert text.count("## Summary") == 1
    for name in ("base", "sft", "rl", "dpo"):  # a section per stage, with its time and tokens
        assert f"## {name}\n" in text
    assert "- rollout tokens: 12,345" in text and "- wall clock: 0:00:20" in text
    assert "## System" in text and "Python" in text
    assert "Total wall clock: 0:00:37" in text


def test_plots_are_written_and_linked(tmp_path, stages):
    md, js = make_report(tmp_path, stages, {"gpu": None})
    for name in ("loss.png", "rl.png", "pass_at_1.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md.read_text()


def test_no_rl_stage_no_rl_plot(tmp_path, stages):
    written = report_plots(tmp_path, [s for s in stages if s.name != "rl"])
    assert [p.name for p in written] == ["loss.png", "pass_at_1.png"]
    assert not (tmp_path / "rl.png").exists()


def test_stages_are_found_and_loaded_from_their_folders(tmp_path, stages):
    (tmp_path / "notes").mkdir()  # a folder that is not a stage
    (tmp_path / "zeta").mkdir()
    (tmp_path / "zeta" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0,
                                                                 "tokens": 77}) + "\n")
    found = find_stages(tmp_path)
    assert [s.name for s in found] == ["base", "sft", "rl", "dpo", "zeta"]  # the recipe's order, then by name
    assert found[2] == stages[2]
    zeta = load_stage("zeta", tmp_path / "zeta")  # no stage.json: tokens from metrics.jsonl, no time, no eval
    assert (zeta.tokens, zeta.wall_clock_s, zeta.eval) == (77, None, None)
    md, _ = make_report(tmp_path)
    assert table(md.read_text())["metric"] == ["base", "sft", "rl", "dpo", "zeta"]
    with pytest.raises(FileNotFoundError, match="no stage folders"):
        make_report(tmp_path / "notes")


def test_system_info(monkeypatch):
    info = system_info()
    for key in ("python", "torch", "cpu", "cpu_count", "torch_threads", "gpu", "platform", "git_commit", "date"):
        assert key in info
    assert info["cpu_count"] >= 1 and info["torch_threads"] >= 1

    def no_git(*a, **kw):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)  # no git on the machine: reported as unknown, not a failure
    assert report_mod._git() == {"git_commit": None, "git_dirty": None}
