"""Tool-call parsing: both Llama 4 formats, prose before the calls, fences, unsafe or look-alike text kept as content,
the tools filter, and streaming == non-streaming on random splits.

    .venv/bin/python -m pytest tests/test_tools.py -v
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herd.tools import ParsedOutput, ToolCallStreamParser, finish_reason, parse_tool_calls

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "get_time")]


def calls(parsed: ParsedOutput) -> list[tuple[str, dict]]:
    """(name, decoded arguments) per call, after checking the OpenAI shape."""
    out = []
    for c in parsed.tool_calls:
        assert set(c) == {"id", "type", "function"} and c["type"] == "function" and c["id"].startswith("call_")
        assert set(c["function"]) == {"name", "arguments"} and isinstance(c["function"]["arguments"], str)
        out.append((c["function"]["name"], json.loads(c["function"]["arguments"])))
    return out


def stream(pieces: list[str], tools=None) -> tuple[str, list[dict], ParsedOutput]:
    """Streamed content (all deltas joined), the final tool-call deltas, and the parser's whole-message result."""
    parser = ToolCallStreamParser(tools)
    content = "".join(parser.feed(p).content for p in pieces)
    last = parser.finish()
    return content + last.content, last.tool_calls, parser.result


# ---- formats ---------------------------------------------------------------------------------------------------------
def test_pythonic_parallel_calls():
    p = parse_tool_calls("[get_weather(city=\"San Francisco\"), get_time(tz='UTC')]")
    assert p.content is None
    assert calls(p) == [("get_weather", {"city": "San Francisco"}), ("get_time", {"tz": "UTC"})]
    assert finish_reason(p) == "tool_calls"


def test_pythonic_in_python_markers_and_meta_examples():
    # The two Model Response examples of llama-models models/llama4/prompt_format.md, one wrapped as vLLM sees it.
    p = parse_tool_calls('<|python_start|>[get_weather(city="San Francisco"), get_weather(city="Seattle")]'
                         "<|python_end|>")
    assert p.content is None and calls(p) == [("get_weather", {"city": "San Francisco"}),
                                              ("get_weather", {"city": "Seattle"})]
    assert calls(parse_tool_calls("[get_user_info(user_id=7890, special='black')]")) == [
        ("get_user_info", {"user_id": 7890, "special": "black"})]


def test_nested_literal_arguments():
    src = ("[search(q='it\\'s \"quoted\"', n=-3, score=+1.5e2, flag=True, none=None, tags=['a', 'b'], "
           "pt=(1, 2), opts={'deep': {'xs': [1, [2, {'k': False}]]}}, doc='''multi\nline''')]")
    [(name, args)] = calls(parse_tool_calls(src))
    assert name == "search"
    assert args == {"q": "it's \"quoted\"", "n": -3, "score": 150.0, "flag": True, "none": None, "tags": ["a", "b"],
                    "pt": [1, 2], "opts": {"deep": {"xs": [1, [2, {"k": False}]]}}, "doc": "multi\nline"}


def test_dotted_names_comments_and_spacing():
    p = parse_tool_calls("[ weather.current (city='SF',  # the user's city\n units='metric'), ]")
    assert calls(p) == [("weather.current", {"city": "SF", "units": "metric"})]


def test_prose_before_the_call_becomes_content():
    p = parse_tool_calls("Sure, let me check. [get_weather(city='SF')]\n")
    assert p.content == "Sure, let me check." and calls(p) == [("get_weather", {"city": "SF"})]


@pytest.mark.parametrize("key", ["parameters", "arguments"])
def test_json_object(key):
    p = parse_tool_calls(f'{{"name": "get_weather", "{key}": {{"city": "SF", "days": [1, 2]}}}}')
    assert p.content is None and calls(p) == [("get_weather", {"city": "SF", "days": [1, 2]})]


def test_json_variants():
    # Meta's encode_tool_call adds "type"; OpenAI's shape carries arguments as a JSON string; lists of calls.
    p = parse_tool_calls('{"type": "function", "name": "f", "parameters": {}}')
    assert calls(p) == [("f", {})]
    assert calls(parse_tool_calls('{"name": "f", "arguments": "{\\"a\\": 1}"}')) == [("f", {"a": 1})]
    p = parse_tool_calls('I will call two.\n[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "arguments": {}}]')
    assert p.content == "I will call two." and calls(p) == [("a", {"x": 1}), ("b", {})]
    p = parse_tool_calls('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"y": null}}')
    assert calls(p) == [("a", {}), ("b", {"y": None})]
    # The raw output reported in vLLM #16214, markers included.
    p = parse_tool_calls('<|python_start|>{"name": "brave_web_search", "parameters": {"query": "latest news"}}'
                         "<|python_end|>")
    assert p.content is None and calls(p) == [("brave_web_search", {"query": "latest news"})]


