"""Direct preference optimisation: `dpo(cfg)` runs herd's trainer on (chosen, rejected) pairs.

    herd dpo --init runs/sft/hf --pairs pairs.jsonl --out runs/dpo [beta=0.1 label_smoothing=0.0 key=value ...]
    herd dpo --init runs/sft/hf --from-rollouts runs/rl/rollouts.jsonl|tasks:NAME --out runs/dpo [prefer=correct]
    herd dpo --resume runs/dpo

One loop: the pairs (herd.post.dpo_data: padded chosen / rejected rows with the frozen reference's log-probs
precomputed) are the `rows` the trainer (herd.train.trainer) reads, and the DPO loss (herd.post.dpo_loss,
Rafailov et al., arXiv:2305.18290, eq. 7) is its `objective` in place of the cross-entropy, so clipping, the LR
schedule, checkpoints, exact resume, metrics.jsonl and the Hugging Face export are the pretraining run's own. The
logged `loss` is the DPO loss; the train records add TRL's DPOTrainer statistics (reward_chosen, reward_rejected,
reward_margin and pref_acc, the share of pairs whose chosen answer gets the higher implicit reward;
https://huggingface.co/docs/trl/dpo_trainer). Validation is the same loss and `val_pref_acc` on the held-out pairs
(every 20th).

The config is a TrainConfig (preset "dpo") with `init`, `beta`, `label_smoothing` and one source of pairs: a pairs
file (`dpo_pairs`), or rollouts (`dpo_rollouts`: an RL run's rollouts.jsonl, or tasks:NAME to sample the `init`
model's own answers) that herd.post.dpo_pairs turns into pairs by `prefer` and writes to out_dir/dpo_pairs.jsonl. A
resumed run reads that file back rather than building the pairs again, so it trains on exactly the same ones. The
reference model is `init` itself (the model before DPO), as in the paper.

Multimodal DPO: with a multimodal `init` (vision tower + decoder) the pairs' prompts may hold images (a pairs file
in SFT's JSONL image syntax, or dpo_rollouts=tasks:scenes); the trainer runs the multimodal model on batches with
`pixel_values` (herd.post.dpo_data) and the export is the multimodal checkpoint. As for SFT, the vision config is
read from `init`'s config before the trainer loads the weights, since the image tokens depend on its tiling.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from herd.config import ConfigError
from herd.post.dpo_data import PairPacker, encode_pair, pair_images, read_pairs, reference_logprobs
from herd.post.dpo_loss import dpo_loss, sequence_logprobs
from herd.post.dpo_pairs import PAIRS_FILE, rollout_pairs
from herd.post.sft_data import pad_id, val_split, with_init_tokenizer
from herd.train.snapshots import init_vision_config as vision_config


def _device(cfg) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device


def pair_source(resume: bool):
    """(cfg, tok, rank) -> the run's checked pairs, built once and kept for the train and val splits: the
    `dpo_pairs` file, or pairs from `dpo_rollouts` - read back from out_dir/dpo_pairs.jsonl on resume."""
    built: list = []

    def pairs(cfg, tok, rank: int) -> list:
        if not built:
            saved = Path(cfg.out_dir) / PAIRS_FILE
            if cfg.dpo_pairs:
                built.append(read_pairs(cfg.dpo_pairs))
            elif resume and saved.is_file():
                built.append(read_pairs(saved))
            else:
                built.append(rollout_pairs(cfg, tok, _device(cfg), main=rank == 0))
        return built[0]

    return pairs


def pair_rows(cfg, tok, split: str, rank: int = 0, world: int = 1, pairs=None, vision=None) -> PairPacker:
    """The trainer's `rows` for DPO: the pairs of `split` with the reference log-probs of `cfg.init`. `pairs`: a
    pair_source (default: read cfg.dpo_pairs); `vision`: init's VisionConfig (None: text-only, refusing images)."""
    found = val_split(read_pairs(cfg.dpo_pairs) if pairs is None else pairs(cfg, tok, rank), split)
    encoded = [encode_pair(p, tok, cfg.seq_len, vision) for p in found]
    images = [pair_images(p) for p in found]
    refs = reference_logprobs(cfg.init, encoded, cfg.seq_len, pad_id(tok), _device(cfg), cfg.batch_size, images)
    return PairPacker(encoded, refs, cfg.seq_len, cfg.batch_size, pad_id(tok), seed=cfg.seed, rank=rank,
                      world_size=world, shuffle=split == "train", images=images, vision=vision)


def dpo_objective(beta: float, label_smoothing: float = 0.0):
    """The trainer's `objective`: (logits (2B, T, V), batch) -> (mean DPO loss over the B pairs, stats)."""

    def objective(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        lp = sequence_logprobs(logits, batch["labels"])  # (2B,) rows 2i chosen, 2i + 1 rejected
        loss, stats = dpo_loss(lp[0::2], lp[1::2], batch["ref_chosen"], batch["ref_rejected"], beta,
                               label_smoothing)
        stats["pref_acc"] = stats.pop("accuracy")
        return loss, stats

    return objective


def dpo(cfg, resume: bool = False) -> dict:
    """Tune `cfg.init` on the pairs of `cfg.dpo_pairs` or `cfg.dpo_rollouts` (or continue the run in cfg.out_dir);
    the trainer's summary."""
    from herd.train.trainer import train

    if bool(cfg.dpo_pairs) == bool(cfg.dpo_rollouts):
        raise ConfigError("DPO needs one source of preference pairs: a pairs file (dpo_pairs=FILE.jsonl, herd dpo "
                          "--pairs FILE.jsonl) or rollouts (dpo_rollouts=ROLLOUTS.jsonl|tasks:NAME, herd dpo "
                          "--from-rollouts ...)" + (", not both" if cfg.dpo_pairs else ""))
    if cfg.init is None:
        raise ConfigError("DPO tunes a model against itself as reference: give init=DIR (herd dpo --init DIR)")
    if cfg.image_rows or cfg.teacher:
        raise ConfigError("herd dpo takes its images from the pairs, not from image rows, and has no teacher: set "
                          "image_rows=0 and teacher=None")
    cfg = with_init_tokenizer(cfg)  # the checkpoint's own tokenizer
    vision = vision_config(cfg.init)  # what the trainer's build_model will load
    return train(cfg, resume=resume, rows=partial(pair_rows, pairs=pair_source(resume), vision=vision),
                 objective=dpo_objective(cfg.beta, cfg.label_smoothing))
