"""Llama 4 chat format: OpenAI-style messages in, token ids out (text, tool calls, tool results and images).

Layout (meta-llama/llama-models models/llama4/prompt_format.md): `<|begin_of_text|>`, then per turn
`<|header_start|>{role}<|header_end|>\n\n{content}<|eot|>`,
roles system / user / assistant / ipython (OpenAI's "tool"; OpenAI's newer "developer" is the system role), and with
add_generation_prompt the open assistant header.

Design
- Three styles. The default "herd" is transformers' Llama 4 chat template (models/llama4/processing_llama4.py) token
  for token, as its processor expands it, except that an assistant turn that made tool calls ends with `<|eom|>`
  (end of message: a tool result follows), as Meta's reference does; "transformers" is the template exactly
  (`<|eot|>` everywhere). "meta" is Meta's reference `ChatFormat` (llama-models models/llama4/chat_format.py), see
  below. In every style special tokens are inserted as ids, never parsed out of text: a user who types "<|eot|>"
  gets the BPE of those characters, not a turn end.
- "herd" / "transformers": text between two control tokens is encoded as one string, because that is what
  tokenizing the rendered template does (it decides how "\n\n" joins the content). Every turn ends with `<|eot|>`,
  ipython turns included (vLLM's template ends those with `<|eom|>`). An assistant tool-call turn
  is `<|python_start|>{content}<|python_end|>` followed by `{"name": NAME, "parameters": ARGS-JSON}` per call. A tool
  result is rendered as JSON (a plain string becomes a quoted JSON string, as in transformers' and vLLM's templates).
  The system prompt (first message only) is stripped. With `tools`, the function specs go into the first user
  message under the template's fixed preamble and the system prompt gains "Environment: ipython\n".
- Deliberate differences from the template, all in inputs it mishandles: OpenAI's JSON-string `arguments` are parsed
  (the template would double-encode them), and an empty or null `tool_calls` is an ordinary message (the template
  drops it or fails).
- Images (as transformers' `Llama4Processor` expands them): every image part becomes `<|image_start|>`, its tiles'
  `<|patch|>` runs row by row with
  `<|tile_x_separator|>` between columns and `<|tile_y_separator|>` after each row, then `<|image|>` + the thumbnail's
  patches + `<|image_end|>`; a 1x1 image has no tiles part. The grid of each image comes from image preprocessing
  (`herd.image`), passed in as `image_grids`; `prepare_chat` runs the preprocessing too. Meta's `_encode_image`
  lays images out the same way.
- "meta", as `ChatFormat.encode_dialog_prompt` does it: every piece is encoded on its own (the role, the header's
  "\n\n", each content part, each tool call), so BPE never merges across them; system prompts are kept verbatim;
  an assistant tool call is the bare call text after the content, `{"type": "function", "name": .., "parameters":
  ..}` (json.dumps, ASCII-escaped), `[f(a=1)]` (tool_format="pythonic", Meta's value formatting: strings quoted
  as is) or `<function=f>{..}</function>` (tool_format="function_tag"); Meta's built-in tools are
  `brave_search.call(query="..")` (also wolfram_alpha, photogen) and code_interpreter's bare code. Tool-call turns
  and tool results (raw text, header "ipython") end with `<|eom|>`. Meta's ChatFormat renders no tool
  definitions; with `tools`, herd adds the template's preamble block as in the other styles.
- `template=`: a Jinja chat template (herd.formats.chat_template) renders the conversation instead, for fine-tunes
  trained on another format; its text is tokenized with special tokens parsed, `<|image|>` laid out as above.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from typing import Any

from herd.tokenizer import Tokenizer

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "ipython",
         "ipython": "ipython"}
# The fixed preamble of transformers' Llama 4 template for tools in the first user message.
TOOLS_PREAMBLE = ("Given the following functions, please respond with a JSON for a function call with its proper "
                  "arguments that best answers the given prompt.\n\n"
                  'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
                  'value}.Do not use variables.\n\n')


def image_tokens(tokenizer: Tokenizer, rows: int, cols: int, tokens_per_tile: int = 144) -> list[int]:
    """The ids one image of `rows` x `cols` tiles becomes (147 for 1x1, 145*rows*cols + 147 otherwise at 144)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"image grid must be at least 1x1, got {rows}x{cols}")
    sp = tokenizer.special
    patches = [sp("patch")] * tokens_per_tile
    ids = [sp("image_start")]
    if rows * cols > 1:  # the tiles; a single-tile image is only the "global" part below
        for _ in range(rows):
            for c in range(cols):
                ids += patches
                if c < cols - 1:
                    ids.append(sp("tile_x_separator"))
            ids.append(sp("tile_y_separator"))
    return ids + [sp("image")] + patches + [sp("image_end")]