def test_json_as_herd_chat_format_renders_it():
    """The assistant tool-call turn herd.chat writes (<|python_start|>...<|python_end|> then one JSON object per call,
    back to back) parses back to the same calls."""
    from herd.chat import format_chat
    from herd.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    sent = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "SF"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Checking.", "tool_calls": sent}]
    text = tok.decode(format_chat(msgs, tok, add_generation_prompt=False))
    turn = text.rsplit("<|header_end|>\n\n", 1)[1].removesuffix("<|eom|>")
    assert turn.startswith("<|python_start|>")
    p = parse_tool_calls(turn, TOOLS)
    assert p.content == "Checking." and calls(p) == [("get_weather", {"city": "SF"}), ("get_time", {"tz": "UTC"})]


@pytest.mark.parametrize("text", [
    'Here you go:\n```json\n{"name": "get_weather", "parameters": {"city": "SF"}}\n```',
    "Here you go:\n```python\n[get_weather(city='SF')]\n```\n",
    "Here you go: ```[get_weather(city='SF')]```",
])
def test_fenced(text):
    p = parse_tool_calls(text)
    assert p.content == "Here you go:" and calls(p) == [("get_weather", {"city": "SF"})]


# ---- what is not a tool call ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    '[os.system("rm -rf /")]',  # positional argument
    '[f(x=open("f"))]',  # a call as a value
    '[__import__("os").system(cmd="ls")]',  # the function is a call result
    "[f(x=__import__)]",  # a name as a value
    "[f(x=1+1)]", "[f(x=lambda: 0)]", "[f(x=[i for i in y])]", "[f(x=f'{y}')]", "[f(x=b'raw')]",
    "[f(**{'a': 1})]", "[f(x={**d})]", "[f(x={1: 'a'})]", "[f(x=1e999)]", "[f(x=...)]", "[f(x=-True)]",
    "[f(x=1), 'text']", "[getattr(o, 'x')()]", "[f(x=1)][0]",
    '{"name": "f", "parameters": {"x": NaN}}', '{"name": "f", "parameters": [1]}',
    '{"name": "f", "parameters": {}, "arguments": {}}', '{"name": "f"}', '{"name": "f", "parameters": {}, "x": 1}',
    '{"type": "tool", "name": "f", "parameters": {}}', '{"name": "rm -rf", "parameters": {}}',
])
def test_unsafe_or_invalid_code_stays_content(text):
    p = parse_tool_calls(text)
    assert p == ParsedOutput(text, []) and finish_reason(p) == "stop"


@pytest.mark.parametrize("text", [
    "The list [a, b] and the dict {x: 1}.", "See [the docs](https://example.com).", "[0, 1]", "[]",
    "[f(x=1)] and then some prose", "[f(x=1)", '{"result": 5}', "Use `ls` or ```bash\nls\n```",
    '{"name": "Alice", "age": 3}', "get_weather(city='SF')", "[get weather(city='SF')]", "",
])
def test_look_alikes_stay_content(text):
    assert parse_tool_calls(text) == ParsedOutput(text or None, [])


def test_unknown_function_names_with_a_tools_list():
    text = "[get_weather(city='SF'), delete_everything(really=True)]"
    assert parse_tool_calls(text, TOOLS) == ParsedOutput(text, [])  # all or nothing
    assert len(parse_tool_calls(text).tool_calls) == 2  # no list: any name
    assert calls(parse_tool_calls("[get_time(tz='UTC')]", TOOLS)) == [("get_time", {"tz": "UTC"})]
    assert calls(parse_tool_calls('{"name": "get_time", "parameters": {}}', ["get_time"])) == [("get_time", {})]
    assert parse_tool_calls('{"name": "nope", "parameters": {}}', TOOLS).tool_calls == []
    assert parse_tool_calls("[get_time()]", []).tool_calls == []


