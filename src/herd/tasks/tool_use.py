"""Tool use: the reply must be a Llama 4 tool call, and it is verified by running it.

Three built-in functions, each offered to the model as an OpenAI function spec (all three in every prompt, so
choosing the tool is part of the task): `calculator(expression)`, `lookup_capital(country)` from a small table,
and `convert_units(value, from_unit, to_unit)`. The seed picks the function; difficulty d (1..5) sets the size:
d+1 operands of up to d digits for the calculator, a longer value for a conversion (one digit at d=1, decimals
from d=4), while capitals do not scale. The reference reply is the call as herd's chat template writes an assistant
tool call, `{"name": ..., "parameters": {...}}` (herd.chat; transformers' Llama 4 template), and the verifier parses a
completion with herd.tools.parse_tool_calls (that JSON or Llama 4's pythonic `[f(x=1)]`), runs the one call and
compares the result with the target (what the reference call returns): any call that computes it is right, e.g.
`(2+3)*4` for `4*(3+2)`. A call to an unknown function, with wrong arguments, or more than one call scores 0;
no parseable call is a format error.

The calculator never evaluates Python: the expression is parsed with `ast` and only numbers, + - * / // % **,
unary signs and parentheses are walked, with bounds on length, exponents and magnitudes, so `__import__('os')` or
`9**9**9` is refused (ToolError), not run.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
from dataclasses import dataclass
from typing import Any

from herd.tasks.base import Example, Score, verdict
from herd.tasks.base import check_difficulty as _check


class ToolError(ValueError):
    """A call the built-in functions refuse: unknown function, bad arguments, an expression outside the grammar."""


# ---- the built-in functions -----------------------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_MAX_EXPR = 200  # characters
_MAX_ABS = 10 ** 30  # any intermediate value past this is refused (bounds the work of ** and *)


def _arith(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _arith(node.operand)
        value = -value if isinstance(node.op, ast.USub) else value
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or (abs(left) > 1 and right * math.log2(abs(left)) > 100)):
            raise ToolError("exponent too large")
        try:
            value = _BINOPS[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as e:
            raise ToolError(f"cannot compute: {e}") from e
        if isinstance(value, complex):
            raise ToolError("the result is not a real number")
    else:
        raise ToolError(f"only numbers, + - * / // % ** and parentheses are allowed, not {type(node).__name__}")
    if abs(value) > _MAX_ABS or (isinstance(value, float) and not math.isfinite(value)):  # no float() of a big int
        raise ToolError("number out of range")
    return value


def calculator(expression: str) -> int | float:
    """The value of an arithmetic expression (numbers, + - * / // % **, parentheses), never Python-evaluated."""
    if not isinstance(expression, str) or len(expression) > _MAX_EXPR:
        raise ToolError(f"expression must be a string of at most {_MAX_EXPR} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from e
    return _arith(tree.body)


CAPITALS = {"france": "Paris", "germany": "Berlin", "italy": "Rome", "spain": "Madrid", "portugal": "Lisbon",
            "japan": "Tokyo", "china": "Beijing", "india": "New Delhi", "brazil": "Brasilia", "canada": "Ottawa",
            "australia": "Canberra", "egypt": "Cairo", "kenya": "Nairobi", "mexico": "Mexico City",
            "peru": "Lima", "norway": "Oslo", "sweden": "Stockholm", "poland": "Warsaw", "greece": "Athens",
            "turkey": "Ankara", "argentina": "Buenos Aires", "chile": "Santiago", "nigeria": "Abuja",
            "vietnam": "Hanoi", "thailand": "Bangkok", "ireland": "Dublin", "austria": "Vienna",
            "hungary": "Budapest", "finland": "Helsinki", "morocco": "Rabat"}


def lookup_capital(country: str) -> str:
    if not isinstance(country, str) or country.strip().lower() not in CAPITALS:
        raise ToolError(f"no capital known for {country!r}")
    return CAPITALS[country.strip().lower()]


# Each unit's size in its dimension's base unit (metre, kilogram, second, litre).
UNITS = {"mm": ("length", 0.001), "cm": ("length", 0.01), "m": ("length", 1.0), "km": ("length", 1000.0),
         "in": ("length", 0.0254), "ft": ("length", 0.3048), "mi": ("length", 1609.344),
         "g": ("mass", 0.001), "kg": ("mass", 1.0), "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
         "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0),
         "ml": ("volume", 0.001), "l": ("volume", 1.0)}
UNIT_NAMES = {"mm": "millimetres", "cm": "centimetres", "m": "metres", "km": "kilometres", "in": "inches",
              "ft": "feet", "mi": "miles", "g": "grams", "kg": "kilograms", "lb": "pounds", "oz": "ounces",
              "s": "seconds", "min": "minutes", "h": "hours", "day": "days", "ml": "millilitres", "l": "litres"}


def convert_units(value: float, from_unit: str, to_unit: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ToolError(f"value must be a finite number, got {value!r}")
    if from_unit not in UNITS or to_unit not in UNITS:
        raise ToolError(f"units must be among {sorted(UNITS)}, got {from_unit!r} and {to_unit!r}")
    (dim_a, a), (dim_b, b) = UNITS[from_unit], UNITS[to_unit]
    if dim_a != dim_b:
        raise ToolError(f"cannot convert {dim_a} ({from_unit}) to {dim_b} ({to_unit})")
    return value * a / b


FUNCTIONS = {"calculator": calculator, "lookup_capital": lookup_capital, "convert_units": convert_units}


def _spec(name: str, description: str, params: dict[str, dict]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": params, "required": list(params)}}}


TOOLS = [
    _spec("calculator", "Evaluate an arithmetic expression with + - * / // % ** and parentheses.",
          {"expression": {"type": "string", "description": "the expression, e.g. (2 + 3) * 4"}}),
    _spec("lookup_capital", "The capital city of a country.",
          {"country": {"type": "string", "description": "the country's English name"}}),
    _spec("convert_units", "Convert a quantity between units of length, mass, time or volume.",
          {"value": {"type": "number"}, "from_unit": {"type": "string", "enum": list(UNITS)},
           "to_unit": {"type": "string", "enum": list(UNITS)}}),
]


def execute(call: dict) -> Any:
    """Run one OpenAI-shaped tool call ({"function": {"name", "arguments": JSON string}}) on the built-ins."""
    fn = call.get("function", call)
    name, args = fn.get("name"), fn.get("arguments", fn.get("parameters", {}))
    if name not in FUNCTIONS:
        raise ToolError(f"unknown function {name!r}; the tools are {sorted(FUNCTIONS)}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError as e:
            raise ToolError(f"arguments are not JSON: {args!r}") from e
    if not isinstance(args, dict):
        raise ToolError("arguments must be an object")
    try:
        return FUNCTIONS[name](**args)
    except TypeError as e:  # missing or unexpected argument names
        raise ToolError(f"bad arguments for {name}: {e}") from e


def same_result(got: Any, target: Any) -> bool:
    """Strings match ignoring case and outer spaces; numbers to a relative 1e-9 (0.1+0.2 is 0.3)."""
    if isinstance(target, str):
        return isinstance(got, str) and got.strip().lower() == target.strip().lower()
    if type(got) not in (int, float) or type(target) not in (int, float):
        return False
    return math.isclose(got, target, rel_tol=1e-9, abs_tol=1e-9)


def call_text(name: str, args: dict) -> str:
    """A call as herd's chat template writes it in an assistant turn (herd.chat._tool_call_json)."""
    return json.dumps({"name": name, "parameters": args}, ensure_ascii=False)


# ---- the task -------------------------------------------------------------------------------------------------------
def _expression(rng: random.Random, difficulty: int) -> str:
    terms = [str(rng.randint(1, 10 ** rng.randint(1, difficulty) - 1)) for _ in range(difficulty + 1)]
    text = terms[0]
    for t in terms[1:]:
        op = rng.choice("+-*")
        if op == "*" and rng.random() < 0.5 and len(text) > len(terms[0]):
            text = f"({text})"  # parentheses change the value: the call must keep them
        text = f"{text} {op} {t}"
    return text


@dataclass(frozen=True)
class ToolUse:
    name: str = "tool_use"
    max_difficulty: int = 5
    multimodal: bool = False

    def example(self, seed: int, difficulty: int) -> Example:
        _check(self.name, difficulty, self.max_difficulty)
        rng = random.Random(f"herd-task:{self.name}:{seed}:{difficulty}")
        kind = rng.choice(tuple(FUNCTIONS))
        if kind == "calculator":
            expr = _expression(rng, difficulty)
            args, size = {"expression": expr}, difficulty + 1
            question = rng.choice(("Use the calculator to compute {e}.", "What is {e}? Use a tool.")).format(e=expr)
        elif kind == "lookup_capital":
            country = rng.choice(sorted(CAPITALS))
            args, size = {"country": country.title()}, 1
            question = f"What is the capital of {country.title()}? Look it up with a tool."
        else:
            dim = rng.choice(sorted({d for d, _ in UNITS.values()}))
            a, b = rng.sample([u for u, (d, _) in UNITS.items() if d == dim], 2)
            value = round(rng.uniform(1, 1000), max(0, difficulty - 3)) if difficulty > 1 else rng.randint(1, 9)
            value = int(value) if float(value).is_integer() else value
            args, size = {"value": value, "from_unit": a, "to_unit": b}, difficulty
            question = f"Convert {value} {UNIT_NAMES[a]} to {UNIT_NAMES[b]} using a tool."
        return Example(task=self.name, seed=seed, difficulty=difficulty,
                       messages=[{"role": "user", "content": question}], answer=call_text(kind, args),
                       target=FUNCTIONS[kind](**args), tools=TOOLS, meta={"function": kind, "args": args,
                                                                            "size": size})

    def score(self, example: Example, completion: str) -> Score:
        from herd.tools import parse_tool_calls  # here: importing herd.tasks stays light

        calls = parse_tool_calls(completion).tool_calls  # any name parses; an unknown one fails when run
        if not calls:
            return verdict(False, format_ok=False)
        if len(calls) != 1:
            return verdict(False)
        try:
            result = execute(calls[0])
        except ToolError:
            return verdict(False)
        return verdict(same_result(result, example.target))
