"""Sparse upcycling (herd.train.upcycle): the upcycled MoE computes the dense model, loads, and trains on.

Run: .venv/bin/python -m pytest tests/train/test_upcycle.py -v
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import herd
from herd.config import ConfigError
from herd.train.train_cli import add_train_parser, run_train
from herd.train.upcycle import logit_difference, upcycle
from tests.formats.test_llama_dense import _llama
from tests.train import small_data

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _parse(argv):
    p = argparse.ArgumentParser()
    add_train_parser(p.add_subparsers(dest="cmd", required=True))
    return p.parse_args(argv)


def _ids(vocab, n=48, seed=0):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("every", [1, 2])
def test_upcycled_herd_model_computes_the_dense_one(every):
    """A herd dense model (Llama 4 layout: NoPE layers, chunks, QK-norm) upcycled: same logits, routed experts live."""
    dense = herd.build_model(herd.preset("tiny", moe_layers=[]), seed=3).eval()
    moe = upcycle(dense, experts=4, every=every)
    cfg = moe.config
    assert cfg.moe_layers == list(range(every - 1, cfg.num_hidden_layers, every)) and cfg.num_local_experts == 4
    assert cfg.intermediate_size == dense.config.intermediate_size_mlp  # experts as wide as the dense FFN
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        assert (moe(ids) - dense(ids)).abs().max().item() <= TOL
        layer = moe.model.layers[cfg.moe_layers[0]].feed_forward
        x = torch.randn(5, cfg.hidden_size)
        shared_only = layer.shared_expert(x)
        full, _ = layer(x)
        # the routed experts carry half the FFN: a construction that zeroed them would be exact too, but dead
        assert (full - shared_only).abs().max().item() > 1e-3
        assert (full - dense.model.layers[cfg.moe_layers[0]].feed_forward(x)).abs().max().item() <= TOL


def test_router_noise_is_measured_not_exact():
    dense = herd.build_model(herd.preset("tiny", moe_layers=[]), seed=3).eval()
    noisy = upcycle(dense, experts=4, router_std=0.02)
    d = logit_difference(dense, noisy, dense.config.vocab_size)
    assert TOL < d < 1.0  # close to the dense model, not equal (the gate is no longer exactly 1/2)


def test_upcycling_refuses_a_moe_model():
    with pytest.raises(ConfigError, match="already has MoE layers"):
        upcycle(herd.build_model(herd.preset("tiny"), seed=0), experts=4)


def test_herd_upcycle_a_llama_then_train_on(tmp_path, monkeypatch, capsys):
    """`herd upcycle` on a transformers-written Llama: the MoE checkpoint loads with herd.from_pretrained, computes
    transformers' dense logits, and `herd train --init` continues it."""
    small_data(monkeypatch)
    ref = _llama(tmp_path / "llama", seed=5, num_hidden_layers=2)
    out = tmp_path / "moe"
    args = _parse(["upcycle", "--init", str(tmp_path / "llama"), "--experts", "4", "--out", str(out)])
    assert args.fn(args) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    d = json.loads((out / "config.json").read_text())
    assert d["architectures"] == ["Llama4ForCausalLM"] and d["moe_layers"] == [0, 1]
    moe = herd.from_pretrained(out)
    ids = _ids(2048, n=80)
    with torch.no_grad():
        assert (moe(ids) - ref(ids).logits).abs().max().item() <= TOL
    run = tmp_path / "run"
    assert run_train(_parse(["train", "--preset", "smoke", "--init", str(out), "--out", str(run), "--max-steps", "2",
                             "plots=false", "export=false"])) == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" and r["step"] == 2 for r in recs)
