"""Checkpoints: exact resume (same losses, bitwise the same weights), atomic saves under a crash, keep-last-N.

The reference is one unbroken float32 CPU run of N steps; a run stopped early (or crashed inside a save) and then
resumed to N must match it bit for bit: weights, AdamW state, expert biases, and every logged loss.
Run: .venv/bin/python -m pytest tests/train/test_resume.py -v
"""

from __future__ import annotations

import json

import pytest
import torch

from herd.train import snapshots as ckpt
from herd.train import train, train_preset
from tests.train import small_data

N = 8


def _cfg(out, **kw):
    base = dict(out_dir=str(out), steps=N, warmup=2, seq_len=32, batch_size=4, grad_accum=2, log_every=1,
                eval_every=4, eval_batches=1, ckpt_every=2, keep_last=2, export=False, plots=False)
    return train_preset("smoke", **{**base, **kw})


def _losses(out, kind: str) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss" if kind == "train" else "val_loss"] for r in recs if r["kind"] == kind}


def _final(out) -> dict:
    return ckpt.load(ckpt.latest(out / "ckpt"))


def _assert_same_run(a, b):
    fa, fb = _final(a), _final(b)
    assert fa["state"]["step"] == fb["state"]["step"] == N
    for k, v in fa["model"].items():
        assert torch.equal(v, fb["model"][k]), f"weights differ: {k}"
    for k, v in fa["state"]["expert_bias"].items():
        assert torch.equal(v, fb["state"]["expert_bias"][k]), f"expert bias differs: {k}"
    sa, sb = fa["optim"]["state"], fb["optim"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}.{k} differs"
    assert _losses(a, "train") == _losses(b, "train")  # every step's loss, exactly
    assert _losses(a, "train").keys() == set(range(1, N + 1))
    ea, eb = _losses(a, "eval"), _losses(b, "eval")  # b may also have evaluated where it stopped
    assert ea == {k: v for k, v in eb.items() if k in ea}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        small_data(mp)
        out = tmp_path_factory.mktemp("unbroken")
        train(_cfg(out))
        yield out


@pytest.fixture(autouse=True)
def _data(monkeypatch):
    small_data(monkeypatch)


def test_stopped_and_resumed_run_is_bitwise_identical(reference, tmp_path):
    out = tmp_path / "run"
    s = train(_cfg(out, max_steps=3))  # stops between checkpoints: the end-of-run save is at step 3
    assert s["step"] == 3 and ckpt.latest(out / "ckpt").name == "step_00000003"
    s = train(_cfg(out), resume=True)
    assert s["step"] == N
    _assert_same_run(reference, out)


def test_crash_inside_a_save_leaves_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def crashing_save(obj, f, *a, **kw):  # dies after the first file of the step-4 checkpoint is written
        calls.append(str(f))
        real_save(obj, f, *a, **kw)
        if "step_00000004" in str(f):
            raise KeyboardInterrupt("simulated kill during the save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(out))
    monkeypatch.setattr(torch, "save", real_save)
    root = out / "ckpt"
    assert [p.name for p in ckpt.step_dirs(root)] == ["step_00000002"]  # the half-written step 4 is not visible
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert ckpt.load(ckpt.latest(root))["state"]["step"] == 2  # and the previous one is whole
    train(_cfg(out), resume=True)
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    _assert_same_run(reference, out)


def test_keep_last_n_and_refusing_to_overwrite(reference, tmp_path):
    assert [p.name for p in ckpt.step_dirs(reference / "ckpt")] == ["step_00000006", "step_00000008"]
    with pytest.raises(FileExistsError, match="resume"):
        train(_cfg(reference))


def test_resume_past_the_planned_steps_keeps_the_final_lr(reference, tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, steps=4, max_steps=None))
    s = train(_cfg(out, steps=4, max_steps=5), resume=True)
    assert s["step"] == 5
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[-1]["lr"] == pytest.approx(train_preset("smoke").min_lr)
