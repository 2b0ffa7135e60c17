"""DPO data: preference pairs in, padded (chosen, rejected) rows with the reference model's log-probs out.

Pairs file (`TrainConfig.dpo_pairs`), one pair per line:
    {"messages": [... up to the user's turn], "chosen": {assistant message}, "rejected": {assistant message},
     "tools": [...]?}
the shape of TRL's conversational preference datasets (https://huggingface.co/docs/trl/dpo_trainer). Each side is
checked as an SFT conversation (herd.post.sft_data: roles, tool calls, image parts in user turns as data URLs or
paths relative to the file), so a malformed line fails with its line number and what to change. Every 20th pair
is held out for validation (all of them serve when there are fewer than 20).

Each side becomes the conversation `messages + [answer]` rendered by herd.chat's template, with labels on the final
assistant turn only (an earlier assistant turn in the prompt is context, not what is compared): DPO compares the
log-probs of the two answers given the same prompt (Rafailov et al., arXiv:2305.18290).

Reference log-probs are computed once, before training, by the frozen `init` model (no grad, float32, eval mode) on
exactly the rows the trainer will see (same padding, same doc ids), and stored with each pair, so every batch
carries `ref_chosen` / `ref_rejected` and the policy is the only model in memory while training (TRL's
`precompute_ref_log_probs=True`). The computation is deterministic, so a resumed run recomputes the same values.

`PairPacker` yields batches of `batch_size` pairs: rows 2i (chosen) and 2i + 1 (rejected) are pair i, each one
conversation padded to `seq_len` (doc id 0 on its tokens, -1 on padding, herd.data.packing's convention).

Images (multimodal `init`): each side is encoded by herd.post.sft_data.example for the model's vision config, so
image tokens are laid out as in SFT and are never targets. Both sides share the prompt and so its images; the
multimodal model fills the batch's `<|patch|>` tokens in row order, so a batch's `pixel_values` are the tiles of
pair 0's images for its chosen row, again for its rejected row, then pair 1's, and so on (herd.post.sft_data.tiles,
made again per batch as SFT does). The reference log-probs are computed the same way, with the images.
"""

from __future__ import annotations

from pathlib import Path

import torch

from herd.data.packing import rank_slice
from herd.data.sources import DataError
from herd.post.sft_data import Conversation, EpochStream, _check, example, jsonl_records, tiles
from herd.train.inputs import IGNORE

Side = tuple[list[int], list[int]]  # (ids, labels) of one conversation
Pair = tuple[Side, Side]  # (chosen, rejected)


def _answer(msg, name: str, where: str) -> dict:
    if not isinstance(msg, dict):
        raise DataError(f"{where}: \"{name}\" must be an assistant message object, e.g. "
                        f"{{\"role\": \"assistant\", \"content\": \"...\"}}")
    if msg.get("role", "assistant") != "assistant":
        raise DataError(f"{where}: \"{name}\" has role {msg['role']!r}; it must be the assistant's answer")
    return {**msg, "role": "assistant"}


def check_pair(rec, where: str, root: Path | None = None) -> tuple[Conversation, Conversation]:
    """(chosen conversation, rejected conversation) from one parsed record, or a DataError saying what is wrong.
    `root`: the folder image paths are relative to (None refuses image parts)."""
    if not isinstance(rec, dict) or not all(k in rec for k in ("messages", "chosen", "rejected")):
        raise DataError(f"{where}: expected an object with \"messages\" (the prompt), \"chosen\" and \"rejected\" "
                        "(assistant messages)")
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) or \
            msgs[-1].get("role") == "assistant":
        raise DataError(f"{where}: \"messages\" must be a non-empty list ending before the answer (the user's or a "
                        "tool's turn); put the answers in \"chosen\" and \"rejected\"")
    sides = []
    for name in ("chosen", "rejected"):
        conv = {"messages": [*msgs, _answer(rec[name], name, where)], "tools": rec.get("tools")}
        sides.append(_check(conv, f"{where} ({name})", root))
    return sides[0], sides[1]


def read_pairs(path: str | Path) -> list[tuple[Conversation, Conversation]]:
    root = Path(path).resolve().parent  # image paths are relative to the file's folder, as for SFT data
    return [check_pair(rec, where, root)
            for rec, where in jsonl_records(path, "pairs", "{messages, chosen, rejected} lines")]


