"""Tool calls in Llama 4 output: generated text in, OpenAI `tool_calls` plus the remaining content out, whole or
streamed piece by piece (for the OpenAI-compatible server; no HTTP here).

Formats: one block of calls ending the output, after optional prose, optionally in a ``` fence (any language tag):
- pythonic, Llama 4's native format (llama-models models/llama4/prompt_format.md, "Tool calling"):
  `[get_weather(city="SF"), get_time(tz='UTC')]`, parallel calls in one list;
- JSON, which herd's chat format trains (chat.py writes `{"name": ..., "parameters": ...}` per call after
  `<|python_end|>`, as transformers' Llama 4 template does) and Llama 4 sometimes emits instead (vLLM #46863): an
  object, a list of them, or several in a row (optionally split by , or ;). "arguments" (an object or a JSON string)
  may stand for "parameters"; "type": "function" may be present (Meta's ToolUtils.encode_tool_call writes it);
- `<function=get_weather>{"city": "SF"}</function>`, the function-tag form Meta documents for Llama 4 custom tools
  (ToolPromptFormat.function_tag; one or several in a row, the closing tag optional at the end, as Meta's regex);
- Meta's built-in tools, `brave_search.call(query="...")` (also wolfram_alpha, photogen: llama-models
  models/llama3/tool_utils.py), as a call of `brave_search` with those keyword arguments;
- `<|python_start|>code[<|python_end|>]` ending the text, when nothing else in it is a call: a `code_interpreter`
  call with {"code": code}, as Meta's ChatFormat.decode_assistant_message reads it. The markers are special tokens,
  so this needs text decoded with them (herd's engine skips special tokens by default).

Design
- Nothing is evaluated: pythonic calls go through `ast.parse`, JSON through `json.loads`, and only literal
  arguments count (herd.tool_scanner, which reads one block: its validators and its scanner).
- The block starts at the earliest `[`, `{` or ``` from which all the rest is valid; the text before it, right-
  stripped, is the content (None if empty). vLLM's llama4_pythonic parser needs the list first (#22917); Meta's
  prompt asks for that, but models write "Sure, let me check." first. Prose after the block, or a bad block, leaves
  it all content. With a `tools` list, a block naming any other function is not a call either (all or nothing, so
  the client sees what the model said rather than a call it cannot run); without one, any name counts.
- `<|python_start|>` / `<|python_end|>` (there when text is decoded with special tokens; vLLM strips them too) are
  control tokens: dropped wherever they are, except as the code-interpreter call above. Stop tokens (<|eot|>,
  <|eom|>) are the engine's: pass text without them.
- Streaming shares the scanner (herd.tool_scanner.Scanner), which ends reading in pieces where reading whole does.
  Text before the earliest live candidate is content whatever follows and is sent at once; `finish` parses the
  whole text and sends the rest. So streamed content + final calls == `parse_tool_calls(full text)` for any split.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

# BUILTIN_TOOLS, CALL_KEYS, TAG_* and Call are re-exported: herd.tools is where callers find the formats' names
from herd.tool_scanner import BUILTIN_TOOLS as BUILTIN_TOOLS
from herd.tool_scanner import CALL_KEYS as CALL_KEYS
from herd.tool_scanner import TAG_CLOSE as TAG_CLOSE
from herd.tool_scanner import TAG_OPEN as TAG_OPEN
from herd.tool_scanner import Call as Call
from herd.tool_scanner import Scanner

MARKER_RE = re.compile(r"<\|python_(?:start|end)\|>")
MARKERS = ("<|python_start|>", "<|python_end|>")
_MARKER_PREFIXES = {m[:k] for m in MARKERS for k in range(1, len(m))}
# Where a block may start: a bracket, a fence, a function tag, or (as a whole word) a built-in tool's name.
_CANDIDATE = re.compile(r"[\[{`<]|(?<![\w.])[bwp]")
CODE_TOOL = "code_interpreter"
# Characters all candidate scans of a text may read, per character of it: each may read to the end, so text like
# `[f(a=` x 3000 (a model in a loop) would cost O(n^2). Past it: no calls, all content (also safe for streaming).
_WORK_PER_CHAR = 16


@dataclass
class ParsedOutput:
    """An assistant message: content (None if empty), OpenAI tool_calls ({"id", "type", "function": {"name",
    "arguments": a JSON string}})."""

    content: str | None
    tool_calls: list[dict] = field(default_factory=list)


@dataclass
class StreamDelta:
    """What one streaming step adds: content text ("" for none) and tool-call deltas (only from `finish`)."""

    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)


def finish_reason(parsed: ParsedOutput, reason: str = "stop") -> str:
    """OpenAI finish_reason: "tool_calls" when any call was parsed, else the engine's own ("stop" / "length")."""
    return "tool_calls" if parsed.tool_calls else reason


