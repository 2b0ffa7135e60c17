"""SFT data: conversations in, packed rows with targets on the assistant's tokens only out.

Sources (`TrainConfig.sft_data`):
- a JSONL file, one conversation per line in OpenAI's chat shape: {"messages": [...], "tools": [...]?}, roles
  system / developer / user / assistant / tool, assistant `tool_calls` as the OpenAI API writes them. Every
  conversation is checked when read; a malformed line fails with its line number and what to change. Every 20th
  conversation is held out for validation (all of them serve when there are fewer than 20).
- `tasks:NAME[,NAME...][@D|@LO-HI]`: `sft_examples` examples per task from herd.tasks' train split (held-out split
  for validation), each the task's prompt plus its reference answer (herd.tasks.base.assistant_message). Without
  `@difficulty` the examples spread evenly over the task's difficulties.
- `scenes:TASK` (caption | qa | ground | mixed | all): `sft_examples` synthetic scene chats with their PIL images
  (herd.data.synthetic.scene_chat, the conversations a joint stage's `image_rows` train on: bare answers, 56-pixel
  scenes of up to 4 shapes), from the run seed's stream (the validation stream for validation).
- several of them joined by `+`, e.g. `tasks:arithmetic,counting@1+scenes:qa`: a multimodal model's text
  post-training keeps its image chats (herd recipe's multimodal preset does this: without them text-only SFT erased
  what the joint stage taught, docs/vision.md).

Each conversation becomes token ids through herd.chat's template (herd.train.inputs.chat_example), with labels on the
assistant turns only - their text or tool calls and their end token; prompts, tool results and the scaffolding
predict nothing - as TRL's SFTTrainer does with `assistant_only_loss=True`
(https://huggingface.co/docs/trl/sft_trainer). `ChatPacker` packs whole conversations into rows of `seq_len`
(a conversation that does not fit starts the next row; the rest of the row is padding) with doc ids, so
conversations never attend to each other and positions restart at each (herd.data.packing's convention).

Images (multimodal models: vision tower + decoder): a JSONL user turn may hold OpenAI image parts,
{"type": "image_url", "image_url": {"url": "data:image/png;base64,..." or a path}}, paths relative to the JSONL
file's folder (herd.data.sources' convention; checked to exist when read; remote URLs are refused, as herd.image
does); `tasks:scenes` gives PIL images. herd.chat lays out each image's tokens by its tile grid for the model's
vision config, so SFT on images needs a model with a vision tower (DataError otherwise). Image tokens, like the
rest of the prompt, are never targets. Packing is unchanged: the multimodal model writes the image features into
the `<|patch|>` positions of the whole batch in row-major order (herd.model.multimodal.fuse, `masked_scatter`), and
vision tiles are encoded independently of each other, so a batch's `pixel_values` are simply the tiles of its
rows' images in the order their tokens appear (row by row, conversation by conversation); doc ids keep the
conversations apart as for text. Tiles are made again whenever a batch holds a conversation (only the image
sources are kept), because a data set's tiles would not fit in memory; preprocessing is deterministic, so the
batches, and a resumed run, are exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from herd.data.packing import rank_slice
from herd.data.sources import DataError
from herd.train.inputs import IGNORE, VAL_OFFSET, chat_example

ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None
    where: str = ""  # "FILE line N" or "task NAME seed S": for error messages and the judge's scores file


# ---- reading -------------------------------------------------------------------------------------------------------
def _image_url(src, root: Path, where: str, j: int) -> str:
    """An image part's source as prepare_chat will load it: a data URL, or the absolute path of an existing file."""
    if not isinstance(src, str) or not src:
        raise DataError(f"{where}: message {j}: an image part needs a source: {{\"type\": \"image_url\", "
                        f"\"image_url\": {{\"url\": \"data:image/png;base64,...\" or a path relative to {root}}}}}")
    if src.startswith("data:"):
        return src
    if src.startswith(("http://", "https://")):
        raise DataError(f"{where}: message {j}: remote image {src[:80]!r}: herd does not fetch URLs; download it and "
                        "give its path (relative to the JSONL file's folder) or a data URL")
    path = root / src  # an absolute path stays as it is
    if not path.is_file():
        raise DataError(f"{where}: message {j}: image file {src!r} not found (looked for {path})")
    return str(path)


def _with_images(m: dict, root: Path, where: str, j: int) -> dict:
    """A user message with every image part as {"type": "image_url", "image_url": {"url": resolved source}}."""
    from herd.chat import collect_images

    if m["role"] != "user":
        raise DataError(f"{where}: message {j} ({m['role']}) holds an image; images go in user messages")
    sources = iter(collect_images([m]))  # herd.chat's reading of the parts, in order
    parts = [{"type": "image_url", "image_url": {"url": _image_url(next(sources), root, where, j)}}
             if isinstance(p, dict) and p.get("type") in ("image", "image_url") else p for p in m["content"]]
    return {**m, "content": parts}


