"""Tool calls in Llama 4 output: generated text in, OpenAI `tool_calls` plus the remaining content out, whole or
streamed piece by piece (for the OpenAI-compatible server; no HTTP here).

Formats: one block of calls ending the output, after optional prose, optionally in a ``` fence (any language tag):
- pythonic, Llama 4's native format (llama-models models/llama4/prompt_format.md, "Tool calling"):
  `[get_weather(city="SF"), get_time(tz='UTC')]`, parallel calls in one list;
- JSON, which herd's chat format trains (chat.py writes `{"name": ..., "parameters": ...}` per call after
  `<|python_end|>`, as transformers' Llama 4 template does) and Llama 4 sometimes emits instead (vLLM #46863): an
  object, a list of them, or several in a row (optionally split by , or ;). "arguments" (an object or a JSON string)
  may stand for "parameters"; "type": "function" may be present (Meta's ToolUtils.encode_tool_call writes it).

Design
- Nothing is evaluated. Pythonic calls go through `ast.parse` and count only if every element calls a plain or dotted
  name with keyword arguments whose values are literals: str, int, float (finite), bool, None, and lists / tuples /
  dicts (str keys) of those. Anything else (a positional argument, `**kw`, a call, a name, an operator, an f-string)
  means no tool call: the text stays content. JSON goes through `json.loads` (NaN / Infinity refused).
- The block starts at the earliest `[`, `{` or ``` from which all the rest is valid; the text before it, right-
  stripped, is the content (None if empty). vLLM's llama4_pythonic parser needs the list first (#22917); Meta's
  prompt asks for that, but models write "Sure, let me check." first. Prose after the block, or a bad block, leaves
  it all content. With a `tools` list, a block naming any other function is not a call either (all or nothing, so
  the client sees what the model said rather than a call it cannot run); without one, any name counts.
- `<|python_start|>` / `<|python_end|>` (there when text is decoded with special tokens; vLLM strips them too) are
  control tokens: dropped wherever they are. Stop tokens (<|eot|>, <|eom|>) are the engine's: pass text without them.
- Streaming shares the scanner. `_Scanner` reads a candidate block left to right and marks it dead only on a
  character no continuation can repair; where a character's meaning depends on text not there yet (a quote that may
  open a triple quote, a backtick that may open a fence) it waits, so reading in pieces ends where reading whole
  does. Text before the earliest live candidate is content whatever follows and is sent at once; `finish` parses the
  whole text and sends the rest. So streamed content + final calls == `parse_tool_calls(full text)` for any split.
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MARKER_RE = re.compile(r"<\|python_(?:start|end)\|>")
MARKERS = ("<|python_start|>", "<|python_end|>")
_MARKER_PREFIXES = {m[:k] for m in MARKERS for k in range(1, len(m))}
CALL_KEYS = ("name", "type", "parameters", "arguments")  # the keys a JSON call object may have
_CANDIDATE = re.compile(r"[\[{`]")
_WS = " \t\r\n"
_CLOSE = {")": "(", "]": "[", "}": "{"}
_JSON_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
# Characters all candidate scans of a text may read, per character of it: each may read to the end, so text like
# `[f(a=` x 3000 (a model in a loop) would cost O(n^2). Past it: no calls, all content (also safe for streaming).
_WORK_PER_CHAR = 16

Call = tuple[str, dict]  # (function name, arguments)


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


# ---- validating one complete body: literals only, never evaluated --------------------------------------------------
class _NotLiteral(Exception):
    """A pythonic argument that is not a plain literal (a call, a name, an operator, a comprehension...)."""


def _literal(node: ast.AST) -> Any:
    """The JSON value of a literal argument; raises _NotLiteral for anything that would need evaluating."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if not (isinstance(k, ast.Constant) and type(k.value) is str):  # k is None for a {**spread}
                raise _NotLiteral
            out[k.value] = _literal(v)
        return out
    if isinstance(node, ast.Constant) and (node.value is None or type(node.value) in (str, bool, int, float)):
        value = node.value
    elif (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
          and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)):
        value = -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value  # -3 is "-" on 3
    else:
        raise _NotLiteral
    if isinstance(value, float) and not math.isfinite(value):  # 1e999 parses to inf, which JSON cannot carry
        raise _NotLiteral
    return value


