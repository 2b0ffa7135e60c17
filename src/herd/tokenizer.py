"""The Llama 4 tokenizer: byte-level BPE with the o200k split regex and Llama 4's special tokens.

Design
- One format on disk: Hugging Face `tokenizer.json`, the way real Llama 4 checkpoints ship the tokenizer. `Tokenizer`
  wraps `tokenizers.Tokenizer` (Rust) and adds what herd needs on top: ids by name, stop ids, injection-safe encoding,
  streaming detokenization, and `save` files that transformers' `AutoTokenizer` loads.
- Special tokens are data (`SPECIAL_TOKENS`, in Meta's order). They sit right after the BPE ranks, so
  id = n_ranks + offset: the real tokenizer has n_ranks = 200000 (`<|begin_of_text|>` = 200000, `<|patch|>` = 200092)
  and fills 2048 slots with `<|reserved_special_token_i|>`; a small trained tokenizer appends only the 1144 named
  ones. Code therefore always asks `special(name)`, never a literal id.
- `encode` treats its input as plain text: "<|eot|>" typed by a user is BPE'd like any other text, so it cannot inject
  a control token. `allow_special=True` (the tiktoken `allowed_special="all"` idea) parses special-token text, for
  rendering already-templated strings.
- `train_bpe` builds the tokenizer.json the way transformers' `TikTokenConverter` converts Meta's tiktoken file:
  Split(o200k regex, isolated) + ByteLevel(use_regex=False) pre-tokenizer, BPE with ignore_merges, ByteLevel decoder,
  and the `<|begin_of_text|> $A` template post-processor of transformers' Llama 4 converter.

Sources: meta-llama/llama-models models/llama4/tokenizer.py (token lists, O200K pattern,
stop tokens); transformers convert_slow_tokenizer.py (TikTokenConverter) and
models/llama4/convert_llama4_weights_to_hf.py (post-processor, bos/eos/pad in tokenizer_config.json).
"""

from __future__ import annotations

import codecs
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from functools import cache, cached_property
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

# The o200k-style pre-tokenization regex of Llama 4 (O200K_PATTERN in meta-llama/llama-models models/llama4/
# tokenizer.py). Must stay exact.
O200K_PATTERN = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# ---- the special-token table (Meta's llama4/tokenizer.py; offsets from the first special id, 200000 in the real one) -
def _reserved(name: str, count: int, start: int) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


BASIC_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
# offsets 5..79. Meta numbers the trailing reserved block 8..68 (6 and 7 are skipped); transformers' converter names
# it 6..66. Only the names differ, never the ids; herd follows Meta.
TEXT_POST_TRAIN_SPECIAL_TOKENS = [
    "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>", *_reserved("text_post_train", 6, 0),
    "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>", *_reserved("text_post_train", 61, 8),
]
# offsets 80..1133
VISION_SPECIAL_TOKENS = [
    "<|image_start|>", "<|image_end|>", *_reserved("vision", 2, 0), "<|tile_x_separator|>", "<|tile_y_separator|>",
    *_reserved("vision", 4, 2), "<|image|>", *_reserved("vision", 1, 6), "<|patch|>", *_reserved("vision", 1041, 7),
]
# offsets 1134..1143 (Meta only; transformers' converted tokenizer.json stops at offset 1133)
REASONING_SPECIAL_TOKENS = [*_reserved("reasoning", 8, 0), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
SPECIAL_TOKENS = [*BASIC_SPECIAL_TOKENS, *TEXT_POST_TRAIN_SPECIAL_TOKENS, *VISION_SPECIAL_TOKENS,
                  *REASONING_SPECIAL_TOKENS]  # 1144 named tokens
NUM_SPECIAL_SLOTS = 2048  # the real vocabulary is 200000 ranks + 2048 slots = 202048 embedding rows


def llama4_special_tokens() -> list[str]:
    """All 2048 special slots of the real tokenizer: the 1144 named tokens, then `<|reserved_special_token_i|>`."""
    return SPECIAL_TOKENS + [f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL_SLOTS - len(SPECIAL_TOKENS))]