def test_ids_unique():
    text = "[" + ", ".join(f"f{i}(i={i})" for i in range(50)) + "]"
    ids = [c["id"] for _ in range(4) for c in parse_tool_calls(text).tool_calls]
    assert len(ids) == 200 == len(set(ids))


def test_finish_reason():
    assert finish_reason(ParsedOutput("hi")) == "stop" and finish_reason(ParsedOutput("hi"), "length") == "length"
    assert finish_reason(parse_tool_calls("[f()]"), "length") == "tool_calls"


# ---- Meta's other forms: function tags, built-in tools, <|python_start|> code ----------------------------------------
def test_function_tag():
    p = parse_tool_calls('Let me check. <function=get_weather>{"city": "Zürich"}</function>')
    assert p.content == "Let me check." and calls(p) == [("get_weather", {"city": "Zürich"})]
    p = parse_tool_calls('<function=get_weather>{"city": "SF"}</function>\n<function=get_time>{}</function>', TOOLS)
    assert p.content is None and calls(p) == [("get_weather", {"city": "SF"}), ("get_time", {})]
    assert calls(parse_tool_calls('<function=get_time>{"tz": "UTC"}')) == [("get_time", {"tz": "UTC"})]  # unclosed
    for text in ['<function=get_time>{"tz": "UTC"}</function> and more', '<function=get_time>[1]</function>',
                 '<function=get_time>{"tz": }</function>', "<function=get time>{}</function>",
                 '<function=get_time>{"a": 1}</function></function>']:
        assert parse_tool_calls(text) == ParsedOutput(text, []), text
    assert not parse_tool_calls("<function=rm_rf>{}</function>", TOOLS).tool_calls  # not in the tools list


def test_builtin_tool_convention():
    p = parse_tool_calls('Searching. brave_search.call(query="Llama 4 release date")')
    assert p.content == "Searching." and calls(p) == [("brave_search", {"query": "Llama 4 release date"})]
    assert calls(parse_tool_calls('wolfram_alpha.call(query="2+2")\n')) == [("wolfram_alpha", {"query": "2+2"})]
    for text in ['my_search.call(query="x")', 'brave_search.call(query=open("x"))', "brave_search.call(query)",
                 'xbrave_search.call(query="x")', 'brave_search.call(query="x") then']:
        assert not parse_tool_calls(text).tool_calls, text
    assert not parse_tool_calls('brave_search.call(query="x")', TOOLS).tool_calls  # not offered
    offered = TOOLS + [{"type": "function", "function": {"name": "brave_search"}}]
    assert calls(parse_tool_calls('brave_search.call(query="x")', offered)) == [("brave_search", {"query": "x"})]


def test_python_markers_as_code_interpreter_call():
    code = "import math\nprint(math.pi)"
    p = parse_tool_calls(f"<|python_start|>{code}<|python_end|>")
    assert p.content is None and calls(p) == [("code_interpreter", {"code": code})]
    p = parse_tool_calls(f"Computing.<|python_start|>{code}")  # stopped (eom) before <|python_end|>
    assert p.content == "Computing." and calls(p) == [("code_interpreter", {"code": code})]
    # a call inside the markers is that call; herd's own format (content in the markers, calls after) is unchanged
    inside = "<|python_start|>[get_time(tz='UTC')]<|python_end|>"
    assert calls(parse_tool_calls(inside)) == [("get_time", {"tz": "UTC"})]
    p = parse_tool_calls('<|python_start|>Checking.<|python_end|>{"name": "get_time", "parameters": {}}')
    assert p.content == "Checking." and calls(p) == [("get_time", {})]
    assert parse_tool_calls("<|python_start|>hi<|python_end|> there") == ParsedOutput("hi there", [])
    assert parse_tool_calls("<|python_start|> \n<|python_end|>") == ParsedOutput(" \n", [])  # no code
    assert not parse_tool_calls(f"<|python_start|>{code}", TOOLS).tool_calls  # code_interpreter not offered


