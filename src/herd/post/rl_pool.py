"""RL's prompt pool: which prompts the policy practises on, re-filtered by the policy itself as it learns.

Llama 4's post-training ran online RL on medium-to-hard prompts, "continuous online RL ... alternating between
training the model and then using it to continually filter and retain only medium-to-hard difficulty prompts", with
a curriculum mixing capabilities ("The Llama 4 herd", https://ai.meta.com/blog/llama-4-multimodal-intelligence/).
Here, per task (`rl_tasks`, e.g. "arithmetic@3,sorting"):
- Fresh prompts come from the task's train split (herd.tasks.draw) at the task's current difficulty, in seed order
  from an index set by the run's seed, so a run is reproducible, runs with other seeds see other problems, and
  none sees a held-out problem.
- Continuous filtering (`refilter_every` > 0): every N steps the current policy samples `pool_k` answers to
  `pool_size` fresh prompts; prompts it solves more often than `keep_pass` are dropped as easy, the rest (medium and
  hard) form the pool until the next refresh. The answers spent on scoring count as rollout tokens (the cost of
  filtering is part of any comparison).
- Curriculum (`curriculum`): a task moves to the next difficulty, up to its cap, when the policy's accuracy at the
  current one reaches `promote_at` (measured on the training rollouts since the last check, or on the fresh
  prompts being scored). Without refiltering, accuracy is checked every 10 steps.
- Batches mix capabilities: prompts are taken from the tasks in turn.
- System prompts (`system_prompts`): each prompt gets one drawn from a varied pool (none half of the time), chosen
  by a hash of the problem, so the policy is not tuned to one phrasing of its instructions.
The pool's whole state is plain numbers (state_dict), saved in every checkpoint: a resumed run takes the same prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib

from herd import tasks as registry
from herd.tasks.base import HELDOUT_BASE, Example

SYSTEM_PROMPTS = (
    None, None, None, None,
    "You are a helpful assistant.",
    "You are a careful assistant. Check your work before you answer.",
    "Answer the question. Keep it short.",
    "You are an expert problem solver.",
    "Think step by step, then give the answer.",
    "You are a precise assistant: the answer must be exactly right.",
    "Be concise and accurate.",
    "You help with puzzles, arithmetic and text.",
)
CHECK_EVERY = 10  # steps between curriculum checks when the pool is not re-filtered
MIN_OBSERVED = 16  # answers seen at a level before its accuracy can promote it
SEED_STRIDE = 10_000_000  # a run with seed s draws train problems from seed index s x SEED_STRIDE on


def parse_tasks(spec: str) -> dict[str, int]:
    """"arithmetic@3,sorting" -> {"arithmetic": 3, "sorting": its max difficulty}: each task's difficulty cap."""
    out = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, cap = part.partition("@")
        task = registry.get(name)
        try:
            level = int(cap) if cap else task.max_difficulty
        except ValueError:
            raise ValueError(f"rl_tasks: {part!r} is not NAME or NAME@MAX_DIFFICULTY") from None
        if not 1 <= level <= task.max_difficulty:
            raise ValueError(f"rl_tasks: {name} has difficulties 1..{task.max_difficulty}, got @{level}")
        out[name] = level
    if not out:
        raise ValueError("rl_tasks names no task; e.g. rl_tasks=arithmetic@3,sorting")
    return out


def with_system(ex: Example, seed: int) -> Example:
    """The example with a system prompt from SYSTEM_PROMPTS (or none) chosen by a hash of the run seed and problem."""
    if ex.messages and ex.messages[0].get("role") == "system":
        return ex
    h = hashlib.sha256(f"herd-system:{seed}:{ex.task}:{ex.seed}".encode()).digest()
    text = SYSTEM_PROMPTS[int.from_bytes(h[:4], "big") % len(SYSTEM_PROMPTS)]
    if text is None:
        return ex
    return dataclasses.replace(ex, messages=[{"role": "system", "content": text}, *ex.messages])


