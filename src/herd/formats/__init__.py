"""File formats herd reads and writes, one module each: `hf` (Hugging Face checkpoints: config.json, safetensors,
generation defaults). Training snapshots (optimizer, RNG, data position) are the trainer's own: herd.train.snapshots.
"""
