"""Chat style "meta": token-identical to Meta's reference ChatFormat (llama-models models/llama4/chat_format.py), run
here on Meta's own RawMessage objects with Meta's Tokenizer, against herd's rendering with the converted tokenizer.

    .venv/bin/python -m pytest tests/test_chat_meta.py -v
"""

from __future__ import annotations

import importlib
import io
import sys
import types

import pytest
import torch
from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem, ToolCall, ToolPromptFormat
from llama_models.llama4.args import Size, VisionArgs

from herd.chat import format_chat, meta_tool_call
from tests.formats.test_meta_tokenizer import meta_tokenizers


def _chat_format_class():
    """Meta's ChatFormat. Its module imports the image preprocessing, which needs torchvision (not a herd
    dependency); the tests replace the image transforms anyway, so a stand-in module serves when it is missing."""
    name = "llama_models.llama4.preprocess"
    if importlib.util.find_spec("torchvision") is None and name not in sys.modules:
        stub = types.ModuleType(name)
        stub.ResizeNormalizeImageTransform = stub.VariableSizeImageTransform = lambda *a, **k: None
        sys.modules[name] = stub
    return importlib.import_module("llama_models.llama4.chat_format").ChatFormat


@pytest.fixture(scope="module")
def pair():
    return meta_tokenizers()


def meta_ids(meta_tok, messages: list[RawMessage], fmt=ToolPromptFormat.json, layouts=()) -> list[int]:
    """Meta's encode_dialog_prompt. `layouts` gives each image's tile grid: Meta's image transform (which picks the
    grid from the pixels) is replaced by one returning that many blank tiles, so only the token layout is compared."""
    vision = VisionArgs(image_size=Size(height=336, width=336), patch_size=Size(height=14, width=14), dim=8,
                        n_layers=1, n_heads=1, mlp_ratio=1.0, output_dim=8, pixel_shuffle_ratio=0.5)
    chat = _chat_format_class()(meta_tok, vision_args=vision)
    grids = iter(layouts)

    def tiles(image, max_num_chunks):
        rows, cols = next(grids)
        return torch.zeros(rows * cols, 3, 336, 336), (rows, cols)

    chat.dynamic_image_transform = tiles
    chat.image_transform = lambda image: torch.zeros(3, 336, 336)
    return chat.encode_dialog_prompt(messages, fmt).tokens


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


def call(name: str, args: dict) -> dict:
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": args}}


def test_plain_system_and_multi_turn(pair):
    meta, tok = pair
    dialogs = [
        ([RawMessage(role="user", content="Hello!")], [{"role": "user", "content": "Hello!"}]),
        # the system prompt keeps its whitespace; "\n\n" is its own piece, so "\n\n\n" never forms across it
        ([RawMessage(role="system", content="  You are terse.\n"), RawMessage(role="user", content="\n2+2?")],
         [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "\n2+2?"}]),
        ([RawMessage(role="user", content="2+2?"), RawMessage(role="assistant", content="4"),
          RawMessage(role="user", content=[RawTextItem(text="And 3+3? Hel"), RawTextItem(text="lo")])],
         [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
          {"role": "user", "content": [{"type": "text", "text": "And 3+3? Hel"}, {"type": "text", "text": "lo"}]}]),
        ([RawMessage(role="system", content="多谢 👍🏽 "), RawMessage(role="user", content=" spaced  ")],
         [{"role": "developer", "content": "多谢 👍🏽 "}, {"role": "user", "content": " spaced  "}]),
    ]
    for ms, ours in dialogs:
        assert format_chat(ours, tok, style="meta") == meta_ids(meta, ms), ours
    # The parts are encoded apart: "Hel" + "lo" is not the BPE of "Hello" (herd's default style joins them).
    assert format_chat(dialogs[2][1], tok, style="meta") != format_chat(dialogs[2][1], tok)


WEATHER = {"city": "Zürich", "days": 2, "units": None, "hourly": True}


@pytest.mark.parametrize("fmt,tool_format", [(ToolPromptFormat.json, "json"),
                                             (ToolPromptFormat.python_list, "pythonic"),
                                             (ToolPromptFormat.function_tag, "function_tag")])
