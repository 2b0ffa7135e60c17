"""FSDP2 on 2 CPU processes (gloo, launched by torchrun) gives the single-process losses on the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from herd.train.distributed import all_reduce_mean, init_distributed, is_main, shard
from tests.train.fsdp_worker import train

WORKER = Path(__file__).with_name("fsdp_worker.py")
STEPS = 5


def test_single_process_helpers_need_no_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    rank, world, device = init_distributed()
    assert (rank, world) == (0, 1) and device.type in ("cpu", "cuda")
    assert is_main() and not dist.is_initialized()
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(all_reduce_mean(t), t)
    m = torch.nn.Linear(2, 2)
    assert shard(m) is m  # no process group: nothing to shard


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")
def test_fsdp2_two_processes_match_one(tmp_path):
    out = tmp_path / "losses.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--out", str(out), "--steps", str(STEPS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank logs the same global loss and holds the same expert biases

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(STEPS)
    finally:
        torch.set_num_threads(n)
    assert one["losses"][-1] < one["losses"][0]  # it trains
    diff = max(abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True))
    assert diff < 1e-5, (one["losses"], two["losses"])
    bias_diff = max(abs(a - b) for x, y in zip(one["expert_bias"], two["expert_bias"], strict=True)
                    for a, b in zip(x, y, strict=True))
    assert bias_diff < 1e-6


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")
def test_herd_train_under_torchrun_checkpoints_resumes_and_exports(tmp_path):
    """The real command as the README gives it: 2 gloo processes train, save, resume from the checkpoint, export."""
    import os

    from herd.data.corpus import documents
    from herd.train import snapshots as ckpt

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(d[:3000] for d in documents("train")[:40]))
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "herd.cli", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (["--preset", "smoke", "--out", str(out), "--data", str(text), "--max-steps", "3", "plots=false"],
                 ["--resume", str(out), "--max-steps", "4"]):
        proc = subprocess.run(launch + args, capture_output=True, text=True, timeout=300, env=env,
                              cwd=Path(__file__).parents[2])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.count("done: step") == 1  # rank 0 speaks for the run
    assert "resumed from" in proc.stdout
    state = ckpt.load(ckpt.latest(out / "ckpt"), ("state",))["state"]
    assert state["step"] == 4 and len(state["data"]) == 2  # each rank's data position is kept
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # one line per step, written by rank 0 only
    import herd

    model = herd.from_pretrained(out / "hf")
    assert model(torch.tensor([[1, 2, 3]])).isfinite().all()