# Roles, by name. Instruct checkpoints use eot as eos; Meta stops generation on any of STOP_TOKENS.
BOS, EOS_BASE, EOT, EOM, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot|>", "<|eom|>", "<|finetune_right_pad|>"
STOP_TOKENS = (EOS_BASE, EOM, EOT)


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (what the ByteLevel decoder undoes)."""
    return {c: i for i, c in enumerate(_bytes_to_unicode())}


def _bytes_to_unicode() -> list[str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:  # unprintable bytes are shifted above 255
            out.append(chr(256 + n))
            n += 1
    return out


class TokenizerError(ValueError):
    """A checkpoint's tokenizer files are missing or malformed (the message names the file)."""


def _regular(f: Path) -> Path:
    """`f` if it is a regular file; checked before opening, since a FIFO in its place would block the read forever."""
    try:
        mode = os.stat(f).st_mode
    except FileNotFoundError:
        raise TokenizerError(f"{f.parent} has no {f.name}: copy the checkpoint's tokenizer files into it") from None
    except OSError as e:
        raise TokenizerError(f"{f} cannot be read: {e}") from e
    if not stat.S_ISREG(mode):
        raise TokenizerError(f"{f} is not a regular file (a FIFO, device or directory)")
    return f


def _read_config(f: Path) -> dict:
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{f} must hold a JSON object")
    return cfg


