"""Tokenizer: the special-token table against Meta's (llama-models models/llama4/tokenizer.py), round trips,
transformers compatibility, streaming decode.

    .venv/bin/python -m pytest tests/test_tokenizer.py -v
"""

from __future__ import annotations

import json
import sysconfig
import time
from functools import cache
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from herd.tokenizer import (
    NUM_SPECIAL_SLOTS,
    O200K_PATTERN,
    SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    llama4_special_tokens,
    tiny_tokenizer,
    train_bpe,
)

# O200K_PATTERN of Meta's models/llama4/tokenizer.py, character for character (a Python raw string).
META_PATTERN = r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

# The ids Meta's tokenizer gives the named special tokens, plus the edges of every reserved range.
REAL_IDS = {
    "<|begin_of_text|>": 200000, "<|end_of_text|>": 200001, "<|fim_prefix|>": 200002, "<|fim_middle|>": 200003,
    "<|fim_suffix|>": 200004, "<|header_start|>": 200005, "<|header_end|>": 200006, "<|eom|>": 200007,
    "<|eot|>": 200008, "<|step|>": 200009, "<|text_post_train_reserved_special_token_0|>": 200010,
    "<|text_post_train_reserved_special_token_5|>": 200015, "<|python_start|>": 200016, "<|python_end|>": 200017,
    "<|finetune_right_pad|>": 200018, "<|text_post_train_reserved_special_token_8|>": 200019,
    "<|text_post_train_reserved_special_token_68|>": 200079, "<|image_start|>": 200080, "<|image_end|>": 200081,
    "<|vision_reserved_special_token_0|>": 200082, "<|vision_reserved_special_token_1|>": 200083,
    "<|tile_x_separator|>": 200084, "<|tile_y_separator|>": 200085, "<|vision_reserved_special_token_2|>": 200086,
    "<|vision_reserved_special_token_5|>": 200089, "<|image|>": 200090, "<|vision_reserved_special_token_6|>": 200091,
    "<|patch|>": 200092, "<|vision_reserved_special_token_7|>": 200093,
    "<|vision_reserved_special_token_1047|>": 201133, "<|reasoning_reserved_special_token_0|>": 201134,
    "<|reasoning_reserved_special_token_7|>": 201141, "<|reasoning_thinking_start|>": 201142,
    "<|reasoning_thinking_end|>": 201143, "<|reserved_special_token_0|>": 201144,
    "<|reserved_special_token_903|>": 202047,
}

SAMPLES = ["", "Hello, world!", "  leading spaces\n\n\ttabs\r\nCRLF", "naïve café 123456789 I'm we'LL",
           "数学は楽しい。你好，世界",
           "emoji 👍🏽 family 👨‍👩‍👧 flag 🇫🇷", "e\u0301 a\u0308 combining", "<|eot|> is not special",
           "<|header_start|>user<|header_end|>\n\n", "x" * 300, "def f(x):\n    return x**2  # comment\n"]


@cache
def real_layout_tokenizer() -> Tokenizer:
    """The tiny BPE padded to 200000 ranks with tokens no text can produce (they hold a character outside the
    byte-level alphabet), then all 2048 real special slots: every special token at its real id. Builds in ~1 s."""
    d = json.loads(tiny_tokenizer()._tok.to_str())
    vocab = d["model"]["vocab"]
    vocab.update({f"\u2042{i}": i for i in range(len(vocab), 200000)})
    d["added_tokens"] = [{"id": 200000 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(llama4_special_tokens())]
    d["post_processor"] = None
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(d)))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


def test_special_token_table_matches_spec():
    assert len(SPECIAL_TOKENS) == 1144 and len(set(SPECIAL_TOKENS)) == 1144  # 5 + 75 + 1054 + 10
    full = llama4_special_tokens()
    assert len(full) == NUM_SPECIAL_SLOTS == 2048 and len(set(full)) == 2048
    real = real_layout_tokenizer()
    for name, i in REAL_IDS.items():
        assert real.special(name) == i, name
    assert real.bos_id == 200000 and real.eos_id == 200008 and real.pad_id == 200018
    assert real.stop_ids == [200001, 200007, 200008]
    assert real.encode("hi", bos=True)[0] == 200000


def test_tiny_tokenizer_layout(tok):
    # 904 ranks + the 1144 named tokens = the tiny presets' 2048; specials keep their real offsets from the first.
    assert tok.vocab_size == 2048 and tok.n_ranks == 904 and len(tok.specials) == 1144
    for name, i in REAL_IDS.items():
        if i - 200000 < len(SPECIAL_TOKENS):
            assert tok.special(name) == tok.n_ranks + i - 200000, name
    assert tok.special("eot") == tok.special("<|eot|>") == tok.eos_id
    assert tok.special("bos") == tok.bos_id and tok.special("pad") == tok.pad_id
    assert tok.stop_ids == [tok.special(n) for n in ("end_of_text", "eom", "eot")]
    # Every id's bytes agree with the Rust ByteLevel decoder (what StreamDecoder relies on).
    assert all(tok.token_bytes(i).decode(errors="replace") == tok.decode([i]) for i in range(tok.vocab_size))
    with pytest.raises(KeyError):
        tok.special("<|reserved_special_token_0|>")  # the tiny file carries only the named tokens


