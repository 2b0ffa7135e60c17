"""Checkpoint integrity: a damaged newest checkpoint is skipped (with a warning naming the file and the fault) and
the run resumes from the newest intact one, exactly; none intact is a clear refusal; a full disk during a save keeps
the previous checkpoints and stops the run with a clear error.

Every resumed run here is compared bit for bit with one unbroken run (resuming is exact, tests/train/test_resume.py),
so "equal to the unbroken run" means "equal to resuming from the checkpoint it fell back to".
Run: .venv/bin/python -m pytest tests/train/test_snapshots.py -v
"""

from __future__ import annotations

import argparse
import errno
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from herd.train import snapshots as ckpt
from herd.train import train
from herd.train.train_cli import add_train_parser, build_config, run_train
from tests.train import small_data
from tests.train.test_resume import _assert_same_run, _cfg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the unbroken 8-step run, a run stopped at step 6 with checkpoints at 2, 4 and 6)."""
    with pytest.MonkeyPatch.context() as mp:
        small_data(mp)
        ref, part = tmp_path_factory.mktemp("unbroken"), tmp_path_factory.mktemp("part")
        train(_cfg(ref))
        train(_cfg(part, max_steps=6, keep_last=3))
        yield ref, part


@pytest.fixture(autouse=True)
def _data(monkeypatch):
    small_data(monkeypatch)


def _copy(part: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(part, out)
    return out


def _parse(argv):
    p = argparse.ArgumentParser()
    add_train_parser(p.add_subparsers(dest="cmd", required=True))
    return p.parse_args(argv)


# ---- the damage, as found in the wild --------------------------------------------------------------------------------
def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _empty(f: Path):
    f.write_bytes(b"")


def _garbage(f: Path):  # the same size, so only the checksum can tell
    f.write_bytes(random.Random(0).randbytes(f.stat().st_size))


def _flip_bit(f: Path):
    """One bit in the middle of the largest weight's bytes: torch.load reads it without complaint (asserted below)."""
    big = max(torch.load(f, weights_only=True).values(), key=torch.numel)
    b = bytearray(f.read_bytes())
    at = b.find(big.numpy().tobytes()) + big.numel() * big.element_size() // 2
    b[at] ^= 1
    f.write_bytes(bytes(b))


def _junk_dir(root: Path) -> Path:
    d = root / "step_00000999"
    d.mkdir()
    for i, name in enumerate(("model.pt", "optim.pt", "state.pt")):
        (d / name).write_bytes(b"PK\x03\x04" + random.Random(i).randbytes(500))
    return d


