"""SFT data: conversations in, packed rows with targets on the assistant's tokens only out.

Sources (`TrainConfig.sft_data`):
- a JSONL file, one conversation per line in OpenAI's chat shape: {"messages": [...], "tools": [...]?}, roles
  system / developer / user / assistant / tool, assistant `tool_calls` as the OpenAI API writes them. Every
  conversation is checked when read; a malformed line fails with its line number and what to change. Every 20th
  conversation is held out for validation (all of them serve when there are fewer than 20).
- `tasks:NAME[,NAME...][@difficulty]`: `sft_examples` examples per task from herd.tasks' train split (held-out split
  for validation), each the task's prompt plus its reference answer (herd.tasks.base.assistant_message). Without
  `@difficulty` the examples spread evenly over the task's difficulties.

Each conversation becomes token ids through herd.chat's template (herd.train.inputs.chat_example), with labels on the
assistant turns only - their text or tool calls and their end token; prompts, tool results and the scaffolding
predict nothing - as TRL's SFTTrainer does with `assistant_only_loss=True`
(https://huggingface.co/docs/trl/sft_trainer). `ChatPacker` packs whole conversations into rows of `seq_len`
(a conversation that does not fit starts the next row; the rest of the row is padding) with doc ids, so
conversations never attend to each other and positions restart at each (herd.data.packing's convention).

Images are not supported yet: herd sft trains the text model, and a conversation with an image part is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from herd.data.packing import rank_slice
from herd.data.sources import DataError
from herd.train.inputs import IGNORE, chat_example

ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None
    where: str = ""  # "FILE line N" or "task NAME seed S": for error messages and the judge's scores file


# ---- reading -------------------------------------------------------------------------------------------------------
def _check(rec, where: str) -> Conversation:
    """A conversation from one parsed JSONL record, or a DataError saying what is wrong with it."""
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not rec["messages"]:
        raise DataError(f"{where}: expected an object with a non-empty \"messages\" list")
    tools = rec.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: \"tools\" must be a list of OpenAI function specs (objects)")
    for j, m in enumerate(rec["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: message {j} needs a \"role\", one of {', '.join(ROLES)}")
        content, calls = m.get("content"), m.get("tool_calls")
        if content is None and not calls:
            raise DataError(f"{where}: message {j} ({m['role']}) has no content")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise DataError(f"{where}: message {j}: only assistant messages carry a \"tool_calls\" list")
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise DataError(f"{where}: message {j}: each tool call needs {{\"function\": {{\"name\": ..., "
                                    f"\"arguments\": ...}}}}")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image", "image_url")
                                             for p in content):
            raise DataError(f"{where}: message {j} holds an image; herd sft trains text models only for now "
                            "(remove image parts, or train images with herd train image_rows=N image_data=FILE)")
        if content is not None and not isinstance(content, (str, list)):
            raise DataError(f"{where}: message {j}: content must be a string or a list of parts")
    if not any(m["role"] == "assistant" for m in rec["messages"]):
        raise DataError(f"{where}: no assistant message: nothing to learn from")
    return Conversation(rec["messages"], tools, where)


def jsonl_records(path: str | Path, what: str, shape: str) -> list[tuple[dict, str]]:
    """(record, "FILE line N") for every non-empty line of a JSONL file of `what` (e.g. "conversations"); a DataError
    naming the file and line for a missing file, a line that is not JSON, or no records at all."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p} is not a file (give a .jsonl of {shape})")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), f"{p} line {n}"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p} line {n}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not out:
        raise DataError(f"{p} holds no {what}")
    return out


def read_jsonl(path: str | Path) -> list[Conversation]:
    return [_check(rec, where) for rec, where in jsonl_records(path, "conversations",
                                                              "conversations, or use --data tasks:NAME")]


def val_split(items: list, split: str) -> list:
    """Every 20th item is validation ("val"), the rest "train"; all of them when there are fewer than 20."""
    return [x for i, x in enumerate(items) if (i % 20 == 19) == (split == "val")] or items


