"""herd.post.evaluate and `herd eval`: the pass@k estimator against its closed form, metrics recomputed by hand
from the same completions (a fake task whose verifier the test controls, on a tiny random model), seeded and
reproducible samples, and the command writing its JSON and markdown.

Run: .venv/bin/python -m pytest tests/post -v
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

import herd
from herd.chat import prepare_chat
from herd.post.evaluate import evaluate, markdown_table, pass_at_k, sample_examples, write_results
from herd.tasks.base import Example, Score
from herd.tokenizer import tiny_tokenizer

TOOLS = [{"type": "function", "function": {"name": "echo", "description": "Say a number back.",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]


@dataclass(frozen=True)
class Repeat:
    """"Repeat the number": its verifier depends only on the completion's text, in ways the test recomputes."""

    name: str = "repeat"
    max_difficulty: int = 2
    multimodal: bool = False
    tools: bool = False

    def example(self, seed: int, difficulty: int) -> Example:
        return Example(self.name, seed, difficulty, [{"role": "user", "content": f"Repeat {seed * difficulty}."}],
                       answer=str(seed * difficulty), target=seed * difficulty,
                       tools=TOOLS if self.tools else None)

    def score(self, example: Example, completion: str) -> Score:
        return verifier(completion)


def verifier(completion: str) -> Score:
    correct = len(completion) % 2 == 0
    return Score(float(correct) + len(completion) / 100, correct, len(completion) % 3 != 0)


@dataclass(frozen=True)
class Picture(Repeat):
    name: str = "picture"
    multimodal: bool = True


@pytest.fixture(scope="module")
def model():
    return herd.build_model(herd.preset("tiny"), seed=3)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---- pass@k ----------------------------------------------------------------------------------------------------------
def test_pass_at_k_equals_its_closed_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12), (n, c, k)
            assert pass_at_k(n, c, n) == (1.0 if c > 0 else 0.0)  # all n drawn: any correct one counts
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)
        assert all(pass_at_k(n, 0, k) == 0.0 for k in range(1, n + 1))
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # large n: the product form stays exact where floats of
    assert pass_at_k(10**6, 3, 10) == pytest.approx(1 - math.comb(10**6 - 3, 10) / math.comb(10**6, 10))  # C overflow


@pytest.mark.parametrize("n, c, k, what", [(4, 1, 5, "at least k=5 samples"), (4, 5, 1, "0..n=4"),
                                           (4, -1, 1, "0..n=4"), (0, 0, 1, "n >= 1"), (4, 1, 0, "k >= 1")])
def test_pass_at_k_refuses_impossible_counts(n, c, k, what):
    with pytest.raises(ValueError, match=what):
        pass_at_k(n, c, k)


# ---- evaluate --------------------------------------------------------------------------------------------------------
def _by_hand(sampled, k):
    """The metrics recomputed from the completions alone, with the test's own verifier."""
    scores = [[verifier(t) for t in p.completions] for p in sampled]
    flat = [s for row in scores for s in row]
    correct = [sum(s.correct for s in row) for row in scores]
    return {"prompts": len(sampled), "samples": len(flat),
            "pass@1": sum(c / k for c in correct) / len(sampled),
            "pass@k": sum(c > 0 for c in correct) / len(sampled),
            "mean_reward": sum(s.reward for s in flat) / len(flat),
            "mean_length": sum(x for p in sampled for x in p.lengths) / len(flat),
            "format_error_rate": sum(not s.format_ok for s in flat) / len(flat), "errors": 0}


def test_metrics_equal_a_hand_count_of_the_same_completions(model, tok):
    from herd.tasks import draw

    task, k = Repeat(), 4
    kw = dict(n_per_task=3, difficulties=[1, 2], k=k, temperature=1.0, max_new_tokens=6, seed=5, bpb_batches=0)
    res = evaluate(model, tok, {"repeat": task}, **kw)
    examples = draw(task, "heldout", 3, 1) + draw(task, "heldout", 3, 2)
    sampled = sample_examples(model, tok, {"repeat": task}, examples, k, 1.0, 6, seed=5)
    for p in sampled:
        assert len(p.completions) == k and len(set(p.seeds)) == k  # k seeded requests per prompt
        assert len(set(p.completions)) > 1  # ... that are distinct draws
        assert all(1 <= n <= 6 for n in p.lengths)
    flat = [verifier(t) for p in sampled for t in p.completions]
    assert 0 < sum(s.correct for s in flat) < len(flat)  # the fake verifier splits them: the counts mean something
    assert res["total"] == pytest.approx(_by_hand(sampled, k))
    assert res["total"]["pass@k"] != res["total"]["pass@1"]
    for d in (1, 2):
        mine = [p for p in sampled if p.example.difficulty == d]
        assert res["tasks"]["repeat"]["by_difficulty"][str(d)] == pytest.approx(_by_hand(mine, k))
    assert [(r["seed"], r["difficulty"], r["correct"]) for r in res["prompts"]] == \
        [(p.example.seed, p.example.difficulty, p.correct) for p in sampled]


