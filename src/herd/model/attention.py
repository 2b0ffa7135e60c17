"""Llama 4 text attention: GQA with iRoPE, QK-norm and inference-time temperature tuning.

iRoPE (the Llama 4 model card and Meta's "The Llama 4 herd" post): three layers in four apply RoPE and attend only
inside fixed, absolutely aligned chunks of `attention_chunk_size` tokens ("chunked local attention"); every fourth
layer applies no positional encoding at all (NoPE) and attends over the whole causal context. Long-context
extrapolation comes from the NoPE layers, helped by scaling their queries with a slowly growing temperature
(Nakanishi 2025, "Scalable-Softmax Is Superior for Attention", arXiv:2501.19399).

Design choices, all chosen to match Hugging Face transformers' `Llama4TextAttention` bit for bit where it matters:
- RoPE is the interleaved ("complex", GPT-J) form: pairs (x[2i], x[2i+1]) rotate together, computed in float32.
  Checkpoints keep Meta's row order, so no q/k permutation is needed.
- QK-norm is a weightless RMS norm per head, after RoPE, on RoPE layers only, with eps = rms_norm_eps.
- Positions and attend-masks come from the batch layout (herd.model.layout): this module only applies them.
- torch SDPA does the attention; masks are skipped (`is_causal`) exactly when they are plainly causal.

Shapes: B batch, T new tokens, K keys visible this step, H query heads, G kv heads, D head_dim, C chunk size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (D/2,), with llama3-style frequency scaling when configured (Scout: 16/1/1 at 8192)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Llama 3 recipe: keep high frequencies, divide low ones by `factor`, blend in between. With lo == hi (Scout)
    # the blend band is empty and the blend formula divides by zero, so it is only evaluated where it applies.
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    if bool(medium.any()):
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return scaled


def rope_phases(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Unit complex rotations e^{i pos f}, (B, T, D/2) complex64, always computed in float32."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (B, T, D/2)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, n, D) by phases (B, T, D/2); float32 inside, x's dtype out."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, n, D/2)
    return torch.view_as_real(xc * phases[:, :, None, :]).flatten(3).type_as(x)


def rms_unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS norm over the last dim in float32 (Llama 4 QK-norm; HF calls it L2Norm, but it is RMS)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def temperature_scale(cache_positions: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """s(p) = 1 + attn_scale * log(1 + floor((p + 1) / floor_scale)); 1.0 below floor_scale - 1 (arXiv:2501.19399)."""
    return torch.log1p(torch.floor((cache_positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.use_rope = cfg.uses_rope(layer_idx)
        self.use_qk_norm = cfg.use_qk_norm and self.use_rope  # Scout's RoPE layers only; Maverick never
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope  # NoPE layers only
        self.eps, self.floor_scale, self.attn_scale = cfg.rms_norm_eps, cfg.floor_scale, cfg.attn_scale
        self.scale = self.head_dim**-0.5  # passed to SDPA explicitly, as the reference does
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=False)

    def forward(self, x: torch.Tensor, phases: torch.Tensor, q_pos: torch.Tensor, mask, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)  # (B, T, G, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)  # (B, T, G, D)
        if self.use_rope:
            q, k = apply_rope(q, phases), apply_rope(k, phases)
        if self.use_qk_norm:  # per head, after RoPE
            q, k = rms_unit(q, self.eps), rms_unit(k, self.eps)
        if self.temperature_tuning:
            # Queries (not logits) are scaled, by absolute cache position (position in the document when packed),
            # and cast back like the reference does.
            s = temperature_scale(q_pos, self.floor_scale, self.attn_scale).view(-1, T, 1, 1)
            q = (q * s).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, G, K, D)
        gqa = self.n_heads != self.n_kv
        if isinstance(mask, str):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        # out: (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