class Tokenizer:
    """A Llama 4 tokenizer over a `tokenizers.Tokenizer` (real checkpoint or trained here)."""

    def __init__(self, tok: tokenizers.Tokenizer, bos_token: str = BOS, eos_token: str = EOT,
                 pad_token: str | None = PAD, model_max_length: int | None = None, chat_template: str | None = None):
        self._tok = tok
        # The checkpoint's own Jinja chat template, if it has one (herd.formats.chat_template); `save` writes it, or
        # herd's own template when there is none.
        self.chat_template = chat_template
        # Make the Rust side skip added-token matching inside text: encode treats input as plain text and finds
        # special tokens itself only when asked (allow_special). The flag is not saved in tokenizer.json.
        tok.encode_special_tokens = True
        added = tok.get_added_tokens_decoder()
        self.specials: dict[str, int] = {t.content: i for i, t in sorted(added.items()) if t.special}
        self.n_ranks = tok.get_vocab_size(with_added_tokens=False)
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token = bos_token, eos_token
        # transformers' Llama 4 config names the pad token '<|finetune_right_pad_id|>', a token that does not exist
        # (set by models/llama4/convert_llama4_weights_to_hf.py); fall back to Meta's name so pad_id is always a
        # real id.
        self.pad_token = pad_token if pad_token in self.specials else (PAD if PAD in self.specials else None)
        for t in (bos_token, eos_token):
            if t not in self.specials:
                raise ValueError(f"{t!r} is not a special token of this tokenizer")
        # One alternation of every special token (longest first), to find them in text when allow_special=True.
        names = sorted(self.specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None
        self._bytes: dict[int, bytes] = {}

    # ---- loading and saving ----------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, **kw) -> Tokenizer:
        """A tokenizer.json file. A missing, unreadable or malformed file raises TokenizerError naming it."""
        f = _regular(Path(path))
        try:
            tok = tokenizers.Tokenizer.from_file(str(f))
        except Exception as e:  # the Rust side raises plain Exceptions for bad JSON and unknown layouts
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise TokenizerError(f"{f} is not a valid tokenizer.json ({why}): replace it with the checkpoint's "
                                 "tokenizer.json") from e
        try:
            return cls(tok, **kw)
        except ValueError as e:  # e.g. no <|begin_of_text|> among its special tokens
            raise TokenizerError(f"{f}: {e}") from e

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """A checkpoint directory: tokenizer.json, plus bos/eos/pad/model_max_length from tokenizer_config.json."""
        if str(path).lower().endswith(".gguf"):  # the tokenizer inside a GGUF file (herd.formats.gguf_tokenizer)
            from herd.formats.gguf_tokenizer import read_tokenizer
            tok, kw = read_tokenizer(path, O200K_PATTERN)
            return cls(tok, **kw)
        root = Path(path)
        kw = {}
        cfg_file = root / "tokenizer_config.json"
        cfg = _read_config(_regular(cfg_file)) if os.path.lexists(cfg_file) else {}
        for key in ("bos_token", "eos_token", "pad_token"):
            v = cfg.get(key)
            if isinstance(v, dict):  # older files store AddedToken dicts
                v = v.get("content")
            if isinstance(v, str):
                kw[key] = v
        if isinstance(cfg.get("model_max_length"), int) and cfg["model_max_length"] < 1 << 40:
            kw["model_max_length"] = cfg["model_max_length"]
        # transformers 5 saves the template as chat_template.jinja; older files keep it in tokenizer_config.json
        jinja = root / "chat_template.jinja"
        if os.path.lexists(jinja):
            kw["chat_template"] = _regular(jinja).read_text()
        elif isinstance(cfg.get("chat_template"), str):
            kw["chat_template"] = cfg["chat_template"]
        return cls.from_file(root / "tokenizer.json", **kw)

    def save(self, path: str | os.PathLike) -> None:
        """tokenizer.json + tokenizer_config.json + special_tokens_map.json, loadable by transformers'
        `AutoTokenizer.from_pretrained` (as a `PreTrainedTokenizerFast`) and by `Tokenizer.from_pretrained`, and
        chat_template.jinja: this tokenizer's chat template, else herd's own (so `apply_chat_template` works)."""
        from herd.formats.chat_template import HERD_CHAT_TEMPLATE

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(root / "tokenizer.json"))
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        if self.pad_token is not None:
            tokens["pad_token"] = self.pad_token
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens, "clean_up_tokenization_spaces": False,
               "model_input_names": ["input_ids", "attention_mask"]}
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        (root / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (root / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
        (root / "chat_template.jinja").write_text(self.chat_template or HERD_CHAT_TEMPLATE)

    # ---- ids ------------------------------------------------------------------------------------------------------
    def special(self, name: str) -> int:
        """Id of a special token: '<|eot|>', 'eot', or a role of this tokenizer ('bos', 'eos', 'pad')."""
        roles = {"bos": self.bos_token, "eos": self.eos_token, "pad": self.pad_token}
        token = name if name.startswith("<|") else roles.get(name) or f"<|{name}|>"
        if token not in self.specials:
            raise KeyError(f"{token!r} is not a special token of this tokenizer")
        return self.specials[token]

    @property
    def vocab_size(self) -> int:
        """Ranks + added tokens. A model's embedding may be larger (202048 rows; transformers' converted file holds
        about 201135 ids)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.specials[self.bos_token]

    @property
    def eos_id(self) -> int:
        return self.specials[self.eos_token]

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.specials[self.pad_token]

    @property
    def stop_ids(self) -> list[int]:
        """Meta's stop tokens (end_of_text, eom, eot) present here, plus the configured eos."""
        ids = [self.specials[t] for t in STOP_TOKENS if t in self.specials]
        return ids + ([self.eos_id] if self.eos_id not in ids else [])

    # ---- text <-> ids ---------------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, allow_special: bool = False) -> list[int]:
        """BPE ids of `text` (no BOS unless bos=True). Special-token text is plain text unless allow_special=True."""
        ids = [self.bos_id] if bos else []
        if not allow_special or self._special_re is None:
            return ids + self._plain(text)
        pos = 0
        for m in self._special_re.finditer(text):  # split around special tokens, as the Rust added-vocab does
            ids += self._plain(text[pos:m.start()]) + [self.specials[m.group()]]
            pos = m.end()
        return ids + self._plain(text[pos:])

    def encode_batch(self, texts: list[str], bos: bool = False) -> list[list[int]]:
        """`encode` over many texts, in parallel threads (Rust)."""
        out = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return [[self.bos_id] + ids for ids in out] if bos else out

    def _plain(self, text: str) -> list[int]:
        # encode_batch, not encode: the tokenizers binding lets go of the GIL in encode_batch only, so a server thread
        # tokenizing a long prompt leaves the event loop (and every other request) running meanwhile.
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids if text else []

    @cached_property
    def max_token_bytes(self) -> int:
        """The longest BPE token, in bytes. Byte-level BPE with no normalizer (Llama 4's) splits the UTF-8 bytes
        of plain text into tokens of at most this many bytes, so n bytes are at least n / max_token_bytes tokens: a
        bound that refuses an over-long prompt before tokenizing it."""
        table = _byte_decoder()
        return max((len(s) if all(c in table for c in s) else len(s.encode())
                    for s in self._tok.get_vocab(with_added_tokens=False)), default=1)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, i: int) -> bytes:
        """The bytes one id stands for (special tokens: their UTF-8 text), as the ByteLevel decoder sees them."""
        b = self._bytes.get(i)
        if b is None:
            s = self._tok.id_to_token(i)
            if s is None:
                raise IndexError(f"token id {i} is outside the vocabulary ({self.vocab_size})")
            table = _byte_decoder()
            # Same rule as the Rust ByteLevel decoder: map every char back to its byte; if any char is not one of
            # the 256 stand-ins (an added token with other characters), take the token's UTF-8 text as is.
            b = bytes(table[c] for c in s) if all(c in table for c in s) else s.encode()
            self._bytes[i] = b
        return b

    def stream(self, skip_special: bool = False, keep: Iterable[str] = ()) -> StreamDecoder:
        return StreamDecoder(self, skip_special, keep)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, n_ranks={self.n_ranks}, specials={len(self.specials)})"


