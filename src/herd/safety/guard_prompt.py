"""The Llama Guard prompt: a conversation in, the classification task text out; and the guard's answer parsed.

The text is Meta's Llama Guard 3 prompt as llama-stack builds it (llama_stack providers/inline/safety/llama_guard,
`PROMPT_TEMPLATE`) and llama-recipes documents it (`prompt_format_utils.py`), byte for byte:

    Task: Check if there is unsafe content in '$agent_type' messages in conversations according our safety policy
    with the below categories. / the category lines / the conversation / the instructions

Design
- `$agent_type` is "User" when the last message is the user's (prompt classification) and "Agent" when it is the
  assistant's (response classification); turns are written "User: ..." / "Agent: ...", as the Llama Guard 3 chat
  templates write them, joined by a blank line. Each turn's text is stripped, as those templates `trim` it; the text
  parts of an OpenAI-style content list are joined by a space (llama-stack's `interleaved_content_as_str`).
- Roles must alternate user / assistant starting with the user (the templates raise otherwise). System (and
  "developer") messages are dropped: the prompt has no place for them (the templates know only User and Agent
  turns), and the operator's own instructions are not what the guard is asked to judge. Tool messages are refused
  rather than guessed at: classify a tool result by passing it as the text of a turn.
- "according our safety policy" keeps the typo of Meta's template (llama-recipes, llama-stack, the Llama Guard 3
  templates): it is the text the Llama Guard 3 models were trained on. Llama Guard 4's Hugging Face chat template
  writes "according to our safety policy" and lays the turns out slightly differently; both prompts are in use with
  Llama Guard 4, and this one is the one llama-stack sends it.
- Images do not enter the text. `guard_messages` wraps the text in the single user turn Llama Guard runs on, image
  parts first and then the text (as the Llama Guard 3-Vision and 4 templates put images before "Task:"), so that
  herd.chat lays the images out exactly as for any Llama 4 chat.
- `parse_guard_output` accepts "safe", or "unsafe" and a line of comma-separated codes (spaces around codes are
  ignored); a verdict naming only excluded categories is safe (llama-stack's rule). "unsafe" with no second line is
  unsafe with no categories (a stop right after "unsafe" happens in practice; failing closed keeps it a block).
  Anything else raises GuardOutputError quoting the text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from herd.safety.taxonomy import DEFAULT, LG4, Category, codes
from herd.safety.taxonomy import categories as select

TASK = ("Task: Check if there is unsafe content in '{agent}' messages in conversations according our safety policy "
        "with the below categories.")
INSTRUCTIONS = ("Provide your safety assessment for ONLY THE LAST {agent} message in the above conversation:\n"
                " - First line must read 'safe' or 'unsafe'.\n"
                " - If unsafe, a second line must include a comma-separated list of violated categories.")
SPEAKERS = {"user": "User", "assistant": "Agent"}
DROPPED_ROLES = ("system", "developer")


class GuardOutputError(ValueError):
    """The guard's answer is neither "safe" nor "unsafe" followed by a list of known category codes."""


@dataclass(frozen=True)
class GuardVerdict:
    safe: bool
    categories: tuple[str, ...] = ()  # violated codes, excluded ones removed
    score: float | None = None  # P(unsafe) when the verdict came from herd.safety.guard
    raw: str = ""  # the model's own text for the categories, when it generated some


