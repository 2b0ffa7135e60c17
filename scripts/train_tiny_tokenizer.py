"""Train the tiny tokenizer shipped in src/herd/assets/tiny-tokenizer/ (2048 ids: 904 BPE ranks + the 1144 named
Llama 4 special tokens, so it fits the tiny presets' vocab_size of 2048).

Corpus: the docstrings of the Python standard library this interpreter ships (modules, classes, functions; test
packages, idlelib and site-packages left out), read with `ast` without importing anything: about 1.7 MB of English
technical prose with code examples, under the PSF License (Python Software Foundation License Version 2), which allows
derived works. Only the trained tokenizer is committed, not the corpus; the corpus's SHA-256 and the Python version
are written next to it so a rebuild can be checked (the text changes between Python releases).

    .venv/bin/python scripts/train_tiny_tokenizer.py                 # rewrites src/herd/assets/tiny-tokenizer/
    .venv/bin/python scripts/train_tiny_tokenizer.py --dump-corpus corpus.txt --out /tmp/tok
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
import time
from pathlib import Path

from herd.tokenizer import TINY_TOKENIZER_DIR, train_bpe

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}


def stdlib_docstrings() -> list[str]:
    """Every docstring of the standard library's .py files, in sorted path order (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):  # a few files are deliberately broken or not UTF-8
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if doc := ast.get_docstring(node):
                    docs.append(doc)
    return docs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(TINY_TOKENIZER_DIR), help="directory for tokenizer.json and configs")
    ap.add_argument("--vocab-size", type=int, default=2048, help="total ids, special tokens included")
    ap.add_argument("--dump-corpus", default=None, help="also write the training text to this file")
    args = ap.parse_args()

    t0 = time.perf_counter()
    docs = stdlib_docstrings()
    text = "\n\n".join(docs)
    sha = hashlib.sha256(text.encode()).hexdigest()
    print(f"corpus: {len(docs)} docstrings, {len(text.encode()) / 1e6:.2f} MB, sha256 {sha[:16]}..., "
          f"read in {time.perf_counter() - t0:.1f} s")
    if args.dump_corpus:
        Path(args.dump_corpus).write_text(text)

    t0 = time.perf_counter()
    tok = train_bpe(docs, args.vocab_size)
    print(f"trained in {time.perf_counter() - t0:.2f} s: {tok}")
    if tok.vocab_size != args.vocab_size:  # the corpus had too few distinct pairs to fill the ranks
        print(f"warning: vocab_size is {tok.vocab_size}, asked for {args.vocab_size}", file=sys.stderr)

    sample = text[:200_000]
    n = len(tok.encode(sample))
    print(f"compression on the first 200k chars: {len(sample.encode()) / n:.2f} bytes/token")
    print(f"ids: bos {tok.bos_id}, eot {tok.special('eot')}, pad {tok.pad_id}, image_start "
          f"{tok.special('image_start')}, image_end {tok.special('image_end')}, patch {tok.special('patch')}")

    out = Path(args.out)
    tok.save(out)
    meta = {"corpus": "Python standard library docstrings (PSF License Version 2)", "python": sys.version.split()[0],
            "docstrings": len(docs), "corpus_bytes": len(text.encode()), "corpus_sha256": sha,
            "vocab_size": tok.vocab_size, "n_ranks": tok.n_ranks, "special_tokens": len(tok.specials)}
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