def _check(rec, where: str, root: Path | None = None) -> Conversation:
    """A conversation from one parsed JSONL record, or a DataError saying what is wrong with it. `root`: the folder
    image paths are relative to; None refuses image parts (data that is text-only)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not rec["messages"]:
        raise DataError(f"{where}: expected an object with a non-empty \"messages\" list")
    tools = rec.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: \"tools\" must be a list of OpenAI function specs (objects)")
    messages = list(rec["messages"])
    for j, m in enumerate(messages):
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
        if content is not None and not isinstance(content, (str, list)):
            raise DataError(f"{where}: message {j}: content must be a string or a list of parts")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image", "image_url")
                                             for p in content):
            if root is None:
                raise DataError(f"{where}: message {j} holds an image; this data is text-only for now (remove the "
                                "image parts; herd sft takes conversations with images)")
            messages[j] = _with_images(m, root, where, j)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message: nothing to learn from")
    return Conversation(messages, tools, where)


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
    root = Path(path).resolve().parent  # image paths are relative to the file's folder
    return [_check(rec, where, root) for rec, where in jsonl_records(path, "conversations",
                                                                    "conversations, or use --data tasks:NAME")]


def val_split(items: list, split: str) -> list:
    """Every 20th item is validation ("val"), the rest "train"; all of them when there are fewer than 20."""
    return [x for i, x in enumerate(items) if (i % 20 == 19) == (split == "val")] or items


def _levels(level: str, task, spec: str, source: str) -> tuple[int, int]:
    """The difficulty range of `@D` (D..D), `@LO-HI` or nothing (1..the task's maximum)."""
    if not level:
        return 1, task.max_difficulty
    lo, _, hi = level.partition("-")
    try:
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise DataError(f"{source} tasks:{spec}: difficulty must be D or LO-HI, got {level!r}") from None
    if not 1 <= lo <= hi <= task.max_difficulty:
        raise DataError(f"{source} tasks:{spec}: difficulty {level} is outside {task.name}'s 1..{task.max_difficulty}")
    return lo, hi


def task_examples(spec: str, n: int, split: str, source: str = "sft_data", images: bool = False) -> list:
    """`NAME[,NAME...][@D|@LO-HI]`: n herd.tasks examples per task (text tasks only unless `images`; `source` names
    the setting in errors), spread evenly over difficulties LO..HI (default: all the task's difficulties)."""
    from herd import tasks

    names, _, level = spec.partition("@")
    out = []
    for name in names.split(","):
        try:
            task = tasks.get(name.strip())
        except KeyError as e:
            raise DataError(f"{source} tasks:{spec}: {e.args[0]}") from e
        if task.multimodal and not images:
            raise DataError(f"{source} tasks:{spec}: task {task.name!r} needs images, which this use takes none of")
        lo, hi = _levels(level, task, spec, source)  # n spread evenly over the difficulties lo..hi
        d = hi - lo + 1
        blocks = [(lo + k, n // d + (k < n % d)) for k in range(d)]
        for difficulty, count in blocks:
            # train seeds from 0; held-out seeds come from their own range (herd.tasks)
            out += tasks.draw(task, split, count, difficulty, start=difficulty * 100_000)
    return out


def task_conversations(spec: str, n: int, split: str) -> list[Conversation]:
    """`NAME[,NAME...][@D|@LO-HI]`: n examples per task with their reference answers."""
    from herd.tasks.base import assistant_message

    return [Conversation([*ex.messages, assistant_message(ex.answer, ex.tools)], ex.tools,
                         f"task {ex.task} seed {ex.seed} difficulty {ex.difficulty}")
            for ex in task_examples(spec, n, split, images=True)]


def scene_conversations(task: str, n: int, seed: int, size: int) -> list[Conversation]:
    """n synthetic scene chats of `task` (herd.data.synthetic.scene_chat) from stream `seed`."""
    from herd.data.synthetic import TASKS, scene_chat

    if task not in TASKS:
        raise DataError(f"sft_data scenes:{task}: the scene task must be one of {', '.join(TASKS)}")
    return [Conversation(scene_chat(seed, i, task, size=size, max_shapes=4)[1], None, f"scenes {task} {i}")
            for i in range(n)]


def conversations(cfg, split: str) -> list[Conversation]:
    """The conversations of `cfg.sft_data` for split "train" or "val" (module docstring)."""
    out = []
    n = cfg.sft_examples if split == "train" else max(cfg.sft_examples // 20, 1)
    for src in (cfg.sft_data or "").split("+"):
        if src.startswith("tasks:"):
            out += task_conversations(src[len("tasks:"):], n, "train" if split == "train" else "heldout")
        elif src.startswith("scenes:"):
            seed = cfg.seed + (VAL_OFFSET if split == "val" else 0)
            out += scene_conversations(src[len("scenes:"):], n, seed, cfg.scene_size)
        else:
            out += val_split(read_jsonl(src), split)
    return out


@dataclass(frozen=True)
class Example:
    """One encoded conversation: ids, labels (labels[t] = ids[t + 1] on assistant tokens, else IGNORE) and its image
    sources in the order their tokens appear (herd.chat.collect_images), tiled when a batch holds it."""

    ids: list[int]
    labels: list[int]
    images: tuple = ()


def example(conv: Conversation, tok, max_len: int, vision=None) -> Example:
    """The conversation in the checkpoint's chat format (herd.chat.default_template: herd's own, or the template a
    tokenizer without Llama 4's chat tokens brings, such as SmolLM2's ChatML); image tokens laid out for `vision`
    (the model's VisionConfig; None: a text-only model, which cannot take images)."""
    from herd.chat import collect_images, default_template

    images = tuple(collect_images(conv.messages))
    if images and vision is None:
        raise DataError(f"{conv.where}: the conversation holds images but the model has no vision tower: init from "
                        "a multimodal checkpoint (herd init --multimodal, or a run trained with image_rows > 0), or "
                        "remove the images")
    try:
        ids, labels, _ = chat_example(conv.messages, tok, vision, 1 << 62, conv.where, conv.tools,
                                      default_template(tok))
    except ValueError as e:  # what the chat template or herd.image refuse (unknown parts, broken images ...)
        raise DataError(f"{conv.where}: {e}") from e
    if len(ids) > max_len:
        what = " (image tokens included)" if images else ""
        raise DataError(f"{conv.where}: the conversation takes {len(ids)} tokens{what}, more than seq_len={max_len}; "
                        "raise seq_len or shorten it")
    return Example(ids, labels, images)


def encode(conv: Conversation, tok, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of a text conversation (`example`)."""
    ex = example(conv, tok, max_len)
    return ex.ids, ex.labels


def tiles(images, vision) -> torch.Tensor:
    """(tiles, 3, H, W) pixel values of image sources in order, tiled for `vision` as `example` laid out their
    tokens (herd.image.preprocess; deterministic, so the same tiles every time)."""
    from herd.image import preprocess

    return preprocess(list(images), tile_size=vision.image_size, max_tiles=vision.max_tiles).pixel_values


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
    """Infinite iterator of (B, T) batches {"input_ids", "labels", "doc_ids"} of whole conversations (EpochStream),
    plus "pixel_values" (tiles, 3, H, W) when they hold images: the tiles of the rows' images in token order, made
    for `vision` (the model's VisionConfig; module docstring)."""

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True, vision=None):
        super().__init__(examples, seq_len, batch_size, pad_id, seed, rank, world_size, shuffle, "conversations")
        if vision is None and any(ex.images for ex in examples):
            raise ValueError("conversations with images need the model's vision config (vision=)")
        self.vision = vision

    def _row(self, order: list) -> tuple[list[int], list[int], list[int], list]:
        ids: list[int] = []
        labels: list[int] = []
        doc_ids: list[int] = []
        images: list = []  # the row's image sources, in token order
        doc = 0
        while True:
            if self.cursor == len(self.items):  # peek past an epoch's end: the next conversation may not fit
                self.cursor, self.epoch = 0, self.epoch + 1
                order[:] = self._order()
            ex = self.items[order[self.cursor]]
            x, y = ex.ids, ex.labels
            if len(ids) + len(x) > self.seq_len and ids:
                break  # whole conversations only: this one starts the next row
            ids, labels, doc_ids = ids + x, labels + y, doc_ids + [doc] * len(x)
            images += ex.images
            doc = doc + 1
            self._next_index(order)
            if len(ids) == self.seq_len:
                break
        pad = self.seq_len - len(ids)
        return ids + [self.pad_id] * pad, labels + [IGNORE] * pad, doc_ids + [-1] * pad, images

    def __next__(self) -> dict[str, torch.Tensor]:
        order, images = self._order(), []

        def next_row():
            *row, row_images = self._row(order)
            images.append(row_images)
            return row

        self.step += 1
        batch = rank_slice(next_row, self.batch_size, self.world_size, self.rank)
        # this rank's rows' images, row by row: the order the model scatters features into <|patch|> tokens
        mine = [src for row in images[self.rank * self.batch_size:(self.rank + 1) * self.batch_size] for src in row]
        if mine:
            batch["pixel_values"] = tiles(mine, self.vision)  # (tiles, 3, H, W)
        return batch


def pad_id(tok) -> int:
    """The id padding rows: the tokenizer's pad, else Llama 4's <|finetune_right_pad|>, else the eos (a tokenizer
    with neither; padded positions are never attended to nor targets, so any id serves)."""
    if tok.pad_id is not None:
        return tok.pad_id
    return tok.specials.get("<|finetune_right_pad|>", tok.eos_id)


def with_init_tokenizer(cfg):
    """`cfg` with tokenizer=init when none was named and the checkpoint being tuned brings its own (a Hugging Face
    folder's tokenizer.json, a GGUF file's vocabulary): a fine-tune speaks its model's tokens."""
    p = Path(cfg.init) if cfg.init else None
    own = p is not None and ((p / "tokenizer.json").is_file() or (p.is_file() and p.suffix.lower() == ".gguf"))
    return cfg.replace(tokenizer=str(p)) if own and cfg.tokenizer == "tiny" else cfg
