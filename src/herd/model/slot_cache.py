"""A fixed-shape KV cache for decoding: one row per batch slot, one slot per position, shapes that never change.

herd.model.cache.KVCache stores what a left-padded batch has seen and grows or slides its buffers as needed; its
shapes change every step, which is fine for eager PyTorch but rules out capturing the decode step once (a CUDA graph
replays fixed shapes and fixed addresses) and makes torch.compile specialise on every length. SlotCache is its
fixed-shape twin for single-token decode steps (what vLLM and gpt-fast also do for CUDA graphs):
- every request owns a row (a slot of the batch) and stores its keys at its REAL positions: no left padding, so a
  row computes what it computes alone (RoPE, the chunk rule and the attention temperature all see real positions);
- global (NoPE) layers keep position p in slot p of a (rows, G, capacity, D) buffer; `capacity` only changes when
  `grow` is called (the engine doubles it when a row is about to run out), which copies the buffers once;
- chunked (RoPE) layers keep a ring of C = attention_chunk_size slots: position p lives in slot p % C. A query at p
  sees its own chunk only (positions C * floor(p / C) .. p, at most C of them), so overwriting p - C loses nothing.
  Memory is the two-tier cost of herd.model.cache: chunked layers stop growing at C slots per row;
- `slot_pos` (rows, C) records which position each ring slot holds (-1: none), so the chunked mask is a comparison
  of tensors. Every chunked layer writes the same positions, so one table serves them all.
A decode step is a model call with this cache (`model(ids, position_ids=pos, cache=slot_cache)`, ids and pos (b, 1):
the first b rows take part, each at its own position); the model asks `step(...)`, which writes `slot_pos` and
returns the positions and the two attend-masks (herd.model.layout.Step); then every attention layer calls
`update(i, k, v)` (herd.model.attention.Attention does) and gets the full (b, G, slots, D) buffers to attend over.
Nothing in a step reads a value back to the host or allocates a shape that depends on data, so the step can be
captured as a CUDA graph.
The price of fixed shapes: the global layers hold rows x capacity positions, so the longest request sets every row's
capacity (a paged cache, as in vLLM, would not), and their attention spans the whole capacity, masked.
Rows that take part in a step without a request (a capture size larger than the live rows) pass position 0 and
compute garbage that nobody reads; `load` resets a row before a new request uses it.

Shapes: b rows in this step, G kv heads, D head_dim, C chunk size, S stored positions of one request.
"""

from __future__ import annotations

import torch

from herd.model.layout import Step


class SlotCache:
    def __init__(self, cfg, rows: int, capacity: int, device, dtype: torch.dtype):
        self.chunk, self.rows, self.capacity = cfg.attention_chunk_size, rows, capacity
        self.chunked = [cfg.is_chunked(i) for i in range(cfg.num_hidden_layers)]
        G, D = cfg.num_key_value_heads, cfg.head_dim
        shape = [(rows, G, self.chunk if c else capacity, D) for c in self.chunked]
        self.k = [torch.zeros(s, device=device, dtype=dtype) for s in shape]
        self.v = [torch.zeros(s, device=device, dtype=dtype) for s in shape]
        self.slot_pos = torch.full((rows, self.chunk), -1, dtype=torch.long, device=device)  # (rows, C)
        self._rows = torch.arange(rows, device=device)
        self._slots: dict[bool, torch.Tensor] = {}  # this step's write slot per row, per layer kind

    def step(self, B: int, T: int, device: torch.device, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, temperature_positions: torch.Tensor | None = None) -> Step:
        """One new token for each of rows 0 .. B - 1 at its position_ids (B, 1): every row's position is real (no
        padding), so RoPE and the attention temperature both take it."""
        if T != 1 or position_ids is None or attention_mask is not None:
            raise ValueError("a SlotCache step takes one new token per row and its position_ids (rows, 1); rows are "
                             "never padded, so no attention_mask")
        return Step(position_ids, position_ids, self.begin(position_ids.reshape(B)))

    def advance(self, T: int) -> None:
        """Nothing to do: every row's position is given with each step."""

    def begin(self, pos: torch.Tensor) -> dict[bool, torch.Tensor]:
        """Start a decode step in which row r (r < b = len(pos)) writes position pos[r]; return the attend-masks
        {chunked: (b, 1, 1, slots) bool} for the chunked (True) and global (False) layers."""
        b, C = pos.shape[0], self.chunk
        ring = pos % C  # (b,)
        self._slots = {True: ring, False: pos}
        self.slot_pos[:b].scatter_(1, ring[:, None], pos[:, None])
        held = self.slot_pos[:b]  # (b, C)
        start = pos - ring  # first position of each row's chunk
        local = (held >= start[:, None]) & (held <= pos[:, None])  # (b, C)
        whole = torch.arange(self.capacity, device=pos.device)[None, :] <= pos[:, None]  # (b, capacity)
        return {True: local[:, None, None, :], False: whole[:, None, None, :]}

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (b, G, 1, D) of layer i at each row's slot; return the layer's (b, G, slots, D)."""
        b = k.shape[0]
        if k.shape[2] != 1:
            raise ValueError(f"SlotCache takes one new position per row per step, got {k.shape[2]}")
        slot, rows = self._slots[self.chunked[i]], self._rows[:b]
        self.k[i][rows, :, slot] = k[:, :, 0]  # (b, G, D) at [row, :, slot]
        self.v[i][rows, :, slot] = v[:, :, 0]
        return self.k[i][:b], self.v[i][:b]

    def load(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        """Give `row` to a request whose first `length` positions are prefilled: keys[i], values[i] (G, S, D) are
        layer i's stored positions length - S .. length - 1 (a chunked layer's last S <= C - 1, a global layer's
        whole prefix, S == length)."""
        if length > self.capacity:
            raise ValueError(f"{length} positions do not fit the cache's capacity {self.capacity}; grow it first")
        self.slot_pos[row] = -1
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            S = k.shape[1]
            if self.chunked[i]:
                if S > self.chunk - 1:
                    raise ValueError(f"layer {i} is chunked: at most {self.chunk - 1} stored positions, got {S}")
                p = torch.arange(length - S, length, device=k.device)
                self.k[i][row][:, p % self.chunk], self.v[i][row][:, p % self.chunk] = k, v
                self.slot_pos[row, p % self.chunk] = p
            else:
                if S != length:
                    raise ValueError(f"layer {i} is global: it needs all {length} positions, got {S}")
                self.k[i][row, :, :S], self.v[i][row, :, :S] = k, v

    def grow(self, capacity: int) -> None:
        """Enlarge the global layers' buffers to `capacity` positions (their contents kept)."""
        if capacity <= self.capacity:
            return
        for i, chunked in enumerate(self.chunked):
            if not chunked:
                for bufs in (self.k, self.v):
                    old = bufs[i]
                    bufs[i] = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                    bufs[i][:, :, :self.capacity] = old
        self.capacity = capacity

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (every row and slot, used or not)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
