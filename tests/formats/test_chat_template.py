"""herd's chat format as a Jinja chat template: transformers' apply_chat_template renders herd's ids from a saved
tokenizer, other templates render through the sandbox, and `herd serve --chat-template FILE` uses one.

    .venv/bin/python -m pytest tests/formats/test_chat_template.py -v
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from herd.chat import format_chat, prepare_chat
from herd.formats.chat_template import HERD_CHAT_TEMPLATE, TemplateError, load_template, render_text
from herd.tokenizer import Tokenizer, tiny_tokenizer
from tests.serve.server_process import ServerProcess, init_checkpoint
from tests.test_chat import GRIDS, WEATHER_TOOL, multi_image_conversation

CASES = [
    ([{"role": "user", "content": "Hello!"}], {}),
    ([{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "\n  leading whitespace"},
      {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "多谢 "},
                                                                           {"type": "text", "text": "👍🏽"}]}], {}),
    ([{"role": "developer", "content": [{"type": "text", "text": " Terse. "}]}, {"role": "user", "content": "2+2?"}],
     {}),
    ([{"role": "user", "content": "Weather?"},
      {"role": "assistant", "content": "Checking.", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}},
          {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
      {"role": "tool", "content": "rain"}, {"role": "tool", "content": {"time": "12:00"}},
      {"role": "assistant", "content": "Rainy at noon.", "tool_calls": []}], {}),
    ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": " Weather in Oslo? "}],
     {"tools": [WEATHER_TOOL]}),
    (multi_image_conversation("image"), {"image_grids": GRIDS}),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny tokenizer saved as an export writes it, and transformers' tokenizer read from there."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer().save(path)
    return Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("add_prompt", [True, False])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_transformers_renders_herds_ids(saved, case, add_prompt):
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    tok, hf = saved
    msgs, kw = CASES[case]
    text = hf.apply_chat_template(msgs, tools=kw.get("tools"), tokenize=False, add_generation_prompt=add_prompt)
    pieces = text.split("<|image|>")  # what Llama4Processor does with each image placeholder
    grids = kw.get("image_grids", [])
    assert len(pieces) == len(grids) + 1
    text = pieces[0] + "".join(Llama4Processor._prompt_split_image(None, g, 144) + p
                               for g, p in zip(grids, pieces[1:], strict=True))
    ours = format_chat(msgs, tok, add_generation_prompt=add_prompt, **kw)
    assert hf.encode(text, add_special_tokens=False) == ours
    assert format_chat(msgs, tok, add_generation_prompt=add_prompt, template=HERD_CHAT_TEMPLATE, **kw) == ours


def test_saved_tokenizer_carries_a_template_and_keeps_its_own(saved, tmp_path):
    tok, hf = saved
    assert tok.chat_template == HERD_CHAT_TEMPLATE and hf.chat_template == HERD_CHAT_TEMPLATE
    ids = hf.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == format_chat([{"role": "user", "content": "Hi"}], tok)
    own = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    tok.chat_template = own
    tok.save(tmp_path / "a")
    assert Tokenizer.from_pretrained(tmp_path / "a").chat_template == own  # a checkpoint's own template survives
    (tmp_path / "a" / "chat_template.jinja").unlink()  # older files: tokenizer_config.json's "chat_template"
    cfg = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": own}))
    assert Tokenizer.from_pretrained(tmp_path / "a").chat_template == own
    tok.chat_template = HERD_CHAT_TEMPLATE


def test_another_format_through_a_template(tmp_path):
    tok = tiny_tokenizer()
    chatml = ("{% for m in messages %}<|header_start|>{{ m.role }}<|header_end|>{{ m.content }}<|eot|>{% endfor %}"
              "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>{% endif %}")
    f = tmp_path / "t.jinja"
    f.write_text(chatml)
    template = load_template(str(f), None)
    msgs = [{"role": "user", "content": "Hi <|eot|> there"}]
    ids, batch = prepare_chat(msgs, tok, template=template)
    assert batch is None and ids == tok.encode("<|header_start|>user<|header_end|>Hi <|eot|> there<|eot|>"
                                               "<|header_start|>assistant<|header_end|>", allow_special=True)
    with pytest.raises(TemplateError, match="no chat template"):
        load_template("checkpoint", None)
    assert load_template("checkpoint", chatml) == chatml and load_template(None, chatml) is None
    with pytest.raises(TemplateError, match="cannot read"):
        load_template(str(tmp_path / "missing.jinja"), None)
    f.write_text("{% for m in messages %}")
    with pytest.raises(TemplateError, match="t.jinja"):
        load_template(str(f), None)
    with pytest.raises(TemplateError, match="unsafe|access"):  # the sandbox: no attribute walks to Python internals
        render_text("{{ messages.__class__.__mro__[1].__subclasses__() }}", msgs)
    with pytest.raises(TemplateError, match="tools go into the first user message"):
        render_text(HERD_CHAT_TEMPLATE, [], tools=[WEATHER_TOOL])
    with pytest.raises(TemplateError, match="placeholders"):
        format_chat([{"role": "user", "content": [{"type": "image"}]}], tok, template=chatml, image_grids=[(1, 1)])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_terminal_chat_uses_the_template(ckpt, tmp_path, capsys):
    from herd.cli import main
    from herd.formats.hf import from_pretrained
    from herd.terminal_chat import Session, reply

    template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    model, tok = from_pretrained(ckpt).eval(), Tokenizer.from_pretrained(ckpt)
    session = Session(chat_template=template)
    session.settings["max_new_tokens"] = 4096  # refused before generating; the message counts the prompt's tokens
    n = len(format_chat([{"role": "user", "content": "hi"}], tok, template=template))
    with pytest.raises(ValueError, match=f"the conversation is {n} tokens"):
        reply(model, tok, session, "hi")
    assert main(["chat", "--model", str(ckpt), "--chat-template", str(tmp_path / "none.jinja")]) == 2
    assert "none.jinja: cannot read it" in capsys.readouterr().err
    from herd.config import ConfigError
    from herd.serve.serve_config import ServeConfig

    with pytest.raises(ConfigError, match="chat_template .* is not a file"):  # `herd serve` refuses it before loading
        ServeConfig(model=str(ckpt), chat_template=str(tmp_path / "none.jinja"))


def test_serve_uses_chat_template_file(ckpt, tmp_path):
    f = tmp_path / "other.jinja"
    f.write_text("{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    msgs = [{"role": "user", "content": "Hello there"}]
    expected = len(format_chat(msgs, tiny_tokenizer(), template=f.read_text()))
    assert expected != len(format_chat(msgs, tiny_tokenizer()))
    with ServerProcess(ckpt, "--name", "tiny", "--chat-template", str(f)) as srv:
        body = json.dumps({"model": "tiny", "messages": msgs, "max_tokens": 1}).encode()
        req = urllib.request.Request(f"{srv.base}/v1/chat/completions", body, {"Content-Type": "application/json"})
        usage = json.loads(urllib.request.urlopen(req, timeout=60).read())["usage"]
    assert usage["prompt_tokens"] == expected