@pytest.mark.parametrize("text,content,expected", [
    ('Sure. <function=get_time>{"tz": "UTC"}</function>', "Sure.", [("get_time", {"tz": "UTC"})]),
    ('Sure. brave_search.call(query="a b")', "Sure.", [("brave_search", {"query": "a b"})]),
    ("Sure.<|python_start|>print(1)\n<|python_end|>\n", "Sure.", [("code_interpreter", {"code": "print(1)\n"})]),
])
def test_meta_forms_stream_character_by_character(text, content, expected):
    streamed, deltas, result = stream(list(text))
    assert streamed == content and calls(result) == expected
    assert [(d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas] == expected
    parser = ToolCallStreamParser()
    assert parser.feed("Sure. b").content == "Sure."  # "b" may begin brave_search.call(: held
    assert parser.feed("ye.").content == " bye."  # released as soon as it cannot


# ---- streaming -----------------------------------------------------------------------------------------------------
def test_stream_sends_prose_and_holds_the_call():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("Sure, let me ").content == "Sure, let me"  # a trailing space waits: it may end the content
    assert parser.feed("check. [get_").content == " check."
    assert parser.feed("weather(city='SF')]").content == ""
    last = parser.finish()
    assert last.content == "" and finish_reason(parser.result) == "tool_calls"
    [delta] = last.tool_calls
    assert delta["index"] == 0 and delta["id"].startswith("call_") and delta["type"] == "function"
    assert delta["function"] == {"name": "get_weather", "arguments": '{"city": "SF"}'}


def test_stream_releases_a_candidate_once_it_cannot_be_a_call():
    parser = ToolCallStreamParser()
    assert parser.feed("See [note").content == "See"
    assert parser.feed("] here").content == " [note] here"
    parser = ToolCallStreamParser()
    assert parser.feed('{"res').content == '{"res'  # no call object has a key starting "res"
    parser = ToolCallStreamParser()
    assert parser.feed("x <|python_st").content == "x"  # may be a marker: held
    assert parser.feed("art|>[f(a=1)]").content == ""  # may be a call, or code for the code interpreter
    assert parser.feed("<|python_end|> y").content == " [f(a=1)] y"  # text after the markers: neither


def test_stream_handles_long_prose_piece_by_piece():
    text = "word [x] {y} `z` " * 500
    content, deltas, result = stream([text[i:i + 3] for i in range(0, len(text), 3)])
    assert content == text and deltas == [] and result.content == text


VALID = ["[get_weather(city='SF')]", '<function=get_time>{"tz": "UTC"}</function>', 'brave_search.call(query="q")',
         '<function=get_weather>{"c": [1]}</function>\n<function=get_time>{}', "<|python_start|>print(1)<|python_end|>",
         '[get_weather(city="S, F"), get_time(tz=\'U)TC\')]',
         '{"name": "get_time", "parameters": {"tz": "UTC"}}', '{"name": "get_weather", "arguments": "{\\"c\\": 1}"}',
         '[{"name": "get_time", "parameters": {}}]', "```json\n{\"name\": \"get_time\", \"parameters\": {}}\n```",
         "<|python_start|>[get_time(tz='''x\"y''')]<|python_end|>", "[unknown(a=1)]"]
NOISE = ["Sure, let me check.", " ", "\n", "[", "]", "{", "}", "(", ")", "`", "```", "```json\n", "'", '"', "'''",
         "\\", "#", ",", ";", "=", "x", "get_time(", "tz=", "<|python_start|>", "<|python_end|>", "<|pyth", "|>",
         "[note]", '{"name": ', '"parameters": {}}', '{"result": 1}', "[f(x)]", "[a, b]", "<function=", "</function>",
         "<function=get_time>", "brave", "brave_search.call(", 'query="x")', "<", ">", "b", "p"]
texts = st.one_of(
    st.lists(st.sampled_from(NOISE + VALID), max_size=10).map("".join),
    st.tuples(st.lists(st.sampled_from(NOISE), max_size=4).map("".join), st.sampled_from(VALID),
              st.sampled_from(["", " ", "\n\n"])).map("".join),
)


@settings(max_examples=400, deadline=None)
@given(text=texts, data=st.data(), with_tools=st.booleans())
def test_stream_equals_whole_for_random_splits(text, data, with_tools):
    tools = TOOLS if with_tools else None
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)], strict=True)]
    whole = parse_tool_calls(text, tools)
    content, deltas, result = stream(pieces, tools)
    assert content == (whole.content or "")
    assert result.content == whole.content and calls(result) == calls(whole)
    assert [(d["index"], d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas] == [
        (i, n, a) for i, (n, a) in enumerate(calls(whole))]
    assert [d["id"] for d in deltas] == [c["id"] for c in result.tool_calls]