class StreamDecoder:
    """Incremental detokenization for streaming: `put(id)` returns only whole characters.

    A character can span several byte-level tokens (emoji, CJK), so bytes are held back until they form valid UTF-8
    (Python's incremental UTF-8 decoder). Bytes that can never become valid are replaced by U+FFFD, as `decode` does,
    so the concatenated output of all `put` calls plus `flush()` equals `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, keep: Iterable[str] = ()):
        """`skip_special`: drop the text of special tokens, except those named in `keep`."""
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        kept = {tokenizer.specials[t] for t in keep if t in tokenizer.specials}
        self._skip = set(tokenizer.specials.values()) - kept if skip_special else set()

    def put(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back at the end of the stream (U+FFFD for an unfinished character)."""
        return self._utf8.decode(b"", final=True)

    def decode_all(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield the non-empty pieces for `ids`, then the flushed tail."""
        for i in ids:
            if piece := self.put(i):
                yield piece
        if tail := self.flush():
            yield tail


# ---- training ------------------------------------------------------------------------------------------------------
def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _post_processor(bos_id: int) -> processors.PostProcessor:
    """BOS in front when add_special_tokens=True (transformers' default), like the converted Llama 4 file."""
    return processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None,
              min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts`; `vocab_size` counts the special tokens, appended after the ranks in order
    (default: the 1144 named Llama 4 tokens, so id = n_ranks + real offset). All 256 bytes are in the base
    alphabet, so any text round-trips."""
    special_tokens = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if BOS not in special_tokens or EOT not in special_tokens:
        raise ValueError(f"special_tokens must contain {BOS} and {EOT}")
    n_ranks = vocab_size - len(special_tokens)
    if n_ranks < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves {n_ranks} BPE ranks after {len(special_tokens)} special "
                         "tokens; byte-level BPE needs at least the 256 bytes")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_ranks, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    tok.model.ignore_merges = True  # tiktoken semantics: a pre-token already in the vocabulary is one token
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special_tokens])
    tok.post_processor = _post_processor(tok.token_to_id(BOS))
    return Tokenizer(tok, pad_token=PAD if PAD in special_tokens else None)


TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny-tokenizer"


def tiny_tokenizer() -> Tokenizer:
    """The shipped 2048-id tokenizer for the tiny presets (904 ranks + the 1144 named Llama 4 special tokens;
    trained by scripts/train_tiny_tokenizer.py)."""
    return Tokenizer.from_pretrained(TINY_TOKENIZER_DIR)