DAMAGE = {  # case of issue item 9: (file, damage, what the warning must say)
    "truncated_model": ("model.pt", _truncate, r"model\.pt is \d+ bytes, its manifest says \d+"),
    "empty_optim": ("optim.pt", _empty, r"optim\.pt is 0 bytes, its manifest says \d+"),
    "garbage_state": ("state.pt", _garbage, r"state\.pt fails its SHA-256 checksum"),
    "flipped_bit_model": ("model.pt", _flip_bit, r"model\.pt fails its SHA-256 checksum"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(case, runs, tmp_path, capsys):
    ref, part = runs
    out = _copy(part, tmp_path)
    name, damage, said = DAMAGE[case]
    bad = out / "ckpt" / "step_00000006"
    damage(bad / name)
    if case == "flipped_bit_model":  # without the manifest this loads silently, with different weights
        flipped = torch.load(bad / name, weights_only=True)
        good = torch.load(part / "ckpt" / "step_00000006" / name, weights_only=True)
        assert any(not torch.equal(flipped[k], good[k]) for k in good)
    with pytest.raises(ckpt.CheckpointCorrupt, match=said):
        ckpt.load(bad)
    capsys.readouterr()
    train(_cfg(out), resume=True)
    printed = capsys.readouterr().out
    assert f"warning: skipped damaged checkpoint {bad}: " in printed
    assert len(re.findall(said, printed)) == 1
    assert f"resumed from {out / 'ckpt' / 'step_00000004'} at step 4" in printed
    assert (out / "ckpt" / "skipped" / "step_00000006" / name).is_file()  # kept for inspection, not deleted
    _assert_same_run(ref, out)


def test_stray_junk_step_dir_is_skipped_and_keep_last_keeps_the_intact_ones(runs, tmp_path, capsys):
    """A junk step_00000999 (no manifest) beside a bit-flipped step 6: resume falls back to step 4, and pruning with
    keep_last=1 keeps the run's own newest checkpoint, not the junk (before, it kept 999 and deleted step 8)."""
    ref, part = runs
    out = _copy(part, tmp_path)
    junk = _junk_dir(out / "ckpt")
    _flip_bit(out / "ckpt" / "step_00000006" / "model.pt")
    train(_cfg(out, keep_last=1), resume=True)
    printed = capsys.readouterr().out
    assert f"skipped damaged checkpoint {junk}: no manifest.json, though older checkpoints have one" in printed
    assert "step_00000006: model.pt fails its SHA-256 checksum" in printed
    assert "resumed from" in printed and "step_00000004 at step 4" in printed
    assert [p.name for p in ckpt.step_dirs(out / "ckpt")] == ["step_00000008"]
    assert sorted(p.name for p in (out / "ckpt" / "skipped").iterdir()) == ["step_00000006", "step_00000999"]
    assert ckpt.verify(ckpt.latest(out / "ckpt"))
    _assert_same_run(ref, out)


def test_no_intact_checkpoint_is_a_clear_refusal_from_the_cli(runs, tmp_path, capsys):
    _, part = runs
    out = _copy(part, tmp_path)
    root = out / "ckpt"
    _junk_dir(root)
    _truncate(root / "step_00000006" / "model.pt")
    _empty(root / "step_00000004" / "optim.pt")
    _flip_bit(root / "step_00000002" / "model.pt")
    capsys.readouterr()
    assert run_train(_parse(["train", "--resume", str(out)])) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: no intact checkpoint in {root}: ") and "Traceback" not in err
    for said in ("step_00000999: no manifest.json", r"step_00000006: model.pt is \d+ bytes",
                 "step_00000004: optim.pt is 0 bytes", "step_00000002: model.pt fails its SHA-256"):
        assert re.search(said, err), said
    assert [p.name for p in ckpt.step_dirs(root)] == ["step_00000002", "step_00000004", "step_00000006",
                                                      "step_00000999"]  # nothing moved or deleted


def test_starting_from_a_run_checks_its_checkpoints_too(runs, tmp_path, capsys):
    """`--init` / `teacher=` read a run's weights through the same checks: a named damaged step dir is refused, a
    run directory gives its newest intact checkpoint."""
    _, part = runs
    out = _copy(part, tmp_path)
    bad = out / "ckpt" / "step_00000006"
    _flip_bit(bad / "model.pt")
    with pytest.raises(ckpt.CheckpointCorrupt, match=r"model\.pt fails its SHA-256 checksum"):
        ckpt.load_model(bad)
    model, _ = ckpt.load_model(out)
    assert f"skipped damaged checkpoint {bad}" in capsys.readouterr().out
    good = ckpt.load(out / "ckpt" / "step_00000004", ("model",))["model"]
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())
    assert bad.is_dir()  # reading another run moves nothing


# ---- checkpoints from before manifests -------------------------------------------------------------------------------
def test_checkpoints_without_manifests_resume_with_a_warning(runs, tmp_path, capsys):
    ref, part = runs
    out = _copy(part, tmp_path)
    for d in ckpt.step_dirs(out / "ckpt"):
        (d / "manifest.json").unlink()
    _truncate(out / "ckpt" / "step_00000006" / "model.pt")
    train(_cfg(out), resume=True)
    printed = capsys.readouterr().out
    assert "step_00000006: model.pt cannot be read (RuntimeError: PytorchStreamReader" in printed
    assert "step_00000004 has no manifest.json (written by an older herd), so it cannot be verified" in printed
    _assert_same_run(ref, out)


@pytest.mark.parametrize("name,damage,error", [("model.pt", _truncate, "RuntimeError: PytorchStreamReader"),
                                               ("optim.pt", _empty, "EOFError"),
                                               ("state.pt", _truncate, "(RuntimeError|OSError)"),
                                               ("state.pt", _garbage, "UnpicklingError")])
def test_unreadable_files_without_a_manifest_raise_checkpoint_corrupt(name, damage, error, runs, tmp_path):
    """Checkpoints from before manifests cannot be verified, but their damage is still one clear error."""
    d = tmp_path / "step_00000002"
    shutil.copytree(runs[1] / "ckpt" / "step_00000002", d)
    (d / "manifest.json").unlink()
    damage(d / name)
    with pytest.raises(ckpt.CheckpointCorrupt, match=rf"{d}: {re.escape(name)} cannot be read \({error}"):
        ckpt.load(d)
    junk = _junk_dir(tmp_path)
    with pytest.raises(ckpt.CheckpointCorrupt, match=r"step_00000999: model\.pt cannot be read"):
        ckpt.load(junk)


# ---- a full disk during a save (issue item 10) -------------------------------------------------------------------
class _SmallDisk:
    """open() for files on a disk with `free` bytes left: past that, writes fail as a full disk's do (ENOSPC)."""

    def __init__(self, free: int):
        self.free = free

    def open(self, path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        return f if "w" not in mode else _Limited(f, self, path)


class _Limited:
    def __init__(self, f, disk: _SmallDisk, path):
        self.f, self.disk, self.path = f, disk, path

    def write(self, b):
        if len(b) > self.disk.free:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        self.disk.free -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):  # flush, fileno, close
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_during_a_save_keeps_the_previous_checkpoints_and_stops_cleanly(runs, tmp_path, monkeypatch,
                                                                                   capsys):
    ref, part = runs
    one = sum(f.stat().st_size for f in (part / "ckpt" / "step_00000002").iterdir())
    out = tmp_path / "run"
    monkeypatch.setattr(ckpt, "open", _SmallDisk(one + one // 3).open, raising=False)  # room for 1.3 checkpoints
    argv = ["train", "--preset", "smoke", "--out", str(out), "steps=8", "warmup=2", "seq_len=32", "batch_size=4",
            "grad_accum=2", "log_every=1", "eval_every=4", "eval_batches=1", "ckpt_every=2", "keep_last=2",
            "export=false", "plots=false"]  # _cfg's settings
    assert _cfg(out) == build_config(_parse(argv))[0]
    assert run_train(_parse(argv)) == 1
    err = capsys.readouterr().err
    root = out / "ckpt"
    assert err.startswith("error: disk full: the checkpoint of step 4 needs about ") and f"MiB in {root}" in err
    assert "the previous ones are intact (newest step_00000002)" in err and "Traceback" not in err
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]  # the partial step 4 is gone
    assert ckpt.verify(root / "step_00000002")
    monkeypatch.undo()
    small_data(monkeypatch)
    train(_cfg(out), resume=True)
    _assert_same_run(ref, out)


def test_a_real_enospc_from_the_kernel_is_reported_as_such():
    """/dev/full (Linux, where CI runs) fails every write with ENOSPC. torch.save given the path only says
    `unexpected pos N vs M`; the checkpoint writer hands torch a Python file, so the disk's own error comes through."""
    assert Path("/dev/full").exists(), "this test needs Linux's /dev/full"
    with pytest.raises(RuntimeError, match="unexpected pos"):
        torch.save({"w": torch.zeros(1000)}, "/dev/full")
    with pytest.raises(OSError) as e:
        ckpt._save_file({"w": torch.zeros(1000)}, Path("/dev/full"))
    assert e.value.errno == errno.ENOSPC and ckpt._disk_full(e.value)
