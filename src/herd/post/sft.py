"""Supervised fine-tuning: `sft(cfg)` runs herd's trainer on chats, with easy-data pruning by a judge.

    herd sft --init runs/base --data chats.jsonl --out runs/sft [prune_easy=0.5] [key=value ...]
    herd sft --init runs/base --data tasks:arithmetic,tool_use --out runs/sft
    herd sft --resume runs/sft

One loop: the conversations (herd.post.sft_data: assistant-only targets, whole conversations packed with doc ids)
are the `rows` the trainer (herd.train.trainer) reads in place of packed documents, so checkpoints, exact resume,
metrics.jsonl, plots and the Hugging Face export in out/hf are the pretraining run's own. Validation loss is the
loss on the assistant tokens of held-out conversations. The config is a TrainConfig (preset "sft") with `init`,
`sft_data`, `sft_examples`, `prune_easy` and `judge` set.

Easy-data pruning: Llama 4's post-training removed more than 50% of the SFT data tagged easy by a judge model
("The Llama 4 herd", https://ai.meta.com/blog/llama-4-multimodal-intelligence/ ; 95% for Behemoth). Here the
judge (any herd checkpoint; default the model being tuned) scores every training conversation by its mean loss
per answer token (the assistant tokens; lower = easier), and the easiest `prune_easy` share is dropped before
training (ties broken by example index), within each task for tasks: data (`prune_groups`). Every example's
score and whether it was kept go to out/sft_judge_scores.jsonl so a run can be audited. Scoring is deterministic,
so a resumed run scores again and keeps the same examples. Conversations with images need a judge with a vision
tower that tiles images as the tuned model does (the same token layout).

Multimodal SFT: with a multimodal `init` (vision tower + decoder) the conversations may hold images
(herd.post.sft_data); the trainer runs the multimodal model on batches with `pixel_values`, and the export is the
multimodal checkpoint. The vision config is read from `init`'s config before the trainer loads the weights, since
the conversations' image tokens depend on its tiling.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.config import ConfigError
from herd.post.sft_data import ChatPacker, Example, conversations, example, pad_id, tiles, with_init_tokenizer
from herd.train.inputs import IGNORE
from herd.train.snapshots import init_vision_config as vision_config

SCORES_FILE = "sft_judge_scores.jsonl"


def _tiling(v) -> tuple | None:
    return None if v is None else (v.image_size, v.max_tiles, v.tokens_per_tile)


@torch.no_grad()
def judge_scores(judge: str, examples: list[Example], device: str = "cpu", batch_size: int = 8,
                 vision=None) -> list[float]:
    """The judge model's mean loss (nats) per answer token of every example; `vision`: the vision config the
    examples' image tokens were laid out for."""
    from herd.train.snapshots import load_model

    model, mcfg = load_model(judge)
    if any(ex.images for ex in examples) and _tiling(mcfg.vision_config) != _tiling(vision):
        raise ConfigError(f"judge {judge} cannot score conversations with images: it needs a vision tower that tiles "
                          f"as the tuned model's does; give judge=DIR of such a multimodal checkpoint (default: init)")
    model.to(device).eval()
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        T = max(len(ex.ids) for ex in chunk)
        # right padding: causal attention keeps the real tokens from seeing it, and its labels are ignored
        ids = torch.tensor([ex.ids + [0] * (T - len(ex.ids)) for ex in chunk], device=device)  # (B, T)
        labels = torch.tensor([ex.labels + [IGNORE] * (T - len(ex.labels)) for ex in chunk], device=device)  # (B, T)
        images = [src for ex in chunk for src in ex.images]  # row by row, as the model fills <|patch|> tokens
        kw = {"pixel_values": tiles(images, vision).to(device)} if images else {}
        logits = model(ids, **kw).float()  # (B, T, V)
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # (B, T)
        out += (nll.sum(1) / (labels != IGNORE).sum(1).clamp(min=1)).tolist()
    return out


def prune_easy(scores: list[float], frac: float, groups: list[str] | None = None) -> list[int]:
    """Indices kept (in order) after dropping the `frac` share with the lowest scores (ties: lower index first)
    within each group (`groups[i]`: example i's; None: one group). Each group keeps at least one example."""
    members: dict[str, list[int]] = {}
    for i in range(len(scores)):
        members.setdefault(groups[i] if groups else "", []).append(i)
    dropped = set()
    for idx in members.values():
        n_drop = min(int(frac * len(idx)), len(idx) - 1)
        dropped.update(sorted(idx, key=lambda i: (scores[i], i))[:n_drop])
    return [i for i in range(len(scores)) if i not in dropped]


def prune_groups(convs) -> list[str]:
    """The strata pruning works within: a task's name for task examples, one group for a file's chats. A judge's
    loss also measures how predictable a task's answer *form* is (a count repeats the question's words, a sum does
    not), so one global threshold would drop whole tasks rather than the easy part of each."""
    return [c.where.split()[1] if c.where.startswith("task ") else "file" for c in convs]


def _prune(cfg, convs, examples, main: bool, vision=None) -> list[int]:
    judge = cfg.judge or cfg.init
    if judge is None:
        raise ConfigError("prune_easy needs a judge: set judge=DIR (or init, the model being tuned)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    scores = judge_scores(judge, examples, device, cfg.batch_size, vision=vision)
    kept = prune_easy(scores, cfg.prune_easy, prune_groups(convs))
    if main:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        keep = set(kept)
        with open(out / SCORES_FILE, "w") as f:
            for i, (s, c) in enumerate(zip(scores, convs, strict=True)):
                f.write(json.dumps({"index": i, "score": s, "kept": i in keep, "source": c.where}) + "\n")
        print(f"judge {judge}: kept {len(kept)} of {len(scores)} examples (dropped the easiest "
              f"{len(scores) - len(kept)}, prune_easy={cfg.prune_easy}); scores in {out / SCORES_FILE}", flush=True)
    return kept


def chat_rows(cfg, tok, split: str, rank: int = 0, world: int = 1, vision=None) -> ChatPacker:
    """The trainer's `rows` for SFT: packed conversations of `split`, the train split pruned by the judge. `vision`:
    the tuned model's VisionConfig (None: text-only, which refuses conversations with images)."""
    convs = conversations(cfg, split)
    examples = [example(c, tok, cfg.seq_len, vision) for c in convs]
    if split == "train" and cfg.prune_easy > 0:
        kept = _prune(cfg, convs, examples, rank == 0, vision)
        examples = [examples[i] for i in kept]
    return ChatPacker(examples, cfg.seq_len, cfg.batch_size, pad_id(tok), seed=cfg.seed, rank=rank,
                      world_size=world, shuffle=split == "train", vision=vision)


def sft(cfg, resume: bool = False) -> dict:
    """Fine-tune `cfg.init` on `cfg.sft_data` (or continue the run in cfg.out_dir); the trainer's summary."""
    from herd.train.trainer import train

    if not cfg.sft_data:
        raise ConfigError("SFT needs data: sft_data=FILE.jsonl or sft_data=tasks:NAME (herd sft --data ...)")
    if cfg.init is None and not resume:
        raise ConfigError("SFT tunes a model: give init=DIR (herd sft --init DIR)")
    if cfg.image_rows:
        raise ConfigError("herd sft takes its images from the conversations (sft_data), not from image rows: set "
                          "image_rows=0")
    cfg = with_init_tokenizer(cfg)  # the checkpoint's own tokenizer
    vision = vision_config(cfg.init) if cfg.init else None  # what the trainer's build_model will load
    return train(cfg, resume=resume, rows=partial(chat_rows, vision=vision))
