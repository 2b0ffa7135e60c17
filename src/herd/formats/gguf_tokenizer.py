"""The tokenizer inside a GGUF file <-> herd's Tokenizer (a `tokenizers` byte-level BPE plus special tokens).

GGUF stores a BPE tokenizer as `tokenizer.ggml.model` = "gpt2", the token strings in GPT-2's byte-to-unicode form
(`tokenizer.ggml.tokens`, id = position), `tokenizer.ggml.merges` ("a b" strings, by rank), `token_type` (1 normal,
3 control, 4 user-defined, 5 unused, 6 byte; gguf.TokenType), bos/eos/pad ids, and `tokenizer.ggml.pre`: the NAME
of the pre-tokenizer, whose split regex lives in llama.cpp's src/llama-vocab.cpp, not in the file. `PRE_TOKENIZERS`
holds the names herd rebuilds, each as the `tokenizers` pre-tokenizer that Hugging Face's tokenizer.json of that
family uses:
- "llama-bpe" (Llama 3; also "llama3", "llama-v3"): Llama 3's split regex, then byte-level, with ignore_merges;
- "llama4" (also "gpt-4o"): the o200k split of Llama 4 (herd.tokenizer.O200K_PATTERN) -- what herd's tokenizers use,
  so a herd export says "llama4" (llama.cpp does not recognise herd's tokenizer by hash in convert_hf_to_gguf.py);
- "smollm" (also "starcoder", "refact"): single digits split off, then GPT-2's byte-level regex;
- "gpt2": GPT-2's byte-level regex.
Control tokens become special added tokens (herd never matches them in plain text, herd.tokenizer), user-defined
ones ordinary added tokens. `tokenizer.chat_template` is kept as `Tokenizer.chat_template`, the checkpoint's own
template that herd.chat renders (herd.formats.chat_template). Writing a tokenizer into a GGUF file is
herd.formats.gguf_export's (`add_tokenizer`).
"""

from __future__ import annotations

import os

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from herd.formats.gguf import GGUFError, _gguf, metadata, open_reader

# Llama 3's split regex (meta-llama/llama-models models/llama3/tokenizer.py pat_str; tokenizer.json of Llama 3).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(pattern: str) -> list:
    return [pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]


def _gpt2() -> list:
    return [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]


# name -> (pre-tokenizer parts given the o200k pattern, ignore_merges); aliases as llama.cpp's llama-vocab.cpp groups
# them. The o200k pattern is herd.tokenizer.O200K_PATTERN, passed in: herd.tokenizer imports this module.
PRE_TOKENIZERS = {
    "llama-bpe": (lambda o200k: _split(LLAMA3_PATTERN), True),
    "llama4": (lambda o200k: _split(o200k), True),
    "smollm": (lambda o200k: [pre_tokenizers.Digits(individual_digits=True), *_gpt2()], False),
    "gpt2": (lambda o200k: _gpt2(), False),
}
ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "gpt-4o": "llama4", "starcoder": "smollm",
           "refact": "smollm"}


def tokenizer_parts(meta: dict, o200k: str, where: str = "GGUF") -> tuple[tokenizers.Tokenizer, dict]:
    """(the `tokenizers` object, herd Tokenizer keyword arguments) from GGUF metadata (module docstring); GGUFError
    naming what is not supported. herd.tokenizer.Tokenizer.from_pretrained("x.gguf") builds the Tokenizer."""
    g = _gguf()
    K, TT = g.Keys.Tokenizer, g.TokenType
    kind = meta.get(K.MODEL)
    if kind != "gpt2":
        raise GGUFError(f"{where}: tokenizer.ggml.model {kind!r} is not supported; herd rebuilds byte-level BPE "
                        "tokenizers ('gpt2'), not SentencePiece ('llama') or others")
    pre = ALIASES.get(meta.get(K.PRE, "gpt2"), meta.get(K.PRE, "gpt2"))
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{where}: tokenizer.ggml.pre {meta.get(K.PRE)!r} is not a pre-tokenizer herd knows "
                        f"(known: {sorted(PRE_TOKENIZERS) + sorted(ALIASES)})")
    tokens = [str(t) for t in meta.get(K.LIST, [])]
    types = list(meta.get(K.TOKEN_TYPE, [TT.NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.get(K.MERGES, [])]
    parts, ignore_merges = PRE_TOKENIZERS[pre]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id (one pass: vocabularies are 50k-200k)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(parts(o200k))
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(t, normalized=False, special=ty == TT.CONTROL) for t, ty in zip(tokens, types, strict=False)
             if ty in (TT.CONTROL, TT.USER_DEFINED)]
    tok.add_tokens(added)  # the strings are in the vocabulary, so their ids stay the file's
    names = {k: tokens[int(meta[key])] for k, key in (("bos_token", K.BOS_ID), ("eos_token", K.EOS_ID),
                                                       ("pad_token", K.PAD_ID))
             if key in meta and 0 <= int(meta[key]) < len(tokens)}
    if "bos_token" in names and meta.get(K.ADD_BOS, False):
        bos = names["bos_token"]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, vocab[bos])])])
    for role in ("bos_token", "eos_token"):
        if role not in names:
            raise GGUFError(f"{where}: the tokenizer has no {role.split('_')[0]} token id (tokenizer.ggml."
                            f"{role.split('_')[0]}_token_id)")
        if types[vocab[names[role]]] != TT.CONTROL:  # herd needs its role tokens to be special tokens
            tok.add_special_tokens([AddedToken(names[role], normalized=False, special=True)])
    template = meta.get(K.CHAT_TEMPLATE)
    return tok, dict(bos_token=names["bos_token"], eos_token=names["eos_token"], pad_token=names.get("pad_token"),
                     chat_template=template if isinstance(template, str) else None)


def read_tokenizer(path: str | os.PathLike, o200k: str) -> tuple[tokenizers.Tokenizer, dict]:
    """`tokenizer_parts` of a GGUF file."""
    return tokenizer_parts(metadata(open_reader(path)), o200k, str(path))