def _dotted(node: ast.AST) -> str | None:
    """`f` or `a.b.f` as a string; None for anything else (a call result, a subscript...)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _python_calls(src: str) -> list[Call] | None:
    """`[f(a=1), g.h(b="x")]` -> [("f", {"a": 1}), ("g.h", {"b": "x"})]; None unless every call is safe."""
    try:
        tree = ast.parse(src, mode="eval")  # parsing only; deep nesting and huge ints raise, caught here
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        name = _dotted(node.func) if isinstance(node, ast.Call) else None
        if name is None or node.args or any(kw.arg is None for kw in node.keywords):
            return None  # keyword arguments only: Meta's format is name=value
        try:
            calls.append((name, {kw.arg: _literal(kw.value) for kw in node.keywords}))
        except (_NotLiteral, RecursionError):
            return None
    return calls


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_call(d: Any) -> Call | None:
    """{"name", "parameters" | "arguments", optional "type": "function"} -> (name, arguments dict), else None."""
    if not isinstance(d, dict) or not set(d) <= set(CALL_KEYS) or d.get("type", "function") != "function":
        return None
    name = d.get("name")
    if not isinstance(name, str) or not _JSON_NAME.fullmatch(name) or ("parameters" in d) == ("arguments" in d):
        return None
    args = d.get("parameters", d.get("arguments"))
    if isinstance(args, str):  # OpenAI's own shape carries arguments as a JSON string
        try:
            args = json.loads(args, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            return None
    return (name, args) if isinstance(args, dict) else None


def _json_calls(src: str) -> list[Call] | None:
    try:
        value = json.loads(src, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_json_call(d) for d in items]
    return calls if calls and all(c is not None for c in calls) else None


# ---- the scanner: where a block may start, end, or cannot be ------------------------------------------------------
class _Scanner:
    """Reads one candidate block from `start`: [``` lang] body [body...] [```], then only whitespace. A body (a
    pythonic list or a JSON value) is validated as soon as its last bracket arrives. Phases: begin / lang / pre (before
    a body); list / name / gap / after / next (a pythonic list's top level); args / comment (in a call's parentheses);
    json / key (in a JSON body); str (in either's strings); between (after a body); fence (the closing ```); end."""

    def __init__(self, start: int, allowed: frozenset[str] | None):
        self.start = self.i = self.body_start = start
        self.allowed = allowed
        self.phase = "begin"
        self.fenced = False
        self.kind = ""  # "py" or "json", fixed by the first body: the formats do not mix
        self.stack: list[str] = []  # open brackets of the current body
        self.quote = ""  # delimiter of the open string: ' " ''' or """ (JSON: ")
        self.key = ""  # a JSON call object's first key, read so far
        self.expect_key = False  # a JSON call object was opened: its first key comes next
        self.separated = False  # a , or ; after a JSON body: another body must follow
        self.calls: list[Call] = []
        self.dead = False

    def advance(self, text: str) -> None:
        """Scan `text` (which only ever grows) from where the last call stopped."""
        while not self.dead and self.i < len(text):
            n = self._step(text)
            if n is None:
                return  # the next character's meaning depends on text not here yet
            self.i += n

    def complete(self, text: str) -> bool:
        """All of `text` from `start` is a valid block."""
        return (not self.dead and self.i == len(text) and bool(self.calls) and not self.separated
                and (self.phase == "end" or (self.phase == "between" and not self.fenced)))

    def _die(self) -> int:
        self.dead = True
        return 0  # the loop in advance() stops on `dead`

    def _step(self, t: str) -> int | None:
        if self.phase == "str":
            return self._string(t)
        if self.phase in ("args", "comment"):
            return self._python(t)
        if self.phase in ("json", "key"):
            return self._json(t)
        return self._frame(t)

    def _frame(self, t: str) -> int | None:
        c, p = t[self.i], self.phase
        if c in _WS and p in ("pre", "list", "after", "next", "between", "end"):
            return 1
        if p == "begin" and c == "`" or p == "fence":
            if len(t) - self.i < 3 and "```".startswith(t[self.i:]):
                return None
            if not t.startswith("```", self.i):
                return self._die()
            self.fenced, self.phase = True, ("lang" if p == "begin" else "end")
            return 3
        if p == "lang":
            if c.isalnum() or c in "_-":
                return 1
            self.phase = "pre"
            return 0
        if p in ("begin", "pre") or (p == "between" and c in "[{" and self.kind == "json"):
            return self._open(c)
        if p == "list":
            if c == "{":
                self.kind, self.phase = "json", "json"  # a list of JSON call objects: the JSON phases take over
                return 0
            if (c.isalpha() or c == "_") and not self.kind:
                self.kind, self.phase = "py", "name"
                return 0
        elif p in ("name", "gap"):  # a function name, maybe spaces, its "(": "[Note that" dies at the "t"
            if c == "(":
                self.stack.append("(")
                self.phase = "args"
                return 1
            if c in _WS:
                self.phase = "gap"
                return 1
            if p == "name" and (c.isalnum() or c in "_."):  # ast.parse judges the name once the body is complete
                return 1
        elif p in ("after", "next"):
            if c == "]":
                return self._close(t)
            if p == "after" and c == ",":
                self.phase = "next"
                return 1
            if p == "next" and (c.isalpha() or c == "_"):
                self.phase = "name"
                return 0
        elif p == "between":
            if c in ",;" and self.kind == "json" and not self.separated:
                self.separated = True
                return 1
            if c == "`" and self.fenced and not self.separated:
                self.phase = "fence"
                return 0
        return self._die()

    def _open(self, c: str) -> int:
        """A body starts at `c`: a list (pythonic or JSON) or a JSON object."""
        if c not in "[{":
            return self._die()
        self.body_start, self.stack, self.separated = self.i, [c], False
        if c == "[":
            self.phase = "list"
        else:
            self.kind, self.phase, self.expect_key = "json", "json", True
        return 1

    def _close(self, t: str) -> int:
        """The body's last bracket is at i: validate the body now, so a bad one dies before more text arrives."""
        body = t[self.body_start:self.i + 1]
        calls = _python_calls(body) if self.kind == "py" else _json_calls(body)
        if calls is None or (self.allowed is not None and any(name not in self.allowed for name, _ in calls)):
            return self._die()
        self.calls += calls
        self.stack, self.phase = [], "between"
        return 1

    def _string(self, t: str) -> int | None:
        """In a Python or JSON string: skip escapes, and wait where a quote may begin a closing triple quote."""
        c, i = t[self.i], self.i
        if c == "\\":
            return 2 if i + 1 < len(t) else None
        if c != self.quote[0]:
            return 1
        seg = t[i:i + len(self.quote)]
        if seg == self.quote:
            self.phase = "args" if self.kind == "py" else "json"
            return len(seg)
        return None if len(seg) < len(self.quote) and self.quote.startswith(seg) else 1

    def _python(self, t: str) -> int | None:
        """Inside a call's parentheses: track brackets, strings (opening triple quotes included) and comments."""
        c, i = t[self.i], self.i
        if self.phase == "comment":
            if c == "\n":
                self.phase = "args"
            return 1
        if c in "'\"":
            if i + 1 >= len(t) or (t[i + 1] == c and i + 2 >= len(t)):
                return None  # ', '' or ''' ? wait for the next character
            if t[i + 1] != c:
                self.quote, self.phase = c, "str"
                return 1
            if t[i + 2] != c:
                return 2  # an empty string
            self.quote, self.phase = c * 3, "str"
            return 3
        if c == "#":
            self.phase = "comment"
        elif c in "([{":
            self.stack.append(c)
        elif c in _CLOSE:
            if self.stack[-1] != _CLOSE[c]:
                return self._die()
            self.stack.pop()
            if len(self.stack) == 1:  # back at the list's top level: the call is closed
                self.phase = "after"
        return 1

    def _json(self, t: str) -> int | None:
        """Inside a JSON body: track brackets and strings. A call object's first key must be one of CALL_KEYS and a
        list of calls holds only objects, so an ordinary JSON answer is let go at once instead of held to its end."""
        c = t[self.i]
        if self.phase == "key":
            if c == '"':
                self.phase = "json"
                return 1 if self.key in CALL_KEYS else self._die()
            self.key += c
            return 1 if any(k.startswith(self.key) for k in CALL_KEYS) else self._die()
        if self.expect_key:
            if c in _WS:
                return 1
            if c != '"':
                return self._die()
            self.expect_key, self.key, self.phase = False, "", "key"
            return 1
        in_list = self.stack == ["["]
        if c == '"':
            self.quote, self.phase = '"', "str"
        elif c in "[{":
            if in_list and c != "{":
                return self._die()
            self.expect_key = in_list  # an element of a list of calls is itself a call object
            self.stack.append(c)
        elif c in _CLOSE:
            if self.stack[-1] != _CLOSE[c]:
                return self._die()
            self.stack.pop()
            if not self.stack:
                return self._close(t)
        elif in_list and c not in _WS + ",":
            return self._die()
        return 1


def parse_tool_calls(text: str, tools: Sequence[dict | str] | None = None) -> ParsedOutput:
    """The whole generated text as an assistant message: prose as content, a final block of calls as tool_calls.
    With `tools`, only the functions named there count (see the module docstring)."""
    norm, allowed = MARKER_RE.sub("", text), tool_names(tools)
    budget = _WORK_PER_CHAR * len(norm) + 4096
    # Every complete block ends with "]", "}" or ``` (then whitespace): text cut off mid-call needs no scan at all.
    for m in _CANDIDATE.finditer(norm) if norm.rstrip().endswith(("]", "}", "```")) else ():
        scanner = _Scanner(m.start(), allowed)
        scanner.advance(norm)
        if scanner.complete(norm):
            calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                     for name, args in scanner.calls]
            return ParsedOutput(norm[:m.start()].rstrip() or None, calls)
        budget -= scanner.i - m.start() + 1
        if budget < 0:
            break
    return ParsedOutput(norm or None, [])


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
        self._scanner: _Scanner | None = None  # the earliest candidate still alive
        self._search = 0  # candidates before this index are ruled out
        self._work = 0  # characters scanned so far (see _WORK_PER_CHAR)
        self._stuck_at: int | None = None  # where holding starts for good once the budget is spent

    def feed(self, piece: str) -> StreamDelta:
        if self.result is not None:
            raise RuntimeError("feed() after finish()")
        self._pieces.append(piece)
        tail = self._pending + piece
        cut = _partial_marker(tail)
        self._text += MARKER_RE.sub("", tail[:cut])  # no marker spans `cut`: only a marker's first char is "<"
        self._pending = tail[cut:]
        return StreamDelta(self._send(self._text[:self._hold_from()].rstrip()))

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
                self._scanner = _Scanner(m.start(), self.allowed)
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
