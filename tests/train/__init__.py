"""Helpers for the training tests: a small slice of the built-in corpus, and stand-ins for data modules not there yet.

`small_data(monkeypatch)` makes `herd.data.corpus.documents` return a few short documents (the first ones of the
real corpus when it is installed, generated sentences otherwise) so every run tokenizes kilobytes, not megabytes,
and installs a stand-in `herd.data.packing.Packer` only if the real one cannot be imported. The stand-in keeps the
real one's contract: (B, T) input_ids, labels already shifted (-100 where the next token is another document's),
doc_ids, and state_dict()/load_state_dict() for exact resume.
"""

from __future__ import annotations

import importlib
import random
import sys
import types

import torch

N_DOCS, DOC_CHARS = 48, 2000


def _generated_documents(split: str) -> list[str]:
    rng = random.Random(0 if split == "train" else 1)
    names, verbs, things = ["Anne", "the king", "Mr Darcy", "a shepherd"], ["saw", "loved", "sold", "found"], \
        ["the river", "a letter", "his sheep", "the old house"]
    return [" ".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)}." for _ in range(40))
            for _ in range(N_DOCS if split == "train" else 8)]


class StandInPacker:
    """Documents tokenized with BOS, shuffled by seed, concatenated; rows are consecutive windows of the stream."""

    def __init__(self, docs, tokenizer, seq_len, batch_size, seed=0, rank=0, world_size=1):
        order = random.Random(seed).sample(range(len(docs)), len(docs))
        ids, doc = [], []
        for j, i in enumerate(order):
            t = [tokenizer.bos_id] + tokenizer.encode(docs[i])
            ids += t
            doc += [j] * len(t)
        self.ids, self.doc = torch.tensor(ids), torch.tensor(doc)
        self.seq_len, self.batch_size, self.rank, self.world = seq_len, batch_size, rank, world_size
        self.row = 0

    def _window(self, row: int):
        T = self.seq_len
        start = (row * T) % (len(self.ids) - T - 1)
        x, d = self.ids[start:start + T + 1], self.doc[start:start + T + 1]
        labels = x[1:].clone()
        labels[d[1:] != d[:-1]] = -100
        return x[:-1], labels, d[:-1]

    def __iter__(self):
        while True:
            rows = [self._window((self.row + b) * self.world + self.rank) for b in range(self.batch_size)]
            self.row += self.batch_size
            yield {k: torch.stack([r[i] for r in rows]) for i, k in enumerate(("input_ids", "labels", "doc_ids"))}

    def state_dict(self) -> dict:
        return {"row": self.row}

    def load_state_dict(self, state: dict) -> None:
        self.row = state["row"]


def small_data(monkeypatch) -> None:
    try:
        from herd.data import corpus

        full = {s: corpus.documents(s) for s in ("train", "val")}
        docs = {s: [d[:DOC_CHARS] for d in full[s][:N_DOCS]] for s in full}
        monkeypatch.setattr(corpus, "documents", lambda split="train", sources=None: list(docs[split]))
    except ImportError:
        mod = types.ModuleType("herd.data.corpus")
        mod.documents = _generated_documents
        monkeypatch.setitem(sys.modules, "herd.data.corpus", mod)
    try:
        importlib.import_module("herd.data.packing")
    except ImportError:
        mod = types.ModuleType("herd.data.packing")
        mod.Packer = StandInPacker
        monkeypatch.setitem(sys.modules, "herd.data.packing", mod)