def last_answer_only(labels: list[int]) -> list[int]:
    """Labels with only the last run of targets kept: the final assistant turn (earlier ones are the prompt)."""
    end = max((t for t, y in enumerate(labels) if y != IGNORE), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return [y if start <= t <= end else IGNORE for t, y in enumerate(labels)]


def encode_pair(pair: tuple[Conversation, Conversation], tok, max_len: int, vision=None) -> Pair:
    """Both sides through herd.chat's template, image tokens laid out for `vision` (the model's VisionConfig; None:
    a text-only model, which refuses images with a DataError)."""
    out = []
    for conv in pair:
        ex = example(conv, tok, max_len, vision)
        out.append((ex.ids, last_answer_only(ex.labels)))
    return out[0], out[1]


def pair_images(pair: tuple[Conversation, Conversation]) -> tuple:
    """The image sources of a pair's prompt in token order: one copy, as both sides share the prompt (images go in
    user turns only, never in the answers)."""
    from herd.chat import collect_images

    return tuple(collect_images(pair[0].messages))


def row_tiles(images: list[tuple], vision, device="cpu") -> dict[str, torch.Tensor]:
    """{"pixel_values": (tiles, 3, H, W)} for rows 2i, 2i + 1 of pairs with image sources `images[i]` (each pair's
    images twice: its chosen row, then its rejected row), or {} when they hold none."""
    srcs = [src for imgs in images for src in (*imgs, *imgs)]
    return {"pixel_values": tiles(srcs, vision).to(device)} if srcs else {}


def pad_row(side: Side, seq_len: int, pad_id: int) -> tuple[list[int], list[int], list[int]]:
    ids, labels = side
    pad = seq_len - len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE] * pad, [0] * len(ids) + [-1] * pad


@torch.no_grad()
def reference_logprobs(init: str, pairs: list[Pair], seq_len: int, pad_id: int, device: str = "cpu",
                       batch_size: int = 8, images: list[tuple] | None = None) -> list[tuple[float, float]]:
    """(log ref(chosen), log ref(rejected)) of every pair: summed over the answer's tokens, by the frozen `init`.
    `images[k]`: pair k's image sources (pair_images), seen by init's vision tower, which tiles them as the pairs'
    image tokens were laid out (encode_pair with init's vision config)."""
    from herd.post.dpo_loss import sequence_logprobs
    from herd.train.snapshots import load_model

    model, mcfg = load_model(init)
    images = images or [()] * len(pairs)
    if any(images) and mcfg.vision_config is None:
        raise DataError(f"the pairs hold images but {init} has no vision tower: init from a multimodal checkpoint "
                        "(herd init --multimodal), or remove the images")
    model.to(device).eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        rows = [pad_row(side, seq_len, pad_id) for pair in pairs[i:i + batch_size] for side in pair]
        ids, labels, docs = (torch.tensor([r[k] for r in rows], device=device) for k in range(3))  # (2B, T)
        kw = row_tiles(images[i:i + batch_size], mcfg.vision_config, device)
        lp = sequence_logprobs(model(ids, doc_ids=docs, **kw).float(), labels)  # (2B,) 2i chosen, 2i + 1 rejected
        out += list(zip(lp[0::2].tolist(), lp[1::2].tolist(), strict=True))
    return out


class PairPacker(EpochStream):
    """Infinite iterator of batches {"input_ids", "labels", "doc_ids"} (2B, T) and {"ref_chosen", "ref_rejected"}
    (B,): rows 2i and 2i + 1 are pair i's chosen and rejected sides (EpochStream: order and position), plus
    "pixel_values" when the pairs hold images (`images[k]`: pair k's sources, tiled for `vision`; module docstring)."""

    def __init__(self, pairs: list[Pair], refs: list[tuple[float, float]], seq_len: int, batch_size: int,
                 pad_id: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 images: list[tuple] | None = None, vision=None):
        if len(pairs) != len(refs):
            raise ValueError(f"need one reference per pair, got {len(pairs)} pairs, {len(refs)} references")
        super().__init__(pairs, seq_len, batch_size, pad_id, seed, rank, world_size, shuffle, "pairs")
        self.refs, self.images, self.vision = refs, images or [()] * len(pairs), vision
        if len(self.images) != len(pairs) or (any(self.images) and vision is None):
            raise ValueError("pairs with images need one tuple of image sources per pair (images=) and the model's "
                             "vision config (vision=)")

    def __next__(self) -> dict[str, torch.Tensor]:
        order, taken, pending = self._order(), [], []

        def next_row():
            if not pending:  # the next pair: its chosen row, then its rejected row
                k = self._next_index(order)
                taken.append(k)
                pending.extend(pad_row(side, self.seq_len, self.pad_id) for side in reversed(self.items[k]))
            return pending.pop()

        self.step += 1
        batch = rank_slice(next_row, 2 * self.batch_size, self.world_size, self.rank)
        mine = taken[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        batch["ref_chosen"] = torch.tensor([self.refs[k][0] for k in mine], dtype=torch.float32)  # (B,)
        batch["ref_rejected"] = torch.tensor([self.refs[k][1] for k in mine], dtype=torch.float32)  # (B,)
        batch.update(row_tiles([self.images[k] for k in mine], self.vision))  # rows' images in row order
        return batch
