"""Learning-rate schedules as pure functions of the step: nothing to save but the step itself.

- warmup: linear from peak/warmup to the peak over `warmup` steps (the first update is never at lr 0);
- cosine: then half a cosine from `lr` down to `min_lr` at `steps` (the common LLM pretraining default);
- wsd (warmup-stable-decay; Hu et al. 2024, MiniCPM, arXiv:2404.06395): then flat at `lr`, and a linear decay to
  `min_lr` over the final `decay_frac` of the steps. A stable phase can be extended or branched into a decay at
  any point, which suits continued (mid-)training;
- constant: then flat at `lr`.

`step` counts updates already done, so `lr_at(cfg, step)` is the rate of update number step + 1. Past `steps`
(a run resumed beyond its plan) every schedule stays at its final value.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, steps: int, warmup: int, kind: str, min_ratio: float, decay_frac: float = 0.2) -> float:
    """Multiplier of the peak learning rate for update number step + 1."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    step = min(step, steps)
    if kind == "cosine":
        span = max(steps - warmup, 1)
        progress = (step - warmup) / span
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "wsd":
        decay_start = steps - max(round(decay_frac * steps), 1)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(steps - decay_start, 1)
        return 1.0 - (1 - min_ratio) * progress
    raise ValueError(f"unknown schedule {kind!r}")


def lr_at(cfg, step: int) -> float:
    """Learning rate of update number step + 1 for a TrainConfig."""
    return cfg.lr * lr_factor(step, steps=cfg.steps, warmup=cfg.warmup, kind=cfg.schedule,
                              min_ratio=cfg.min_lr / cfg.lr if cfg.lr else 0.0, decay_frac=cfg.decay_frac)
