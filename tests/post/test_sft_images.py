"""Multimodal SFT (herd.post.sft, herd.post.sft_data): image chats' labels, packing image conversations against the
model's feature scatter, `herd sft` on tasks:scenes and on a JSONL with images (loss, export, exact resume), and
the clear refusals for a model or judge without a vision tower.

Run: .venv/bin/python -m pytest tests/post/test_sft_images.py -v
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

import herd
from herd.cli import main as herd_cli
from herd.data.sources import DataError
from herd.post.sft import chat_rows
from herd.post.sft_data import ChatPacker, Conversation, example, read_jsonl, tiles
from herd.tokenizer import tiny_tokenizer
from herd.train import snapshots as ckpt
from herd.train import train_preset
from herd.train.inputs import IGNORE
from herd.train.validation import forward, text_loss_sums

pytestmark = pytest.mark.usefixtures("one_thread")

VISION = herd.multimodal_preset("tiny").vision_config  # 28-pixel tiles, 4 tokens per tile, up to 6 tiles
IMAGE_TOKENS = ("image_start", "image_end", "image", "patch", "tile_x_separator", "tile_y_separator")


def _png(color, size=(28, 28)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(color, size=(28, 28)) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(color, size)).decode()


def _user(image_url: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                        {"type": "text", "text": text}]}


def test_image_chat_labels_are_exactly_the_assistant_tokens(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(_png("red", (56, 28)))  # a 1x2 grid: tiles, separators, thumbnail
    chat = [{"role": "system", "content": "Be brief."}, _user("imgs/red.png", "Colour?"),
            {"role": "assistant", "content": "red"}, _user(_data_url("blue"), "And this one?"),
            {"role": "assistant", "content": "blue"}]
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": chat}) + "\n")
    [conv] = read_jsonl(data)
    assert conv.messages[1]["content"][0]["image_url"]["url"] == str(tmp_path / "imgs" / "red.png")  # file's folder
    tok = tiny_tokenizer()
    ex = example(conv, tok, 10_000, VISION)
    ids, labels = ex.ids, ex.labels
    sp = tok.special
    image_ids = {sp(n) for n in IMAGE_TOKENS}
    assert ids.count(sp("patch")) == len(tiles(ex.images, VISION)) * VISION.tokens_per_tile == (3 + 1) * 4
    # the oracle, read off the rendering: after each assistant header and its "\n\n", every token through <|eot|>
    want, t = set(), 0
    while t < len(ids):
        end = ids.index(sp("header_end"), t) if ids[t] == sp("header_start") else -1
        if end > 0 and tok.decode(ids[t + 1:end]) == "assistant":
            t = end + 2
            while ids[t] != sp("eot"):
                want.add(t)
                t += 1
            want.add(t)
        t += 1
    got = {t + 1 for t, y in enumerate(labels) if y != IGNORE}
    assert got == want and all(labels[t - 1] == ids[t] for t in want)
    assert not any(ids[t] in image_ids for t in got)  # no image token is ever a target
    assert tok.decode([ids[t] for t in sorted(want) if ids[t] != sp("eot")]) == "redblue"


def _conv(color, size, answer, where) -> Conversation:
    return Conversation([_user(_data_url(color, size), "Colour?"), {"role": "assistant", "content": answer}],
                        where=where)


def test_packed_image_conversations_match_each_alone():
    """Several image conversations in one row and across rows: the batch's tiles follow the rows' image tokens, so
    every conversation's logits are what the model gives it alone (the multimodal model's masked_scatter order)."""
    tok = tiny_tokenizer()
    convs = [_conv("red", (28, 28), "red", "a"), _conv("green", (84, 28), "green", "b"),
             Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], where="c"),
             _conv("blue", (28, 56), "blue", "d"), _conv("white", (56, 56), "white", "e")]
    examples = [example(c, tok, 512, VISION) for c in convs]
    model = herd.build_model(herd.multimodal_preset("tiny"), seed=0).eval()
    packer = ChatPacker(examples, seq_len=150, batch_size=2, pad_id=0, shuffle=False, vision=VISION)
    b = next(packer)
    docs = b["doc_ids"].tolist()
    assert max(docs[0]) >= 2 and max(docs[1]) >= 1  # image conversations packed together, and in both rows
    with torch.no_grad():
        packed = forward(model, b)  # (B, T, V)
        k = 0
        for r, row in enumerate(docs):
            for d in range(max(row) + 1):
                ex, span = examples[k % len(examples)], [t for t, x in enumerate(row) if x == d]
                assert b["input_ids"][r, span].tolist() == ex.ids
                kw = {"pixel_values": tiles(ex.images, VISION)} if ex.images else {}
                alone = model(torch.tensor([ex.ids]), **kw)[0]
                torch.testing.assert_close(packed[r, span], alone, atol=1e-4, rtol=1e-4)
                k += 1
    state = packer.state_dict()  # the position restores exactly, tiles included
    again = ChatPacker(examples, seq_len=150, batch_size=2, pad_id=0, shuffle=False, vision=VISION)
    again.load_state_dict(state)
    for _ in range(2):
        x, y = next(packer), next(again)
        assert x.keys() == y.keys() and all(torch.equal(x[key], y[key]) for key in x)


SMALL = ["seq_len=160", "batch_size=2", "eval_batches=1", "eval_every=2", "ckpt_every=2", "log_every=1",
         "plots=false", "steps=4", "warmup=1", "lr=3e-3"]


def test_multimodal_sft_on_scenes_learns_exports_and_resumes(inits, tmp_path):
    mm, _ = inits
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ["sft", "--init", str(mm), "--data", "tasks:scenes@2", *SMALL, "sft_examples=8"]
    assert herd_cli([*args, "--out", str(whole)]) == 0
    assert herd_cli([*args, "--out", str(broken), "--max-steps", "2"]) == 0  # exports mid-run: biased routers
    assert herd_cli(["sft", "--resume", str(broken), "--max-steps", "4"]) == 0
    a, b = ckpt.load(ckpt.latest(whole / "ckpt"))["model"], ckpt.load(ckpt.latest(broken / "ckpt"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("vision_model.") for k in a)  # the vision tower was tuned along
    # the run's own four training batches, rebuilt: the tuned model's loss on them is lower than init's
    cfg = train_preset("sft", sft_data="tasks:scenes@2", sft_examples=8, seq_len=160, batch_size=2)
    rows = chat_rows(cfg, tiny_tokenizer(), "train", vision=VISION)
    batches = [next(rows) for _ in range(4)]
    assert all("pixel_values" in x for x in batches)
    before, _ = ckpt.load_model(mm)
    tuned, _ = ckpt.load_model(whole)
    loss = [float(s[0] / s[1]) for m in (before, tuned) for s in [text_loss_sums(m.eval(), batches, None, "cpu")]]
    assert loss[1] < loss[0] - 0.5, loss
    exported = herd.from_pretrained(str(whole / "hf"))
    assert exported.vision_config is not None
    with torch.no_grad():
        torch.testing.assert_close(forward(exported, batches[0]), forward(tuned, batches[0]), atol=1e-5, rtol=0)


def test_multimodal_sft_on_a_jsonl_with_images_and_text(inits, tmp_path):
    mm, _ = inits
    (tmp_path / "data" / "img").mkdir(parents=True)
    lines = []
    for i, (color, size) in enumerate([("red", (28, 28)), ("blue", (56, 28)), ("green", (28, 84))]):
        (tmp_path / "data" / "img" / f"{i}.png").write_bytes(_png(color, size))
        lines += [{"messages": [_user(f"img/{i}.png", "Colour?"), {"role": "assistant", "content": color}]},
                  {"messages": [_user(_data_url(color, size), "Name it."), {"role": "assistant", "content": color}]},
                  {"messages": [{"role": "user", "content": f"Say {color}."}, {"role": "assistant", "content": color}]}]
    data = tmp_path / "data" / "chats.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps(x) + "\n" for x in lines[2::3]))
    for src, out in ((data, "mixed"), (text, "text")):  # image and text chats; text chats alone on the same model
        assert herd_cli(["sft", "--init", str(mm), "--data", str(src), "--out", str(tmp_path / out), *SMALL,
                         "steps=2"]) == 0
        assert herd.from_pretrained(str(tmp_path / out / "hf")).vision_config is not None


def test_images_without_a_vision_tower_are_refused(inits, tmp_path, capsys):
    mm, text = inits
    assert herd_cli(["sft", "--init", str(text), "--data", "tasks:scenes", "--out", str(tmp_path / "a"),
                     *SMALL]) == 2
    assert "the model has no vision tower: init from a multimodal checkpoint" in capsys.readouterr().err
    # the judge scores the conversations with their images, so it needs a vision tower too
    assert herd_cli(["sft", "--init", str(mm), "--data", "tasks:scenes", "--out", str(tmp_path / "b"), *SMALL,
                     "prune_easy=0.5", f"judge={text}"]) == 2
    assert "cannot score conversations with images" in capsys.readouterr().err
    with pytest.raises(DataError, match="no vision tower"):
        example(_conv("red", (28, 28), "red", "x"), tiny_tokenizer(), 512, None)
