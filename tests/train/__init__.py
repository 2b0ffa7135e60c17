"""Helpers for the training tests: a small slice of the built-in corpus.

`small_data(monkeypatch)` makes `herd.data.corpus.documents` return the first few documents of the real corpus, cut
short, so every run tokenizes kilobytes, not megabytes.
"""

from __future__ import annotations

N_DOCS, DOC_CHARS = 48, 2000


def small_data(monkeypatch) -> None:
    from herd.data import corpus

    full = {s: corpus.documents(s) for s in ("train", "val")}
    docs = {s: [d[:DOC_CHARS] for d in full[s][:N_DOCS]] for s in full}
    monkeypatch.setattr(corpus, "documents", lambda split="train", sources=None: list(docs[split]))
