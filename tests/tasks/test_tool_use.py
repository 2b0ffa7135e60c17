"""herd.tasks.tool_use: calls are verified by running them, on a calculator that never evaluates Python.
python -m pytest tests/tasks/test_tool_use.py -q"""

from __future__ import annotations

import pytest

import herd.tasks as tasks
from herd.tasks.tool_use import ToolError, calculator, execute

T = tasks.get("tool_use")


def _ex(function: str):
    return next(e for e in tasks.draw("tool_use", "train", 60, 3) if e.meta["function"] == function)


def test_the_call_is_executed_not_compared_as_text():
    ex = _ex("calculator")
    expr = ex.meta["args"]["expression"]
    other = f"[calculator(expression='({expr}) + 0')]"  # pythonic, a different text, the same value
    assert T.score(ex, other).correct
    assert T.score(ex, f"Let me compute that.\n```json\n{ex.answer}\n```").correct  # prose + fenced JSON


@pytest.mark.parametrize("function,wrong", [
    ("calculator", '{"name": "calculator", "parameters": {"expression": "1 + 1 + 999999"}}'),
    ("lookup_capital", '[lookup_capital(country="Atlantis")]'),
    ("lookup_capital", '[lookup_capital(country="Peru")]'),
    ("convert_units", '[convert_units(value=1, from_unit="kg", to_unit="m")]'),
    ("convert_units", '[convert_units(value=1, unit="kg")]'),  # wrong argument name
])
def test_wrong_arguments_fail(function, wrong):
    ex = _ex(function)
    if ex.meta["args"].get("country") == "Peru":
        wrong = wrong.replace("Peru", "Chile")
    s = T.score(ex, wrong)
    assert (s.reward, s.correct, s.format_ok) == (0.0, False, True)


def test_unknown_tool_and_no_call():
    ex = _ex("calculator")
    unknown = ex.answer.replace('"calculator"', '"shell"')
    assert T.score(ex, unknown) == T.score(ex, "[os.system(cmd='ls')]")
    assert (T.score(ex, unknown).reward, T.score(ex, unknown).format_ok) == (0.0, True)
    s = T.score(ex, f"The answer is {ex.target}.")  # right number, but no tool call
    assert (s.reward, s.format_ok) == (0.0, False)
    two = "[" + ex.answer.strip("{}") + "]"  # a malformed block
    assert T.score(ex, two).format_ok is False
    assert T.score(ex, f"[{ex.answer}, {ex.answer}]").reward == 0.0  # one call is asked for


@pytest.mark.parametrize("expr", ["__import__('os').system('echo hi')", "open('/etc/passwd')", "x + 1",
                                  "(1).__class__", "[1, 2]", "9 ** 9 ** 9", "10 ** 400", "1 / 0", "'a' * 3",
                                  "lambda: 1", "2 ** 0.5 ** -1 * 1e308 * 1e308"])
def test_calculator_refuses_anything_but_arithmetic(expr):
    with pytest.raises(ToolError):
        calculator(expr)
    ex = _ex("calculator")
    assert T.score(ex, f'[calculator(expression="{expr}")]').reward == 0.0


def test_calculator_and_conversions_compute():
    assert calculator("(2 + 3) * 4 - 10 // 3") == 17 and calculator("-2 ** 2") == -4
    assert calculator("0.1 + 0.2") == pytest.approx(0.3)
    assert execute({"function": {"name": "convert_units",
                                 "arguments": '{"value": 2, "from_unit": "km", "to_unit": "m"}'}}) == 2000
    assert execute({"name": "lookup_capital", "parameters": {"country": " japan "}}) == "Tokyo"
    with pytest.raises(ToolError, match="unknown function"):
        execute({"name": "eval", "parameters": {}})


def test_each_function_appears_and_its_reference_is_right():
    seen = {e.meta["function"] for e in tasks.draw("tool_use", "train", 60, 2)}
    assert seen == {"calculator", "lookup_capital", "convert_units"}
    for f in seen:
        ex = _ex(f)
        assert ex.tools and T.score(ex, ex.answer).correct
        assert execute({"name": f, "parameters": ex.meta["args"]}) == ex.target
