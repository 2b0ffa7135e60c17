"""The Llama 4 text decoder: embeddings, N pre-norm blocks (attention + dense MLP or MoE), final norm, LM head.

Module names mirror the Hugging Face checkpoint (`model.layers.{i}.self_attn.q_proj`, `...feed_forward.experts.
gate_up_proj`, `lm_head`), so a checkpoint loads by name with no translation table (herd.formats.hf strips the
`language_model.` prefix of multimodal files and nothing else).

Calling the model follows the transformers convention: `model(input_ids, attention_mask=None)` returns logits
(B, T, V). With `return_router_logits=True` it also returns each MoE layer's (N, E) router logits for
load-balancing losses. There is one decoder loop, `decode`; the batch layout decides positions and masks
(herd.model.layout): a cache object (`cache=`: herd.model.cache.KVCache for left-padded batches,
herd.model.slot_cache.SlotCache for fixed-shape decode steps) continues from what it holds, `doc_ids` marks packed
training documents, and without either the rows are plain (optionally left-padded) sequences.

Both model classes say what they are with the same small surface: `text_config`, `vision_config` (None for a text
model), `decoder` (the Llama4ForCausalLM that runs the tokens) and `image_token_index` (None without images).

NOTE: models are often built on the meta device (`build_model(cfg, device="meta")`), which allocates nothing; call
`materialize(model, device)` or load a checkpoint before running it. Parameters on meta have no values.

Shapes: B batch, T new tokens, D hidden, V vocab, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from herd.config import TextConfig
from herd.model.attention import Attention, rope_inv_freq, rope_phases
from herd.model.layout import Step, packed_step, sequence_step
from herd.model.moe import MLP, MoE


class RMSNorm(nn.Module):
    """y = weight * cast(x / rms(x)); statistics in float32, weight applied after the cast back (as the reference)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        self.is_moe = cfg.is_moe_layer(i)
        self.chunked = cfg.is_chunked(i)  # RoPE layers attend locally in chunks; NoPE layers globally
        self.self_attn = Attention(cfg, i)
        self.feed_forward = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size_mlp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, phases, q_pos, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), phases, q_pos, mask, cache)
        h = self.feed_forward(self.post_attention_layernorm(x))
        if self.is_moe:
            h, logits = h
            return x + h, logits
        return x + h, None


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama4ForCausalLM(nn.Module):
    """Text-only Llama 4 (the `Llama4ForCausalLM` checkpoint layout)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # float32, outside the state dict (the checkpoint has no rotary buffers); `_apply` moves it with the model
        # but never casts it, so a bfloat16 model still rotates by float32 frequencies as the reference does
        self._inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._inv_freq = self._inv_freq.to(fn(self._inv_freq[:0]).device)
        return self

    # ---- what this model is (the same surface as Llama4ForConditionalGeneration) -------------------------------
    @property
    def text_config(self) -> TextConfig:
        return self.config

    @property
    def vision_config(self) -> None:
        return None

    @property
    def decoder(self) -> Llama4ForCausalLM:
        return self

    @property
    def image_token_index(self) -> None:
        return None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache=None, return_router_logits: bool = False, logits_to_keep: int = 0,
                inputs_embeds: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                temperature_positions: torch.Tensor | None = None):
        """Logits (B, T, V) for input_ids (B, T) (or their embeddings, `inputs_embeds` (B, T, D)).

        `cache`: continue from what a cache holds (its `step` makes positions and masks); `doc_ids` (B, T): packed
        training rows; `attention_mask` (B, past + T): left padding; `position_ids` (B or 1, T) and
        `temperature_positions`: see herd.model.layout.sequence_step. `logits_to_keep` > 0 computes only the last
        ones (generation needs one).
        """
        if pixel_values is not None:
            raise ValueError("this is a text-only Llama4ForCausalLM: it has no vision tower for pixel_values")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        chunk = self.config.attention_chunk_size
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids (packed training rows) cannot continue from a cache")
            step = cache.step(B, T, x.device, attention_mask, position_ids, temperature_positions)
        elif doc_ids is not None:
            if doc_ids.shape != (B, T):
                raise ValueError(f"doc_ids must be (batch, seq) = {(B, T)}, got {tuple(doc_ids.shape)}")
            if attention_mask is not None:
                raise ValueError("packed rows (doc_ids) take no attention_mask: documents are kept apart by doc_ids")
            step = packed_step(doc_ids.to(x.device), chunk, position_ids)
        else:
            step = sequence_step(B, T, x.device, chunk, attention_mask, position_ids, temperature_positions)
        h, router_logits = self.decode(x, step, cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)  # (B, T, V)
        return (logits, router_logits) if return_router_logits else logits

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        V = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            bad = input_ids[(input_ids < 0) | (input_ids >= V)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary (size {V})")
        return self.model.embed_tokens(input_ids)

    def decode(self, x: torch.Tensor, step: Step, cache=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder stack on embeddings x (B, T, D) laid out as `step` says; every layer stores its keys in
        `cache` when there is one. Returns (normed hidden states, each MoE layer's router logits)."""
        phases = rope_phases(step.positions, self._inv_freq)  # (B or 1, T, D/2)
        router_logits = []
        for layer in self.model.layers:
            x, logits = layer(x, phases, step.temperature_positions, step.masks[layer.chunked], cache)
            if logits is not None:
                router_logits.append(logits)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.model.norm(x), router_logits

    # ---- construction helpers ------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Random init: normal(0, initializer_range) for matrices and embeddings, ones for norm weights."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