def tool_names(tools: Sequence[dict | str] | None) -> frozenset[str] | None:
    """Function names of a request's `tools` (OpenAI {"type": "function", "function": {"name"}}, a bare function
    spec, or a name); None (no list) means any name is accepted."""
    return None if tools is None else frozenset(t if isinstance(t, str) else t.get("function", t)["name"]
                                                for t in tools)


def parse_tool_calls(text: str, tools: Sequence[dict | str] | None = None) -> ParsedOutput:
    """The whole generated text as an assistant message: prose as content, a final block of calls as tool_calls.
    With `tools`, only the functions named there count (see the module docstring)."""
    norm, allowed = MARKER_RE.sub("", text), tool_names(tools)
    budget = _WORK_PER_CHAR * len(norm) + 4096
    # Every complete block ends with "]", "}", ")", ">" or ``` (then whitespace): text cut off mid-call needs no scan.
    for m in _CANDIDATE.finditer(norm) if norm.rstrip().endswith(("]", "}", ")", ">", "```")) else ():
        scanner = Scanner(m.start(), allowed)
        scanner.advance(norm)
        if scanner.complete(norm):
            return ParsedOutput(norm[:m.start()].rstrip() or None, [_openai(*call) for call in scanner.calls])
        budget -= scanner.i - m.start() + 1
        if budget < 0:
            break
    code = _code_call(text, allowed)
    if code is not None:
        return ParsedOutput(code[0], [_openai(CODE_TOOL, {"code": code[1]})])
    return ParsedOutput(norm or None, [])


def _openai(name: str, args: dict) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _code_call(text: str, allowed: frozenset[str] | None) -> tuple[str | None, str] | None:
    """(content, code) when `text` ends with `<|python_start|>code[<|python_end|>]` (only whitespace after the first
    <|python_end|>): Meta's code-interpreter call. None otherwise, or when code_interpreter is not an allowed tool."""
    start = text.find(MARKERS[0])
    if start < 0 or (allowed is not None and CODE_TOOL not in allowed):
        return None
    rest = text[start + len(MARKERS[0]):]
    end = rest.find(MARKERS[1])
    if end >= 0:
        if rest[end + len(MARKERS[1]):].strip():
            return None
        rest = rest[:end]
    code = MARKER_RE.sub("", rest)
    return (MARKER_RE.sub("", text[:start]).rstrip() or None, code) if code.strip() else None


def _partial_marker(tail: str) -> int:
    """Start of the longest end of `tail` that is an unfinished <|python_start|> / <|python_end|> (else len)."""
    starts = range(max(0, len(tail) - max(map(len, MARKERS)) + 1), len(tail))
    return next((j for j in starts if tail[j:] in _MARKER_PREFIXES), len(tail))