def test_pre_tokenizer_regex_is_the_spec_string(tok, tmp_path):
    assert O200K_PATTERN == META_PATTERN
    tok.save(tmp_path)
    pre = json.loads((tmp_path / "tokenizer.json").read_text())["pre_tokenizer"]
    split, byte_level = pre["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"]["Regex"] == META_PATTERN and split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and byte_level["use_regex"] is False


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_samples(tok, text):
    ids = tok.encode(text)
    assert all(i < tok.n_ranks for i in ids)  # special-looking text stays BPE: no injected control tokens
    assert tok.decode(ids) == text
    assert tok.encode(text, bos=True) == [tok.bos_id] + ids
    assert tok.encode_batch([text, text], bos=True) == [[tok.bos_id] + ids] * 2


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=80) | st.lists(st.sampled_from(
    ["<|eot|>", "<|begin_of_text|>", "<|patch|>", "<|", "|>", "👍🏽", "数", "e\u0301", "\n", " ", "\r\n", "'s", "ab"]),
    max_size=12).map("".join))
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(i < tok.n_ranks for i in ids)


def test_allow_special_parses_special_text(tok):
    ids = tok.encode("a<|eot|>b<|image|>", allow_special=True)
    assert ids == tok.encode("a") + [tok.special("eot")] + tok.encode("b") + [tok.special("image")]
    assert tok.decode(ids) == "a<|eot|>b<|image|>"
    assert tok.decode(ids, skip_special=True) == "ab"


def test_transformers_loads_the_saved_tokenizer(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.save(tmp_path)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.bos_token == "<|begin_of_text|>" and auto.eos_token == "<|eot|>"
    assert auto.pad_token == "<|finetune_right_pad|>"
    assert len(auto) == tok.vocab_size
    for text in SAMPLES:
        if "<|" in text:  # transformers parses special-token text by default; herd only with allow_special
            assert auto.encode(text, add_special_tokens=False) == tok.encode(text, allow_special=True)
            assert auto(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tok.encode(text)
            continue
        for hf in (fast, auto):
            assert hf.encode(text) == tok.encode(text, bos=True), text  # the post-processor adds BOS
            assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert auto.decode(tok.encode(text)) == text
    again = Tokenizer.from_pretrained(tmp_path)
    assert (again.bos_id, again.eos_id, again.pad_id, again.stop_ids) == (tok.bos_id, tok.eos_id, tok.pad_id,
                                                                          tok.stop_ids)


def test_from_pretrained_reads_hf_style_config(tok, tmp_path):
    # transformers' converted Llama 4 files: AddedToken dicts, eos <|eot|>, and a pad name that does not exist.
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|end_of_text|>",
        "pad_token": "<|finetune_right_pad_id|>", "model_max_length": 10485760}))
    t = Tokenizer.from_pretrained(tmp_path)
    assert t.eos_id == t.special("end_of_text") and t.pad_id == t.special("finetune_right_pad")
    assert t.model_max_length == 10485760


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=60))
def test_stream_decoder_yields_whole_characters(tok, text):
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.put(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text == tok.decode(ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)  # nothing was emitted half-finished


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2047), max_size=40), st.booleans())
def test_stream_decoder_equals_decode_on_any_ids(tok, ids, skip):
    # Arbitrary ids can form invalid UTF-8; both sides then agree on the U+FFFD replacements.
    assert "".join(tok.stream(skip_special=skip).decode_all(ids)) == tok.decode(ids, skip_special=skip)


def test_stream_holds_back_a_split_character(tok):
    ids = tok.encode("👍")  # 4 bytes; the tiny vocabulary has no such merge
    assert len(ids) > 1
    dec = tok.stream()
    assert [dec.put(i) for i in ids] == [""] * (len(ids) - 1) + ["👍"]


def _stdlib_text(n_bytes: int) -> list[str]:
    out, n = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out.append(p.read_text(encoding="utf-8", errors="replace"))
        n += len(out[-1])
        if n >= n_bytes:
            break
    return out


def test_train_bpe_on_1mb_is_fast_and_faithful():
    texts = _stdlib_text(1_000_000)
    t0 = time.perf_counter()
    tok = train_bpe(texts, vocab_size=4096)
    elapsed = time.perf_counter() - t0
    print(f"train_bpe: {sum(map(len, texts)) / 1e6:.2f} MB, vocab 4096, {elapsed:.2f} s")
    assert elapsed < 30
    assert tok.vocab_size == 4096 and tok.n_ranks == 4096 - 1144 and tok.bos_id == tok.n_ranks
    assert tok.decode(tok.encode(texts[0][:5000])) == texts[0][:5000]
    with pytest.raises(ValueError):
        train_bpe(texts[:1], vocab_size=1144 + 100)  # fewer ranks than the 256 bytes
