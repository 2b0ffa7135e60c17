"""Training: the pretraining / mid-training loop, its config and checkpoints (load balancing, MetaP, FP8,
distillation and FSDP2 live in their own modules here and are imported only when a run asks for them).

    from herd.train import train, train_preset
    summary = train(train_preset("tiny", out_dir="runs/x"))        # runs/x: checkpoints, metrics, plots, hf/
    train(train_preset("tiny", out_dir="runs/x", max_steps=900), resume=True)
"""

from herd.train.train_config import TRAIN_PRESETS, TrainConfig, train_preset
from herd.train.trainer import TrainingDiverged, train

__all__ = ["TRAIN_PRESETS", "TrainConfig", "TrainingDiverged", "train", "train_preset"]
