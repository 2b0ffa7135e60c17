"""Users' own data: plain-text files, JSON lines, image-text records and Hugging Face datasets, read into what the
rest of herd.data consumes (lists of document strings; image-text records as OpenAI-style messages).

Design
- Readers are eager and return lists: user corpora at the scale herd trains on fit in memory, and the packer needs
  the number of documents to shuffle. `hf_documents` streams when asked (datasets' `streaming=True`).
- Errors name the file and the 1-based line: "data.jsonl:7: bad JSON (...)", "data.jsonl:3: no 'text' key",
  "pairs.jsonl:2: image file 'cat.png' not found (...)". A malformed file fails loudly instead of training on less.
- Image paths in JSONL are relative to the JSONL file's folder (so a data folder can move), absolute paths stay.
  Images are not opened here (herd.chat.prepare_chat / herd.image.load_image do it when a batch needs them); only
  their existence is checked, so a missing file is found before training starts.
- `datasets` is imported lazily inside `hf_documents`, so it is not a dependency of herd.

JSONL image-text records: {"image": path, "text": caption} becomes a user turn holding the image and an assistant
turn with the caption (`prompt` may add a text part to the user turn); {"image": path, "messages": [...]} keeps the
messages, puts the image into the first `{"type": "image"}` / image_url part without a source, or else at the front
of the first user message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

PathLike = str | os.PathLike


class DataError(ValueError):
    """A user data file is malformed: the message names the file and line."""


def _files(paths: PathLike | list[PathLike], pattern: str) -> list[Path]:
    """Files named directly, plus the files under named folders that match `pattern` (sorted, recursive)."""
    out = []
    for p in [paths] if isinstance(paths, str | os.PathLike) else paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(f for f in p.rglob(pattern) if f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e


def text_documents(paths: PathLike | list[PathLike], split: str = "file", pattern: str = "*.txt") -> list[str]:
    """Documents from plain-text files (or folders of `pattern` files): split="file" makes each file one document,
    split="blank_lines" makes each run of non-blank lines (a paragraph) one document. Empty documents are dropped."""
    if split not in ("file", "blank_lines"):
        raise ValueError(f"split must be 'file' or 'blank_lines', got {split!r}")
    docs = []
    for path in _files(paths, pattern):
        text = _read_text(path).replace("\r\n", "\n")
        parts = [text] if split == "file" else _paragraphs(text)
        docs += [p.strip("\n") for p in parts if p.strip()]
    return docs


def _paragraphs(text: str) -> list[str]:
    out, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line)
        elif cur:
            out.append("\n".join(cur))
            cur = []
    return out + (["\n".join(cur)] if cur else [])


def _jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; DataError on bad JSON or a non-object line."""
    path = Path(path)
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: bad JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def jsonl_documents(path: PathLike, key: str = "text") -> list[str]:
    """The `key` string of every line of a JSONL file."""
    docs = []
    for n, obj in _jsonl(path):
        if key not in obj:
            raise DataError(f"{path}:{n}: no {key!r} key (keys: {', '.join(sorted(obj)) or 'none'})")
        if not isinstance(obj[key], str):
            raise DataError(f"{path}:{n}: {key!r} must be a string, got {type(obj[key]).__name__}")
        docs.append(obj[key])
    return docs


def load_documents(source: PathLike, **kw) -> list[str]:
    """Documents from a .jsonl file, a .txt file or a folder of .txt files (keyword arguments go to the reader)."""
    p = Path(source)
    return jsonl_documents(p, **kw) if p.suffix == ".jsonl" else text_documents(p, **kw)


def _place_image(messages: list, image: str, where: str) -> list[dict]:
    """Messages with the image as the source of the first sourceless image part, or prepended to the first user turn."""
    msgs = [dict(m) for m in messages]
    part = {"type": "image_url", "image_url": {"url": image}}
    for m in msgs:
        if isinstance(m.get("content"), list):
            for k, p in enumerate(m["content"]):
                if isinstance(p, dict) and p.get("type") in ("image", "image_url") and not (
                        p.get("image") or p.get("url") or p.get("path") or p.get("image_url")):
                    m["content"] = [*m["content"][:k], part, *m["content"][k + 1:]]
                    return msgs
    for m in msgs:
        if m.get("role") == "user":
            content = m.get("content")
            rest = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            m["content"] = [part, *rest]
            return msgs
    raise DataError(f"{where}: messages have no user turn to hold the image")


def image_text_records(path: PathLike, prompt: str | None = None) -> list[dict]:
    """Image-text records of a JSONL file as [{"image": absolute path, "messages": OpenAI-style messages}]."""
    root = Path(path).resolve().parent
    records = []
    for n, obj in _jsonl(path):
        where = f"{path}:{n}"
        if "image" not in obj:
            raise DataError(f"{where}: no 'image' key")
        if not isinstance(obj["image"], str):
            raise DataError(f"{where}: 'image' must be a path string, got {type(obj['image']).__name__}")
        image = root / obj["image"]
        if not image.is_file():
            raise DataError(f"{where}: image file {obj['image']!r} not found (looked for {image})")
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
                raise DataError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
            messages = _place_image(msgs, str(image), where)
        elif isinstance(obj.get("text"), str):
            user = [{"type": "image_url", "image_url": {"url": str(image)}}]
            if prompt:
                user.append({"type": "text", "text": prompt})
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": obj["text"]}]
        else:
            raise DataError(f"{where}: needs a 'messages' list or a 'text' string next to 'image'")
        records.append({"image": str(image), "messages": messages})
    return records


def hf_documents(path: str, split: str = "train", text_key: str = "text", streaming: bool = False,
                 limit: int | None = None, **load_kw) -> list[str] | Iterator[str]:
    """The `text_key` column of a Hugging Face dataset (`path`: a hub name or a local folder, as
    `datasets.load_dataset` takes; extra keyword arguments such as `name=` (the config) or `data_files=` go there).
    A list, or with streaming=True a lazy iterator; `limit` caps the number of documents."""
    try:
        import datasets  # optional: only users with Hugging Face datasets need it
    except ImportError as e:
        raise ImportError("hf_documents needs the `datasets` package: pip install datasets") from e
    ds = datasets.load_dataset(path, split=split, streaming=streaming, **load_kw)
    if not streaming and text_key not in ds.column_names:
        raise DataError(f"dataset {path!r} ({split}) has no column {text_key!r}; columns: {ds.column_names}")

    def texts() -> Iterator[str]:
        for k, row in enumerate(ds):
            if limit is not None and k >= limit:
                return
            if text_key not in row:
                raise DataError(f"dataset {path!r} row {k} has no {text_key!r} field")
            yield row[text_key]

    return texts() if streaming else list(texts())