class ToolCallStreamParser:
    """Feed generated text as it comes; get what is surely content now, and the tool calls at the end:
    `feed(piece).content` per piece, then `finish()` for the held-back rest and `.tool_calls`; `finish_reason(result)`.

    Text is held back from where a tool call may have started (a `[` and a name, a `{` whose first key may be a call's,
    a ``` fence, a partial <|python_start|>, trailing whitespace) and released once that candidate cannot be a call.
    Each call's arguments come in one fragment at the end."""

    def __init__(self, tools: Sequence[dict | str] | None = None):
        self.tools, self.allowed = tools, tool_names(tools)
        self.result: ParsedOutput | None = None  # the whole message, once finished
        self._pieces: list[str] = []
        self._pending = ""  # a tail that may still become a marker
        self._text = ""  # everything before it, markers removed
        self._sent = 0  # characters of content already returned
        self._scanner: Scanner | None = None  # the earliest candidate still alive
        self._search = 0  # candidates before this index are ruled out
        self._work = 0  # characters scanned so far (see _WORK_PER_CHAR)
        self._stuck_at: int | None = None  # where holding starts for good once the budget is spent
        # A <|python_start|> may begin a code-interpreter call: text from there (`_code_at`) is held while that may
        # still be true ("in" the code, or "after" its <|python_end|> with only whitespace since); "off" for good.
        self._code = "none" if self.allowed is None or CODE_TOOL in self.allowed else "off"
        self._code_at = 0

    def feed(self, piece: str) -> StreamDelta:
        if self.result is not None:
            raise RuntimeError("feed() after finish()")
        self._pieces.append(piece)
        tail = self._pending + piece
        cut = _partial_marker(tail)
        pos = 0  # no marker spans `cut`: only a marker's first char is "<"
        for m in MARKER_RE.finditer(tail, 0, cut):
            self._add(tail[pos:m.start()])
            self._marker(m.group())
            pos = m.end()
        self._add(tail[pos:cut])
        self._pending = tail[cut:]
        hold = self._hold_from()
        if self._code in ("in", "after"):
            hold = min(hold, self._code_at)
        return StreamDelta(self._send(self._text[:hold].rstrip()))

    def _add(self, s: str) -> None:
        if self._code == "after" and s.strip():  # text after <|python_end|>: not a code call (see _code_call)
            self._code = "off"
        self._text += s

    def _marker(self, marker: str) -> None:
        if self._code == "none" and marker == MARKERS[0]:
            self._code, self._code_at = "in", len(self._text)
        elif self._code == "in" and marker == MARKERS[1]:
            self._code = "after"
        elif self._code == "after":
            self._code = "off"

    def finish(self) -> StreamDelta:
        """The rest of the content and the tool-call deltas ({"index", "id", "type", "function": {"name",
        "arguments"}}), from parsing the whole text: the same answer `parse_tool_calls` gives."""
        if self.result is None:
            self.result = parse_tool_calls("".join(self._pieces), self.tools)
        deltas = [{"index": i, **call} for i, call in enumerate(self.result.tool_calls)]
        return StreamDelta(self._send(self.result.content or ""), deltas)

    def _hold_from(self) -> int:
        """Index of the earliest candidate still alive (len(text) if none): all text before it is content."""
        while self._stuck_at is None:
            if self._scanner is None:
                m = _CANDIDATE.search(self._text, self._search)
                if m is None:
                    self._search = len(self._text)
                    return len(self._text)
                self._scanner = Scanner(m.start(), self.allowed)
            before = self._scanner.i
            self._scanner.advance(self._text)
            self._work += self._scanner.i - before + 1
            if not self._scanner.dead:
                return self._scanner.start
            self._search, self._scanner = self._scanner.start + 1, None
            if self._work > _WORK_PER_CHAR * len(self._text) + 4096:  # degenerate text: hold the rest for finish()
                self._stuck_at = self._search
        return self._stuck_at

    def _send(self, content: str) -> str:
        """The part of `content` not yet returned (content only ever grows: see the module docstring)."""
        new = content[self._sent:]
        self._sent = max(self._sent, len(content))
        return new
