"""DPO pairs from rollouts (herd.post.dpo_pairs): groups of scored answers become (chosen, rejected) pairs by
`prefer`, malformed rollout lines name their line, a tasks: source samples the init model itself (the same files on
every build), and `herd dpo` trains on rollouts, exports, and resumes exactly from its own pairs file.

Run: .venv/bin/python -m pytest tests/post/test_dpo_pairs.py -v
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import herd
from herd import tasks
from herd.cli import main as herd_cli
from herd.config import ConfigError
from herd.data.sources import DataError
from herd.post.dpo import dpo
from herd.post.dpo_data import check_pair, read_pairs
from herd.post.dpo_pairs import rollout_pairs
from herd.post.evaluate import sample_examples
from herd.post.sft_data import task_examples
from herd.tasks.arithmetic import Arithmetic
from herd.tasks.base import verdict
from herd.tokenizer import tiny_tokenizer
from herd.train import snapshots as ckpt
from herd.train.train_config import TrainConfig, train_preset

pytestmark = pytest.mark.usefixtures("one_thread")

Q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
TOOL = tasks.draw("tool_use", "train", 1, 1)[0]  # a prompt with tools; its reference answer is a tool call


def _ans(text: str, correct: bool, tokens: int, format_ok: bool = True) -> dict:
    return {"text": text, "reward": float(correct), "correct": correct, "format_ok": format_ok, "tokens": tokens}


def _group(messages, answers, tools=None) -> dict:
    return {"step": 3, "task": "arithmetic", "difficulty": 1, "seed": 7, "system": None, "messages": messages,
            "tools": tools, "answers": answers, "policy_version": 2}


GROUPS = [
    # 1: both modes make a pair; `correct` takes the first well-formed wrong answer over the malformed first one
    _group(Q, [_ans("no idea", False, 3, format_ok=False), _ans("#### 4", True, 4), _ans("#### 5", False, 4),
               _ans("2 + 2 = 4, since two and two make four.\n#### 4", True, 16)]),
    # 2: all correct, lengths too close (2 tokens apart): no pair in either mode
    _group(Q, [_ans("#### 4", True, 10), _ans("#### 4 ", True, 12)]),
    # 3: an image task (no messages): skipped and counted
    _group(None, [_ans("#### 3", True, 4), _ans("#### 2", False, 4)]),
    # 4: a tool task: the answers become tool calls; only malformed wrong answers, so the first of them is rejected
    _group(TOOL.messages, [_ans("hmm", False, 2, format_ok=False), _ans(TOOL.answer, True, 30),
                           _ans("[oops", False, 3, format_ok=False)], TOOL.tools),
    # 5: all wrong: no pair; 6: correct answers 5 and 6 tokens long (+1 < 4 tokens) and 20 (+15, and > 20%)
    _group(Q, [_ans("#### 5", False, 4), _ans("#### 6", False, 4)]),
    _group(Q, [_ans("#### 4.", True, 5), _ans("4\n#### 4", True, 6), _ans("four\n" * 5 + "#### 4", True, 20)]),
]


def _write(path, lines) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _expected(prefer: str) -> list[dict]:
    msg = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "convert_units", "arguments": json.dumps(
            json.loads(TOOL.answer)["parameters"])}}]}
    if prefer == "correct":
        return [{"messages": Q, "chosen": msg("#### 4"), "rejected": msg("#### 5"), "tools": None},
                {"messages": TOOL.messages, "chosen": call, "rejected": msg("hmm"), "tools": TOOL.tools}]
    return [{"messages": Q, "chosen": msg("#### 4"), "rejected": msg(GROUPS[0]["answers"][3]["text"]), "tools": None},
            {"messages": Q, "chosen": msg("#### 4."), "rejected": msg("four\n" * 5 + "#### 4"), "tools": None}]


@pytest.mark.parametrize("prefer", ["correct", "shorter"])
def test_pairs_from_a_rollouts_file(tmp_path, capsys, prefer):
    src = _write(tmp_path / "rollouts.jsonl", GROUPS)
    out = tmp_path / "run"
    pairs = rollout_pairs(TrainConfig(dpo_rollouts=src, prefer=prefer, out_dir=str(out)), tok=None)
    want = _expected(prefer)
    assert [json.loads(x) for x in (out / "dpo_pairs.jsonl").read_text().splitlines()] == want
    assert [(c.messages, r.messages) for c, r in pairs] == \
        [(c.messages, r.messages) for c, r in (check_pair(w, "expected") for w in want)]
    assert [c.tools for c, _ in pairs] == [w["tools"] for w in want]
    assert "skipped 3 without a usable pair and 1 of image tasks" in capsys.readouterr().out
    assert not (out / "rollouts.jsonl").exists()  # only a tasks: source writes its rollouts


@pytest.mark.parametrize("line, message", [
    ("{oops", "line 2: not valid JSON"),
    ('{"messages": null}', r"line 2: expected a rollout group"),
    (json.dumps(_group(Q, [{"text": "#### 4", "correct": True, "format_ok": True}])),
     r"line 2: answer 0 needs .*\"tokens\""),
    (json.dumps(_group(Q, [_ans("#### 4", True, 4), {**_ans("x", False, 1), "correct": "no"}])),
     r"line 2: answer 1 needs"),
    (json.dumps(_group("What is 2 + 2?", [])), r"line 2: \"messages\" must be the prompt's list"),
    (json.dumps(_group([*Q, {"role": "assistant", "content": "4"}], [_ans("#### 4", True, 4), _ans("5", False, 1)])),
     r"line 2: \"messages\" must be a non-empty list ending before the answer"),
])
def test_malformed_rollout_lines_name_the_line(tmp_path, line, message):
    src = _write(tmp_path / "bad.jsonl", [GROUPS[0], line])
    with pytest.raises(DataError, match=message):
        rollout_pairs(TrainConfig(dpo_rollouts=src, out_dir=str(tmp_path / "run")), tok=None)


@pytest.mark.parametrize("groups, prefer, message", [
    ([GROUPS[1], GROUPS[4]], "correct", r"no group had both a correct and a wrong answer \(2 text groups\): sample "
                                        r"more answers per prompt \(group_size\)"),
    ([GROUPS[1], GROUPS[3]], "shorter", "no group had two correct answers, one at least 20% and 4 tokens longer"),
    ([GROUPS[2]], "correct", "all 1 groups are image tasks"),
])
def test_no_usable_pair_says_why(tmp_path, groups, prefer, message):
    src = _write(tmp_path / "rollouts.jsonl", groups)
    with pytest.raises(DataError, match=message):
        rollout_pairs(TrainConfig(dpo_rollouts=src, prefer=prefer, out_dir=str(tmp_path / "run")), tok=None)


@pytest.mark.parametrize("spec, message", [("tasks:nope", "dpo_rollouts tasks:nope: unknown task 'nope'")])
def test_tasks_source_refuses_unknown_tasks(tmp_path, spec, message):  # image tasks: tests/post/test_dpo_images.py
    with pytest.raises(DataError, match=message):
        rollout_pairs(TrainConfig(dpo_rollouts=spec, out_dir=str(tmp_path / "run")), tok=None)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tiny"
    assert herd_cli(["init", "--preset", "tiny", "--out", str(out)]) == 0
    return out


@dataclass(frozen=True)
class Parity(Arithmetic):
    """Arithmetic's prompts with a verifier an untrained model passes half the time (an even-length answer), so
    its own samples hold both right and wrong answers."""

    def score(self, example, completion):
        return verdict(len(completion) % 2 == 0)


SMALL = ["seq_len=128", "batch_size=2", "eval_batches=1", "eval_every=2", "ckpt_every=2", "log_every=1",
         "plots=false", "steps=4", "warmup=1"]


def test_tasks_source_samples_the_init_model_and_writes_what_it_trained_on(base, tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "arithmetic", Parity())
    spec = dict(init=str(base), dpo_rollouts="tasks:arithmetic@1", sft_examples=6, group_size=4, temperature=1.0,
                max_new_tokens=8, seed=3)
    direct = tmp_path / "direct"
    pairs = rollout_pairs(TrainConfig(**spec, out_dir=str(direct)), tiny_tokenizer())
    groups = [json.loads(x) for x in (direct / "rollouts.jsonl").read_text().splitlines()]
    examples = task_examples("arithmetic@1", 6, "train")
    assert [(g["task"], g["seed"], g["difficulty"], g["messages"]) for g in groups] == \
        [(e.task, e.seed, e.difficulty, e.messages) for e in examples]
    # the answers are the init model's own samples: the same seeds through the engine give the same texts
    model, _ = ckpt.load_model(base)
    sampled = sample_examples(model.eval(), tiny_tokenizer(), {"arithmetic": Parity()}, examples, 4, 1.0, 8, 3)
    assert [[a["text"] for a in g["answers"]] for g in groups] == [s.completions for s in sampled]
    assert [[a["tokens"] for a in g["answers"]] for g in groups] == [s.lengths for s in sampled]
    assert [[a["correct"] for a in g["answers"]] for g in groups] == [[x.correct for x in s.scores] for s in sampled]
    assert 0 < len(pairs) <= 6 and len(read_pairs(direct / "dpo_pairs.jsonl")) == len(pairs)
    # a DPO run from the same source builds the same files (deterministic) and trains on them
    run = tmp_path / "run"
    keys = [f"{k}={v}" for k, v in spec.items() if k != "init"]
    assert herd_cli(["dpo", "--init", str(base), "--out", str(run), *keys, *SMALL, "--max-steps", "1"]) == 0
    for name in ("rollouts.jsonl", "dpo_pairs.jsonl"):
        assert (run / name).read_text() == (direct / name).read_text()
    # and the written rollouts re-run as a file source give the same pairs (a run can be audited and repeated)
    again = tmp_path / "again"
    rollout_pairs(TrainConfig(dpo_rollouts=str(direct / "rollouts.jsonl"), out_dir=str(again)), tok=None)
    assert (again / "dpo_pairs.jsonl").read_text() == (direct / "dpo_pairs.jsonl").read_text()


def _rollouts(path, n: int) -> str:
    """Arithmetic prompts, each with a wrong (off by one) and the right answer, as an RL run logs them."""
    groups = [_group(ex.messages, [_ans(f"{ex.target + 1}\n#### {ex.target + 1}", False, 6),
                                   _ans(ex.answer, True, 9)]) for ex in tasks.draw("arithmetic", "train", n, 1)]
    return _write(path, groups)


def test_herd_dpo_from_rollouts_trains_exports_and_resumes_from_its_pairs_file(base, tmp_path):
    src = tmp_path / "rollouts.jsonl"
    _rollouts(src, 8)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ["dpo", "--init", str(base), f"dpo_rollouts={src}", *SMALL, "steps=4"]
    assert herd_cli([*args, "--out", str(whole)]) == 0
    assert herd_cli([*args, "--out", str(broken), "--max-steps", "2"]) == 0
    src.write_text(json.dumps(_group(Q, [_ans("#### 4", True, 4), _ans("#### 9", False, 4)])) + "\n")
    assert herd_cli(["dpo", "--resume", str(broken), "--max-steps", "4"]) == 0  # reads broken/dpo_pairs.jsonl
    a, b = (ckpt.load(ckpt.latest(run / "ckpt"))["model"] for run in (whole, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(read_pairs(whole / "dpo_pairs.jsonl")) == 8
    model = herd.from_pretrained(str(whole / "hf"))
    assert model.config.text_config.vocab_size > 0
    recs = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and "pref_acc" in train[-1]


@pytest.mark.parametrize("pairs, rollouts, message", [("p.jsonl", "r.jsonl", "not both"),
                                                      (None, None, "one source of preference pairs")])
def test_dpo_needs_exactly_one_source_of_pairs(tmp_path, pairs, rollouts, message):
    cfg = train_preset("dpo", init=str(tmp_path), dpo_pairs=pairs, dpo_rollouts=rollouts, out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        dpo(cfg)
