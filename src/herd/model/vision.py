"""The Llama 4 vision tower: a MetaCLIP-style ViT per image tile, pixel shuffle, and a two-layer adapter.

Each tile (and the global thumbnail) is encoded independently (transformers' `Llama4VisionModel`, `pixel_shuffle`
and `Llama4VisionPixelShuffleMLP`; meta-llama/llama-models models/llama4/vision/encoder.py and embedding.py):
1. patchify with a stride-`patch` unfold (feature order channel, ky, kx) and a bias-free linear embedding;
2. append a learned class token LAST, add learned positional embeddings, LayerNorm;
3. pre-norm encoder layers with bidirectional attention inside the tile, 2-D RoPE on q and k (x and y patch
   coordinates + 1; the class token gets angle 0), exact GELU MLP; final LayerNorm; drop the class token;
4. pixel shuffle by 0.5: each 2x2 block of patches becomes one token with 4x the channels, cutting 576 tokens per
   336-px tile to 144;
5. adapter MLP with GELU after BOTH layers (as released), then (in herd.model.multimodal) the projector to text width.

Module names follow the Hugging Face checkpoint (`vision_model.patch_embedding.linear`, `...model.layers.{j}.
self_attn.q_proj`, `...vision_adapter.mlp.fc1`), so loading is by name.

Shapes: N tiles, P patches per tile (+1 with the class token), C width, H heads, D head dim, S tile side in pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def vision_rope_phases(grid: int, head_dim: int, theta: float) -> torch.Tensor:
    """Complex rotations (P + 1, D/2) for a grid x grid patch layout plus the class token (last row, angle 0).

    Pairs 0..D/4-1 rotate by (x + 1) * f_k and pairs D/4..D/2-1 by (y + 1) * f_k, f_k = theta^(-2k / (D/2)) - the
    same axial 2-D RoPE as Pixtral. Computed in float32 with the reference's operation order for exact parity.
    """
    idx = torch.arange(grid * grid, dtype=torch.int32, device="cpu").reshape(-1, 1)
    idx = torch.cat([idx, idx[:1]], dim=0)
    idx[-1, -1] = -2  # the class token
    x, y = idx % grid, idx // grid
    half = head_dim // 2
    freq = 1.0 / (theta ** (torch.arange(0, half, 2, device="cpu")[: half // 2].float() / half))
    fx = ((x + 1)[..., None] * freq[None, None, :]).repeat_interleave(2, dim=-1)
    fy = ((y + 1)[..., None] * freq[None, None, :]).repeat_interleave(2, dim=-1)
    angles = torch.cat([fx, fy], dim=-1).float()[..., ::2]  # (P+1, 1, D/2)
    angles = angles.masked_fill(idx.reshape(-1, 1, 1) < 0, 0)
    return torch.polar(torch.ones_like(angles), angles).squeeze(1)  # (P+1, D/2)


def apply_vision_rope(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (N, P+1, H, D) by phases (P+1, D/2), float32 inside."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * phases[None, :, None, :].to(x.device)).flatten(3).type_as(x)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N, P, C) on a square grid -> (N, P * ratio^2, C / ratio^2); a 2x2 block's channels concatenated dh-major.

    The two view/permute steps reproduce the reference's channel order exactly (transformers' `pixel_shuffle`).
    """
    N, P, C = x.shape
    g = round(P ** 0.5)
    x = x.view(N, g, round(g * ratio), round(C / ratio))  # merge horizontal neighbours into channels
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(N, round(g * ratio), round(g * ratio), round(C / ratio ** 2))  # then vertical neighbours
    return x.permute(0, 2, 1, 3).contiguous().view(N, -1, round(C / ratio ** 2))


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, self.n_heads = cfg.hidden_size, cfg.num_attention_heads
        self.head_dim = C // self.n_heads
        self.q_proj, self.k_proj = nn.Linear(C, C), nn.Linear(C, C)
        self.v_proj, self.o_proj = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
        N, P, C = x.shape
        q = apply_vision_rope(self.q_proj(x).view(N, P, self.n_heads, self.head_dim), phases)  # (N, P, H, D)
        k = apply_vision_rope(self.k_proj(x).view(N, P, self.n_heads, self.head_dim), phases)
        v = self.v_proj(x).view(N, P, self.n_heads, self.head_dim)
        # Bidirectional within the tile: no mask. Scale left to SDPA's default (D^-0.5), as the reference does.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(N, P, C))


class VisionMLP(nn.Module):
    def __init__(self, d_in: int, width: int, d_out: int, bias: bool, gelu_after_last: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, width, bias=bias), nn.Linear(width, d_out, bias=bias)
        self.gelu_after_last = gelu_after_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU
        return F.gelu(x) if self.gelu_after_last else x


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.hidden_size
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(C, cfg.intermediate_size, C, bias=True, gelu_after_last=False)
        self.input_layernorm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(C, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), phases)
        return x + self.mlp(self.post_attention_layernorm(x))


class PatchEmbedding(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.patch = cfg.patch_size
        self.linear = nn.Linear(cfg.num_channels * cfg.patch_size ** 2, cfg.hidden_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(pixels, kernel_size=self.patch, stride=self.patch)  # (N, 3*p*p, P), row-major patches
        return self.linear(patches.transpose(1, 2))  # (N, P, C)


class VisionEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class PixelShuffleAdapter(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = VisionMLP(cfg.intermediate_size, cfg.projector_input_dim, cfg.projector_output_dim, bias=False,
                             gelu_after_last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.ratio))


class VisionModel(nn.Module):
    """pixel_values (N, 3, S, S) -> vision tokens (N, tokens_per_tile, projector_output_dim)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        C, grid = cfg.hidden_size, cfg.image_size // cfg.patch_size
        self.patch_embedding = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(torch.empty(C))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(grid * grid + 1, C))
        self.layernorm_pre = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.layernorm_post = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.model = VisionEncoder(cfg)
        self.vision_adapter = PixelShuffleAdapter(cfg)
        self._phases = vision_rope_phases(grid, C // cfg.num_attention_heads, cfg.rope_theta)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        S = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (self.config.num_channels, S, S):
            raise ValueError(f"pixel_values must be (tiles, {self.config.num_channels}, {S}, {S}), "
                             f"got {tuple(pixel_values.shape)}")
        x = self.patch_embedding(pixel_values.to(self.positional_embedding_vlm.dtype))  # (N, P, C)
        cls = self.class_embedding.expand(x.shape[0], 1, x.shape[-1])
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm  # class token last: (N, P+1, C)
        x = self.layernorm_pre(x)
        for layer in self.model.layers:
            x = layer(x, self._phases)
        x = self.layernorm_post(x)[:, :-1]  # drop the class token
        return self.vision_adapter(x)  # (N, tokens_per_tile, projector_output_dim)
