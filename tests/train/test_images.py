"""Image-text training: answer-only targets, the multimodal run end to end (HF export loads in transformers with the
same logits on an image chat), exact resume with image rows, users' JSONL image-text records, clear errors.

Run: .venv/bin/python -m pytest tests/train/test_images.py -v
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import herd
from herd.data.sources import DataError
from herd.data.synthetic import scene_chat
from herd.tokenizer import tiny_tokenizer
from herd.train import snapshots as ckpt
from herd.train import train, train_preset
from herd.train.inputs import IGNORE, ImageRows, chat_example
from tests.train import small_data, transformers_logit_gap

VCFG = herd.multimodal_preset("tiny").vision_config


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, **kw):
    base = dict(out_dir=str(out), steps=6, warmup=1, seq_len=32, batch_size=2, image_rows=2, log_every=1,
                eval_every=3, eval_batches=1, ckpt_every=2, keep_last=2, export=False, plots=False)
    return train_preset("smoke", **{**base, **kw})


def test_only_the_answers_are_targets():
    tok = tiny_tokenizer()
    messages = scene_chat(0, 3, "all", size=56, max_shapes=3)[1]  # caption + every question + every box
    ids, labels, batch = chat_example(messages, tok, VCFG, max_len=1024)
    assert len(ids) == len(labels) and batch.pixel_values.shape[1:] == (3, 28, 28)
    targets = [t for t in labels if t != IGNORE]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    # every answer followed by its end of turn, in order, and nothing else
    assert tok.decode(targets) == "<|eot|>".join(answers) + "<|eot|>"
    for t, lab in enumerate(labels[:-1]):
        if lab != IGNORE:
            assert lab == ids[t + 1]
    assert labels[-1] == IGNORE


def test_rows_are_padded_resumable_and_split(monkeypatch):
    tok = tiny_tokenizer()
    cfg = train_preset("smoke", image_rows=3)
    rows = ImageRows(cfg, tok, VCFG)
    first, second = next(rows), next(rows)
    assert first["input_ids"].shape == first["labels"].shape and first["input_ids"].shape[0] == 3
    assert first["pixel_values"].shape[0] == 3 * 5  # a 56-pixel scene: 2x2 tiles + the global one, per row
    again = ImageRows(cfg, tok, VCFG)
    again.load_state_dict(ImageRows(cfg, tok, VCFG).state_dict() | {"index": 3})
    assert torch.equal(next(again)["input_ids"], second["input_ids"])  # resume continues the same stream
    val = next(ImageRows(cfg, tok, VCFG, split="val"))
    assert not torch.equal(val["pixel_values"][:5], first["pixel_values"][:5])
    with pytest.raises(DataError, match="image_seq_len=8"):
        next(ImageRows(train_preset("smoke", image_rows=1, image_seq_len=8), tok, VCFG))


def test_multimodal_run_learns_and_exports_for_transformers(tmp_path, monkeypatch):
    small_data(monkeypatch)
    out = tmp_path / "run"
    summary = train(_cfg(out, steps=16, eval_every=8, export=True, plots=True))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert evals[-1]["val_image_loss"] < evals[0]["val_image_loss"] - 0.5  # answers about images are learnt
    assert all("image_loss" in r for r in recs if r["kind"] == "train")
    assert (out / "loss.png").stat().st_size > 0
    # the export is a Llama4ForConditionalGeneration checkpoint: same logits in transformers on an image chat
    assert transformers_logit_gap(summary["hf"]) < 1e-4


def test_resume_with_image_rows_is_exact(tmp_path, monkeypatch):
    small_data(monkeypatch)
    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(full))
    train(_cfg(part, max_steps=2))
    train(_cfg(part), resume=True)
    a, b = ckpt.load(ckpt.latest(full / "ckpt")), ckpt.load(ckpt.latest(part / "ckpt"))
    assert a["state"]["images"] == b["state"]["images"] == {"index": 12}
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_jsonl_records_and_text_only_init_error(tmp_path, monkeypatch):
    small_data(monkeypatch)
    img = tmp_path / "red.png"
    shutil.copy("tests/data/images/square_h224_w224.png", img)
    lines = [{"image": "red.png", "text": f"picture number {i}"} for i in range(3)]
    (tmp_path / "pics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "run"
    train(_cfg(out, steps=2, image_data=str(tmp_path / "pics.jsonl"), image_rows=1, image_seq_len=512))
    assert ckpt.load(ckpt.latest(out / "ckpt"))["state"]["images"] == {"index": 2}
    text = tmp_path / "text"
    train(_cfg(text, steps=1, image_rows=0))
    with pytest.raises(herd.formats.hf.CheckpointError, match="text-only model"):
        train(_cfg(tmp_path / "again", steps=1, init=str(text)))


def test_scene_accuracy_compares_the_right_image_with_another(monkeypatch):
    """The 'does it look' check: a stand-in model that answers from the pixels scores differently on the two arms."""
    from herd.train import samples

    calls = []

    def fake_generate(model, ids, n, eos_token_id=None, pixel_values=None):
        calls.append(pixel_values)
        return torch.cat([ids, torch.tensor([[0]])], 1)  # answers token 0 whatever it sees

    monkeypatch.setattr("herd.infer.generate.generate", fake_generate)
    acc = samples.scene_accuracy(None, tiny_tokenizer(), VCFG, seed=0, n=4)
    assert acc == {"scene_qa_accuracy": 0.0, "scene_qa_accuracy_other_image": 0.0, "scene_qa_questions": 4}
    assert len(calls) == 8 and not torch.equal(calls[0], calls[1])  # the second arm really shows another image
    assert torch.equal(calls[1], calls[2])  # ... namely the next question's scene


def test_long_documents_are_cut_at_paragraphs_without_losing_text():
    from herd.train.inputs import pieces

    text = "".join(f"Paragraph {i}. " + "word " * (i % 7 * 10) + "\n\n" for i in range(60)) + "x" * 500
    for n in (0, 64, 300, 10**6):
        parts = pieces(text, n)
        assert "".join(parts) == text
        if n:
            assert all(len(p) <= n for p in parts)
    cut = pieces(text, 300)
    assert sum(p.endswith("\n\n") for p in cut) > len(cut) // 2  # mostly at paragraph breaks


def _color_chats(cfg):
    """Four 56-pixel images, one big square each in a different colour, and the same question about each."""
    from PIL import Image, ImageDraw

    rows = []
    for name, rgb in {"red": (230, 30, 30), "blue": (30, 60, 230), "green": (30, 180, 60),
                      "yellow": (240, 220, 30)}.items():
        image = Image.new("RGB", (56, 56), "white")
        ImageDraw.Draw(image).rectangle([10, 10, 45, 45], fill=rgb)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                 {"type": "text", "text": "What color is the shape?"}]},
                    {"role": "assistant", "content": name}]
        ids, labels, batch = chat_example(messages, tiny_tokenizer(), cfg.vision_config, 256)
        rows.append((torch.tensor([ids]), torch.tensor([labels]), batch.pixel_values.float()))
    return rows


def test_gradients_match_transformers_through_the_vision_tower(tmp_path):
    """Backward parity (the forward is tested in tests/model): every parameter's gradient of an answer loss."""
    import torch.nn.functional as F
    from transformers import Llama4ForConditionalGeneration

    cfg = herd.multimodal_preset("tiny")
    ours = herd.build_model(cfg, seed=0).train()
    herd.save_pretrained(ours, tmp_path)
    theirs = Llama4ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).train()
    ids, labels, pixels = _color_chats(cfg)[0]
    F.cross_entropy(ours(ids, pixel_values=pixels)[0], labels[0], ignore_index=IGNORE).backward()
    F.cross_entropy(theirs(input_ids=ids, pixel_values=pixels).logits[0], labels[0], ignore_index=IGNORE).backward()
    grads = {n: p.grad for n, p in theirs.named_parameters()}
    checked = 0
    for name, p in ours.named_parameters():
        match = [n for n in grads if n.endswith(name.split(".", 1)[1]) and name.split(".")[0] in n]
        ref = grads[min(match, key=len)]
        assert (p.grad - ref).norm() <= 1e-4 * ref.norm() + 1e-9, name
        checked += 1
    assert checked == len(grads)


def test_the_decoder_can_learn_to_read_the_image():
    """Four images that only their colour tells apart, one question: memorised within 60 steps, so image information
    reaches the answer through training. (With the tiny preset's 16-token chunks and temperature tuning from position
    8 it takes far longer: the image sits in earlier chunks, visible to the one global layer only.)"""
    import torch.nn.functional as F

    cfg = herd.multimodal_preset("tiny", attention_chunk_size=128, attn_temperature_tuning=False)
    model = herd.build_model(cfg, seed=0).train()
    rows = _color_chats(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = sum(F.cross_entropy(model(ids, pixel_values=px)[0], lab[0], ignore_index=IGNORE)
                   for ids, lab, px in rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok = tiny_tokenizer()
    with torch.no_grad():
        answers = []
        for ids, labels, pixels in rows:
            first = int((labels[0] != IGNORE).nonzero()[0, 0])
            answers.append(tok.decode([int(model(ids, pixel_values=pixels)[0, first].argmax())]))
    assert answers == ["red", "bl", "g", "y"]  # the first token of each colour name
