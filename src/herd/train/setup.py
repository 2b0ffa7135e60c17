"""A run's building blocks: its device and process group, its model (from a preset, or an `init` checkpoint with
the vision stages' surgery: herd.train.vision_stages) and its optimizer."""

from __future__ import annotations

import os

import torch

from herd.train import snapshots as ckpt
from herd.train import vision_stages
from herd.train.train_config import TrainConfig


def setup_device(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); torchrun's WORLD_SIZE > 1 initialises the process group (herd.train.distributed)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from herd.train.distributed import init_distributed

        return init_distributed()
    name = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    return 0, 1, torch.device(name)


def build_model(cfg: TrainConfig, device: torch.device, world: int, tok):
    """(model, its config): a TextConfig, or a Llama4Config when the run trains on images (image_rows > 0)."""
    import herd

    if cfg.init:
        model, mcfg = ckpt.load_model(cfg.init, multimodal=cfg.image_rows > 0 and not cfg.vision)
        if cfg.model_overrides:  # attention geometry only (herd.train.vision_stages.INIT_OVERRIDES)
            model, mcfg = vision_stages.with_overrides(model, mcfg, cfg.model_overrides)
        if cfg.vision and mcfg.vision_config is None:  # a fresh tower for a text checkpoint
            model, mcfg = vision_stages.attach_tower(model, cfg.vision, tok, cfg.seed)
    else:
        make = herd.multimodal_preset if cfg.image_rows or cfg.stage != "lm" else herd.preset
        mcfg = make(cfg.model, **cfg.model_overrides)
        model = herd.build_model(mcfg, seed=cfg.seed)
        if cfg.metap:
            from herd.train.metap import init_

            init_(model, cfg.base_width, cfg.base_depth, cfg.seed)
    vision_stages.freeze(model, cfg.frozen)
    model.to(device).train()
    if cfg.fp8:
        from herd.train.fp8 import apply_fp8

        model = apply_fp8(model)
    if world > 1:
        from herd.train.distributed import shard

        model = shard(model)
    return model, mcfg


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, extra: list | None = None
                    ) -> tuple[torch.optim.AdamW, list[float]]:
    """AdamW and each group's peak LR. Norm weights (1-D) are never decayed; MetaP sets per-group LRs. `extra`:
    trainable scalars outside the model (a contrastive loss's scale and bias), never decayed."""
    if cfg.metap:
        from herd.train.metap import param_groups

        groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.base_width, cfg.base_depth)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups + [{"params": list(extra or []), "weight_decay": 0.0}] if g["params"]]
    cuda = next(model.parameters()).device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                            fused=cuda or None)
    return opt, [g["lr"] for g in opt.param_groups]


def objective_parameters(objective) -> list:
    """The trainable parameters an objective holds (a contrastive loss's scale and bias), [] for plain functions."""
    return [p for p in objective.parameters() if p.requires_grad] if isinstance(objective, torch.nn.Module) else []