def test_samples_are_reproducible_and_follow_the_seed(model, tok):
    ex = [Repeat().example(7, 1), Repeat().example(8, 1)]
    runs = [sample_examples(model, tok, {"repeat": Repeat()}, ex, k=3, max_new_tokens=5, seed=s) for s in (0, 0, 1)]
    assert [p.completions for p in runs[0]] == [p.completions for p in runs[1]]
    assert [p.completions for p in runs[0]] != [p.completions for p in runs[2]]
    assert not set(runs[0][0].seeds) & set(runs[2][0].seeds)  # nearby run seeds share no draw


def test_tools_reach_the_prompt(model, tok):
    plain, tools = Repeat().example(7, 1), Repeat(tools=True).example(7, 1)
    out = sample_examples(model, tok, {"repeat": Repeat()}, [plain, tools], k=1, max_new_tokens=1)
    assert out[0].prompt_len == len(prepare_chat(plain.messages, tok)[0])
    assert out[1].prompt_len == len(prepare_chat(tools.messages, tok, tools=TOOLS)[0]) > out[0].prompt_len + 20


def test_image_tasks_are_skipped_on_a_text_model_and_run_on_a_multimodal_one(model, tok):
    from PIL import Image

    res = evaluate(model, tok, {"repeat": Repeat(), "picture": Picture()}, n_per_task=1, k=2, max_new_tokens=2,
                   bpb_batches=0)
    assert list(res["tasks"]) == ["repeat"] and "no vision tower" in res["skipped"]["picture"]
    mm = herd.build_model(herd.multimodal_preset("tiny"), seed=0)
    img = Image.new("RGB", (56, 56), (200, 30, 30))
    ex = Example("picture", 1, 1, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                                                 {"type": "text", "text": "Color?"}]}], "red", "red")
    out = sample_examples(mm, tok, {"picture": Picture()}, [ex], k=2, max_new_tokens=3)
    assert out[0].errors == [None, None] and out[0].prompt_len > 30  # the image's tokens are in the prompt


def test_bits_per_byte_is_the_trainers_val_bpb(model, tok):
    from herd.train.inputs import token_bytes_table
    from herd.train.train_config import TrainConfig
    from herd.train.validation import text_loss_sums, val_batches, val_metrics

    res = evaluate(model, tok, {"repeat": Repeat()}, n_per_task=1, k=1, max_new_tokens=1, bpb_batches=2)
    cfg = TrainConfig(seq_len=64, batch_size=8, eval_batches=2)
    sums = text_loss_sums(model, val_batches(cfg, tok), token_bytes_table(tok, model.text_config.vocab_size), "cpu")
    assert res["bits_per_byte"] == pytest.approx(val_metrics(sums.tolist())["val_bpb"])
    assert 3 < res["bits_per_byte"] < 20  # a random model: about log2(vocab) bits per ~2.4-byte token


def test_write_results_and_the_table(tmp_path):
    m = {"prompts": 2, "samples": 4, "pass@1": 0.25, "pass@k": 0.5, "mean_reward": 0.25, "mean_length": 3.0,
         "format_error_rate": 0.5, "errors": 0}
    res = {"k": 2, "temperature": 1.0, "split": "heldout", "bits_per_byte": 1.5, "skipped": {"picture": "why"},
           "tasks": {"repeat": {"all": m, "by_difficulty": {"1": m, "2": m}}}, "total": m}
    js, md = write_results(res, tmp_path / "out")
    assert json.loads(js.read_text()) == res
    table = md.read_text()
    assert "| repeat | 1 | 2 | 0.250 | 0.500 | 0.250 | 3.0 | 0.500 |" in table and "| repeat | all |" in table
    assert "pass@2" in table and "bits per byte on held-out text: 1.5000" in table and "skipped picture: why" in table
    assert table.endswith(markdown_table(res))


# ---- herd eval -------------------------------------------------------------------------------------------------------
def test_herd_eval_writes_json_and_markdown(tmp_path, capsys):
    from herd.cli import main

    ckpt, out = tmp_path / "tiny", tmp_path / "eval"
    assert main(["init", "--preset", "tiny", "--out", str(ckpt)]) == 0
    assert main(["eval", "--model", str(ckpt), "--tasks", "arithmetic", "--k", "2", "--n", "2", "--difficulty",
                 "1,2", "--max-new-tokens", "4", "--bpb-batches", "1", "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["k"] == 2 and set(res["tasks"]["arithmetic"]["by_difficulty"]) == {"1", "2"}
    assert res["total"]["prompts"] == 4 and res["total"]["samples"] == 8 and res["bits_per_byte"] > 0
    printed = capsys.readouterr()
    assert "| arithmetic | 2 | 2 |" in (out / "results.md").read_text() and "| **total** |" in printed.out
    assert "eval 8/8 completions" in printed.err and "ETA" in printed.err
    assert main(["eval", "--model", str(ckpt), "--tasks", "nope"]) == 2
    assert main(["eval", "--model", str(ckpt), "--tasks", "arithmetic", "--difficulty", "x"]) == 2
    assert "--difficulty takes comma-separated integers" in capsys.readouterr().err
    torch.manual_seed(0)  # the command's sampling is seeded per request: the default generator plays no part
    assert main(["eval", "--model", str(ckpt), "--tasks", "arithmetic", "--k", "2", "--n", "2", "--difficulty",
                 "1,2", "--max-new-tokens", "4", "--bpb-batches", "0", "--device", "cpu", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["prompts"] == res["prompts"] and again["bits_per_byte"] is None
