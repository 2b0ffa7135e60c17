"""Stop conditions with the real tiny BPE tokenizer: stop ids, stop strings across token boundaries, holdback while
streaming, multi-byte characters split over tokens, finish reasons; streamed pieces always join to the final text.

    .venv/bin/python -m pytest tests/infer/test_stops.py -v
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herd.infer.sampling import SamplingParams
from herd.infer.stops import StopChecker
from herd.tokenizer import tiny_tokenizer

TOK = tiny_tokenizer()
EOT = TOK.special("eot")


pytestmark = pytest.mark.usefixtures("one_thread")


def run(ids: list[int], **kw) -> tuple[list[str], StopChecker]:
    """Feed ids until the checker finishes (or ids run out: then end it as the engine would, "length")."""
    kw.setdefault("max_new_tokens", 10_000)
    checker = StopChecker(SamplingParams(**kw), TOK)
    pieces = []
    for i in ids:
        pieces.append(checker.add(i))
        if checker.finished:
            break
    pieces.append(checker.finish())
    assert "".join(pieces) == checker.text
    return pieces, checker


def reference(ids: list[int], stop: tuple[str, ...] = (), max_new_tokens: int = 10_000,
              stop_token_ids: tuple[int, ...] = ()) -> tuple[str, str, int | str | None]:
    """The non-streamed answer, from whole-text decoding: (text, finish_reason, stop_reason)."""
    ids = ids[:max_new_tokens]
    stop_ids = set(TOK.stop_ids) | set(stop_token_ids)
    cut = next((n for n, i in enumerate(ids) if i in stop_ids), None)
    text = TOK.decode(ids if cut is None else ids[:cut], skip_special=True)
    for end in range(1, len(text) + 1):  # the first place where some stop string is complete
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return text[:end - len(s)], "stop", s
    return (text, "length", None) if cut is None else (text, "stop", ids[cut])


def per_char(text: str) -> list[int]:
    """Token ids of text encoded one character at a time: other boundaries than BPE's, same decoded text."""
    return [i for c in text for i in TOK.encode(c)]


# ---- stop tokens and length -----------------------------------------------------------------------------------------
def test_stop_token_ends_without_its_text():
    ids = TOK.encode("Hello world") + [EOT] + TOK.encode(" after")
    pieces, c = run(ids)
    assert c.text == "Hello world" and "<|eot|>" not in "".join(pieces)
    assert (c.finish_reason, c.stop_reason, c.n_tokens) == ("stop", EOT, len(TOK.encode("Hello world")) + 1)


def test_ignore_eos_keeps_going_but_explicit_stop_ids_still_stop():
    extra = TOK.encode("!")[0]
    ids = TOK.encode("a") + [EOT] + TOK.encode("b") + [extra] + TOK.encode("c")
    _, c = run(ids, ignore_eos=True, stop_token_ids=[extra])
    assert c.text == "ab" and c.stop_reason == extra  # eot is a special token: skipped from the text
    _, c = run(ids, ignore_eos=True)
    assert c.text == "ab!c" and c.finish_reason == "length"


def test_length_finish_and_a_character_cut_in_half():
    ids = TOK.encode("日本")  # 6 byte-level tokens
    assert len(ids) == 6
    pieces, c = run(ids, max_new_tokens=4)
    assert (c.finish_reason, c.stop_reason, c.n_tokens) == ("length", None, 4)
    assert c.text == TOK.decode(ids[:4]) == "日\ufffd"  # the unfinished second character, as decode shows it


def test_add_after_finish_is_an_error():
    _, c = run(TOK.encode("hi"), max_new_tokens=1)
    with pytest.raises(RuntimeError, match="finished"):
        c.add(5)
    assert c.finish() == ""


# ---- stop strings ---------------------------------------------------------------------------------------------------
def test_stop_string_straddling_tokens():
    text = "Hello world, the cat sat on the mat."
    ids = TOK.encode(text)
    pieces = [TOK.decode([i]) for i in ids]
    stop = " the m"  # ' the' + ' m' + ...: three token boundaries
    assert not any(stop in p for p in pieces)
    out, c = run(ids, stop=[stop])
    assert c.text == "Hello world, the cat sat on" and c.stop_reason == stop and c.finish_reason == "stop"
    assert c.n_tokens == ids.index(TOK.encode(" m")[0]) + 1  # stopped at the token that completed it


def test_held_back_text_is_never_streamed_before_the_stop():
    ids = TOK.encode("Hello world, the cat sat on the mat.")
    checker, final = StopChecker(SamplingParams(stop=["at on"]), TOK), "Hello world, the cat s"
    seen, steps = "", []
    for i in ids:
        steps.append(checker.add(i))
        seen += steps[-1]
        assert final.startswith(seen)  # the client never sees anything the final text does not have
        if checker.finished:
            break
    assert seen == checker.text == final
    assert steps[-2:] == ["", ""]  # 'at' held (it may begin "at on"), then ' on' completes the stop string