def _image_source(part: dict) -> Any:
    """Where an image part's pixels live: a URL / data URL / path (OpenAI "image_url"), or HF-style keys."""
    if part["type"] == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    return None  # a bare {"type": "image"}: the caller supplies the image and its grid


def _parts(content: Any) -> list[tuple[str, Any]]:
    """Content as [("text", str) | ("image", source)]: a string, None, or a list of OpenAI / HF parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [("text", content)]
    out = []
    for part in content:
        if isinstance(part, str):
            out.append(("text", part))
        elif part.get("type") == "text":
            out.append(("text", part["text"]))
        elif part.get("type") in ("image", "image_url"):
            out.append(("image", _image_source(part)))
        else:
            raise ValueError(f"unsupported content part type {part.get('type')!r}")
    return out


def collect_images(messages: Sequence[dict]) -> list[Any]:
    """Image sources in the order their tokens appear, for `herd.image.preprocess` (None for a bare image part)."""
    return [src for m in messages if ROLES.get(m.get("role")) != "ipython" for kind, src in _parts(m.get("content"))
            if kind == "image"]


class _Ids:
    """Token ids under construction: text is buffered and encoded in one piece up to the next control token."""

    def __init__(self, tokenizer: Tokenizer, grids: list, tokens_per_tile: int, separate: bool = False):
        self.tok, self.grids, self.tokens_per_tile = tokenizer, grids, tokens_per_tile
        self.separate = separate  # Meta's ChatFormat: each piece is encoded on its own, never joined to the next
        self.ids: list[int] = []
        self._text: list[str] = []
        self.n_images = 0

    def text(self, s: str) -> None:
        self._text.append(s)
        if self.separate:
            self.flush()

    def special(self, name: str) -> None:
        self.flush()
        self.ids.append(self.tok.special(name))

    def image(self) -> None:
        if self.n_images >= len(self.grids):
            raise ValueError(f"the messages hold more images than the {len(self.grids)} grids given "
                             "(pass image_grids from herd.image.preprocess, or use prepare_chat)")
        rows, cols = self.grids[self.n_images]
        self.flush()
        self.ids += image_tokens(self.tok, rows, cols, self.tokens_per_tile)
        self.n_images += 1

    def header(self, role: str) -> None:
        self.special("header_start")
        self.text(role)
        self.special("header_end")
        self.text("\n\n")

    def content(self, content: Any, strip: bool = False) -> None:
        parts = _parts(content)
        if strip and isinstance(content, str):
            parts = [("text", content.strip())]
        for kind, value in parts:
            if kind == "text":
                self.text(value)
            else:
                self.image()

    def flush(self) -> None:
        if self._text:
            self.ids += self.tok.encode("".join(self._text))
            self._text = []


def _call(call: dict) -> tuple[str, Any]:
    """(name, arguments) of one OpenAI tool call; arguments parsed if they are a JSON string."""
    fn = call.get("function", call)
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call {fn.get('name')!r} has arguments that are not JSON: {args!r}") from e
    return fn["name"], args


def _tool_call_json(call: dict) -> str:
    """One OpenAI tool call as the template's `{"name": ..., "parameters": ...}` (arguments parsed if a string)."""
    name, args = _call(call)
    # The name goes in verbatim and the arguments through json.dumps(ensure_ascii=False): the template's tojson.
    return '{"name": "' + name + '", "parameters": ' + json.dumps(args, ensure_ascii=False) + "}"


BUILTIN_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")  # Meta's BuiltinTool, bar code_interpreter
TOOL_FORMATS = ("json", "pythonic", "function_tag")


def _meta_value(v: Any) -> str:
    """A pythonic argument value as Meta's ToolUtils.encode_tool_call writes it (strings quoted, not escaped)."""
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (int, float, bool)) or v is None:
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(_meta_value, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_meta_value(x)}" for k, x in v.items()) + "}"
    raise ValueError(f"a pythonic tool call cannot hold a {type(v).__name__} argument")


