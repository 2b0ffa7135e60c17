"""DPO data: preference pairs in, padded (chosen, rejected) rows with the reference model's log-probs out.

Pairs file (`TrainConfig.dpo_pairs`), one pair per line:
    {"messages": [... up to the user's turn], "chosen": {assistant message}, "rejected": {assistant message},
     "tools": [...]?}
the shape of TRL's conversational preference datasets (https://huggingface.co/docs/trl/dpo_trainer). Each side is
checked as an SFT conversation (herd.post.sft_data: roles, tool calls, no images), so a malformed line fails with
its line number and what to change. Every 20th pair is held out for validation (all of them serve when there are
fewer than 20).

Each side becomes the conversation `messages + [answer]` rendered by herd.chat's template, with labels on the final
assistant turn only (an earlier assistant turn in the prompt is context, not what is compared): DPO compares the
log-probs of the two answers given the same prompt (Rafailov et al., arXiv:2305.18290).

Reference log-probs are computed once, before training, by the frozen `init` model (no grad, float32, eval mode) on
exactly the rows the trainer will see (same padding, same doc ids), and stored with each pair, so every batch
carries `ref_chosen` / `ref_rejected` and the policy is the only model in memory while training (TRL's
`precompute_ref_log_probs=True`). The computation is deterministic, so a resumed run recomputes the same values.

`PairPacker` yields batches of `batch_size` pairs: rows 2i (chosen) and 2i + 1 (rejected) are pair i, each one
conversation padded to `seq_len` (doc id 0 on its tokens, -1 on padding, herd.data.packing's convention).
"""

from __future__ import annotations

from pathlib import Path

import torch

from herd.data.packing import rank_slice
from herd.data.sources import DataError
from herd.post.sft_data import Conversation, EpochStream, _check, encode, jsonl_records
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


def check_pair(rec, where: str) -> tuple[Conversation, Conversation]:
    """(chosen conversation, rejected conversation) from one parsed record, or a DataError saying what is wrong."""
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
        sides.append(_check(conv, f"{where} ({name})"))
    return sides[0], sides[1]


def read_pairs(path: str | Path) -> list[tuple[Conversation, Conversation]]:
    return [check_pair(rec, where) for rec, where in jsonl_records(path, "pairs", "{messages, chosen, rejected} lines")]


def last_answer_only(labels: list[int]) -> list[int]:
    """Labels with only the last run of targets kept: the final assistant turn (earlier ones are the prompt)."""
    end = max((t for t, y in enumerate(labels) if y != IGNORE), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return [y if start <= t <= end else IGNORE for t, y in enumerate(labels)]


def encode_pair(pair: tuple[Conversation, Conversation], tok, max_len: int) -> Pair:
    out = []
    for conv in pair:
        ids, labels = encode(conv, tok, max_len)
        out.append((ids, last_answer_only(labels)))
    return out[0], out[1]


def pad_row(side: Side, seq_len: int, pad_id: int) -> tuple[list[int], list[int], list[int]]:
    ids, labels = side
    pad = seq_len - len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE] * pad, [0] * len(ids) + [-1] * pad


@torch.no_grad()
def reference_logprobs(init: str, pairs: list[Pair], seq_len: int, pad_id: int, device: str = "cpu",
                       batch_size: int = 8) -> list[tuple[float, float]]:
    """(log ref(chosen), log ref(rejected)) of every pair: summed over the answer's tokens, by the frozen `init`."""
    from herd.post.dpo_loss import sequence_logprobs
    from herd.train.snapshots import load_model

    model, _ = load_model(init)
    model.to(device).eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        rows = [pad_row(side, seq_len, pad_id) for pair in pairs[i:i + batch_size] for side in pair]
        ids, labels, docs = (torch.tensor([r[k] for r in rows], device=device) for k in range(3))  # (2B, T)
        lp = sequence_logprobs(model(ids, doc_ids=docs).float(), labels)  # (2B,) rows 2i chosen, 2i + 1 rejected
        out += list(zip(lp[0::2].tolist(), lp[1::2].tolist(), strict=True))
    return out


class PairPacker(EpochStream):
    """Infinite iterator of batches {"input_ids", "labels", "doc_ids"} (2B, T) and {"ref_chosen", "ref_rejected"}
    (B,): rows 2i and 2i + 1 are pair i's chosen and rejected sides (EpochStream: order and position)."""

    def __init__(self, pairs: list[Pair], refs: list[tuple[float, float]], seq_len: int, batch_size: int,
                 pad_id: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if len(pairs) != len(refs):
            raise ValueError(f"need one reference per pair, got {len(pairs)} pairs, {len(refs)} references")
        super().__init__(pairs, seq_len, batch_size, pad_id, seed, rank, world_size, shuffle, "pairs")
        self.refs = refs

    def __next__(self) -> dict[str, torch.Tensor]:
        order, taken, pending = self._order(), [], []

        def next_row():
            if not pending:  # the next pair: its chosen row, then its rejected row
                k = self._next_index(order)
                taken.append(self.refs[k])
                pending.extend(pad_row(side, self.seq_len, self.pad_id) for side in reversed(self.items[k]))
            return pending.pop()

        self.step += 1
        batch = rank_slice(next_row, 2 * self.batch_size, self.world_size, self.rank)
        mine = taken[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        batch["ref_chosen"] = torch.tensor([c for c, _ in mine], dtype=torch.float32)  # (B,)
        batch["ref_rejected"] = torch.tensor([r for _, r in mine], dtype=torch.float32)  # (B,)
        return batch
