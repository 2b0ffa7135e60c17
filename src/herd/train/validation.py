"""Held-out text loss and bits per byte: what a training run reports as `val_loss` / `val_bpb` and what
herd.post.evaluate reports for any checkpoint, computed one way.

- bits per byte = total nats / (ln 2 * total UTF-8 bytes of the evaluated text), where the evaluated text is the
  bytes of the target tokens. Special-token targets (document separators) stand for no text, so they are left out of
  both sums (nanochat's convention); `val_loss` is the plain mean over all targets. Tokenizer-independent.
- The batches are the first `eval_batches` packed batches of the held-out documents of a TrainConfig's data, the
  same at every call, so evaluations along a run and across runs compare.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from herd.train.inputs import IGNORE, documents
from herd.train.train_config import TrainConfig


def val_batches(cfg: TrainConfig, tok, rank: int = 0, world: int = 1) -> list[dict]:
    """The first `eval_batches` packed batches of the held-out documents of `cfg.data` (the same at every call)."""
    from herd.data.packing import Packer

    val = iter(Packer(documents(cfg, "val"), tok, cfg.seq_len, cfg.batch_size, seed=cfg.seed, rank=rank,
                      world_size=world))
    return [b for _, b in zip(range(cfg.eval_batches), val, strict=False)]


def to_device(b: dict, device) -> dict:
    """A batch's tensors on `device` (other entries, such as a contrastive batch's caption strings, as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def forward(model, b: dict, objective=None, **kw):
    """The model on a packed text batch (documents kept apart by doc_ids) or an image-text batch (pixel_values);
    an objective with an `outputs(model, batch)` method computes what it scores itself (herd.train.contrastive)."""
    if objective is not None and hasattr(objective, "outputs"):
        return objective.outputs(model, b)
    if "pixel_values" in b:
        kw["pixel_values"] = b["pixel_values"]
    return model(b["input_ids"], doc_ids=b.get("doc_ids"), **kw)


@torch.no_grad()
def text_loss_sums(model, batches: list[dict], bytes_table: torch.Tensor | None, device,
                   autocast=contextlib.nullcontext) -> torch.Tensor:
    """(4,) float64 on the CPU: nats, targets, text nats, text bytes over `batches` (definitions above); without a
    bytes table (image-text chats: answers, not text to count bytes of) the last two are 0."""
    sums = torch.zeros(4, dtype=torch.float64)
    table = bytes_table.to(device) if bytes_table is not None else None
    for b in batches:
        b = to_device(b, device)
        with autocast():
            logits = forward(model, b)
        labels = b["labels"].flatten()
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE, reduction="none")
        if table is None:
            sums[:2] += torch.stack([nll.sum(), (labels != IGNORE).sum()]).double().cpu()
            continue
        nbytes = table[labels.clamp(min=0)] * (labels != IGNORE)
        sums += torch.stack([nll.sum(), (labels != IGNORE).sum(), nll[nbytes > 0].sum(), nbytes.sum()]).cpu()
    return sums


@torch.no_grad()
def objective_means(model, batches: list[dict], objective, device, autocast=contextlib.nullcontext) -> dict:
    """A custom objective's loss and stats (herd.train.trainer.train's `objective`), averaged over `batches`."""
    sums: dict[str, float] = {}
    for b in batches:
        b = to_device(b, device)
        with autocast():
            loss, stats = objective(forward(model, b, objective), b)
        for k, v in {"loss": float(loss), **stats}.items():
            sums[k] = sums.get(k, 0.0) + v / len(batches)
    return sums


def val_metrics(sums: list[float]) -> dict:
    """val_loss and val_bpb from `text_loss_sums` (summed over ranks)."""
    nats, n, text_nats, nbytes = sums
    return {"val_loss": nats / max(n, 1), "val_bpb": text_nats / (math.log(2) * nbytes) if nbytes else None}