class PromptPool:
    def __init__(self, cfg):
        self.cfg, self.caps = cfg, parse_tasks(cfg.rl_tasks)
        self.tasks = {name: registry.get(name) for name in self.caps}
        self.level = dict.fromkeys(self.caps, 1)
        # next train seed index per task; runs with different seeds practise on different problems
        self.cursor = dict.fromkeys(self.caps, SEED_STRIDE * cfg.seed % HELDOUT_BASE)
        self.entries: dict[str, list[list[int]]] = {n: [] for n in self.caps}  # [difficulty, seed] per prompt
        self.next = dict.fromkeys(self.caps, 0)  # position in entries
        self.seen = {n: [0, 0] for n in self.caps}  # [correct, answers] at the current level since the last check
        self.turn = 0

    # -- prompts --
    def _fresh(self, name: str, n: int) -> list[Example]:
        out = registry.draw(self.tasks[name], "train", n, self.level[name], start=self.cursor[name])
        self.cursor[name] = out[-1].seed + 1
        return out

    def example(self, name: str, difficulty: int, seed: int) -> Example:
        ex = self.tasks[name].example(seed, difficulty)
        return with_system(ex, self.cfg.seed) if self.cfg.system_prompts else ex

    def take(self, n: int) -> list[Example]:
        """n prompts, the tasks taking turns."""
        names, out = list(self.caps), []
        for _ in range(n):
            name = names[self.turn % len(names)]
            self.turn += 1
            if self.cfg.refilter_every and self.entries[name]:
                d, seed = self.entries[name][self.next[name] % len(self.entries[name])]
                self.next[name] += 1
            else:
                ex = self._fresh(name, 1)[0]
                d, seed = ex.difficulty, ex.seed
            out.append(self.example(name, d, seed))
        return out

    # -- feedback and refreshes --
    def observe(self, examples: list[Example], correct: list[int], answers: list[int]) -> None:
        """Training rollouts' results: correct answers out of `answers` per example."""
        for ex, c, a in zip(examples, correct, answers, strict=True):
            if ex.difficulty == self.level[ex.task]:
                self.seen[ex.task][0] += c
                self.seen[ex.task][1] += a

    def _promote(self, name: str, accuracy: float) -> bool:
        if self.cfg.curriculum and accuracy >= self.cfg.promote_at and self.level[name] < self.caps[name]:
            self.level[name] += 1
            self.seen[name] = [0, 0]
            return True
        return False

    def due(self, step: int) -> bool:
        every = self.cfg.refilter_every or (CHECK_EVERY if self.cfg.curriculum else 0)
        return bool(every) and step % every == 0

    def refresh(self, generator, step: int) -> dict:
        """The curriculum check and (refilter_every > 0) the pool re-scored by the current policy; its stats,
        rollout tokens spent included."""
        cfg, stats, tokens = self.cfg, {}, 0
        for name in self.caps:
            c, a = self.seen[name]
            if a >= MIN_OBSERVED:
                self._promote(name, c / a)
            if not cfg.refilter_every:
                continue
            while True:
                cands = [self.example(name, ex.difficulty, ex.seed) for ex in self._fresh(name, cfg.pool_size)]
                seed = int.from_bytes(hashlib.sha256(f"herd-pool:{cfg.seed}:{step}:{name}".encode()).digest()[:7],
                                      "big")
                sampled = generator.generate(self.tasks, cands, cfg.pool_k, cfg.temperature, cfg.max_new_tokens, seed)
                tokens += sum(sum(s.lengths) for s in sampled)
                rates = [s.correct / len(s.scores) for s in sampled]
                mean = sum(rates) / len(rates)
                if not self._promote(name, mean):  # the policy masters this level: score the next one instead
                    break
            kept = [[ex.difficulty, ex.seed] for ex, r in zip(cands, rates, strict=True) if r <= cfg.keep_pass]
            self.entries[name] = kept or [[ex.difficulty, ex.seed] for ex in cands]  # all easy at the top level
            self.next[name] = 0
            stats[f"pool_pass/{name}"] = mean
            stats[f"pool_kept/{name}"] = len(kept) / len(cands)
        stats.update({f"level/{n}": float(v) for n, v in self.level.items()})
        stats["pool_rollout_tokens"] = float(tokens)
        return stats

    def state_dict(self) -> dict:
        return {"level": dict(self.level), "cursor": dict(self.cursor), "next": dict(self.next), "turn": self.turn,
                "entries": {n: [list(e) for e in v] for n, v in self.entries.items()},
                "seen": {n: list(v) for n, v in self.seen.items()}}

    def load_state_dict(self, st: dict) -> None:
        if set(st["level"]) != set(self.caps):
            raise ValueError(f"the checkpoint's RL tasks {sorted(st['level'])} differ from rl_tasks "
                             f"{sorted(self.caps)}; resume with the same rl_tasks")
        self.level, self.cursor, self.next = dict(st["level"]), dict(st["cursor"]), dict(st["next"])
        self.turn = int(st["turn"])
        self.entries = {n: [list(e) for e in v] for n, v in st["entries"].items()}
        self.seen = {n: list(v) for n, v in st["seen"].items()}
