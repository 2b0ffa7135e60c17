"""Reading one block of tool calls in Llama 4 output (the formats are listed in herd.tools, which uses this): the
validators for a complete body, and `Scanner`, which reads a candidate block left to right and says where it ends or
that it cannot be one.

Design
- Nothing is evaluated. Pythonic calls go through `ast.parse` and count only if every element calls a plain or dotted
  name with keyword arguments whose values are literals: str, int, float (finite), bool, None, and lists / tuples /
  dicts (str keys) of those. Anything else (a positional argument, `**kw`, a call, a name, an operator, an f-string)
  means no tool call: the text stays content. JSON goes through `json.loads` (NaN / Infinity refused).
- A body is validated as soon as its last bracket arrives, and a block is dead only on a character no continuation
  can repair; where a character's meaning depends on text not there yet (a quote that may open a triple quote, a
  backtick that may open a fence) the scanner waits. So reading a text in pieces ends where reading it whole does,
  which lets herd.tools stream with the same scanner it parses with.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

CALL_KEYS = ("name", "type", "parameters", "arguments")  # the keys a JSON call object may have
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen")  # Meta's BuiltinTool, code_interpreter aside
TAG_OPEN, TAG_CLOSE = "<function=", "</function>"
_WS = " \t\r\n"
_CLOSE = {")": "(", "]": "[", "}": "{"}
_JSON_NAME = re.compile(r"[A-Za-z_][\w.\-]*")

Call = tuple[str, dict]  # (function name, arguments)


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


def _json_value(src: str) -> Any:
    try:
        return json.loads(src, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None


def _json_calls(src: str) -> list[Call] | None:
    value = _json_value(src)
    items = value if isinstance(value, list) else [value]
    calls = [_json_call(d) for d in items]
    return calls if calls and all(c is not None for c in calls) else None


# ---- the scanner: where a block may start, end, or cannot be ------------------------------------------------------
class Scanner:
    """Reads one candidate block from `start`: [``` lang] body [body...] [```], then only whitespace. A body (a
    pythonic list or a JSON value) is validated as soon as its last bracket arrives. Phases: begin / lang / pre (before
    a body); list / name / gap / after / next (a pythonic list's top level); args / comment (in a call's parentheses);
    json / key (in a JSON body); str (in either's strings); between (after a body); fence (the closing ```); end.
    A function tag: literal (reading "<function=" or "</function>") / tname / tbody, then its JSON object through the
    JSON phases; a built-in call: bname (up to its "(") then args."""

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
        self.tag = ""  # the function tag being read: its name
        self.tag_closed = True  # its </function> has been read (or no tag is open)
        self.builtins = [f"{b}.call(" for b in BUILTIN_TOOLS if allowed is None or b in allowed]

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
        if self.phase in ("literal", "tname", "tbody", "bname"):
            return self._named(t)
        return self._frame(t)

    def _named(self, t: str) -> int | None:
        """The function-tag and built-in forms, up to where their bodies start (see the class docstring)."""
        c, p = t[self.i], self.phase
        if p == "literal":  # at a "<": a new tag, or the closing one of the tag just read
            options = (TAG_OPEN,) if self.tag_closed else (TAG_CLOSE, TAG_OPEN)
            for lit in options:
                if t.startswith(lit, self.i):
                    self.tag_closed, self.tag = lit == TAG_CLOSE, ""
                    self.phase = "between" if lit == TAG_CLOSE else "tname"
                    return len(lit)
            if any(len(t) - self.i < len(lit) and lit.startswith(t[self.i:]) for lit in options):
                return None
            return self._die()
        if p == "tname":
            if c == ">" and _JSON_NAME.fullmatch(self.tag) and (self.allowed is None or self.tag in self.allowed):
                self.phase = "tbody"
                return 1
            self.tag += c
            return 1 if _JSON_NAME.fullmatch(self.tag) else self._die()
        if p == "tbody":  # the arguments: one JSON object, read by the JSON phases
            if c != "{":
                return self._die()
            self.body_start, self.stack, self.phase = self.i, ["{"], "json"
            return 1
        # bname: a built-in's name and ".call(" ("brave_search.call("), then its keyword arguments
        read = t[self.body_start:self.i + 1]
        if not any(b.startswith(read) for b in self.builtins):
            return self._die()
        if read in self.builtins:
            self.stack, self.phase = ["[", "("], "args"  # the "[" stands for the list a pythonic call sits in
        return 1

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
        if p == "between" and c == "<" and self.kind == "tag" and not self.separated:
            self.phase = "literal"
            return 0
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
        """A body starts at `c`: a list (pythonic or JSON), a JSON object, a function tag or a built-in's name."""
        self.body_start = self.i
        if c == "<":
            self.kind, self.phase = "tag", "literal"
            return 0
        if c.isalpha():
            self.kind, self.phase = "builtin", "bname"
            return 0
        if c not in "[{":
            return self._die()
        self.stack, self.separated = [c], False
        if c == "[":
            self.phase = "list"
        else:
            self.kind, self.phase, self.expect_key = "json", "json", True
        return 1

    def _close(self, t: str) -> int:
        """The body's last bracket is at i: validate the body now, so a bad one dies before more text arrives."""
        body = t[self.body_start:self.i + 1]
        if self.kind == "tag":
            args = _json_value(body)
            calls = [(self.tag, args)] if isinstance(args, dict) else None
        elif self.kind == "builtin":  # "brave_search.call(query=...)" read as the list "[brave_search.call(...)]"
            calls = [(name.removesuffix(".call"), a) for name, a in _python_calls(f"[{body}]") or []] or None
        else:
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
            self.phase = "args" if self.kind in ("py", "builtin") else "json"
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
            if len(self.stack) == 1 and self.kind == "builtin":  # a bare call: it is the whole body
                return self._close(t)
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
