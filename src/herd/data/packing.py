"""Sequence packing with document masking: documents in, fixed-shape (B, T) training batches out.

Design
- Documents are token-id lists (used as given) or strings, tokenized on first use with a herd `Tokenizer` as
  `<|begin_of_text|>` + text + `<|end_of_text|>` (the base-model convention: the model learns where text ends).
- Order: every epoch visits every document once, in a permutation drawn from (seed, epoch) with numpy's PCG64
  (seeded through SeedSequence, so nearby seeds give unrelated orders); epochs repeat forever.
- Two layouts (`split_docs`):
  True (default; the Llama / GPT pretraining layout): the shuffled documents form one token stream that is cut into
  rows of T tokens. A document that does not fit continues at the start of the next row, in this batch or the
  next. No padding, no token wasted; the continuation starts at position 0 of its row (positions restart per
  doc id), so the context before the cut is lost, as in every concatenate-and-chunk pipeline.
  False: rows hold whole documents; one that does not fit in what is left of a row starts the next row and the
  rest of the row is padding. Only a document longer than T is cut, into T-token pieces.
- Labels are next-token targets inside the same document, -100 where there is none: the last token of each
  document (`<|end_of_text|>` for strings) and padding. The last position of a row whose document continues in the
  next row keeps its target: the next token is known, and it is a fair prediction from the row's prefix.
- doc_ids number the documents of each row 0, 1, 2... in order, padding is -1. `model(input_ids, doc_ids=doc_ids)`
  keeps attention inside each document and restarts positions and attention chunks at each change of id, so a packed
  row computes exactly what its documents compute alone (tests/model/test_packing.py, tests/test_data.py).
- Data parallel: every rank walks the same global stream (global batch = batch_size * world_size rows) and keeps
  rows [rank * batch_size, (rank + 1) * batch_size). The state is the position in that stream, equal on all ranks,
  so any rank's `state_dict()` resumes every rank, even with a different batch_size / world_size split of the same
  stream. The cost: each rank tokenizes the documents of the other ranks' rows too (pass token lists to avoid it).
- Resume: `state_dict()` = (epoch, cursor in the epoch's permutation, tokens of that document already emitted,
  step). A packer restored from the state after step k yields exactly the batches an uninterrupted one yields from
  step k on.

A plain iterator, not a torch DataLoader: packing is cheap next to a training step, and a DataLoader's worker
processes would make the stream position (hence exact resume) hard to pin down.

Shapes: B rows per rank, T sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE = -100  # label of positions without a target (torch cross_entropy's default ignore_index)


class Packer:
    """Infinite iterator of packed batches: dict(input_ids, labels, doc_ids), LongTensors of shape (B, T)."""

    def __init__(self, docs: Sequence[str] | Sequence[Sequence[int]], tokenizer=None, seq_len: int = 512,
                 batch_size: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1, split_docs: bool = True,
                 shuffle: bool = True, pad_id: int | None = None):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(docs) == 0:
            raise ValueError("no documents to pack")
        has_text = any(isinstance(d, str) for d in docs)
        if has_text and tokenizer is None:
            raise ValueError("documents are strings: pass a herd Tokenizer to tokenize them (or pass token ids)")
        if not has_text and not any(len(d) for d in docs):
            raise ValueError("every document is empty")
        self.docs, self.tokenizer = docs, tokenizer
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.split_docs, self.shuffle = split_docs, shuffle
        if pad_id is None:  # padding is never a target and never attended to by real tokens: any id will do
            pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
        self.pad_id = pad_id
        if tokenizer is not None:
            # documents end with Llama's <|end_of_text|>; a tokenizer without it (SmolLM2's) ends them with its eos
            self.bos = tokenizer.bos_id
            self.eos = tokenizer.specials.get("<|end_of_text|>", tokenizer.eos_id)
        self.epoch = self.cursor = self.offset = self.step = 0
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation) of the current epoch
        self._doc: tuple[int, list[int]] | None = None  # (index, tokens) of the document being packed

    # ---- the document stream -------------------------------------------------------------------------------------
    def _order(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            n = len(self.docs)
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm = (self.epoch, perm)
        return self._perm[1]

    def _tokens(self, i: int) -> list[int]:
        if self._doc is None or self._doc[0] != i:
            d = self.docs[i]
            toks = [self.bos, *self.tokenizer.encode(d), self.eos] if isinstance(d, str) else [int(t) for t in d]
            self._doc = (i, toks)
        return self._doc[1]

    def _row(self) -> tuple[list[int], list[int], list[int]]:
        """One row of T tokens: (input ids, labels, doc ids), advancing the stream position."""
        T = self.seq_len
        ids: list[int] = []
        labels: list[int] = []
        doc_ids: list[int] = []
        while len(ids) < T:
            toks = self._tokens(int(self._order()[self.cursor]))
            a, space = self.offset, T - len(ids)
            if len(toks) - a > space and ids and not self.split_docs:
                break  # whole documents only: this one starts the next row
            n = min(len(toks) - a, space)
            if n:
                ids += toks[a:a + n]
                # next token of the same document; none after its last token
                labels += toks[a + 1:a + n + 1] + ([IGNORE] if a + n == len(toks) else [])
                doc_ids += [doc_ids[-1] + 1 if doc_ids else 0] * n
            self.offset += n
            if self.offset == len(toks):  # document done: on to the next, and to a new epoch after the last
                self.offset, self.cursor = 0, self.cursor + 1
                if self.cursor == len(self.docs):
                    self.cursor, self.epoch = 0, self.epoch + 1
        pad = T - len(ids)
        return ids + [self.pad_id] * pad, labels + [IGNORE] * pad, doc_ids + [-1] * pad

    # ---- iteration -------------------------------------------------------------------------------------------------
    def __iter__(self) -> Packer:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self.step += 1
        return rank_slice(self._row, self.batch_size, self.world_size, self.rank)

    # ---- checkpointing ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position in the global stream (plain ints: JSON- and torch.save-friendly) and what defines the stream."""
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset, "step": self.step,
                "seed": self.seed, "n_docs": len(self.docs), "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("n_docs", len(self.docs)), ("shuffle", self.shuffle)):
            if state[key] != mine:
                raise ValueError(f"packer state is for {key}={state[key]}, this packer has {key}={mine}: the "
                                 "document stream would differ")
        self.epoch, self.cursor, self.offset, self.step = (int(state[k]) for k in ("epoch", "cursor", "offset",
                                                                                    "step"))
        self._doc = None


def rank_slice(next_row, batch_size: int, world_size: int, rank: int) -> dict[str, torch.Tensor]:
    """Walk the whole global batch (every rank reads the same stream, so all agree on where it stands) and keep this
    rank's rows: {"input_ids", "labels", "doc_ids"}, each (batch_size, T). `next_row()` gives (ids, labels, doc_ids)."""
    rows, first = [], rank * batch_size
    for r in range(batch_size * world_size):
        row = next_row()
        if first <= r < first + batch_size:
            rows.append(row)
    ids, labels, doc_ids = (torch.tensor([row[k] for row in rows], dtype=torch.long) for k in range(3))
    return {"input_ids": ids, "labels": labels, "doc_ids": doc_ids}
