"""Meta's tiktoken tokenizer.model -> tokenizer.json: ids identical to Meta's own Tokenizer (llama-models), read by
herd and by transformers, and the `herd tokenizer convert` command.

    .venv/bin/python -m pytest tests/formats/test_meta_tokenizer.py -v
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest

from herd.cli import main
from herd.formats.meta_tokenizer import convert_tiktoken, load_tiktoken_ranks
from herd.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n", 'print("a\\tb"); x = {"k": [1, 2, 3]}',
    "1234567890 3.14159 -42 1e-9 2026-12-07", "a   b\t\t\n\n\n  c    ", "  leading and trailing  ", "\r\n\r\nwin\r\n",
    "日本語のテキスト、中文文本。한국어 텍스트", "emoji 👍🏽🎉 family 👨\u200d👩\u200d👧 flags 🇫🇷",
    "Ünïcödé çàfé naïve e\u0301",
    "I'm you're they'LL we'VE it'S", "x" * 300, "🙂" * 40, "\u00a0nbsp\u2003em\u3000ideographic", "Ǆǅǆ ǈ ﬁ Ω ß",
    "<|eot|> <|begin_of_text|>header <|header_start|>user<|header_end|>", "",
]


@functools.cache
def meta_tokenizers() -> tuple:
    """(Meta's llama_models Tokenizer, herd's conversion) of the tokenizer.model the llama-models wheel ships.
    Cached: converting 200k ranks takes seconds, and tests/test_chat_meta.py shares it."""
    import llama_models.llama4 as l4
    from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

    path = Path(l4.__file__).parent / "tokenizer.model"
    return MetaTokenizer(path), convert_tiktoken(path)


@pytest.fixture(scope="module")
def pair():
    return meta_tokenizers()


def test_ids_equal_meta_on_varied_text(pair):
    meta, tok = pair
    for s in TEXTS:
        assert tok.encode(s) == meta.encode(s, bos=False, eos=False), s
        assert tok.decode(tok.encode(s)) == s
    rng = random.Random(0)  # random mixes of the classes the split regex and the merges treat differently
    alphabet = list("abcXYZ 019\n\t'.,;:!?()[]{}-_/\\\"") + list("éß中日👍🏽\u200d\u0301ǅ\r\u00a0Ωﬁ")
    for _ in range(500):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        assert tok.encode(s) == meta.encode(s, bos=False, eos=False), repr(s)


def test_special_tokens_have_metas_ids(pair):
    meta, tok = pair
    assert tok.n_ranks == 200000 and tok.vocab_size == meta.n_words == 202048
    assert {name: tok.special(name) for name in meta.special_tokens} == meta.special_tokens
    assert tok.bos_id == meta.bos_id and tok.pad_id == meta.pad_id and tok.special("eot") == meta.eot_id
    assert sorted(tok.stop_ids) == sorted(meta.stop_tokens)
    s = "<|header_start|>user<|header_end|>\n\nhi<|eot|>"
    assert tok.encode(s, allow_special=True) == meta.encode(s, bos=False, eos=False, allowed_special="all")
    # As plain text (Meta's default, disallowed_special=()), special-token strings are ordinary BPE: no injection.
    assert tok.encode(s) == meta.encode(s, bos=False, eos=False) and 200008 not in tok.encode(s)
    assert tok.decode(meta.encode(s, bos=True, eos=False, allowed_special="all")) == "<|begin_of_text|>" + s


def test_transformers_reads_the_converted_files(pair, tmp_path):
    from transformers import AutoTokenizer

    meta, tok = pair
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for s in TEXTS:  # transformers parses special-token text as the tokens (tiktoken's allowed_special="all")
        assert hf.encode(s, add_special_tokens=False) == meta.encode(s, bos=False, eos=False, allowed_special="all"), s
    assert hf.encode("hi") == meta.encode("hi", bos=True, eos=False)  # the BOS post-processor, as Meta's bos=True
    assert hf.convert_tokens_to_ids("<|eot|>") == meta.eot_id and hf.eos_token == "<|eot|>"
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.encode(TEXTS[8]) == tok.encode(TEXTS[8]) and again.vocab_size == 202048


def test_cli_convert(pair, tmp_path, capsys):
    import llama_models.llama4 as l4

    src = Path(l4.__file__).parent / "tokenizer.model"
    assert main(["tokenizer", "convert", "--from", str(src), "--out", str(tmp_path / "tok")]) == 0
    assert "202048" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|begin_of_text|>"
    meta, _ = pair
    assert Tokenizer.from_pretrained(tmp_path / "tok").encode(TEXTS[2]) == meta.encode(TEXTS[2], bos=False, eos=False)


def test_bad_files_are_refused_with_what_to_pass(tmp_path, capsys):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not-base64! 0\n")
    with pytest.raises(TokenizerError, match="BASE64 RANK|base64"):
        load_tiktoken_ranks(bad)
    bad.write_bytes(b"\x00\xff binary sentencepiece")
    with pytest.raises(TokenizerError, match="not a tiktoken text file"):
        load_tiktoken_ranks(bad)
    bad.write_text("YQ== 0\nYg== 2\n")  # ranks 0 and 2: a gap
    with pytest.raises(TokenizerError, match="ranks are not"):
        load_tiktoken_ranks(bad)
    bad.write_text("YQ== 0\n")  # only "a": the other bytes could never be encoded
    with pytest.raises(TokenizerError, match="no rank"):
        load_tiktoken_ranks(bad)
    assert main(["tokenizer", "convert", "--from", str(tmp_path / "missing.model"), "--out", str(tmp_path)]) == 2
    assert "missing.model" in capsys.readouterr().err
