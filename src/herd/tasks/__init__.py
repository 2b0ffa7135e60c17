"""Procedurally generated tasks with exact verifiers (the interface is in herd.tasks.base).

`TASKS` names every task; `draw` makes a deterministic list of examples from the train or the held-out split, by
the split rule in base.py: train takes seeds start, start+1, ... below HELDOUT_BASE and skips held-out problems;
held-out takes seeds heldout_seed(start), heldout_seed(start+1), ... and keeps only held-out problems.
"""

from __future__ import annotations

from herd.tasks.arithmetic import Arithmetic
from herd.tasks.base import HELDOUT_BASE, Example, Task, heldout_seed, is_heldout
from herd.tasks.scenes import SceneQA
from herd.tasks.strings import Counting, Sorting, StringOps
from herd.tasks.tool_use import ToolUse

TASKS: dict[str, Task] = {t.name: t for t in (Arithmetic(), Counting(), Sorting(), StringOps(), ToolUse(), SceneQA())}
SPLITS = ("train", "heldout")
# Held-out problems are 1 in HELDOUT_SHARE, and at low difficulty many seeds repeat a problem already seen: a draw
# that needs more than this many seeds per example is asking for more distinct problems than the task has.
_MAX_TRIES_PER_EXAMPLE = 1000


def get(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; the tasks are: {', '.join(TASKS)}")
    return TASKS[name]


def draw(task: Task | str, split: str, n: int, difficulty: int, start: int = 0) -> list[Example]:
    """n examples of `task` at `difficulty` from `split` ("train" or "heldout"), the same list on every call.
    `start` is the first seed index (train seed `start`, held-out seed `heldout_seed(start)`); draws over disjoint
    index ranges share no seed, and train and held-out draws never share a problem."""
    task = get(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    out: list[Example] = []
    i, budget = start, _MAX_TRIES_PER_EXAMPLE * max(n, 1)
    while len(out) < n:
        seed = i if split == "train" else heldout_seed(i)
        if split == "train" and seed >= HELDOUT_BASE:
            raise ValueError(f"train seeds end below {HELDOUT_BASE}; use a smaller start")
        ex = task.example(seed, difficulty)
        if is_heldout(ex) == (split == "heldout"):
            out.append(ex)
        i += 1
        if i - start > budget:
            raise ValueError(f"{task.name!r} at difficulty {difficulty} gave only {len(out)} {split} examples "
                             f"from {i - start} seeds; ask for fewer or raise the difficulty")
    return out


__all__ = ["TASKS", "SPLITS", "get", "draw"]
