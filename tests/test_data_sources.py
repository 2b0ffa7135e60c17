"""herd.data.sources: users' text, JSONL and image-text files, with the errors a malformed file must raise.

Run: .venv/bin/python -m pytest tests/test_data_sources.py -v
"""

from __future__ import annotations

import json
import sys
import types

import pytest
from PIL import Image

from herd.data.sources import (
    DataError,
    hf_documents,
    image_text_records,
    jsonl_documents,
    load_documents,
    text_documents,
)


def test_text_files_per_file_and_per_paragraph(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.\r\nStill second.\n")
    (tmp_path / "a.txt").write_text("First paragraph,\ntwo lines.\n\n\n  \nSecond paragraph.\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("\n\n")  # empty documents are dropped
    (tmp_path / "notes.md").write_text("not a .txt file")
    assert text_documents(tmp_path) == ["First paragraph,\ntwo lines.\n\n\n  \nSecond paragraph.",
                                        "Second file.\nStill second."]
    assert text_documents(tmp_path, split="blank_lines") == ["First paragraph,\ntwo lines.", "Second paragraph.",
                                                             "Second file.\nStill second."]
    assert text_documents([tmp_path / "notes.md"]) == ["not a .txt file"]  # files named directly are read as is
    assert load_documents(tmp_path / "b.txt") == ["Second file.\nStill second."]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        text_documents(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="bad.txt: not UTF-8"):
        text_documents(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="split"):
        text_documents(tmp_path, split="lines")


def test_jsonl_documents_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert jsonl_documents(good) == load_documents(good) == ["one", "two"]
    cases = {'{"text": "ok"}\n{"text": "unterminated\n': r"bad.jsonl:2: bad JSON",
             '{"text": "ok"}\n\n{"body": "x"}\n': r"bad.jsonl:3: no 'text' key \(keys: body\)",
             '{"text": 5}\n': r"bad.jsonl:1: 'text' must be a string",
             '["text"]\n': r"bad.jsonl:1: expected a JSON object"}
    for content, message in cases.items():
        (tmp_path / "bad.jsonl").write_text(content)
        with pytest.raises(DataError, match=message):
            jsonl_documents(tmp_path / "bad.jsonl")
    (tmp_path / "other.jsonl").write_text('{"content": "x"}\n')
    assert jsonl_documents(tmp_path / "other.jsonl", key="content") == ["x"]


def test_image_text_records(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "img" / "red.png")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red"}]
    plain = [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "A red box."}]
    lines = [{"image": "img/red.png", "text": "A red rectangle."}, {"image": "img/red.png", "messages": chat},
             {"image": "img/red.png", "messages": plain}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = image_text_records(path, prompt="Describe the image.")
    img = str(tmp_path / "img" / "red.png")
    assert [r["image"] for r in recs] == [img] * 3
    part = {"type": "image_url", "image_url": {"url": img}}
    assert recs[0]["messages"] == [{"role": "user", "content": [part, {"type": "text", "text": "Describe the image."}]},
                                   {"role": "assistant", "content": "A red rectangle."}]
    assert recs[1]["messages"][0]["content"] == [part, {"type": "text", "text": "Colour?"}]
    assert recs[2]["messages"][0]["content"] == [part, {"type": "text", "text": "What is this?"}]
    assert chat[0]["content"][0] == {"type": "image"}  # the caller's objects are not modified

    from herd.chat import prepare_chat  # the records are ready for the chat format
    from herd.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    ids, images = prepare_chat(recs[1]["messages"], tok, tile_size=28, max_tiles=6, tokens_per_tile=4)
    assert images.pixel_values.shape[0] >= 1 and tok.special("image_start") in ids

    errors = {'{"image": "img/blue.png", "text": "x"}\n': r"pairs.jsonl:1: image file 'img/blue.png' not found",
              '{"text": "no image"}\n': r"pairs.jsonl:1: no 'image' key",
              '{"image": "img/red.png"}\n': r"pairs.jsonl:1: needs a 'messages' list or a 'text' string",
              '{"image": "img/red.png", "messages": "hi"}\n': r"pairs.jsonl:1: 'messages' must be a list",
              '\n{"image": "img/red.png", "messages": [{"role": "assistant", "content": "x"}]}\n':
                  r"pairs.jsonl:2: messages have no user turn",
              '{"image": "img/red.png", "text": "ok"}\n{bad\n': r"pairs.jsonl:2: bad JSON"}
    for content, message in errors.items():
        path.write_text(content)
        with pytest.raises(DataError, match=message):
            image_text_records(path)


def test_hf_documents(monkeypatch):
    """The real loader against a stand-in `datasets` module (the suite runs offline and without datasets)."""
    calls = []

    class Rows(list):
        column_names = ["text", "label"]

    def load_dataset(path, split, streaming, **kw):
        calls.append((path, split, streaming, kw))
        rows = [{"text": f"doc {i}", "label": i} for i in range(5)]
        return iter(rows) if streaming else Rows(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert hf_documents("user/corpus", split="validation", name="en") == [f"doc {i}" for i in range(5)]
    assert calls[-1] == ("user/corpus", "validation", False, {"name": "en"})
    stream = hf_documents("user/corpus", streaming=True, limit=2)
    assert not isinstance(stream, list) and list(stream) == ["doc 0", "doc 1"]
    with pytest.raises(DataError, match="no column 'content'"):
        hf_documents("user/corpus", text_key="content")
    monkeypatch.setitem(sys.modules, "datasets", None)  # an import of it now fails, as when it is not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        hf_documents("user/corpus")