def test_tool_call_and_result(pair, fmt, tool_format):
    meta, tok = pair
    ms = [RawMessage(role="user", content="Weather in Zürich?"),
          RawMessage(role="assistant", content="", tool_calls=[
              ToolCall(call_id="c1", tool_name="get_weather", arguments=WEATHER)]),
          RawMessage(role="tool", content='{"temp": 21, "sky": "sunny"}'),
          RawMessage(role="assistant", content="Sunny, 21°C."), RawMessage(role="user", content="Thanks")]
    ours = [{"role": "user", "content": "Weather in Zürich?"},
            {"role": "assistant", "content": None, "tool_calls": [call("get_weather", WEATHER)]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21, "sky": "sunny"}'},
            {"role": "assistant", "content": "Sunny, 21°C."}, {"role": "user", "content": "Thanks"}]
    assert format_chat(ours, tok, style="meta", tool_format=tool_format) == meta_ids(meta, ms, fmt)
    text = tok.decode(format_chat(ours, tok, style="meta", tool_format=tool_format))
    assert "<|eom|><|header_start|>ipython<|header_end|>\n\n{\"temp\"" in text  # raw result, after a call's eom
    assert '"sky": "sunny"}<|eom|>' in text  # a tool result ends with eom too
    if tool_format == "json":
        assert '"Z\\u00fcrich"' in text  # json.dumps' ASCII escaping, as Meta's
    if tool_format == "pythonic":
        assert '[get_weather(city="Zürich", days=2, units=None, hourly=True)]' in text
    # OpenAI's JSON-string arguments render the same as the dict
    ours[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Zürich", "days": 2, "units": null, "hourly": true}'
    assert format_chat(ours, tok, style="meta", tool_format=tool_format) == meta_ids(meta, ms, fmt)


def test_content_before_calls_parallel_calls_and_builtin_tools(pair):
    meta, tok = pair
    calls = [ToolCall(call_id="a", tool_name="brave_search", arguments={"query": "llama 4 release"}),
             ToolCall(call_id="b", tool_name="code_interpreter", arguments={"code": "print(2 ** 10)\n"}),
             ToolCall(call_id="c", tool_name="get_time", arguments={"tz": "UTC"})]
    ms = [RawMessage(role="user", content="Search, compute, time."),
          RawMessage(role="assistant", content="Let me check.", tool_calls=calls),
          RawMessage(role="tool", content="1024")]
    ours = [{"role": "user", "content": "Search, compute, time."},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                call("brave_search", {"query": "llama 4 release"}),
                call("code_interpreter", {"code": "print(2 ** 10)\n"}), call("get_time", {"tz": "UTC"})]},
            {"role": "ipython", "content": "1024"}]
    for fmt, tool_format in [(ToolPromptFormat.json, "json"), (ToolPromptFormat.python_list, "pythonic")]:
        assert format_chat(ours, tok, style="meta", tool_format=tool_format) == meta_ids(meta, ms, fmt)
    assert meta_tool_call(call("wolfram_alpha", {"query": "2+2"})) == 'wolfram_alpha.call(query="2+2")'


def test_multi_image(pair):
    meta, tok = pair
    grids = [(1, 1), (2, 2), (1, 3)]
    img = png()
    ms = [RawMessage(role="user", content=[RawTextItem(text="Compare "), RawMediaItem(data=img),
                                           RawTextItem(text=" and "), RawMediaItem(data=img), RawTextItem(text=".")]),
          RawMessage(role="assistant", content="They differ."),
          RawMessage(role="user", content=[RawMediaItem(data=img), RawTextItem(text="And this wide one?")])]
    ours = [{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                         {"type": "text", "text": " and "}, {"type": "image"},
                                         {"type": "text", "text": "."}]},
            {"role": "assistant", "content": "They differ."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this wide one?"}]}]
    ids = format_chat(ours, tok, style="meta", image_grids=grids)
    assert ids == meta_ids(meta, ms, layouts=grids)
    assert ids.count(tok.special("patch")) == 144 * (1 + 5 + 4)
    assert ids.count(tok.special("tile_x_separator")) == 2 + 2 and ids.count(tok.special("tile_y_separator")) == 3


def test_bad_inputs_are_named(pair):
    _, tok = pair
    with pytest.raises(ValueError, match="tool_format must be one of"):
        format_chat([{"role": "user", "content": "x"}], tok, style="meta", tool_format="xml")
    with pytest.raises(ValueError, match="style must be one of"):
        format_chat([{"role": "user", "content": "x"}], tok, style="llama3")
    with pytest.raises(ValueError, match="tool result cannot hold images"):
        format_chat([{"role": "tool", "content": [{"type": "image"}]}], tok, style="meta", image_grids=[(1, 1)])
