"""Train the tiny tokenizer shipped in src/herd/assets/tiny-tokenizer/ (2048 ids: 904 BPE ranks + the 1144 named
Llama 4 special tokens, so it fits the tiny presets' vocab_size of 2048 and the special ids stay put: bos 904,
eot 912, image_start 984, patch 996).

Corpus: the training split of herd's built-in corpus (herd.data.corpus: Austen, the World English Bible,
Shakespeare, Milton, WordNet glosses; ~26 MB, public domain / permissive, see src/herd/data/corpus/PROVENANCE.md),
so the tiny models train on text their tokenizer was fitted to. The validation split is never seen by the BPE
trainer; the compression printed and recorded in training.json is measured on it. The corpus's SHA-256 is written
next to the tokenizer so a rebuild can be checked.

    .venv/bin/python scripts/train_tiny_tokenizer.py                 # rewrites src/herd/assets/tiny-tokenizer/
    .venv/bin/python scripts/train_tiny_tokenizer.py --dump-corpus corpus.txt --out /tmp/tok
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from herd.data.corpus import documents
from herd.tokenizer import TINY_TOKENIZER_DIR, train_bpe


def bytes_per_token(tok, texts: list[str]) -> float:
    return sum(len(t.encode()) for t in texts) / sum(len(ids) for ids in tok.encode_batch(texts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(TINY_TOKENIZER_DIR), help="directory for tokenizer.json and configs")
    ap.add_argument("--vocab-size", type=int, default=2048, help="total ids, special tokens included")
    ap.add_argument("--dump-corpus", default=None, help="also write the training text to this file")
    args = ap.parse_args()

    t0 = time.perf_counter()
    docs, val = documents("train"), documents("val")
    text = "\n\n".join(docs)
    sha = hashlib.sha256(text.encode()).hexdigest()
    print(f"corpus: {len(docs)} documents, {len(text.encode()) / 1e6:.2f} MB, sha256 {sha[:16]}..., "
          f"read in {time.perf_counter() - t0:.1f} s")
    if args.dump_corpus:
        Path(args.dump_corpus).write_text(text)

    t0 = time.perf_counter()
    tok = train_bpe(docs, args.vocab_size)
    print(f"trained in {time.perf_counter() - t0:.2f} s: {tok}")
    if tok.vocab_size != args.vocab_size:  # the corpus had too few distinct pairs to fill the ranks
        print(f"warning: vocab_size is {tok.vocab_size}, asked for {args.vocab_size}", file=sys.stderr)

    bpt = bytes_per_token(tok, val)
    print(f"compression on the validation split: {bpt:.3f} bytes/token")
    print(f"ids: bos {tok.bos_id}, eot {tok.special('eot')}, pad {tok.pad_id}, image_start "
          f"{tok.special('image_start')}, image_end {tok.special('image_end')}, patch {tok.special('patch')}")

    out = Path(args.out)
    tok.save(out)
    meta = {"corpus": "herd built-in corpus, train split (src/herd/data/corpus/PROVENANCE.md)",
            "documents": len(docs), "corpus_bytes": len(text.encode()), "corpus_sha256": sha,
            "val_bytes_per_token": round(bpt, 4), "vocab_size": tok.vocab_size, "n_ranks": tok.n_ranks,
            "special_tokens": len(tok.specials)}
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
