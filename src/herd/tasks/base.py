"""What every task is: examples generated from a seed at a difficulty, and an exact verifier of a completion.

A task turns (seed, difficulty) into an `Example` deterministically (the same seed always gives the same problem,
on every machine), so a dataset is a list of seeds and a run can be audited by regenerating it. `Task.score` checks
a model's completion (the assistant's text, tool calls included as the model wrote them) against the example's
target exactly - a verifier, not a judge - which is what online RL with verifiable rewards needs (DeepSeek-R1,
arXiv:2501.12948; Tulu 3's RLVR, arXiv:2411.15124).

Train and held-out data never share a problem: a problem belongs to the held-out split when its text hashes into
the held-out share (`is_heldout`), whatever seed produced it (at low difficulty two seeds often give the same sum);
held-out draws take seeds from their own range (`heldout_seed`) and keep only held-out problems, train draws take
seeds below it and skip them.

Answers: every text task's reference reply ends with a line `#### ANSWER` (ANSWER_PREFIX, GSM8K's convention, which
nanochat's GSM8K reward also reads), and `final_answer` is the one extractor the verifiers use. Tool-use replies are
a tool call instead (see herd.tasks.tool_use); `assistant_message` turns any reply into the OpenAI assistant message
herd.chat renders (tool calls parsed out), so SFT and evaluation see references and completions alike.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

HELDOUT_BASE = 1_000_000_000  # held-out seeds are HELDOUT_BASE + i; train seeds are below it
HELDOUT_SHARE = 10  # one problem text in HELDOUT_SHARE hashes into the held-out split


@dataclass(frozen=True)
class Example:
    task: str  # the task's registry name
    seed: int
    difficulty: int  # 1 .. the task's max_difficulty
    messages: list[dict]  # OpenAI-style chat up to and including the user's turn (images as content parts)
    answer: str  # a reference assistant reply that scores as correct (what SFT trains on)
    target: Any  # what the verifier compares with (a number, a string, a list, a call's result ...)
    tools: list[dict] | None = None  # the tools the prompt shows (OpenAI function specs), for tool-use tasks
    meta: dict = field(default_factory=dict)  # anything else worth logging (operands, the scene's index ...)


@dataclass(frozen=True)
class Score:
    reward: float  # 1.0 for a correct answer, 0.0 otherwise (shaping rewards are added elsewhere)
    correct: bool
    format_ok: bool  # the completion had an answer in the expected form (a number, a tool call ...)


class Task(Protocol):
    name: str
    max_difficulty: int
    multimodal: bool  # needs a model with a vision tower

    def example(self, seed: int, difficulty: int) -> Example: ...

    def score(self, example: Example, completion: str) -> Score: ...


def problem_hash(example: Example) -> int:
    """A stable hash of the problem as the model sees it (the user turns' text), independent of the seed."""
    text = "\x1e".join(_content_key(m.get("content")) for m in example.messages if m.get("role") == "user")
    return int.from_bytes(hashlib.sha256(f"{example.task}\x1f{text}".encode()).digest()[:8], "big")


def _content_key(content: Any) -> str:
    """A message's content as stable text: a string as is; in a list of parts, a PIL image (whose repr holds its
    memory address, different on every run) becomes a digest of its pixels, so the same scene hashes alike."""
    if not isinstance(content, list):
        return str(content)
    parts = []
    for part in content:
        url = part.get("image_url", {}).get("url") if isinstance(part, dict) else None
        if hasattr(url, "tobytes"):
            digest = hashlib.sha256(url.tobytes()).hexdigest()
            part = {**part, "image_url": {"url": f"pil:{url.mode}:{url.size}:{digest}"}}
        parts.append(part)
    return str(parts)


def is_heldout(example: Example) -> bool:
    return problem_hash(example) % HELDOUT_SHARE == 0


def heldout_seed(i: int) -> int:
    return HELDOUT_BASE + i


# ---- the answer convention ------------------------------------------------------------------------------------------
ANSWER_PREFIX = "#### "  # a reference reply's last line is ANSWER_PREFIX + the answer (GSM8K's convention)
ANSWER_INSTRUCTION = "Give the final answer on the last line, after ####."  # said in every text task's prompt
_FINAL = re.compile(r"####[ \t]*([^\n]*)")


def final_answer(text: str) -> str | None:
    """The answer after the last `####` in text (to the end of its line, whitespace stripped); None when there is
    no `####` or nothing follows it."""
    found = _FINAL.findall(text)
    answer = found[-1].strip() if found else ""
    return answer or None


def parse_int(text: str | None) -> int | None:
    """An integer answer: optional sign, digits, optional thousands commas ("-1,234"); None for anything else."""
    if text is None:
        return None
    s = text.strip().rstrip(".")
    if not re.fullmatch(r"[+-]?(\d{1,3}(,\d{3})+|\d+)", s):
        return None
    return int(s.replace(",", ""))


def answer_reply(work: str, answer: Any) -> str:
    """A reference reply: optional working, then the final-answer line."""
    return (work + "\n" if work else "") + ANSWER_PREFIX + str(answer)


def assistant_message(reply: str, tools: list[dict] | None = None) -> dict:
    """A reply (a reference answer or a model's completion) as the OpenAI assistant message herd.chat renders. With
    `tools` (the example's), a final block of calls to them becomes `tool_calls` (herd.tools.parse_tool_calls) and
    the rest its content; without, the reply is all content (a "[...]" answer is not a call when none was offered)."""
    from herd.tools import parse_tool_calls  # here: tasks without tools need no parser

    parsed = parse_tool_calls(reply, tools) if tools is not None else None
    if parsed is None or not parsed.tool_calls:
        return {"role": "assistant", "content": reply}
    return {"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls}


def verdict(correct: bool, format_ok: bool = True) -> Score:
    return Score(1.0 if correct else 0.0, correct, format_ok)


def check_difficulty(name: str, difficulty: int, max_difficulty: int) -> None:
    if not 1 <= difficulty <= max_difficulty:
        raise ValueError(f"task {name!r} takes difficulty 1..{max_difficulty}, got {difficulty}")
