"""Multimodal DPO (herd.post.dpo, dpo_data, dpo_pairs): image pairs' labels, reference log-probs that see the
images, packed batches' pixel values in row order, `herd dpo` on image pairs (margin, multimodal export), image
pairs from the policy's own tasks:scenes samples, and the refusals for a model without a vision tower.

Run: .venv/bin/python -m pytest tests/post/test_dpo_images.py -v
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import herd
from herd import tasks
from herd.cli import main as herd_cli
from herd.data.sources import DataError
from herd.post.dpo_data import PairPacker, encode_pair, pad_row, pair_images, read_pairs, reference_logprobs
from herd.post.dpo_loss import sequence_logprobs
from herd.post.dpo_pairs import rollout_pairs
from herd.post.sft_data import tiles
from herd.tasks.base import verdict
from herd.tasks.scenes import SceneQA
from herd.tokenizer import tiny_tokenizer
from herd.train import TrainConfig
from herd.train import snapshots as ckpt
from herd.train.inputs import IGNORE
from tests.post.test_sft_images import IMAGE_TOKENS, VISION, _data_url, _png  # the SFT tests' image fixtures

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
L = 96  # seq_len


def _pair(url: str, right: str, wrong: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Colour?"}]}],
            "chosen": {"role": "assistant", "content": right}, "rejected": {"role": "assistant", "content": wrong}}


def _pairs_file(path, n: int = 8):
    """Image of colour i (a 2x1 grid for odd i: more tiles), chosen = its name, rejected = the next colour's."""
    lines = [_pair(_data_url(c, (56, 28) if i % 2 else (28, 28)), c, COLOURS[(i + 1) % len(COLOURS)])
             for i, c in enumerate(COLOURS[:n])]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_image_pairs_label_only_the_final_answer_never_image_tokens(tmp_path):
    (tmp_path / "red.png").write_bytes(_png("red", (56, 28)))
    rec = _pair("red.png", "red", "blue")  # a path relative to the pairs file
    rec["messages"] += [{"role": "assistant", "content": "red"}, {"role": "user", "content": "Sure?"}]
    (tmp_path / "pairs.jsonl").write_text(json.dumps(rec) + "\n")
    [pair] = read_pairs(tmp_path / "pairs.jsonl")
    assert pair_images(pair) == (str(tmp_path / "red.png"),)
    tok, sp = tiny_tokenizer(), tiny_tokenizer().special
    image_ids = {sp(n) for n in IMAGE_TOKENS}
    for (ids, labels), answer in zip(encode_pair(pair, tok, L, VISION), ("red", "blue"), strict=True):
        assert ids.count(sp("patch")) == len(tiles(pair_images(pair), VISION)) * VISION.tokens_per_tile
        t = [k for k, y in enumerate(labels) if y != IGNORE]  # one run: the final answer and its <|eot|>
        assert t == list(range(t[0], t[-1] + 1)) and [labels[k] for k in t] == ids[t[0] + 1:t[-1] + 2]
        assert tok.decode(ids[t[0] + 1:t[-1] + 1]) == answer and ids[t[-1] + 1] == sp("eot")
        assert not any(ids[k + 1] in image_ids for k in t)
    with pytest.raises(DataError, match="the model has no vision tower"):
        encode_pair(pair, tok, L)  # a text-only model


@torch.no_grad()
def _logprobs(model, encoded, images) -> torch.Tensor:
    """(2N,) summed answer log-probs of the pairs, one batch, pixel values in row order (each pair's twice)."""
    rows = [pad_row(side, L, 0) for p in encoded for side in p]
    ids, labels, docs = (torch.tensor([r[k] for r in rows]) for k in range(3))
    pv = tiles([s for imgs in images for s in (*imgs, *imgs)], VISION)
    return sequence_logprobs(model.eval()(ids, doc_ids=docs, pixel_values=pv).float(), labels)


