"""The Llama 4 text decoder: embeddings, N pre-norm blocks (attention + dense MLP or MoE), final norm, LM head.

Module names mirror the Hugging Face checkpoint (`model.layers.{i}.self_attn.q_proj`, `...feed_forward.experts.
gate_up_proj`, `lm_head`), so a checkpoint loads by name with no translation table (herd.checkpoint strips the
`language_model.` prefix of multimodal files and nothing else).

Calling the model follows the transformers convention: `model(input_ids, attention_mask=None)` returns logits
(B, T, V). With `cache=` it continues from the cache's positions (see herd.model.cache), and with
`return_router_logits=True` it also returns each MoE layer's (N, E) router logits for load-balancing losses.

NOTE: models are often built on the meta device (`build_model(cfg, device="meta")`), which allocates nothing; call
`materialize(model, device)` or load a checkpoint before running it. Parameters on meta have no values.

Shapes: B batch, T new tokens, D hidden, V vocab, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from herd.config import TextConfig
from herd.model.attention import Attention, build_doc_mask, build_mask, doc_positions, rope_inv_freq, rope_phases
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
        self.chunked = cfg.uses_rope(i)  # RoPE layers attend locally in chunks; NoPE layers globally
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
        # Computed once on CPU in float32 and kept out of the state dict (the checkpoint has no rotary buffers).
        self._inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache=None, return_router_logits: bool = False, logits_to_keep: int = 0,
                inputs_embeds: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                temperature_positions: torch.Tensor | None = None):
        if pixel_values is not None:
            raise ValueError("this is a text-only Llama4ForCausalLM: it has no vision tower for pixel_values")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        h, router_logits = self.decode(x, attention_mask, position_ids, cache, doc_ids, temperature_positions)
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

    def decode(self, x, attention_mask=None, position_ids=None, cache=None, doc_ids=None, temperature_positions=None):
        """Run the decoder stack on embeddings x (B, T, D); returns (normed hidden states, router logits).

        `doc_ids` (B, T) marks packed documents (training): attention never crosses a document boundary, and
        positions, chunks and temperature restart at each document, as if every document ran alone.
        `temperature_positions` (B, T): where each token sits in its own sequence, for the NoPE layers' attention
        temperature. By default it is the cache position, padding included (transformers' convention, which the
        parity tests follow); a batching engine passes real positions so a left-padded row computes what it
        computes alone (RoPE and the chunk rule already follow each row's own start).
        """
        cfg = self.config
        B, T, _ = x.shape
        if doc_ids is not None:
            return self._decode_packed(x, doc_ids.to(x.device), position_ids)
        seen = cache.seen if cache is not None else 0
        q_pos = torch.arange(seen, seen + T, device=x.device)  # absolute cache positions (padding included)
        if attention_mask is not None:
            if attention_mask.shape != (B, seen + T):
                raise ValueError(f"attention_mask must be (batch, past + new) = {(B, seen + T)}, "
                                 f"got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.to(x.device).bool()
        if position_ids is None:
            position_ids = q_pos[None]  # (1, T), the transformers default when none are given
        phases = rope_phases(position_ids.to(x.device), self._inv_freq)  # (B or 1, T, D/2)
        masks = {}
        for chunked in (False, True):
            start = max(0, seen - cache.window(chunked)) if cache is not None else 0
            k_pos = torch.arange(start, seen + T, device=x.device)
            masks[chunked] = build_mask(q_pos, k_pos, attention_mask, cfg.attention_chunk_size if chunked else None)
        t_pos = q_pos if temperature_positions is None else temperature_positions.to(x.device)
        router_logits = []
        for layer in self.model.layers:
            x, logits = layer(x, phases, t_pos, masks[layer.chunked], cache)
            if logits is not None:
                router_logits.append(logits)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x), router_logits

    def _decode_packed(self, x, doc_ids, position_ids=None):
        if doc_ids.shape != x.shape[:2]:
            raise ValueError(f"doc_ids must be (batch, seq) = {tuple(x.shape[:2])}, got {tuple(doc_ids.shape)}")
        pos = doc_positions(doc_ids)  # (B, T)
        phases = rope_phases(pos if position_ids is None else position_ids.to(x.device), self._inv_freq)
        masks = {False: build_doc_mask(doc_ids, None), True: build_doc_mask(doc_ids, self.config.attention_chunk_size)}
        router_logits = []
        for layer in self.model.layers:
            x, logits = layer(x, phases, pos, masks[layer.chunked])
            if logits is not None:
                router_logits.append(logits)
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

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> None:
        """Write the Hugging Face format (config.json + safetensors). Lives in herd.checkpoint; imported lazily so
        the model package itself depends on torch alone."""
        from herd.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
