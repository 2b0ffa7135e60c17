"""DPO pairs built from rollouts: a prompt's group of scored answers becomes one (chosen, rejected) pair.

    herd dpo --init runs/sft/hf --from-rollouts runs/rl/rollouts.jsonl --out runs/dpo [prefer=correct|shorter]
    herd dpo --init runs/sft/hf --from-rollouts tasks:arithmetic@2 --out runs/dpo [group_size=8 sft_examples=200]

Sources (`TrainConfig.dpo_rollouts`):
- an RL run's rollouts.jsonl, one prompt's group a line:
      {"step", "task", "difficulty", "seed", "system", "messages": [the prompt as the model saw it] or null,
       "tools": [...] or null, "answers": [{"text", "reward", "correct", "format_ok", "tokens"}], "policy_version"}
  An RL run writes `messages: null` for image tasks (it does not store the images): those groups are skipped and
  counted - sample image tasks with a tasks: source instead. Messages that do hold image parts (data URLs, or paths
  relative to the file) make image pairs. A malformed line fails with its line number and what to change.
- `tasks:NAME[,NAME...][@D|@LO-HI]` (herd.post.sft_data's syntax): `sft_examples` train-split examples per task,
  `group_size` answers each sampled from the `init` model itself (temperature, max_new_tokens, seed) by
  herd.post.evaluate.sample_examples - herd's one engine - and scored by the task's verifier: the policy's own
  rollouts, as in iterative reasoning preference optimisation (Pang et al., arXiv:2404.19733). They are written
  to out_dir/rollouts.jsonl in the shape above, so a run can be audited and re-run from that file. A completion
  the engine ended with an error is left out of its group: it is not an answer the policy gave. Image tasks
  (scenes) need a multimodal `init`; their images are written as PNG data URLs (lossless, so the pairs tokenise
  and tile exactly as sampled), making image pairs that train as a pairs file's do.

Pairs (`TrainConfig.prefer`), one per group at most, chosen deterministically (the first qualifying answer in the
group's order, so the same rollouts always give the same pairs):
- `correct`: a correct answer over a wrong one (Pang et al.). The rejected answer is the first wrong one that still
  has an answer in the expected form (format_ok) when there is one, so the pair teaches the right answer and not
  merely the format; otherwise the first wrong one.
- `shorter`: of the correct answers, the shortest (in generated tokens) over the longest, when the longest is at
  least 20% and 4 tokens longer - a length preference that keeps correctness (Kimi k1.5's long2short DPO,
  arXiv:2501.12599, takes the shortest correct answer over correct ones 1.5x longer). The margin keeps pairs that
  differ by a token or two of noise out.
A group without such a pair is skipped; no pair at all is an error saying why. The pairs are herd.post.dpo_data's
records ({"messages", "chosen", "rejected", "tools"}, each answer turned into an assistant message, tool calls
included, by herd.tasks.base.assistant_message), checked by its `check_pair` and written to out_dir/dpo_pairs.jsonl,
so rollout pairs and pairs files train alike; a resumed run reads that file back instead of rebuilding them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from herd.data.sources import DataError
from herd.post.dpo_data import check_pair
from herd.post.sft_data import Conversation, jsonl_records, task_examples

PAIRS_FILE = "dpo_pairs.jsonl"  # in out_dir: the pairs a run trains on (read back on resume)
ROLLOUTS_FILE = "rollouts.jsonl"  # in out_dir: the groups sampled for a tasks: source
MIN_EXTRA_SHARE, MIN_EXTRA_TOKENS = 0.2, 4  # prefer=shorter: how much longer the rejected answer must be


@dataclass(frozen=True)
class Answer:
    text: str
    correct: bool
    format_ok: bool
    tokens: int  # generated tokens


@dataclass(frozen=True)
class Group:
    """One prompt and the answers sampled for it."""

    messages: list[dict] | None  # None for an image task
    tools: list[dict] | None
    answers: list[Answer]
    where: str  # "FILE line N" or "task NAME seed S difficulty D": for error messages


# ---- reading -------------------------------------------------------------------------------------------------------
def _group(rec, where: str) -> Group:
    """A group from one parsed rollouts record, or a DataError saying what is wrong with it."""
    if not isinstance(rec, dict) or "messages" not in rec or not isinstance(rec.get("answers"), list):
        raise DataError(f"{where}: expected a rollout group {{\"messages\": [...] or null, \"tools\", \"answers\": "
                        "[...]}} (a line of an RL run's rollouts.jsonl)")
    msgs, tools = rec["messages"], rec.get("tools")
    if msgs is not None and not (isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs)):
        raise DataError(f"{where}: \"messages\" must be the prompt's list of messages, or null for an image task")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: \"tools\" must be a list of OpenAI function specs (objects) or null")
    answers = []
    for j, a in enumerate(rec["answers"]):
        ok = isinstance(a, dict) and isinstance(a.get("text"), str) and isinstance(a.get("correct"), bool) and \
            isinstance(a.get("format_ok"), bool) and type(a.get("tokens")) is int and a["tokens"] >= 0
        if not ok:
            raise DataError(f"{where}: answer {j} needs \"text\" (a string), \"correct\" and \"format_ok\" "
                            "(true or false) and \"tokens\" (a count >= 0)")
        answers.append(Answer(a["text"], a["correct"], a["format_ok"], a["tokens"]))
    return Group(msgs, tools, answers, where)


def _json_messages(messages: list[dict]) -> list[dict]:
    """`messages` with every PIL image part (herd.tasks' image tasks) as a PNG data URL, so they can be written."""
    from PIL import Image

    from herd.data.synthetic import image_data_url

    def part(p):
        url = p.get("image_url", {}).get("url") if isinstance(p, dict) and p.get("type") == "image_url" else None
        return {**p, "image_url": {"url": image_data_url(url)}} if isinstance(url, Image.Image) else p

    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


def read_rollouts(path: str | Path) -> list[Group]:
    return [_group(rec, where) for rec, where in jsonl_records(path, "rollout groups",
                                                              "rollout groups (an RL run's rollouts.jsonl)")]


# ---- sampling --------------------------------------------------------------------------------------------------------
def sample_rollouts(cfg, tok, device: str) -> list[dict]:
    """Rollout records (the module docstring's shape) of `cfg.dpo_rollouts` = tasks:SPEC, sampled from cfg.init."""
    from herd import tasks
    from herd.post.evaluate import sample_examples
    from herd.train.snapshots import load_model

    spec = cfg.dpo_rollouts.removeprefix("tasks:")
    examples = task_examples(spec, cfg.sft_examples, "train", "dpo_rollouts", images=True)
    model, mcfg = load_model(cfg.init)
    needs = sorted({ex.task for ex in examples if tasks.get(ex.task).multimodal})
    if needs and mcfg.vision_config is None:
        raise DataError(f"dpo_rollouts tasks:{spec}: task {needs[0]!r} needs images but init {cfg.init} is a text-only "
                        "model: init from a multimodal checkpoint (herd init --multimodal), or drop the task")
    model.to(device).eval()
    sampled = sample_examples(model, tok, {ex.task: tasks.get(ex.task) for ex in examples}, examples,
                              cfg.group_size, cfg.temperature, cfg.max_new_tokens, cfg.seed)
    del model
    return [{"step": 0, "task": s.example.task, "difficulty": s.example.difficulty, "seed": s.example.seed,
             "system": None, "messages": _json_messages(s.example.messages), "tools": s.example.tools,
             "answers": [{"text": text, "reward": score.reward, "correct": score.correct, "format_ok": score.format_ok,
                          "tokens": n} for text, score, n, err in zip(s.completions, s.scores, s.lengths, s.errors,
                                                                      strict=True) if err is None],
             "policy_version": 0} for s in sampled]


# ---- pairs -----------------------------------------------------------------------------------------------------------
def pick(answers: list[Answer], prefer: str) -> tuple[Answer, Answer] | None:
    """(chosen, rejected) of one group by `prefer` (module docstring), or None when the group has no such pair."""
    right = [a for a in answers if a.correct]
    if prefer == "correct":
        wrong = [a for a in answers if not a.correct]
        wrong = [a for a in wrong if a.format_ok] or wrong  # a well-formed wrong answer first
        return (right[0], wrong[0]) if right and wrong else None
    if prefer == "shorter":
        if len(right) < 2:
            return None
        short = min(right, key=lambda a: a.tokens)  # the first of the shortest
        long = max(right, key=lambda a: a.tokens)  # the first of the longest
        extra = long.tokens - short.tokens
        return (short, long) if extra >= max(MIN_EXTRA_TOKENS, MIN_EXTRA_SHARE * short.tokens) else None
    raise ValueError(f"prefer must be correct or shorter, got {prefer!r}")


def answer_message(text: str, tools: list[dict] | None) -> dict:
    """herd.tasks.base.assistant_message, with its tool calls numbered call_0, call_1 ...: the parser draws random
    ids (as the OpenAI API does), which herd.chat's template never renders; numbered, the same rollouts write the
    same pairs file."""
    from herd.tasks.base import assistant_message

    msg = assistant_message(text, tools)
    if msg.get("tool_calls"):
        msg["tool_calls"] = [{**c, "id": f"call_{i}"} for i, c in enumerate(msg["tool_calls"])]
    return msg


def pair_records(groups: list[Group], prefer: str) -> tuple[list[dict], dict[str, int]]:
    """(dpo_data pair records with each one's `where`, counts {groups, pairs, images, no_pair})."""
    out, images = [], 0
    for g in groups:
        if g.messages is None:
            images += 1
            continue
        found = pick(g.answers, prefer)
        if found is not None:
            chosen, rejected = found
            out.append(({"messages": g.messages, "chosen": answer_message(chosen.text, g.tools),
                         "rejected": answer_message(rejected.text, g.tools), "tools": g.tools}, g.where))
    counts = {"groups": len(groups), "pairs": len(out), "images": images, "no_pair": len(groups) - images - len(out)}
    return out, counts


def _no_pairs(counts: dict[str, int], prefer: str, source: str) -> DataError:
    if counts["images"] == counts["groups"]:
        return DataError(f"{source}: all {counts['groups']} groups are image tasks without messages (an RL run does "
                         "not store their images): sample them with dpo_rollouts=tasks:NAME, or use text tasks")
    if prefer == "correct":
        why = "no group had both a correct and a wrong answer"
    else:
        why = (f"no group had two correct answers, one at least {MIN_EXTRA_SHARE:.0%} and {MIN_EXTRA_TOKENS} tokens "
               "longer than the other")
    return DataError(f"{source}: {why} ({counts['no_pair']} text groups): sample more answers per prompt "
                     "(group_size), or use tasks or difficulties the model solves some of the time")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """Written whole, then renamed into place, so no reader ever sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def rollout_pairs(cfg, tok, device: str = "cpu", main: bool = True) -> list[tuple[Conversation, Conversation]]:
    """The checked pairs of `cfg.dpo_rollouts` by `cfg.prefer`; out_dir/dpo_pairs.jsonl (and, for a tasks: source,
    out_dir/rollouts.jsonl) written when `main` (rank 0: every rank builds the same pairs, one writes them)."""
    src, out = cfg.dpo_rollouts, Path(cfg.out_dir)
    if src.startswith("tasks:"):
        records = sample_rollouts(cfg, tok, device)
        if main:
            _write_jsonl(out / ROLLOUTS_FILE, records)
        where = [f"task {r['task']} seed {r['seed']} difficulty {r['difficulty']}" for r in records]
        groups = [_group(r, w) for r, w in zip(records, where, strict=True)]
    else:
        groups = read_rollouts(src)
    found, counts = pair_records(groups, cfg.prefer)
    if not found:
        raise _no_pairs(counts, cfg.prefer, src)
    root = Path(src).resolve().parent if not src.startswith("tasks:") else out  # image paths: next to the file
    pairs = [check_pair(rec, where, root) for rec, where in found]
    if main:
        _write_jsonl(out / PAIRS_FILE, [rec for rec, _ in found])
        print(f"DPO pairs (prefer {cfg.prefer}): {counts['pairs']} from {counts['groups']} groups of {src}; skipped "
              f"{counts['no_pair']} without a usable pair and {counts['images']} of image tasks (no messages "
              f"stored) -> {out / PAIRS_FILE}", flush=True)
    return pairs
