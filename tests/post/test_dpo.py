"""DPO stage (herd.post.dpo, herd.post.dpo_data): pairs become (chosen, rejected) rows labelled on the answer only,
malformed lines name their line, and `herd dpo` raises the chosen-over-rejected margin, exports and resumes exactly.

Run: .venv/bin/python -m pytest tests/post/test_dpo.py -v
"""

from __future__ import annotations

import json

import pytest
import torch

import herd
from herd import tasks
from herd.cli import main as herd_cli
from herd.data.sources import DataError
from herd.post.dpo_data import PairPacker, check_pair, encode_pair, pad_row, read_pairs
from herd.post.dpo_loss import sequence_logprobs
from herd.tasks.base import assistant_message
from herd.tokenizer import tiny_tokenizer
from herd.train import snapshots as ckpt
from herd.train.inputs import IGNORE

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
          {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "What is 2 + 2?"}]


def test_packer_pairs_rows_and_labels_only_the_answers():
    tok = tiny_tokenizer()
    pairs = [encode_pair(check_pair({"messages": PROMPT, "chosen": {"role": "assistant", "content": f"{4 + i}"},
                                     "rejected": {"content": f"wrong {i}"}}, f"pair {i}"), tok, 200)
             for i in range(3)]
    for (ci, cl), (ri, rl) in pairs:  # only the final answer and its end token are targets (not "Hello there.")
        for ids, labels in ((ci, cl), (ri, rl)):
            t = [k for k, y in enumerate(labels) if y != IGNORE]
            assert t == list(range(t[0], t[-1] + 1)) and [labels[k] for k in t] == ids[t[0] + 1:t[-1] + 2]
            assert ids[t[-1] + 1] == tok.special("eot")
        assert tok.decode(ci[[k for k, y in enumerate(cl) if y != IGNORE][0] + 1:-1]).strip() in ("4", "5", "6")
        assert tok.decode(ri[[k for k, y in enumerate(rl) if y != IGNORE][0] + 1:-1]).startswith("wrong")
    refs = [(-1.0 - i, -10.0 - i) for i in range(3)]
    packer = PairPacker(pairs, refs, seq_len=128, batch_size=2, pad_id=0, seed=3)
    for _ in range(3):  # crosses an epoch
        b = next(packer)
        assert b["input_ids"].shape == (4, 128) and b["ref_chosen"].shape == (2,)
        for i in range(2):
            k = [j for j in range(3) if refs[j][0] == b["ref_chosen"][i]][0]  # which pair row 2i holds
            assert b["ref_rejected"][i] == refs[k][1]
            for row, side in ((2 * i, pairs[k][0]), (2 * i + 1, pairs[k][1])):
                want = pad_row(side, 128, 0)
                assert [b[key][row].tolist() for key in ("input_ids", "labels", "doc_ids")] == list(want)
    again = PairPacker(pairs, refs, seq_len=128, batch_size=2, pad_id=0, seed=3)
    again.load_state_dict(packer.state_dict())
    for _ in range(2):
        x, y = next(packer), next(again)
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("line, message", [
    ("{oops", "line 2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "x"}], "chosen": {"content": "a"}}', 'line 2: expected an object'),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}], '
     '"chosen": {"content": "a"}, "rejected": {"content": "b"}}', "line 2: \"messages\" must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "x"}], "chosen": {"role": "user", "content": "a"}, '
     '"rejected": {"content": "b"}}', "line 2: \"chosen\" has role 'user'"),
    ('{"messages": [{"role": "user", "content": "x"}], "chosen": {"content": "a"}, "rejected": {"role": '
     '"assistant"}}', r"line 2 \(rejected\): message 1 \(assistant\) has no content"),
])
def test_malformed_lines_name_the_line(tmp_path, line, message):
    good = {"messages": [{"role": "user", "content": "x"}], "chosen": {"content": "a"}, "rejected": {"content": "b"}}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_pairs(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tiny"
    assert herd_cli(["init", "--preset", "tiny", "--out", str(out)]) == 0
    return out


def _pairs_file(path, n):
    """Arithmetic prompts from herd.tasks: chosen = the reference answer, rejected = a wrong one (off by one)."""
    lines = []
    for ex in tasks.draw("arithmetic", "train", n, 1):
        wrong = f"{ex.target + 1}\n#### {ex.target + 1}"
        lines.append({"messages": ex.messages, "chosen": assistant_message(ex.answer),
                      "rejected": assistant_message(wrong)})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@torch.no_grad()
def _margin(model, pairs, tok) -> float:
    """Mean (log p(chosen) - log p(rejected)) over the pairs."""
    rows = [pad_row(side, 96, 0) for p in pairs for side in encode_pair(p, tok, 96)]
    ids, labels, docs = (torch.tensor([r[k] for r in rows]) for k in range(3))
    lp = sequence_logprobs(model.eval()(ids, doc_ids=docs).float(), labels)
    return float((lp[0::2] - lp[1::2]).mean())


SMALL = ["seq_len=96", "batch_size=4", "eval_batches=1", "eval_every=3", "ckpt_every=3", "log_every=1",
         "plots=false", "steps=6", "warmup=1"]


def test_herd_dpo_raises_the_margin_exports_and_resumes_exactly(base, tmp_path):
    data = _pairs_file(tmp_path / "pairs.jsonl", 8)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ["dpo", "--init", str(base), "--pairs", str(data), *SMALL, "beta=0.1"]
    assert herd_cli([*args, "--out", str(whole)]) == 0
    assert herd_cli([*args, "--out", str(broken), "--max-steps", "4"]) == 0
    assert herd_cli(["dpo", "--resume", str(broken), "--max-steps", "6"]) == 0
    a, b = (ckpt.load(ckpt.latest(run / "ckpt"))["model"] for run in (whole, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok, pairs = tiny_tokenizer(), read_pairs(data)
    before = _margin(herd.from_pretrained(str(base)), pairs, tok)
    after = _margin(herd.from_pretrained(str(whole / "hf")), pairs, tok)
    assert after > before + 0.5, (before, after)  # the policy prefers the right answers more than the reference
    recs = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts as its reference
    assert {"reward_margin", "pref_acc"} <= train[-1].keys() and train[-1]["reward_margin"] > 0
    evals = [r for r in recs if r["kind"] == "eval"]
    assert {"val_loss", "val_pref_acc"} <= evals[-1].keys() and evals[-1]["val_loss"] < evals[0]["val_loss"]