def test_reference_logprobs_see_the_images_and_batches_carry_them_in_row_order(inits, tmp_path):
    mm, _ = inits
    found = read_pairs(_pairs_file(tmp_path / "pairs.jsonl", 3))
    tok = tiny_tokenizer()
    encoded = [encode_pair(p, tok, L, VISION) for p in found]
    images = [pair_images(p) for p in found]
    refs = reference_logprobs(str(mm), encoded, L, 0, batch_size=2, images=images)
    want = _logprobs(ckpt.load_model(mm)[0], encoded, images)
    assert torch.allclose(torch.tensor(refs).flatten(), want, atol=1e-4)
    other = [(_data_url("cyan", (56, 28) if i % 2 else (28, 28)),) for i in range(3)]  # same grids, other image
    moved = reference_logprobs(str(mm), encoded, L, 0, images=other)
    assert all(abs(a[0] - b[0]) > 1e-5 for a, b in zip(refs, moved, strict=True))
    packer = PairPacker(encoded, refs, L, batch_size=2, pad_id=0, seed=1, images=images, vision=VISION)
    for _ in range(3):  # crosses an epoch
        b = next(packer)
        ks = [[j for j in range(3) if refs[j][0] == c][0] for c in b["ref_chosen"].tolist()]
        assert [b["input_ids"][r].tolist() for r in range(4)] == [pad_row(s, L, 0)[0] for k in ks for s in encoded[k]]
        assert torch.equal(b["pixel_values"], tiles([s for k in ks for s in images[k] * 2], VISION))


@torch.no_grad()
def _margin(model, pairs) -> float:
    tok = tiny_tokenizer()
    lp = _logprobs(model, [encode_pair(p, tok, L, VISION) for p in pairs], [pair_images(p) for p in pairs])
    return float((lp[0::2] - lp[1::2]).mean())


SMALL = [f"seq_len={L}", "batch_size=4", "eval_batches=1", "eval_every=3", "ckpt_every=3", "log_every=1",
         "plots=false", "steps=6", "warmup=1"]


def test_herd_dpo_on_image_pairs_raises_the_margin_and_exports_multimodal(inits, tmp_path, capsys):
    mm, text = inits
    data = _pairs_file(tmp_path / "pairs.jsonl")
    assert herd_cli(["dpo", "--init", str(mm), "--pairs", str(data), "--out", str(tmp_path / "run"), *SMALL,
                     "beta=0.1", "lr=2e-4"]) == 0
    pairs = read_pairs(data)
    before = _margin(ckpt.load_model(mm)[0], pairs)
    tuned = herd.from_pretrained(str(tmp_path / "run" / "hf"))
    assert tuned.vision_config is not None
    after = _margin(tuned, pairs)
    assert after > before + 0.5, (before, after)
    train = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in train if r["kind"] == "train"][0] == pytest.approx(0.6931, abs=1e-3)  # policy = ref
    assert herd_cli(["dpo", "--init", str(text), "--pairs", str(data), "--out", str(tmp_path / "t"), *SMALL]) == 2
    assert "the model has no vision tower: init from a multimodal checkpoint" in capsys.readouterr().err


@dataclass(frozen=True)
class Parity(SceneQA):
    """Scene questions with a verifier an untrained model passes half the time (an even-length answer)."""

    def score(self, example, completion):
        return verdict(len(completion) % 2 == 0)


def test_tasks_scenes_rollouts_make_image_pairs(inits, tmp_path, monkeypatch):
    mm, text = inits
    monkeypatch.setitem(tasks.TASKS, "scenes", Parity())
    spec = dict(dpo_rollouts="tasks:scenes@1", sft_examples=3, group_size=4, temperature=1.0, max_new_tokens=6,
                seed=3)
    out = tmp_path / "run"
    pairs = rollout_pairs(TrainConfig(init=str(mm), out_dir=str(out), **spec), tiny_tokenizer())
    assert pairs and all(len(pair_images(p)) == 1 and pair_images(p)[0].startswith("data:image/png") for p in pairs)
    assert len(read_pairs(out / "dpo_pairs.jsonl")) == len(pairs)
    groups = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert all(g["messages"][0]["content"][0]["image_url"]["url"].startswith("data:") for g in groups)
    tok = tiny_tokenizer()  # the pairs encode for the model's tiling: 224-pixel scenes on 28-pixel tiles
    ids, _ = encode_pair(pairs[0], tok, 400, VISION)[0]
    assert ids.count(tok.special("patch")) == len(tiles(pair_images(pairs[0]), VISION)) * VISION.tokens_per_tile
    with pytest.raises(DataError, match="'scenes' needs images but init .* is a text-only model"):
        rollout_pairs(TrainConfig(init=str(text), out_dir=str(tmp_path / "t"), **spec), tiny_tokenizer())