def meta_tool_call(call: dict, tool_format: str = "json") -> str:
    """One OpenAI tool call as the text Meta's ChatFormat puts after an assistant header (ToolUtils.encode_tool_call,
    llama-models models/llama3/tool_utils.py)."""
    name, args = _call(call)
    if name in BUILTIN_QUERY_TOOLS:
        return f'{name}.call(query="{args["query"]}")'
    if name == "code_interpreter":
        return args["code"]
    if tool_format == "json":  # json.dumps defaults: ASCII escapes, ", " and ": " separators
        return json.dumps({"type": "function", "name": name, "parameters": args})
    if tool_format == "function_tag":
        return f"<function={name}>{json.dumps(args)}</function>"
    return f"[{name}(" + ", ".join(f"{k}={_meta_value(v)}" for k, v in args.items()) + ")]"


def _system_text(content: Any) -> str:
    parts = _parts(content)
    if any(kind == "image" for kind, _ in parts):
        raise ValueError("a system message cannot hold images")
    return "".join(v for _, v in parts).strip()


def _meta_turn(out: _Ids, role: str, m: dict, tool_format: str) -> None:
    """One message as Meta's ChatFormat.encode_message renders it (out encodes every piece separately)."""
    out.header(role)
    calls = m.get("tool_calls") if role == "assistant" else None
    c = m.get("content")
    if role != "ipython" or isinstance(c, (str, list)) or c is None:
        if role == "ipython" and any(kind == "image" for kind, _ in _parts(c)):
            raise ValueError("a tool result cannot hold images")
        out.content(c)
    else:  # a structured result (dict, number): its JSON text
        out.text(json.dumps(c, ensure_ascii=False))
    for call in calls or []:
        out.text(meta_tool_call(call, tool_format))
    out.special("eom" if calls or role == "ipython" else "eot")


def _turn(out: _Ids, m: dict, style: str, tool_format: str = "json") -> None:
    role = ROLES.get(m.get("role"))
    if role is None:
        raise ValueError(f"unknown role {m.get('role')!r}; use one of {sorted(ROLES)}")
    if style == "meta":
        _meta_turn(out, role, m, tool_format)
        return
    if role == "ipython":  # tool results are JSON-encoded, strings included (see module docstring)
        c = m.get("content")
        out.header("ipython")
        out.text(json.dumps(c, ensure_ascii=False) if isinstance(c, (str, list, dict)) else str(c))
    elif role == "assistant" and m.get("tool_calls"):
        out.header("assistant")
        out.special("python_start")
        out.content(m.get("content"))
        out.special("python_end")
        for call in m["tool_calls"]:
            out.text(_tool_call_json(call))
    else:
        out.header(role)
        out.content(m.get("content"))
    # Meta's format ends an assistant turn that stopped to call a tool with <|eom|> (end of message: a tool result
    # follows); transformers' template ends every turn with <|eot|>.
    out.special("eom" if style == "herd" and role == "assistant" and m.get("tool_calls") else "eot")


STYLES = ("herd", "transformers", "meta")


def _template_ids(template: str, messages: Sequence[dict], tokenizer: Tokenizer, add_generation_prompt: bool,
                  grids: list, tokens_per_tile: int, tools: Sequence[dict] | None) -> list[int]:
    """A Jinja chat template's text (herd.formats.chat_template), tokenized with its special tokens parsed, and each
    `<|image|>` it writes laid out by the next grid, as transformers' Llama 4 processor expands it."""
    from herd.formats.chat_template import TemplateError, render_text

    pieces = render_text(template, messages, tokenizer.bos_token, add_generation_prompt, tools).split("<|image|>")
    if len(pieces) - 1 != len(grids):
        raise TemplateError(f"the chat template wrote {len(pieces) - 1} <|image|> placeholders for {len(grids)} "
                            "images; a template for this model must write one per image part")
    ids = tokenizer.encode(pieces[0], allow_special=True)
    for (rows, cols), piece in zip(grids, pieces[1:], strict=True):
        ids += image_tokens(tokenizer, rows, cols, tokens_per_tile) + tokenizer.encode(piece, allow_special=True)
    return ids


