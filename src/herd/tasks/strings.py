"""Counting, sorting and string manipulation: small exact tasks that probe what tokenization hides from a model
(letters inside tokens) and what it must hold in order (lists), each with a length dial.

- counting: how many times a letter occurs in a word, or how many items a list has / how often one item occurs;
- sorting: numbers (ascending or descending) or words (alphabetically);
- strings: reverse a word, or name its n-th letter.
Words are random letter strings drawn from the seed (no dictionary to ship; a real word would also let the model
answer from memory instead of reading the letters). Difficulty d sets the length: words of 2d+2 letters, lists of
d+2 items. Replies end with `#### ANSWER`; verifiers compare exactly after normalising case, spaces and quotes.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from herd.tasks.base import (
    ANSWER_INSTRUCTION,
    Example,
    Score,
    answer_reply,
    check_difficulty,
    final_answer,
    parse_int,
    verdict,
)

ITEMS = ("apple", "pear", "plum", "fig", "lime", "kiwi", "grape", "melon", "peach", "mango", "lemon", "cherry",
         "cat", "dog", "fox", "owl", "bee", "cow", "hen", "eel", "yak", "ant", "bat", "elk")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth")


def _rng(name: str, seed: int, difficulty: int) -> random.Random:
    return random.Random(f"herd-task:{name}:{seed}:{difficulty}")


def _word(rng: random.Random, length: int, letter: str | None = None) -> str:
    """Random lowercase letters; with `letter`, about one in four positions is that letter, so counts vary."""
    return "".join(letter if letter and rng.random() < 0.25 else rng.choice(string.ascii_lowercase)
                   for _ in range(length))


def _clean(text: str | None) -> str | None:
    """An answer compared case-, space- and quote-insensitively; None stays None."""
    if text is None:
        return None
    return re.sub(r"\s+", " ", text.strip().strip("'\"`").rstrip(".").strip().strip("'\"`")).lower()


def _items(text: str | None) -> list[str] | None:
    """A list answer: comma-separated (brackets and quotes allowed), or space-separated without commas."""
    if text is None:
        return None
    body = text.strip().rstrip(".").strip("[]()")
    parts = body.split(",") if "," in body else body.split()
    items = [p.strip().strip("'\"`").lower() for p in parts]
    return items if items and all(items) else None


def _example(task, seed: int, difficulty: int, question: str, work: str, answer, target, meta: dict) -> Example:
    return Example(task=task.name, seed=seed, difficulty=difficulty,
                   messages=[{"role": "user", "content": f"{question} {ANSWER_INSTRUCTION}"}],
                   answer=answer_reply(work, answer), target=target, meta=meta)


@dataclass(frozen=True)
class Counting:
    name: str = "counting"
    max_difficulty: int = 6
    multimodal: bool = False

    def example(self, seed: int, difficulty: int) -> Example:
        check_difficulty(self.name, difficulty, self.max_difficulty)
        rng = _rng(self.name, seed, difficulty)
        kind = rng.choice(("letter", "list", "item"))
        if kind == "letter":
            letter = rng.choice(string.ascii_lowercase)
            word = _word(rng, 2 * difficulty + 2, letter)
            n = word.count(letter)
            question = f"How many times does the letter '{letter}' appear in '{word}'?"
            times = f"{n} time{'s' * (n != 1)}"
            work, size = f"The letters of '{word}' are {', '.join(word)}; '{letter}' appears {times}.", len(word)
        else:
            items = [rng.choice(ITEMS) for _ in range(difficulty + 2)]
            if kind == "list":
                n = len(items)
                question = f"How many items are in this list: {', '.join(items)}?"
                work = f"Counting them one by one: {', '.join(f'{w} ({i + 1})' for i, w in enumerate(items))}."
            else:
                item = rng.choice(items if rng.random() < 0.8 else ITEMS)
                n = items.count(item)
                question = f"How many times does '{item}' appear in this list: {', '.join(items)}?"
                work = f"'{item}' appears {n} time{'s' * (n != 1)} in the list."
            size = len(items)
        return _example(self, seed, difficulty, question, work, n, n, {"kind": kind, "size": size})

    def score(self, example: Example, completion: str) -> Score:
        got = parse_int(final_answer(completion))
        return verdict(got == example.target, format_ok=got is not None)


@dataclass(frozen=True)
class Sorting:
    name: str = "sorting"
    max_difficulty: int = 6
    multimodal: bool = False

    def example(self, seed: int, difficulty: int) -> Example:
        check_difficulty(self.name, difficulty, self.max_difficulty)
        rng = _rng(self.name, seed, difficulty)
        n = difficulty + 2
        kind = rng.choice(("ascending", "descending", "words"))
        if kind == "words":
            values = [_word(rng, rng.randint(3, 6)) for _ in range(n)]
            ordered = sorted(values)
            question = f"Sort these words in alphabetical order: {', '.join(values)}."
        else:
            values = [str(rng.randint(0, 10 ** min(difficulty + 1, 4) - 1)) for _ in range(n)]
            ordered = [str(v) for v in sorted(map(int, values), reverse=kind == "descending")]
            question = f"Sort these numbers in {kind} order: {', '.join(values)}."
        answer = ", ".join(ordered)
        return _example(self, seed, difficulty, question, "", answer, ordered, {"kind": kind, "size": n})

    def score(self, example: Example, completion: str) -> Score:
        got = _items(final_answer(completion))
        return verdict(got == list(example.target), format_ok=got is not None)


@dataclass(frozen=True)
class StringOps:
    name: str = "strings"
    max_difficulty: int = 6
    multimodal: bool = False

    def example(self, seed: int, difficulty: int) -> Example:
        check_difficulty(self.name, difficulty, self.max_difficulty)
        rng = _rng(self.name, seed, difficulty)
        word = _word(rng, 2 * difficulty + 2)
        kind = rng.choice(("reverse", "nth"))
        if kind == "reverse":
            target = word[::-1]
            question = rng.choice((f"Reverse the word '{word}'.", f"Spell '{word}' backwards."))
            work = f"The letters of '{word}' from last to first: {', '.join(target)}."
        else:
            i = rng.randrange(len(word))
            target = word[i]
            question = f"What is the {ORDINALS[i]} letter of '{word}'?"
            work = f"The letters of '{word}' are {', '.join(word)}; letter {i + 1} is '{target}'."
        return _example(self, seed, difficulty, question, work, target, target, {"kind": kind, "size": len(word)})

    def score(self, example: Example, completion: str) -> Score:
        got = _clean(final_answer(completion))
        return verdict(got == example.target, format_ok=bool(got))