def task_conversations(spec: str, n: int, split: str) -> list[Conversation]:
    """`NAME[,NAME...][@difficulty]`: n examples per task with their reference answers."""
    from herd import tasks
    from herd.tasks.base import assistant_message

    names, _, level = spec.partition("@")
    out = []
    for name in names.split(","):
        try:
            task = tasks.get(name.strip())
        except KeyError as e:
            raise DataError(f"sft_data tasks:{spec}: {e.args[0]}") from e
        if task.multimodal:
            raise DataError(f"task {task.name!r} needs images; herd sft trains text models only for now")
        if level:
            blocks = [(int(level), n)]
        else:  # n spread over the difficulties 1..max
            d = task.max_difficulty
            blocks = [(k + 1, n // d + (k < n % d)) for k in range(d)]
        for difficulty, count in blocks:
            # train seeds from 0; held-out seeds come from their own range (herd.tasks)
            for ex in tasks.draw(task, split, count, difficulty, start=difficulty * 100_000):
                msgs = [*ex.messages, assistant_message(ex.answer, ex.tools)]
                out.append(Conversation(msgs, ex.tools, f"task {task.name} seed {ex.seed} difficulty {difficulty}"))
    return out


def conversations(cfg, split: str) -> list[Conversation]:
    """The conversations of `cfg.sft_data` for split "train" or "val" (module docstring)."""
    src = cfg.sft_data or ""
    if src.startswith("tasks:"):
        return task_conversations(src[len("tasks:"):], cfg.sft_examples if split == "train" else
                                  max(cfg.sft_examples // 20, 1), "train" if split == "train" else "heldout")
    return val_split(read_jsonl(src), split)


def encode(conv: Conversation, tok, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation: labels[t] = ids[t + 1] on assistant tokens, else IGNORE."""
    try:
        ids, labels, _ = chat_example(conv.messages, tok, None, 1 << 62, conv.where, conv.tools)
    except ValueError as e:  # what the chat template refuses (unknown part types, arguments that are not JSON ...)
        raise DataError(f"{conv.where}: {e}") from e
    if len(ids) > max_len:
        raise DataError(f"{conv.where}: the conversation takes {len(ids)} tokens, more than seq_len={max_len}; "
                        f"raise seq_len or shorten it")
    return ids, labels


# ---- packing -------------------------------------------------------------------------------------------------------
class EpochStream:
    """The position in an endless stream of `items` read in a fresh (seed, epoch) order every epoch, shared by the
    post-training packers: `_next_index(order)` takes the next item (starting a new epoch, in a new order, after the
    last), and `state_dict` / `load_state_dict` save and restore the position, so a resumed run reads exactly on."""

    def __init__(self, items: list, seq_len: int, batch_size: int, pad_id: int, seed: int, rank: int,
                 world_size: int, shuffle: bool, noun: str):
        if not items:
            raise ValueError(f"no {noun} to pack")
        self.items, self.seq_len, self.batch_size, self.pad_id, self.noun = items, seq_len, batch_size, pad_id, noun
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.epoch = self.cursor = self.step = 0

    def _order(self) -> list[int]:
        n = len(self.items)
        return list(np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else range(n))

    def _next_index(self, order: list[int]) -> int:
        if self.cursor == len(self.items):  # a new epoch, in a new order
            self.cursor, self.epoch = 0, self.epoch + 1
            order[:] = self._order()
        self.cursor += 1
        return int(order[self.cursor - 1])

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "step": self.step, "seed": self.seed,
                "n_items": len(self.items)}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["n_items"]) != (self.seed, len(self.items)):
            raise ValueError(f"data state is for seed {state['seed']} and {state['n_items']} {self.noun}, this run "
                             f"has seed {self.seed} and {len(self.items)}: the stream would differ")
        self.epoch, self.cursor, self.step = int(state["epoch"]), int(state["cursor"]), int(state["step"])


class ChatPacker(EpochStream):
    """Infinite iterator of (B, T) batches {"input_ids", "labels", "doc_ids"} of whole conversations (EpochStream)."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], seq_len: int, batch_size: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        super().__init__(examples, seq_len, batch_size, pad_id, seed, rank, world_size, shuffle, "conversations")

    def _row(self, order: list) -> tuple[list[int], list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        doc_ids: list[int] = []
        doc = 0
        while True:
            if self.cursor == len(self.items):  # peek past an epoch's end: the next conversation may not fit
                self.cursor, self.epoch = 0, self.epoch + 1
                order[:] = self._order()
            x, y = self.items[order[self.cursor]]
            if len(ids) + len(x) > self.seq_len and ids:
                break  # whole conversations only: this one starts the next row
            ids, labels, doc_ids = ids + x, labels + y, doc_ids + [doc] * len(x)
            doc = doc + 1
            self._next_index(order)
            if len(ids) == self.seq_len:
                break
        pad = self.seq_len - len(ids)
        return ids + [self.pad_id] * pad, labels + [IGNORE] * pad, doc_ids + [-1] * pad

    def __next__(self) -> dict[str, torch.Tensor]:
        order = self._order()
        self.step += 1
        return rank_slice(lambda: self._row(order), self.batch_size, self.world_size, self.rank)


def pad_id(tok) -> int:
    return tok.pad_id if tok.pad_id is not None else tok.specials["<|finetune_right_pad|>"]
