"""Native multimodality by early fusion: vision tokens enter the decoder's embedding stream before layer 0.

Llama 4 (the model card; transformers' `Llama4ForConditionalGeneration`) encodes every image tile with the vision
tower, projects each vision token to the text width, and writes the projected vectors, in order, into the positions
of the `<|patch|>` placeholder token. From there on the decoder treats them like any token: same causal / chunked
masks, ordinary 1-D positions. Text-only inputs never touch the vision tower.

Names follow `Llama4ForConditionalGeneration` checkpoints: `vision_model.*`, `multi_modal_projector.linear_1`,
`language_model.*` (a complete `Llama4ForCausalLM`).

Shapes: B batch, T tokens, N tiles, K vision tokens per tile, D text width.
"""

from __future__ import annotations

import torch
from torch import nn

from herd.config import Llama4Config
from herd.model.text import Llama4ForCausalLM
from herd.model.vision import VisionModel


class MultiModalProjector(nn.Module):
    def __init__(self, cfg: Llama4Config):
        super().__init__()
        v = cfg.vision_config
        self.linear_1 = nn.Linear(v.vision_output_dim, cfg.text_config.hidden_size, bias=v.multi_modal_projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class Llama4ForConditionalGeneration(nn.Module):
    def __init__(self, cfg: Llama4Config):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionModel(cfg.vision_config)
        self.multi_modal_projector = MultiModalProjector(cfg)
        self.language_model = Llama4ForCausalLM(cfg.text_config)

    # ---- what this model is (the same surface as Llama4ForCausalLM) ------------------------------------------------
    @property
    def text_config(self):
        return self.config.text_config

    @property
    def vision_config(self):
        return self.config.vision_config

    @property
    def decoder(self) -> Llama4ForCausalLM:
        return self.language_model

    @property
    def image_token_index(self) -> int:
        return self.config.image_token_index

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected vision tokens for every tile, flattened in tile order: (N * K, D)."""
        feats = self.vision_model(pixel_values)  # (N, K, vision_output_dim)
        return self.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))

    def fuse(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, D) with vision features scattered into the `<|patch|>` positions."""
        embeds = self.language_model.embed(input_ids)
        is_patch = input_ids == self.config.image_token_index  # (B, T)
        n_slots = int(is_patch.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image patch tokens but no pixel_values were given")
            return embeds
        feats = self.image_features(pixel_values).to(embeds.dtype)  # (N * K, D)
        if n_slots != feats.shape[0]:
            K = self.config.vision_config.tokens_per_tile
            raise ValueError(f"image tokens and image features do not match: the prompt has {n_slots} <|patch|> "
                             f"tokens, the {pixel_values.shape[0]} tiles give {feats.shape[0]} ({K} per tile)")
        return embeds.masked_scatter(is_patch[..., None], feats)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache=None, return_router_logits: bool = False, logits_to_keep: int = 0,
                doc_ids: torch.Tensor | None = None, temperature_positions: torch.Tensor | None = None):
        return self.language_model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                   return_router_logits=return_router_logits, logits_to_keep=logits_to_keep,
                                   inputs_embeds=self.fuse(input_ids, pixel_values), doc_ids=doc_ids,
                                   temperature_positions=temperature_positions)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Random init: text as in Llama4ForCausalLM; vision matrices normal(0, initializer_range), LayerNorms
        (1, 0), biases 0, class and positional embeddings normal(0, width^-0.5) like the reference."""
        self.language_model.init_weights(seed)
        gen = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        v = self.config.vision_config
        for name, p in [*self.vision_model.named_parameters(), *self.multi_modal_projector.named_parameters()]:
            if "layernorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = v.hidden_size ** -0.5 if "embedding_vlm" in name or "class_embedding" in name \
                    else v.initializer_range
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype
