"""herd.post.recipe: pretrain -> SFT for real at smoke size (a report card with both stages), skipping and resuming
stages on a re-run, and the RL and DPO stages wired to the stage before them (stand-ins for their training record
what they were given; the evaluation and the report around them are real).

Run: .venv/bin/python -m pytest tests/post/test_recipe.py -v
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from herd.config import ConfigError
from herd.post import recipe as recipe_mod
from herd.post.recipe import RecipeConfig, recipe, recipe_preset, stage_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A base + sft recipe run at smoke size: (its out_dir, recipe's return value)."""
    out = tmp_path_factory.mktemp("recipe") / "r"
    return out, recipe(recipe_preset("smoke", out_dir=str(out), stages=("base", "sft")))


def copy_of(done, tmp_path) -> Path:
    out = tmp_path / "r"
    shutil.copytree(done[0], out)
    return out


def cfg_for(out: Path, **kw) -> RecipeConfig:
    return recipe_preset("smoke", out_dir=str(out), **kw)


def test_base_and_sft_make_a_report_card(done):
    out, result = done
    data = json.loads((out / "report.json").read_text())
    assert list(data["stages"]) == ["base", "sft"]
    for name in ("base", "sft"):
        m = data["stages"][name]
        assert 0 <= m["pass@1"] <= 1 and 0 <= m["pass@k"] <= 1
        assert m["tokens"] > 0 and m["wall_clock_s"] > 0 and m["bits_per_byte"] > 0
        assert set(m["per_task"]) == {"arithmetic", "sorting", "counting"}
        assert (out / name / "hf" / "model.safetensors").is_file()
    assert result["stages"] == data["stages"] and result["report"] == str(out / "report.md")
    md = (out / "report.md").read_text()
    assert "| metric | base | sft |" in md and "![loss](loss.png)" in md and (out / "loss.png").is_file()
    # SFT started from the base run's export, on the tasks' train split
    sft_cfg = json.loads((out / "sft" / "train_config.json").read_text())
    assert sft_cfg["init"] == str(out / "base" / "hf")
    assert sft_cfg["sft_data"] == "tasks:arithmetic,sorting,counting@1"
    # both stages were asked the same held-out prompts with the same seeds: the columns compare
    evals = [json.loads((out / n / "eval" / "results.json").read_text()) for n in ("base", "sft")]
    asked = [[(p["task"], p["seed"]) for p in e["prompts"]] for e in evals]
    assert asked[0] == asked[1] and len(asked[0]) == 6
    assert all(e["split"] == "heldout" and e["seed"] == 0 for e in evals)


def test_a_rerun_skips_complete_stages(done, tmp_path, monkeypatch, capsys):
    out = copy_of(done, tmp_path)

    def forbidden(*a, **kw):
        raise AssertionError("a complete stage was run again")

    monkeypatch.setattr(recipe_mod, "train_stage", forbidden)
    monkeypatch.setattr(recipe_mod, "evaluate_stage", forbidden)
    before = json.loads((out / "report.json").read_text())["stages"]
    result = recipe(cfg_for(out, stages=("base", "sft")))
    assert capsys.readouterr().out.count("already complete") == 2
    assert result["stages"] == before


def test_a_trained_stage_without_its_evaluation_is_only_evaluated(done, tmp_path, monkeypatch):
    out = copy_of(done, tmp_path)
    first = json.loads((out / "sft" / "eval" / "results.json").read_text())
    shutil.rmtree(out / "sft" / "eval")

    def forbidden(*a, **kw):
        raise AssertionError("a trained stage was trained again")

    monkeypatch.setattr(recipe_mod, "train_stage", forbidden)
    result = recipe(cfg_for(out, stages=("base", "sft")))
    again = json.loads((out / "sft" / "eval" / "results.json").read_text())
    assert again["prompts"] == first["prompts"]  # same prompts, seeds and completions: deterministic
    assert result["stages"]["sft"]["tokens"] == json.loads((out / "sft" / "stage.json").read_text())["tokens"]


def test_an_interrupted_stage_continues_from_its_checkpoint(tmp_path, capsys):
    from herd.train.trainer import train

    cfg = cfg_for(tmp_path / "r", stages=("base",))
    train(stage_config(cfg, "base", None).replace(max_steps=2, export=False))  # as if killed after step 2 of 4
    assert not (tmp_path / "r" / "base" / "hf").exists()
    recipe(cfg)
    assert "resumed from" in capsys.readouterr().out
    recs = [json.loads(x) for x in (tmp_path / "r" / "base" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "r" / "report.json").read_text())["stages"]["base"]["pass@1"] is not None


def test_rl_and_dpo_start_from_the_stage_before(done, tmp_path, monkeypatch):
    out = copy_of(done, tmp_path)
    seen = {}

    def stand_in(name, summary):
        def run(cfg, resume=False):
            seen[name] = cfg
            shutil.copytree(cfg.init, Path(cfg.out_dir) / "hf")  # the "tuned" model: the one it started from
            recs = [{"kind": "train", "step": s, "loss": 1.0 / s, "reward_mean": 0.1 * s, "pass_rate": 0.05 * s,
                     "tokens": 10 * s} for s in (1, 2)]
            (Path(cfg.out_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            if name == "rl":
                (Path(cfg.out_dir) / "rollouts.jsonl").write_text("{}\n")
            return summary

        return run

    fake_rl = types.ModuleType("herd.post.rl")
    fake_rl.rl = stand_in("rl", {"tokens": 20, "rollout_tokens": 99})
    monkeypatch.setitem(sys.modules, "herd.post.rl", fake_rl)
    monkeypatch.setattr("herd.post.dpo.dpo", stand_in("dpo", {"tokens": 7}))
    result = recipe(cfg_for(out, stages=("base", "sft", "rl", "dpo")))  # the text stages; base and sft are done
    rl, dpo = seen["rl"], seen["dpo"]
    assert (rl.init, rl.out_dir) == (str(out / "sft" / "hf"), str(out / "rl"))
    assert rl.rl_tasks == "arithmetic@1,sorting@1,counting@1" and rl.steps == 2
    assert (dpo.init, dpo.out_dir) == (str(out / "rl" / "hf"), str(out / "dpo"))
    assert dpo.dpo_rollouts == str(out / "rl" / "rollouts.jsonl") and dpo.steps == 2
    assert list(result["stages"]) == ["base", "sft", "rl", "dpo"]
    assert result["stages"]["rl"]["rollout_tokens"] == 99 and result["stages"]["dpo"]["tokens"] == 7
    assert result["stages"]["rl"]["pass@1"] == result["stages"]["sft"]["pass@1"]  # same weights, same prompts
    assert (out / "rl.png").is_file()
    assert "| metric | base | sft | rl | dpo |" in Path(result["report"]).read_text()


def test_a_failing_stage_leaves_the_report_of_the_stages_before(done, tmp_path, monkeypatch, capsys):
    out = copy_of(done, tmp_path)
    (out / "report.json").unlink()
    (out / "report.md").unlink()

    def fails(cfg, resume=False):
        raise RuntimeError("no pairs")

    monkeypatch.setattr("herd.post.dpo.dpo", fails)
    with pytest.raises(RuntimeError, match="no pairs"):
        recipe(cfg_for(out, stages=("base", "sft", "dpo")))
    assert "stopped at stage dpo" in capsys.readouterr().out
    assert list(json.loads((out / "report.json").read_text())["stages"]) == ["base", "sft"]
    assert (out / "report.md").is_file()


def test_stage_configs_and_choices(tmp_path):
    cfg = cfg_for(tmp_path)
    # without an RL run, DPO's pairs come from the starting policy's own samples on the tasks
    assert stage_config(cfg, "dpo", "X").dpo_rollouts == "tasks:arithmetic,sorting,counting@1"
    # a stage shorter than its preset's warmup gets a tenth of its steps; an explicit warmup is kept
    assert stage_config(cfg.replace(pretrain_steps=50, overrides={}), "base", None).warmup == 5
    assert stage_config(cfg.replace(overrides={"sft": {"warmup": 3}}), "sft", "X").warmup == 3
    with pytest.raises(ConfigError, match="needs a model to start from"):
        recipe(cfg_for(tmp_path, stages=("sft",)))  # no base run in out_dir, no init
    with pytest.raises(ConfigError, match="in that order"):
        RecipeConfig(stages=("sft", "base"))
    with pytest.raises(ConfigError, match="text tasks"):
        RecipeConfig(tasks=("arithmetic", "scenes"))
    with pytest.raises(ConfigError, match="keyed by stage"):
        RecipeConfig(overrides={"pretrain": {}})
    with pytest.raises(ConfigError, match="unknown recipe preset"):
        recipe_preset("huge")


def test_a_reference_model_gets_its_own_column(done, tmp_path):
    """reference=DIR is evaluated as the stages are (same prompts, seeds and sizes), so the base model given as the
    reference scores exactly as the base stage; the card shows it as its own column, and a rerun keeps it."""
    out = copy_of(done, tmp_path)
    result = recipe(cfg_for(out, stages=("base", "sft"), reference=str(out / "base" / "hf")))
    stages = result["stages"]
    assert list(stages) == ["base", "sft", "reference"]
    for key in ("pass@1", "pass@k", "format_error_rate", "mean_length", "bits_per_byte", "per_task"):
        assert stages["reference"][key] == stages["base"][key], key
    assert "| metric | base | sft | reference |" in (out / "report.md").read_text()
    first = (out / "reference" / "eval" / "results.json").read_text()
    assert recipe(cfg_for(out, stages=("base", "sft"), reference="unused: already evaluated"))["stages"] == stages
    assert (out / "reference" / "eval" / "results.json").read_text() == first


def test_the_vision_stages_make_the_model_multimodal_and_the_card_says_whether_it_looks(done, tmp_path):
    """contrastive -> align -> joint from the base export, for real at smoke size: each starts from the one before,
    the first gives the text model its tower, the chunk holds a scene chat, and every multimodal stage's column has
    the scene questions with the right image, another image and the question alone."""
    out = copy_of(done, tmp_path)
    result = recipe(cfg_for(out, stages=("contrastive", "align", "joint")))
    cfgs = {n: json.loads((out / n / "train_config.json").read_text()) for n in ("contrastive", "align", "joint")}
    assert cfgs["contrastive"]["init"] == str(out / "base" / "hf") and cfgs["contrastive"]["stage"] == "contrastive"
    assert cfgs["align"]["init"] == str(out / "contrastive" / "hf") and cfgs["align"]["freeze"] == "decoder,tower"
    assert cfgs["joint"]["init"] == str(out / "align" / "hf") and cfgs["joint"]["image_rows"] == 8
    hf = json.loads((out / "joint" / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["Llama4ForConditionalGeneration"]
    assert hf["text_config"]["attention_chunk_size"] == 128
    for name in ("contrastive", "align", "joint"):
        m = result["stages"][name]
        assert all(0 <= m[k] <= 1 for k in ("scene_right", "scene_other", "scene_chance")), name
    assert result["stages"]["base"]["scene_right"] is None  # a text model is not asked
    md = (out / "report.md").read_text()
    assert "| scene_right |" in md and "| scene_chance |" in md
