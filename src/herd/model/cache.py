"""KV cache for iRoPE: global (NoPE) layers keep every position, chunked (RoPE) layers stay bounded.

A chunked layer's query at position q only sees keys of its own chunk that are <= q, so at most C - 1 earlier keys
(C = attention_chunk_size). The cache therefore keeps the last C - 1 positions for chunked layers and returns them
together with the step's new keys; the mask (herd.model.layout.build_mask) applies the exact chunk rule on
absolute positions, so the result equals attention over the full history. Memory for 3 of every 4 layers stops
growing after C tokens: at Scout's C = 8192 a 1M-token context needs ~4x less KV memory than a plain cache.

Every layer stores into a preallocated buffer and hands attention a view of it, so a decode step copies only its own
new keys (no concatenation of the whole window per step, which at C = 8192 would copy 16K positions per layer):
- global layers append into a buffer that grows by doubling: amortised O(1) copies per token;
- chunked layers keep their C - 1 positions at buffer[start : start + length] with `SLACK` free slots behind them;
  new keys are written after them and the window slides forward. When the slots run out, the window is copied back
  to the front (every SLACK steps: amortised (C - 1) / SLACK positions per token), so between steps the buffer holds
  C - 1 + max(T, SLACK) slots, T being the last step's new positions (a long prefill piece's buffer shrinks back to
  C - 1 + SLACK on the next step).
`step(...)` lays out a forward call after what the cache holds (positions, masks: herd.model.layout), `update(i, k,
v)` stores a layer's new keys; `layer(i)` returns a layer's valid keys and values, `put(i, k, v)` replaces them (the
left-padded batch's merging, herd.infer.padded_batch).

Positions here are cache positions: every slot written, left padding included (the transformers convention).
Shapes: B batch, G kv heads, S stored positions, T new positions, D head_dim.
"""

from __future__ import annotations

import torch

from herd.model.layout import Step, sequence_step

SLACK = 64  # free slots behind a chunked layer's window: one compaction copy per SLACK decode steps


class KVCache:
    def __init__(self, cfg):
        self.chunk = cfg.attention_chunk_size
        self.chunked = [cfg.is_chunked(i) for i in range(cfg.num_hidden_layers)]
        n = cfg.num_hidden_layers
        self.k: list[torch.Tensor | None] = [None] * n  # (B, G, capacity, D) buffers
        self.v: list[torch.Tensor | None] = [None] * n
        self.start = [0] * n  # first valid slot of each buffer (0 for global layers)
        self.length = [0] * n  # valid stored positions per layer
        self.seen = 0  # positions written so far; the next token's cache position

    def step(self, B: int, T: int, device: torch.device, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, temperature_positions: torch.Tensor | None = None) -> Step:
        """Positions and masks for T new tokens per row after the `seen` ones: chunked layers still hold the last
        C - 1 of them, global layers all (herd.model.layout.sequence_step)."""
        kept = {True: self.chunk - 1, False: self.seen}
        return sequence_step(B, T, device, self.chunk, attention_mask, position_ids, temperature_positions, self.seen,
                             kept)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's stored keys and values (B, G, length, D): views into its buffers."""
        a, b = self.start[i], self.start[i] + self.length[i]
        return self.k[i][:, :, a:b], self.v[i][:, :, a:b]

    def put(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replace layer i's stored keys and values with k, v (B, G, S, D); S must respect the layer's bound."""
        self.k[i], self.v[i], self.start[i], self.length[i] = k, v, 0, k.shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's k, v (B, G, T, D) for layer i; return every key/value the step may attend to."""
        n, T, a = self.length[i], k.shape[2], self.start[i]
        keep = self.chunk - 1 if self.chunked[i] else None
        buf = self.k[i]
        oversized = keep is not None and buf is not None and buf.shape[2] > keep + max(T, SLACK)
        if buf is None or buf.shape[0] != k.shape[0] or a + n + T > buf.shape[2] or oversized:
            # Out of room: a new buffer with the valid positions at its front. Chunked layers get C - 1 + slack
            # slots (a long prefill piece gets what it needs for its step, and the next step shrinks it back),
            # global ones double.
            if keep is not None:
                cap = keep + max(T, SLACK)
            else:
                cap = max(2 * (buf.shape[2] if buf is not None else 0), n + T, SLACK)
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])  # (B, G, cap, D)
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if n:
                new_k[:, :, :n], new_v[:, :, :n] = self.layer(i)
            self.k[i], self.v[i], self.start[i], a = new_k, new_v, 0, 0
        self.k[i][:, :, a + n:a + n + T] = k
        self.v[i][:, :, a + n:a + n + T] = v
        out_k, out_v = self.k[i][:, :, a:a + n + T], self.v[i][:, :, a:a + n + T]  # past + this step's positions
        if keep is not None and n + T > keep:  # the window slides: drop what no later query can see
            self.start[i] = a + n + T - keep
            self.length[i] = keep
        else:
            self.length[i] = n + T
        return out_k, out_v

    def advance(self, T: int) -> None:
        self.seen += T

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (e.g. finished sequences dropped)."""
        for i in range(len(self.k)):
            if self.k[i] is not None:
                self.k[i], self.v[i] = self.k[i][rows], self.v[i][rows]

    def capacity(self, i: int) -> int:
        """Positions layer i's buffers can hold (allocated), >= its valid length."""
        return 0 if self.k[i] is None else self.k[i].shape[2]

    def nbytes(self) -> int:
        """Bytes of keys and values actually held (valid positions only)."""
        total = 0
        for i, k in enumerate(self.k):
            if k is not None:
                total += 2 * self.layer(i)[0].numel() * k.element_size()
        return total