def _text(content: Any) -> str:
    """A message's text: a string, None, or OpenAI / HF content parts (text parts joined by a space)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif part.get("type") == "text":
            texts.append(part["text"])
        elif part.get("type") not in ("image", "image_url"):
            raise ValueError(f"unsupported content part type {part.get('type')!r}: use text, image or image_url")
    return " ".join(t.strip() for t in texts if t.strip())


def _images(content: Any) -> list[dict]:
    if content is None or isinstance(content, str):
        return []
    return [p for p in content if isinstance(p, dict) and p.get("type") in ("image", "image_url")]


def conversation(messages: Sequence[dict]) -> list[dict]:
    """The turns the guard judges: system messages dropped, then user / assistant alternating from the user."""
    turns = [m for m in messages if m.get("role") not in DROPPED_ROLES]
    if not turns:
        raise ValueError("there is nothing to classify: give at least one user message")
    for i, m in enumerate(turns):
        role = m.get("role")
        if role not in SPEAKERS:
            raise ValueError(f"message role {role!r} cannot be classified: the guard prompt knows user and "
                             "assistant turns (pass a tool result as the text of one)")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"conversation roles must alternate user/assistant/user/...: turn {i} (system messages "
                             f"not counted) is {role!r}, expected {expected!r}")
    return turns


def agent_type(messages: Sequence[dict]) -> str:
    """"User" when the last turn is the user's (the prompt is judged), "Agent" when it is the assistant's."""
    return SPEAKERS[conversation(messages)[-1]["role"]]


def _category_lines(cats: Iterable[Category], with_policy: bool) -> str:
    lines = []
    for c in cats:
        lines.append(f"{c.code}: {c.name}.")
        if with_policy and c.description:
            lines.append(c.description)
    return "\n".join(lines)


def render_guard_prompt(messages: Sequence[dict], categories: Sequence[Category] = DEFAULT,
                        exclude: Iterable[str] = (), with_policy: bool = False) -> str:
    """The classification task text for a conversation (OpenAI-style messages), without the chat-format wrapping.
    `categories`: the taxonomy listed (herd.safety.taxonomy); `exclude`: codes left out, the others keeping their
    numbers; `with_policy`: each category's description under its name."""
    turns = conversation(messages)
    agent = SPEAKERS[turns[-1]["role"]]
    convo = "\n\n".join(f"{SPEAKERS[m['role']]}: {_text(m.get('content'))}" for m in turns)
    cats = _category_lines(select(categories, exclude), with_policy)
    return (f"{TASK.format(agent=agent)}\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{cats}\n<END UNSAFE CONTENT CATEGORIES>"
            f"\n\n<BEGIN CONVERSATION>\n\n{convo}\n\n<END CONVERSATION>\n\n{INSTRUCTIONS.format(agent=agent)}")


def guard_messages(messages: Sequence[dict], categories: Sequence[Category] = DEFAULT, exclude: Iterable[str] = (),
                   with_policy: bool = False) -> list[dict]:
    """The conversation a Llama Guard model reads: one user turn holding every image part of `messages` (in order)
    and then the task text. herd.chat.prepare_chat turns it into Llama 4 token ids and preprocessed images."""
    text = render_guard_prompt(messages, categories, exclude, with_policy)
    images = [p for m in conversation(messages) for p in _images(m.get("content"))]
    return [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]


_UNSAFE = re.compile(r"unsafe(?:\n(.*))?", re.DOTALL)


def parse_guard_output(text: str, exclude: Iterable[str] = (), known: Iterable[str] | None = None) -> GuardVerdict:
    """A Llama Guard answer as a verdict. `known`: the codes the model may name (default S1-S14); `exclude`: codes
    that do not count (a verdict naming only those is safe)."""
    known = set(codes(LG4) if known is None else known)
    s = text.strip()
    if s == "safe":
        return GuardVerdict(True)
    m = _UNSAFE.fullmatch(s)
    if m is None:
        raise GuardOutputError(f"the guard answered {text!r}; expected 'safe', or 'unsafe' and a line of "
                               "comma-separated category codes")
    if m.group(1) is None:
        return GuardVerdict(False)
    found = [c.strip() for c in m.group(1).split(",")]
    bad = [c for c in found if c not in known]
    if bad:
        raise GuardOutputError(f"the guard answered {text!r}: {bad} are not category codes (known: "
                               f"{', '.join(sorted(known, key=lambda c: (len(c), c)))})")
    excluded = set(exclude)
    kept = tuple(dict.fromkeys(c for c in found if c not in excluded))
    return GuardVerdict(not kept, kept)
