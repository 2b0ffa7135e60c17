"""The trainer: schedules, config handling, a short run that learns, NaN stop, the Hugging Face export, the CLI.

Runs use the tiny preset on a slice of the built-in corpus (tests/train/__init__.py), seq_len 32, a few steps.
Run: .venv/bin/python -m pytest tests/train/test_trainer.py -v
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import herd
from herd.config import ConfigError
from herd.train import TrainingDiverged, train, train_preset
from herd.train import snapshots as ckpt
from herd.train.schedule import lr_factor
from herd.train.train_cli import add_train_parser, build_config, run_train
from herd.train.train_config import from_dict, load_file, with_overrides
from herd.train.trainer import Run, flops_per_token
from tests.train import small_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _data(monkeypatch):
    small_data(monkeypatch)


def _records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ---- schedules -----------------------------------------------------------------------------------------------------
def test_schedule_shapes():
    kw = dict(steps=100, warmup=10, min_ratio=0.1)
    for kind in ("cosine", "wsd", "constant"):
        f = [lr_factor(s, kind=kind, **kw) for s in range(120)]
        assert f[0] == pytest.approx(0.1) and f[9] == 1.0  # linear warmup, never starting at 0
        assert all(a < b for a, b in zip(f[:9], f[1:10], strict=True))
        assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))  # never rises after warmup
    cos = [lr_factor(s, kind="cosine", **kw) for s in range(101)]
    assert cos[55] == pytest.approx(0.55) and cos[100] == pytest.approx(0.1)  # half-way point of the cosine
    wsd = [lr_factor(s, kind="wsd", decay_frac=0.2, **kw) for s in range(120)]
    assert wsd[10:80] == [1.0] * 70 and wsd[90] == pytest.approx(0.55) and wsd[100] == wsd[119] == pytest.approx(0.1)
    assert [lr_factor(s, kind="constant", **kw) for s in (10, 99, 150)] == [1.0, 1.0, 1.0]


# ---- config --------------------------------------------------------------------------------------------------------
def test_config_presets_files_and_overrides(tmp_path):
    cfg = train_preset("smoke")
    assert cfg.replace(lr=1e-3).lr == 1e-3 and cfg.stop_step == cfg.steps
    cfg = with_overrides(cfg, ["lr=2e-3", "--betas=0.8,0.9", "dtype=bfloat16", "max_steps=none", "metap=true",
                               "model.num_local_experts=2", "steps=1e2"])
    assert (cfg.lr, cfg.betas, cfg.dtype, cfg.max_steps, cfg.metap, cfg.steps) == \
        (2e-3, (0.8, 0.9), "bfloat16", None, True, 100)
    assert cfg.model_overrides == {"num_local_experts": 2}
    (tmp_path / "a.toml").write_text('preset = "smoke"\nlr = 5e-4\nwarmup = 1\n[model_overrides]\nhidden_size = 32\n')
    (tmp_path / "b.json").write_text(json.dumps({"schedule": "wsd", "batch_size": 2}))
    a = from_dict(load_file(tmp_path / "a.toml"))
    assert (a.lr, a.seq_len, a.model_overrides) == (5e-4, 32, {"hidden_size": 32})
    assert from_dict(load_file(tmp_path / "b.json"), base=a).schedule == "wsd"
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        with_overrides(a, ["lrr=1"])
    with pytest.raises(ConfigError, match="batch_size: expected int"):
        with_overrides(a, ["batch_size=two"])
    with pytest.raises(ConfigError, match="unknown model key 'hidden'"):
        with_overrides(a, ["model.hidden=3"])
    with pytest.raises(ConfigError, match="schedule must be one of"):
        a.replace(schedule="linear")
    with pytest.raises(ConfigError, match="warmup"):
        a.replace(warmup=1000)


def test_flops_per_token_counts_active_params_and_attention():
    cfg = herd.preset("tiny")
    n = herd.count_params(cfg).active - cfg.vocab_size * cfg.hidden_size
    attn = 12 * cfg.num_attention_heads * cfg.head_dim * (3 * 16 + 64)  # 3 chunked layers (chunk 16), 1 global
    assert flops_per_token(cfg, 64) == 6 * n + attn


# ---- a short run: learns, logs, plots, exports ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        small_data(mp)
        out = tmp_path_factory.mktemp("short")
        cfg = train_preset("smoke", out_dir=str(out), steps=20, warmup=3, batch_size=8, eval_every=10,
                           eval_batches=2, ckpt_every=10, log_every=5, lr=1e-2)
        run = Run(cfg)
        yield out, run.fit(), run.model.eval()


def test_short_run_learns_and_writes_metrics_and_plots(short_run):
    out, summary, _ = short_run
    train_recs, evals = _records(out, "train"), _records(out, "eval")
    assert [r["step"] for r in train_recs] == list(range(1, 21)) and [r["step"] for r in evals] == [0, 10, 20]
    assert [r["step"] for r in train_recs if "tok_s" in r] == [5, 10, 15, 20]  # throughput and loads per log line
    assert evals[0]["val_loss"] == pytest.approx(math.log(2048), abs=0.1)  # a random model: uniform over the vocab
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0 and summary["val_loss"] == evals[-1]["val_loss"]
    assert max(r["loss"] for r in train_recs[-10:]) < evals[0]["val_loss"] - 1.0
    # bits/byte = nats / (ln 2 * bytes); tiny tokens are a few bytes each, so bpb is well below loss / ln 2
    assert 0 < evals[-1]["val_bpb"] < evals[-1]["val_loss"] / math.log(2)
    r = train_recs[-1]
    assert r["tok_s"] > 0 and 0 < r["mfu"] < 1 and r["tokens"] == 20 * 8 * 32
    load = torch.tensor(r["expert_load"])  # (MoE layers, experts), shares summing to 1 per layer
    assert load.shape == (4, 4) and torch.allclose(load.sum(1), torch.ones(4))
    for name in ("loss.png", "expert_load.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "train_config.json").read_text())["steps"] == 20


def _ids(n=40, seed=0):
    return torch.randint(3, 900, (2, n), generator=torch.Generator().manual_seed(seed))


def _safetensors_names(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def test_a_default_run_serves_and_exports_the_model_it_evaluated(short_run):
    """Train -> export -> load -> serve -> compare. The default balancing (aux-free) trains router biases; the
    cooldown takes them back to exactly zero, so the final model (what the last eval measured) needs none, and
    herd's loader, its server's engine and transformers all compute that model."""
    import asyncio

    from transformers import AutoTokenizer
    from transformers import Llama4ForCausalLM as HFLlama4

    from herd.infer.sampling import SamplingParams
    from herd.serve import build_service
    from herd.serve.serve_config import ServeConfig

    out, summary, final = short_run
    hf_dir = out / "hf"
    mid, last = [ckpt.load(d, ("state",))["state"]["expert_bias"] for d in ckpt.step_dirs(out / "ckpt")]
    assert any(bool(b.any()) for b in mid.values())  # balancing moved the biases during the run (step 10) ...
    assert not any(bool(b.any()) for b in last.values())  # ... and the cooldown brought them back to 0 (step 20)
    assert not any(n.endswith("expert_bias") for n in _safetensors_names(hf_dir))
    assert not (hf_dir / "expert_bias.json").exists()
    served = herd.from_pretrained(hf_dir)
    ref = HFLlama4.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.cat([_ids(), torch.tensor([AutoTokenizer.from_pretrained(hf_dir).encode("It is a truth")] * 2)], 1)
    with torch.no_grad():
        torch.testing.assert_close(served(ids), final(ids), atol=1e-6, rtol=0)
        torch.testing.assert_close(ref(ids).logits, final(ids), atol=1e-5, rtol=1e-5)
    # what `herd serve` answers: its engine's tokens and raw logprobs are the run's model's
    service = build_service(ServeConfig(model=str(hf_dir), device="cpu"))
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True, logprobs=True)
    prompt = ids[0, :25].tolist()

    async def ask():
        req, queue = service.worker.submit(prompt, params)
        while not req.finished:
            await asyncio.wait_for(queue.get(), 60)
        return req
    try:
        req = asyncio.run(ask())
    finally:
        service.worker.stop(0)
    expected = herd.generate(final, torch.tensor([prompt]), 12)[0, 25:].tolist()
    assert req.output_ids == expected
    with torch.no_grad():
        logp = final(torch.tensor([prompt + expected])).log_softmax(-1)[0, 24:-1]  # the logprob of each new token
    torch.testing.assert_close(torch.tensor([lp["logprob"] for lp in req.logprobs]),
                               logp.gather(1, torch.tensor(expected)[:, None])[:, 0], atol=1e-5, rtol=0)


def test_an_export_that_still_routes_with_biases_loads_exactly_in_herd_and_says_so(tmp_path, capsys):
    """A run without the cooldown (or stopped before it ends) exports router biases: herd loads them (the served
    model is the evaluated one), the exporter warns with what dropping them changes, transformers reports the extra
    tensors, and an older export's expert_bias.json sidecar is still read."""
    from herd.formats.hf import LEGACY_BIAS_FILE, RoutingWarning, router_biases

    cfg = train_preset("smoke", out_dir=str(tmp_path), steps=8, warmup=1, eval_every=8, ckpt_every=8,
                       bias_cooldown=0.0, lr=1e-2, plots=False)
    run = Run(cfg)
    run.fit()
    final, hf_dir = run.model.eval(), tmp_path / "hf"
    biases = {n: b.clone() for n, b in router_biases(final).items()}
    assert all(bool(b.any()) for b in biases.values())
    said = capsys.readouterr().out
    assert "WARNING" in said and "routes with non-zero MoE selection biases (4 routers)" in said
    rec = _records(tmp_path, "export")[0]
    assert rec["biased_routers"] == 4 and 0 < rec["routing_changed"] <= 1 and rec["max_logit_change"] > 0
    assert sorted(n for n in _safetensors_names(hf_dir) if n.endswith("expert_bias")) == sorted(biases)
    served, ids = herd.from_pretrained(hf_dir), _ids(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(served(ids), final(ids), atol=1e-6, rtol=0)
        unbiased = herd.build_model(final.config, seed=0)
        unbiased.load_state_dict(final.state_dict())
        assert (unbiased(ids) - final(ids)).abs().max() > 1e-3  # the biases matter to these logits
    # transformers cannot route with them, and its load report names them rather than dropping them silently
    from transformers import Llama4ForCausalLM as HFLlama4

    with pytest.warns(RoutingWarning, match="transformers and vLLM ignore them"):
        herd.save_pretrained(final, tmp_path / "again")
    _, info = HFLlama4.from_pretrained(tmp_path / "again", output_loading_info=True)
    assert sorted(info["unexpected_keys"]) == sorted(biases)
    # an older export: weights without the biases, which sat in a JSON sidecar
    herd.save_pretrained(unbiased, tmp_path / "old")
    (tmp_path / "old" / LEGACY_BIAS_FILE).write_text(json.dumps({n: b.tolist() for n, b in biases.items()}))
    with torch.no_grad():
        torch.testing.assert_close(herd.from_pretrained(tmp_path / "old")(ids), final(ids), atol=1e-6, rtol=0)


def test_distillation_from_a_run_with_fp8_metap_student(short_run, tmp_path):
    teacher, _, _ = short_run  # a training run's directory is a valid teacher (its newest checkpoint is used)
    cfg = train_preset("smoke", out_dir=str(tmp_path), steps=2, warmup=1, teacher=str(teacher), alpha=0.9,
                       alpha_end=0.1, alpha_schedule="linear", tau=2.0, fp8=True, metap=True, base_width=32,
                       export=False, plots=False)
    train(cfg)
    recs = _records(tmp_path, "train")
    assert [r["alpha"] for r in recs] == [pytest.approx(0.9), pytest.approx(0.5)]  # linear 0.9 -> 0.1 over 2 steps
    assert all(r["kl"] > 0 and math.isfinite(r["loss"]) for r in recs)


# ---- failures ------------------------------------------------------------------------------------------------------
def test_nan_loss_stops_and_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_step = Run.train_step

    def poisoned(self):  # weights turn to NaN after step 4 (a blow-up, as a too-high LR would cause)
        if self.step == 4:
            with torch.no_grad():
                self.model.lm_head.weight.fill_(float("nan"))
        return real_step(self)

    monkeypatch.setattr(Run, "train_step", poisoned)
    cfg = train_preset("smoke", out_dir=str(tmp_path), ckpt_every=2, export=False, plots=False)
    with pytest.raises(TrainingDiverged, match=r"step 5: loss nan.*last good checkpoint is .*step_00000004"):
        train(cfg)
    good = ckpt.load(ckpt.latest(tmp_path / "ckpt"))
    assert good["state"]["step"] == 4 and all(v.isfinite().all() for v in good["model"].values())


# ---- CLI, bf16, balancing by aux loss, mid-training ----------------------------------------------------------------
def _parse(argv):
    p = argparse.ArgumentParser()
    add_train_parser(p.add_subparsers(dest="cmd", required=True))
    return p.parse_args(argv)


def test_cli_config_resolution(tmp_path):
    cfg, resume = build_config(_parse(["train", "--preset", "smoke", "--out", str(tmp_path), "--max-steps", "7",
                                       "--weight-decay=0.05", "--schedule", "wsd", "lr=1e-3", "model.hidden_size=32"]))
    assert (cfg.out_dir, cfg.steps, cfg.max_steps, cfg.lr, cfg.weight_decay, cfg.schedule, resume) == \
        (str(tmp_path), 7, 7, 1e-3, 0.05, "wsd", False)
    assert cfg.model_overrides == {"hidden_size": 32}
    cfg, _ = build_config(_parse(["train", "--preset", "smoke", "--max-steps", "5", "steps=20"]))
    assert (cfg.steps, cfg.max_steps) == (20, 5)  # explicit steps keep the schedule; --max-steps only stops
    assert run_train(_parse(["train", "--preset", "smoke", "lrr=3"])) == 2


def test_cli_bf16_aux_loss_run_then_resume_and_midtrain(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--preset", "smoke", "--out", str(run), "--max-steps", "4", "dtype=bfloat16",
            "balance=aux_loss", "plots=false", "eval_every=2"]
    assert run_train(_parse(argv)) == 0
    assert "tok/s" in capsys.readouterr().out
    recs = _records(run, "train")
    assert all(r["aux"] > 0 and math.isfinite(r["loss"]) for r in recs)
    assert run_train(_parse(["train", "--resume", str(run), "--max-steps", "6"])) == 0
    assert ckpt.load(ckpt.latest(run / "ckpt"), ("state",))["state"]["step"] == 6
    assert json.loads((run / "train_config.json").read_text())["dtype"] == "bfloat16"  # the run kept its settings
    long = tmp_path / "long"
    assert run_train(_parse(["midtrain", "--init", str(run), "--out", str(long), "--seq-len", "64",
                             "--max-steps", "2", "export=false"])) == 0
    cfg = json.loads((long / "train_config.json").read_text())
    assert (cfg["seq_len"], cfg["batch_size"], cfg["init"], cfg["steps"]) == (64, 2, str(run), 2)
    assert cfg["data"] == "builtin+passkey+kv"
    start = Run(from_dict({**cfg, "out_dir": str(tmp_path / "again")})).model.state_dict()
    trained = ckpt.load(ckpt.latest(run / "ckpt"), ("model",))["model"]
    assert all(torch.equal(start[k], v) for k, v in trained.items())  # it starts from the trained weights


def test_herd_command_trains_prints_samples_and_generates(tmp_path, capsys):
    """The installed entry point end to end: `herd train` with samples, then `herd generate --raw` on the export."""
    from herd.cli import main

    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--out", str(out), "--max-steps", "3", "samples=true"]) == 0
    text = capsys.readouterr().out
    assert "samples (greedy):" in text and "'To be, or not to be:' ->" in text
    assert f"herd generate --model {out / 'hf'} --raw" in text
    assert main(["generate", "--model", str(out / "hf"), "--raw", "--prompt", "To be", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    assert main(["generate", "--model", str(out / "hf"), "--raw", "--image", "x.png"]) == 2  # raw takes no images


def test_hugging_face_dataset_source(tmp_path, monkeypatch):
    """data="hf:FOLDER" goes through the real `datasets.load_dataset` (a local folder: no network)."""
    from herd.train.inputs import documents

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "ds"
    folder.mkdir()
    lines = [json.dumps({"text": f"Document {i}: the shepherd counted {i} sheep by the river."}) for i in range(40)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = train_preset("smoke", data=f"hf:{folder}", out_dir=str(tmp_path / "run"), steps=2, export=False,
                       plots=False)
    train_docs, val_docs = documents(cfg, "train"), documents(cfg, "val")
    assert len(train_docs) == 38 and [d.split(":")[0] for d in val_docs] == ["Document 19", "Document 39"]
    assert train(cfg)["step"] == 2
