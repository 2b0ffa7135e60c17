"""KV cache for iRoPE: global (NoPE) layers keep every position, chunked (RoPE) layers stay bounded.

A chunked layer's query at position q only sees keys of its own chunk that are <= q, so at most C - 1 earlier keys
(C = attention_chunk_size). The cache therefore keeps the last C - 1 positions for chunked layers and returns them
together with the step's new keys; the mask (herd.model.attention.build_mask) applies the exact chunk rule on
absolute positions, so the result equals attention over the full history. Memory for 3 of every 4 layers stops
growing after C tokens: at Scout's C = 8192 a 1M-token context needs ~4x less KV memory than a plain cache.

Global layers append into a buffer that grows by doubling, so decoding is amortised O(1) copies per token.

Positions here are cache positions: every slot written, left padding included (the transformers convention).
Shapes: B batch, G kv heads, S stored positions, T new positions, D head_dim.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, cfg):
        self.chunk = cfg.attention_chunk_size
        self.chunked = [cfg.uses_rope(i) for i in range(cfg.num_hidden_layers)]
        n = cfg.num_hidden_layers
        self.k: list[torch.Tensor | None] = [None] * n  # (B, G, S, D) each
        self.v: list[torch.Tensor | None] = [None] * n
        self.length = [0] * n  # valid stored positions per layer (global layers over-allocate)
        self.seen = 0  # positions written so far; the next token's cache position

    def window(self, chunked: bool) -> int:
        """How many past positions a layer type keeps (the start of its visible keys is seen - window)."""
        return self.chunk - 1 if chunked else self.seen

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's k, v (B, G, T, D) for layer i; return every key/value the step may attend to."""
        if self.chunked[i]:
            if self.k[i] is not None:
                k, v = torch.cat([self.k[i], k], dim=2), torch.cat([self.v[i], v], dim=2)
            keep = self.chunk - 1
            # clone so the kept tail does not pin a long prefill's full tensor in memory
            self.k[i] = k[:, :, -keep:].clone() if keep else k[:, :, :0].clone()
            self.v[i] = v[:, :, -keep:].clone() if keep else v[:, :, :0].clone()
            self.length[i] = self.k[i].shape[2]
            return k, v
        n, T = self.length[i], k.shape[2]
        buf_k, buf_v = self.k[i], self.v[i]
        if buf_k is None or n + T > buf_k.shape[2]:
            cap = max(2 * (buf_k.shape[2] if buf_k is not None else 0), n + T, 64)
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])  # (B, G, cap, D)
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if n:
                new_k[:, :, :n] = buf_k[:, :, :n]
                new_v[:, :, :n] = buf_v[:, :, :n]
            self.k[i], self.v[i] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, n:n + T] = k
        buf_v[:, :, n:n + T] = v
        self.length[i] = n + T
        return buf_k[:, :, :n + T], buf_v[:, :, :n + T]

    def advance(self, T: int) -> None:
        self.seen += T

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (e.g. finished sequences dropped)."""
        for i in range(len(self.k)):
            if self.k[i] is not None:
                self.k[i], self.v[i] = self.k[i][rows], self.v[i][rows]

    def nbytes(self) -> int:
        """Bytes of keys and values actually held (valid positions only)."""
        total = 0
        for i, k in enumerate(self.k):
            if k is not None:
                total += 2 * k[:, :, : self.length[i]].numel() * k.element_size()
        return total
