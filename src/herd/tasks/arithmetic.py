"""Multi-digit addition, subtraction and multiplication with a difficulty dial.

Difficulty d (1..6) is the number of digits of the operands: add and subtract two d-digit numbers (the larger
first, so answers are never negative); multiply a d-digit number by a ceil(d/2)-digit one, since a product's
partial sums make it the harder operation at equal length. The question is asked in words or in symbols, chosen by
the seed; the reference reply writes the equation, then `#### RESULT`. Scored by exact integer match of the final
answer (commas allowed), as GSM8K-style rewards are (nanochat's GSM8K task, Tulu 3's RLVR arXiv:2411.15124).
"""

from __future__ import annotations

import random
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

OPS = {"+": ("plus", "sum of {a} and {b}"), "-": ("minus", "difference when {b} is subtracted from {a}"),
       "*": ("times", "product of {a} and {b}")}
TEMPLATES = ("What is {a} {sym} {b}?", "What is {a} {word} {b}?", "Compute {a} {sym} {b}.",
             "Calculate the {phrase}.")


def _number(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits (0..9 for one digit)."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


@dataclass(frozen=True)
class Arithmetic:
    name: str = "arithmetic"
    max_difficulty: int = 6
    multimodal: bool = False

    def example(self, seed: int, difficulty: int) -> Example:
        check_difficulty(self.name, difficulty, self.max_difficulty)
        rng = random.Random(f"herd-task:{self.name}:{seed}:{difficulty}")
        op = rng.choice(sorted(OPS))
        a = _number(rng, difficulty)
        b = _number(rng, difficulty if op != "*" else (difficulty + 1) // 2)
        if op == "-" and b > a:
            a, b = b, a
        result = a + b if op == "+" else a - b if op == "-" else a * b
        word, phrase = OPS[op]
        sym = "×" if op == "*" and rng.random() < 0.5 else op
        question = rng.choice(TEMPLATES).format(a=a, b=b, sym=sym, word=word, phrase=phrase.format(a=a, b=b))
        return Example(task=self.name, seed=seed, difficulty=difficulty,
                       messages=[{"role": "user", "content": f"{question} {ANSWER_INSTRUCTION}"}],
                       answer=answer_reply(f"{a} {sym} {b} = {result}", result), target=result,
                       meta={"op": op, "a": a, "b": b, "size": len(str(a)) + len(str(b))})

    def score(self, example: Example, completion: str) -> Score:
        got = parse_int(final_answer(completion))
        return verdict(got == example.target, format_ok=got is not None)
