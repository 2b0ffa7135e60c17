"""Building models from configs: on the meta device (no memory) or materialized with random weights.

NOTE: a model built on the meta device has parameters with shapes but no storage; run `materialize` (random
weights) or load a checkpoint (herd.formats.hf) before calling it.
"""

from __future__ import annotations

import torch

from herd.config import Llama4Config, TextConfig
from herd.model.multimodal import Llama4ForConditionalGeneration
from herd.model.text import Llama4ForCausalLM

Model = Llama4ForCausalLM | Llama4ForConditionalGeneration


def build_model(cfg: TextConfig | Llama4Config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> Model:
    """A text model for a TextConfig, a multimodal one for a Llama4Config; device="meta" allocates nothing."""
    with torch.device("meta"):
        model = Llama4ForConditionalGeneration(cfg) if isinstance(cfg, Llama4Config) else Llama4ForCausalLM(cfg)
    model = model.to(dtype=dtype)
    if str(device) != "meta":
        materialize(model, device, seed=seed)
    return model


def allocate(model: Model, device: str | torch.device) -> Model:
    """Give a meta-device model uninitialised storage on `device` (weights are loaded or initialised next)."""
    model.to_empty(device=device)
    text = model.decoder
    if text.config.tie_word_embeddings:  # to_empty breaks the tie; restore it
        text.lm_head.weight = text.model.embed_tokens.weight
    with torch.no_grad():  # buffers outside the checkpoint start at their defined values, not at garbage
        for layer in text.model.layers:
            if layer.is_moe:
                layer.feed_forward.router.expert_bias.zero_()
    return model


def materialize(model: Model, device: str | torch.device, seed: int | None = 0) -> Model:
    """Allocate a meta-device model on `device` and give it random weights."""
    allocate(model, device)
    model.init_weights(seed)
    return model
