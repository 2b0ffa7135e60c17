"""herd.data: the built-in corpus, sequence packing (labels, doc ids, resume, data-parallel slices, and equality with
running documents alone through the tiny model), synthetic scenes and long-context documents.

Run: .venv/bin/python -m pytest tests/test_data.py tests/test_data_sources.py -v
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import herd
from herd.data import corpus
from herd.data.packing import IGNORE, Packer
from herd.data.synthetic import COLORS, kv_document, make_scene, parse_box, passkey_document, scene_chat
from herd.tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def random_docs(n: int, seed: int = 0, lo: int = 1, hi: int = 40) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [g.integers(0, 900, g.integers(lo, hi)).tolist() for _ in range(n)]


# ---- corpus --------------------------------------------------------------------------------------------------------
def test_corpus_splits_disjoint_and_documented():
    train, val, every = corpus.documents("train"), corpus.documents("val"), corpus.documents("all")
    assert len(train) > 2000 and len(val) > 100 and len(train) + len(val) == len(every)
    assert not set(train) & set(val)  # whole documents are held out
    stats = corpus.corpus_stats()
    assert stats["total"]["train_docs"] == len(train) and stats["total"]["val_docs"] == len(val)
    assert stats["total"]["train_bytes"] > 20e6 and stats["total"]["xz_bytes"] < 10e6
    for s in corpus.SOURCES:  # every source is in both splits
        assert stats[s]["train_docs"] > 0 and stats[s]["val_docs"] > 0, s
    assert "It is a truth universally acknowledged" in "".join(corpus.documents("all", "austen"))
    prov = (corpus.CORPUS_DIR / "PROVENANCE.md").read_text()
    for s in corpus.SOURCES:  # the committed files are the ones PROVENANCE.md describes
        digest = hashlib.sha256((corpus.CORPUS_DIR / f"{s}.jsonl.xz").read_bytes()).hexdigest()
        assert re.search(rf"`{s}\.jsonl\.xz` \| `[0-9a-f]{{64}}` \| `{digest}`", prov), s
    with pytest.raises(ValueError, match="split"):
        corpus.documents("test")


# ---- packing -------------------------------------------------------------------------------------------------------
def test_packer_concatenates_and_labels_next_tokens():
    docs = random_docs(30)
    p = Packer(docs, None, seq_len=16, batch_size=3, shuffle=False)
    batches = [next(p) for _ in range(8)]
    for b in batches:
        assert all(v.shape == (3, 16) and v.dtype == torch.long for v in b.values())
    ids = torch.cat([b["input_ids"] for b in batches]).flatten().tolist()
    labels = torch.cat([b["labels"] for b in batches]).flatten().tolist()
    stream = [t for d in docs for t in d] * 3
    assert ids == stream[:len(ids)]  # no padding, nothing lost, documents in order (shuffle=False)
    ends = np.cumsum([len(d) for d in docs * 3]) - 1  # stream index of each document's last token
    for i in range(len(ids)):
        assert labels[i] == (IGNORE if i in set(ends.tolist()) else stream[i + 1])
    for b in batches:  # doc ids count up from 0 in every row and change exactly where a document starts
        d = b["doc_ids"]
        assert (d[:, 0] == 0).all() and ((d[:, 1:] - d[:, :-1]) >= 0).all()


def test_packer_strings_get_bos_and_end_of_text(tok):
    texts = ["Hello world.", "A second, longer document about shapes.", "Third."]
    p = Packer(texts, tok, seq_len=64, batch_size=1, shuffle=False, split_docs=False)
    b = next(p)
    ids, labels, doc_ids = b["input_ids"][0], b["labels"][0], b["doc_ids"][0]
    eot = tok.special("end_of_text")
    for k, text in enumerate(texts):
        seg = ids[doc_ids == k].tolist()
        assert seg == [tok.bos_id, *tok.encode(text), eot]
        assert labels[doc_ids == k].tolist() == seg[1:] + [IGNORE]
    pad = doc_ids == -1  # whole documents only: the rest of the row is padding, never a target
    assert pad.any() and (labels[pad] == IGNORE).all() and (ids[pad] == tok.pad_id).all()
    with pytest.raises(ValueError, match="Tokenizer"):
        Packer(texts, None, 8, 1)


def test_packer_whole_documents_mode():
    docs = random_docs(40, seed=1, hi=30) + [list(range(50))]  # the last one is longer than a row: it is cut
    p = Packer(docs, None, seq_len=32, batch_size=4, seed=5, split_docs=False)
    seen = []
    for _ in range(20):  # past the first epoch
        b = next(p)
        for r in range(4):
            for k in b["doc_ids"][r].unique().tolist():
                if k >= 0:
                    seen.append(b["input_ids"][r][b["doc_ids"][r] == k].tolist())
    whole = {tuple(d) for d in docs}
    cut = [s for s in seen if tuple(s) not in whole]
    assert cut and all(s == list(range(50))[:32] or s == list(range(50))[32:] for s in cut)


def test_packed_batch_loss_equals_documents_alone(tok):
    """The loss of a packed batch (documents cut across rows included) equals the loss of every row segment run
    through the model alone with the same targets: no attention across documents, positions restart per segment."""
    model = herd.build_model(herd.preset("tiny"), seed=3).eval()
    texts = corpus.documents("val", "bible")[:6]
    p = Packer([t[:300] for t in texts], tok, seq_len=96, batch_size=3, seed=1)
    b = next(p)
    with torch.no_grad():
        logits = model(b["input_ids"], doc_ids=b["doc_ids"])
        packed = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
        alone, n = 0.0, 0
        for r in range(3):
            for k in b["doc_ids"][r].unique().tolist():
                sel = b["doc_ids"][r] == k
                if k < 0:
                    continue
                out = model(b["input_ids"][r][sel][None])[0]
                alone += F.cross_entropy(out, b["labels"][r][sel], ignore_index=IGNORE, reduction="sum")
                n += int((b["labels"][r][sel] != IGNORE).sum())
    assert n == int((b["labels"] != IGNORE).sum()) > 200
    assert abs(packed.item() - alone.item()) < 1e-4 * n


def test_packer_resumes_exactly_and_shuffles_per_epoch():
    docs = random_docs(25, seed=2)
    ref = Packer(docs, None, seq_len=24, batch_size=2, seed=7)
    batches = [next(ref) for _ in range(30)]  # several epochs (25 docs of ~20 tokens, 48 tokens a batch)
    for k in (0, 3, 11, 25):
        p = Packer(docs, None, seq_len=24, batch_size=2, seed=7)
        for _ in range(k):
            next(p)
        state = json.loads(json.dumps(p.state_dict()))  # plain ints: survives JSON
        q = Packer(docs, None, seq_len=24, batch_size=2, seed=7)
        q.load_state_dict(state)
        for want in batches[k:]:
            got = next(q)
            assert all(torch.equal(got[key], want[key]) for key in want)
    assert ref.epoch >= 2 and ref._order().tolist() != Packer(docs, None, 24, 2, seed=7)._order().tolist()
    other = next(Packer(docs, None, seq_len=24, batch_size=2, seed=8))
    assert not torch.equal(other["input_ids"], batches[0]["input_ids"])
    with pytest.raises(ValueError, match="seed"):
        Packer(docs, None, 24, 2, seed=8).load_state_dict(state)


def test_ranks_get_disjoint_slices_of_the_global_batch():
    docs = random_docs(60, seed=4)
    full = Packer(docs, None, seq_len=20, batch_size=6, seed=3)
    ranks = [Packer(docs, None, seq_len=20, batch_size=2, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        want = next(full)
        parts = [next(p) for p in ranks]
        for key in want:
            assert torch.equal(torch.cat([p[key] for p in parts]), want[key])
    assert ranks[0].state_dict() == ranks[2].state_dict() == full.state_dict()
    with pytest.raises(ValueError, match="rank"):
        Packer(docs, None, 20, 2, rank=3, world_size=3)


# ---- synthetic scenes ----------------------------------------------------------------------------------------------
def test_scenes_are_deterministic_and_answers_correct():
    a, b = make_scene(3, 7), make_scene(3, 7)
    assert a.image.tobytes() == b.image.tobytes() and a.qa == b.qa and a.caption == b.caption
    assert make_scene(3, 8).image.tobytes() != a.image.tobytes()
    for index in range(25):
        s = make_scene(11, index, size=160)
        px = np.asarray(s.image).astype(int)
        painted = (px != 255).any(-1)
        inside = np.zeros_like(painted)
        for sh in s.shapes:
            x0, y0, x1, y1 = sh.box
            inside[y0:y1, x0:x1] = True
            cx, cy = (int(v) for v in sh.center)
            assert tuple(px[cy, cx]) == COLORS[sh.color], (index, sh)  # the named colour is drawn there
            assert painted[y0:y1, x0:x1].sum() > 0.3 * (x1 - x0) * (y1 - y0)
        assert not (painted & ~inside).any()  # nothing drawn outside the objects' boxes
        answers = dict(s.qa)
        assert answers["How many shapes are there?"] == str(len(s.shapes))
        for q, ans in s.qa:
            if (m := re.fullmatch(r"How many (\w+)s are there\?", q)) and m.group(1) != "shape":
                assert ans == str(sum(sh.kind == m.group(1) for sh in s.shapes))
            if m := re.fullmatch(r"Is the (\w+ \w+) to the left or to the right of the (\w+ \w+)\?", q):
                named = {sh.name: sh for sh in s.shapes}
                assert ans == ("left" if named[m.group(1)].center[0] < named[m.group(2)].center[0] else "right")
        for (q, box), sh in zip(s.grounding, s.shapes, strict=True):
            assert sh.name in q
            grid = parse_box(box)
            assert all(abs(g * 160 / 1000 - v) <= 0.5 for g, v in zip(grid, sh.box, strict=True))


def test_scene_chat_goes_through_prepare_chat(tok):
    from herd.chat import prepare_chat

    v = herd.multimodal_preset("tiny").vision_config
    for fmt in ("pil", "data_url"):
        image, messages = scene_chat(0, 2, task="all", image_format=fmt, size=56)
        assert messages[0]["role"] == "user" and messages[0]["content"][0]["type"] == "image_url"
        assert messages[1]["role"] == "assistant" and messages[1]["content"].startswith(("One", "Two", "Three"))
        ids, images = prepare_chat(messages, tok, tile_size=v.image_size, max_tiles=v.max_tiles,
                                   tokens_per_tile=v.tokens_per_tile)
        assert ids.count(tok.special("image_start")) == 1 and images.pixel_values.shape[-1] == v.image_size
    tasks = {scene_chat(1, i)[1][1]["content"][:4] for i in range(20)}  # "mixed" draws captions, answers, boxes
    assert any(t.startswith("<box") for t in tasks) and len(tasks) > 3


# ---- long context --------------------------------------------------------------------------------------------------
def test_passkey_and_kv_documents(tok):
    for seed in range(3):
        text, question, answer = passkey_document(seed, n_chars=3000)
        assert len(text) <= 3000 and len(text) > 2800 and text.count(answer) == 2 and "pass key" in question
    early = passkey_document(0, n_chars=3000, depth=0.0)
    late = passkey_document(0, n_chars=3000, depth=1.0)
    assert early.text.index(early.answer) < 300 < 2500 < late.text.index(late.answer)
    doc = passkey_document(5, n_tokens=1000, tokenizer=tok, filler="corpus")
    assert 800 < len(tok.encode(doc.text)) <= 1000 and doc.answer in doc.text
    assert passkey_document(5, n_chars=2000) == passkey_document(5, n_chars=2000)
    kv = kv_document(2, n_tokens=1500, tokenizer=tok, depth=0.5)
    pairs = json.loads(kv.text.split("\n\n", 1)[1])
    key = re.search(r'"([0-9a-f-]{36})"', kv.question).group(1)
    assert len(tok.encode(kv.text)) <= 1500 and pairs[key] == kv.answer and len(pairs) > 5
    assert list(pairs).index(key) == round(0.5 * (len(pairs) - 1))
    with pytest.raises(ValueError, match="exactly one"):
        passkey_document(0)