def test_held_back_text_is_released_when_the_match_fails():
    ids = TOK.encode("hello world war")
    checker = StopChecker(SamplingParams(stop=[" world peace"]), TOK)
    out = [checker.add(i) for i in ids]
    decoded = [TOK.decode([i]) for i in ids]
    held_at = decoded.index(" wor")
    assert out[held_at] == ""  # " wor" could begin " world peace"
    assert out[held_at + 1] == ""  # " world" still could
    assert out[held_at + 2].startswith(" world")  # " w" + ... rules it out: everything held comes out
    assert "".join(out) + checker.finish() == "hello world war" and checker.finish_reason == "length"


def test_multiple_stop_strings_first_in_the_text_wins():
    ids = TOK.encode("one two three four")
    _, c = run(ids, stop=["four", "two"])
    assert (c.text, c.stop_reason) == ("one ", "two")


@pytest.mark.parametrize("ids", [TOK.encode("xxabcdxx"), per_char("xxabcdxx")], ids=["bpe", "per-char"])
def test_overlapping_stop_strings_the_one_completed_first_wins(ids):
    _, c = run(ids, stop=["abcd", "bc"])  # "abcd" starts first, but "bc" is complete first
    assert (c.text, c.stop_reason) == ("xxa", "bc")
    _, c = run(ids, stop=["bc", "abc"])  # both complete at the same character: the longer one
    assert (c.text, c.stop_reason) == ("xx", "abc")


def test_overlapping_stop_strings_inside_one_token():
    ids = TOK.encode(" the cat")
    assert TOK.decode(ids[:1]) == " the"  # both stop strings arrive complete in the same piece
    _, c = run(ids, stop=["the", "h"])
    assert (c.text, c.stop_reason) == (" t", "h")


def test_stop_string_in_the_first_token():
    ids = TOK.encode("Hello there")
    assert TOK.decode(ids[:1]) == "H"
    _, c = run(ids, stop=["H"])
    assert (c.text, c.n_tokens, c.finish_reason) == ("", 1, "stop")
    _, c = run(TOK.encode(" the cat"), stop=["th"])  # ends mid-token: the rest of ' the' is dropped
    assert (c.text, c.n_tokens) == (" ", 1)


def test_stop_string_completed_by_the_last_allowed_token_is_a_stop():
    ids = TOK.encode("Hello world")
    _, c = run(ids, stop=["world"], max_new_tokens=len(ids))
    assert (c.text, c.finish_reason, c.stop_reason) == ("Hello ", "stop", "world")


def test_finish_from_outside_releases_held_text():
    checker = StopChecker(SamplingParams(stop=["cat!"]), TOK)
    out = "".join(checker.add(i) for i in TOK.encode("the ca"))
    assert out == "the " and checker.finish() == "ca" and checker.finish_reason == "length"


# ---- multi-byte characters ------------------------------------------------------------------------------------------
MULTI = "日本語のテキスト 👍🏽 café"


@pytest.mark.parametrize("stop", ["語の", "👍", "é", "テキストX", "🏽 c"])
def test_multibyte_stop_strings(stop):
    ids = TOK.encode(MULTI)
    pieces, c = run(ids, stop=[stop])
    assert (c.text, c.finish_reason, c.stop_reason) == reference(ids, (stop,))
    assert all("\ufffd" not in p for p in pieces)  # no piece ever split a character


def test_multibyte_partial_match_held_then_released():
    ids = TOK.encode(MULTI)
    pieces, c = run(ids, stop=["テキストX"])
    assert c.text == MULTI and c.finish_reason == "length"
    released = next(p for p in pieces if "テキスト" in p)
    assert released.startswith("テキスト")  # held back as a whole, released at once when " " came


# ---- property: any text, any stops, any token boundaries ------------------------------------------------------------
ALPHABET = "ab c.\n日本é👍"


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=30),
       stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=3),
       eot_at=st.one_of(st.none(), st.integers(0, 40)),
       max_new=st.integers(1, 60), split=st.booleans())
def test_streamed_pieces_join_to_the_reference_text(text, stops, eot_at, max_new, split):
    ids = per_char(text) if split else TOK.encode(text)
    if eot_at is not None:
        ids.insert(min(eot_at, len(ids)), EOT)
    pieces, c = run(ids, stop=stops, max_new_tokens=max_new)
    assert (c.text, c.finish_reason, c.stop_reason) == reference(ids, tuple(stops), max_new)
    assert "".join(pieces) == c.text
    assert c.n_tokens <= max_new


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, TOK.n_ranks - 1), max_size=25),
       stops=st.lists(st.text(alphabet="abe \ufffd", min_size=1, max_size=3), max_size=2))
def test_random_byte_tokens_including_broken_utf8(ids, stops):
    pieces, c = run(ids, stop=stops)
    assert (c.text, c.finish_reason, c.stop_reason) == reference(ids, tuple(stops))
    assert "".join(pieces) == c.text