def format_chat(messages: Sequence[dict], tokenizer: Tokenizer, add_generation_prompt: bool = True,
                image_grids: Sequence[tuple[int, int]] | None = None, tokens_per_tile: int = 144,
                tools: Sequence[dict] | None = None, style: str = "herd", tool_format: str = "json",
                template: str | None = None) -> list[int]:
    """Token ids of a conversation, BOS first. `image_grids` holds (rows, cols) per image in message order
    (`collect_images` order); `tools` are OpenAI function specs, rendered into the first user message.
    style="herd" (default): transformers' Llama 4 template, but assistant tool-call turns end with <|eom|>;
    "transformers": token-identical to that template; "meta": token-identical to Meta's reference ChatFormat, whose
    tool calls are written in `tool_format` ("json", "pythonic" or "function_tag"; see the module docstring).
    `template`: a Jinja chat template rendered instead (a fine-tune's own format; see herd.formats.chat_template)."""
    if template is not None:
        return _template_ids(template, messages, tokenizer, add_generation_prompt, list(image_grids or []),
                             tokens_per_tile, tools)
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}; got {style!r}")
    if tool_format not in TOOL_FORMATS:
        raise ValueError(f"tool_format must be one of {', '.join(TOOL_FORMATS)}; got {tool_format!r}")
    out = _Ids(tokenizer, list(image_grids or []), tokens_per_tile, separate=style == "meta")
    out.special("bos")
    messages = list(messages)
    if messages and ROLES.get(messages[0].get("role")) == "system":
        out.header("system")
        if tools is not None:
            out.text("Environment: ipython\n")
        if style == "meta":  # verbatim, parts and all
            out.content(messages[0].get("content"))
        else:
            out.text(_system_text(messages[0].get("content")))
        out.special("eot")
        messages = messages[1:]
    if tools is not None:
        if not messages:
            raise ValueError("tools go into the first user message, and there is none")
        first, messages = messages[0], messages[1:]
        out.header("user")
        out.text(TOOLS_PREAMBLE)
        for t in tools:
            out.text(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n")
        out.content(first.get("content"), strip=style != "meta")
        out.special("eot")
    for m in messages:
        _turn(out, m, style, tool_format)
    if add_generation_prompt:
        out.header("assistant")
    out.flush()
    if out.n_images != len(out.grids):
        raise ValueError(f"{len(out.grids)} image grids given for {out.n_images} images")
    return out.ids


def tiling(vision_config) -> dict:
    """prepare_chat's image-layout arguments for a model's vision config ({} for a text-only model)."""
    v = vision_config
    return {} if v is None else dict(tile_size=v.image_size, max_tiles=v.max_tiles, tokens_per_tile=v.tokens_per_tile)


def prepare_chat(messages: Sequence[dict], tokenizer: Tokenizer, add_generation_prompt: bool = True,
                 tools: Sequence[dict] | None = None, tile_size: int = 336, max_tiles: int = 16,
                 tokens_per_tile: int = 144, style: str = "herd", tool_format: str = "json",
                 template: str | None = None):
    """Token ids and the preprocessed images (`herd.image.ImageBatch`, or None without images) of a conversation:
    loads every image source, tiles it, and lays out its tokens by the resulting grid."""
    sources = collect_images(messages)
    batch = None
    if sources:
        himage = importlib.import_module("herd.image")  # here, not at the top: text-only chat needs no image stack

        if any(s is None for s in sources):
            raise ValueError("an image part has no source; give it an image_url / url / path")
        batch = himage.preprocess([himage.load_image(s) for s in sources], tile_size=tile_size, max_tiles=max_tiles)
    grids = batch.grids if batch is not None else None
    ids = format_chat(messages, tokenizer, add_generation_prompt, grids, tokens_per_tile, tools, style, tool_format,
                      template)
    return ids, batch


def default_template_spec(tokenizer: Tokenizer) -> str | None:
    """The `--chat-template` a checkpoint gets when none is named: "checkpoint" (its own template) when its tokenizer
    lacks Llama 4's chat tokens but has a template (SmolLM2's ChatML in its GGUF, a Llama 3's headers): herd's own
    format would need tokens that model never saw. Else None, herd's own format."""
    return "checkpoint" if "<|header_start|>" not in tokenizer.specials and tokenizer.chat_template else None


def default_template(tokenizer: Tokenizer) -> str | None:
    """The template a checkpoint's chats are rendered in when none is named (`default_template_spec`): its own, or
    None for herd's format. What herd eval samples with and what herd sft / rl / dpo train on, so a fine-tune
    learns the format it is asked in."""
    from herd.formats.chat_template import load_template

    return load_template(default_template_spec(tokenizer), tokenizer.chat_template)
