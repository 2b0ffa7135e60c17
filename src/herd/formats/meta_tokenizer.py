"""Meta's Llama 4 `tokenizer.model` (tiktoken ranks) as a Hugging Face `tokenizer.json` that herd and transformers read.

Meta's releases (and the `llama-models` package) ship the tokenizer as tiktoken ranks: one `base64(token) rank` line
per byte string, 200,000 of them, plus 2048 special tokens that the code appends after the ranks
(meta-llama/llama-models models/llama4/tokenizer.py). `tokenizers` needs a BPE vocabulary *and* merges, so the
merges are rebuilt from the ranks.

Design
- tiktoken encodes a pre-token by repeatedly merging the adjacent pair whose concatenation has the lowest rank. A
  `tokenizers` BPE merges the pair that comes first in its merge list. Listing, for every token, each split into two
  tokens that are themselves in the vocabulary, ordered by the merged token's rank, makes the two agree: the merge
  list's order is the rank order. This is the construction of transformers' `TikTokenConverter`
  (convert_slow_tokenizer.py); among splits of the same token, the one whose parts rank lower comes first.
- `ignore_merges=True`: tiktoken returns a pre-token that is already in the vocabulary as one token without merging
  (its `_byte_pair_encode` shortcut), so the BPE must too.
- Pre-tokenizer, decoder and post-processor are the ones `herd.tokenizer.train_bpe` uses (Llama 4's o200k split
  regex, then byte-level with no regex of its own), and the special tokens are Meta's list in Meta's order, so
  `<|begin_of_text|>` = n_ranks and every id equals Meta's.
- Nothing is executed or unpickled: the file is text, checked line by line.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models

from herd.tokenizer import (
    BOS,
    Tokenizer,
    TokenizerError,
    _bytes_to_unicode,
    _post_processor,
    _pre_tokenizer,
    _regular,
    llama4_special_tokens,
)


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """`{token bytes: rank}` from a tiktoken file; ranks must be 0..n-1 with every single byte among them."""
    f = _regular(Path(path))
    ranks: dict[bytes, int] = {}
    with open(f, encoding="ascii", errors="strict") as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                fields = line.split()
                if len(fields) != 2:
                    raise TokenizerError(f"{f}:{lineno}: expected 'BASE64 RANK', got {line.strip()[:60]!r}; "
                                         "pass Meta's tokenizer.model (tiktoken ranks)")
                try:
                    ranks[base64.b64decode(fields[0], validate=True)] = int(fields[1])
                except (binascii.Error, ValueError) as e:
                    raise TokenizerError(f"{f}:{lineno}: not a base64 token and an integer rank ({e}); "
                                         "pass Meta's tokenizer.model (tiktoken ranks)") from None
        except UnicodeDecodeError:
            raise TokenizerError(f"{f} is not a tiktoken text file (non-ASCII bytes); pass Meta's tokenizer.model, "
                                 "not a SentencePiece model or a tokenizer.json") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{f}: ranks are not 0..{len(ranks) - 1} each once; the file is damaged")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{f}: byte(s) {missing[:8]} have no rank, so some text could not be encoded")
    return ranks


def bpe_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level vocabulary and the merge list that make a BPE encode like tiktoken (see the module docstring)."""
    table = _bytes_to_unicode()

    def unicode(b: bytes) -> str:  # GPT-2's printable stand-in characters, as the ByteLevel pre-tokenizer emits
        return "".join(table[x] for x in b)

    vocab = {unicode(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int]] = []  # (merged rank, left rank, right rank)
    for tok, rank in ranks.items():
        for k in range(1, len(tok)):
            left, right = ranks.get(tok[:k]), ranks.get(tok[k:])
            if left is not None and right is not None:
                merges.append((rank, left, right))
    merges.sort()
    by_rank = {rank: s for s, rank in vocab.items()}
    return vocab, [(by_rank[a], by_rank[b]) for _, a, b in merges]


def convert_tiktoken(path: str | os.PathLike) -> Tokenizer:
    """A herd `Tokenizer` equal, id for id, to Meta's tiktoken tokenizer built from the `tokenizer.model` at `path`."""
    vocab, merges = bpe_from_ranks(load_tiktoken_ranks(path))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in llama4_special_tokens()])
    tok.post_processor = _post_processor(tok.token_to_id(BOS))
    return Tokenizer(tok)


def convert_tokenizer_model(path: str | os.PathLike, out: str | os.PathLike) -> Tokenizer:
    """Convert and save tokenizer.json + tokenizer_config.json + special_tokens_map.json into directory `out`."""
    tok = convert_tiktoken(path)
    tok.save(out)
    return tok
