"""The engine's default batch layout: every running row in one left-padded herd.model.cache.KVCache.

herd.infer.engine.Engine owns the requests (admission, prefill, sampling, stops, cancellation); a layout owns where
their keys live and runs the decode step. This one keeps one batch cache whose rows share a length:
- prefilled requests join by left padding whichever of the batch and the newcomers is shorter and concatenating the
  rows (chunked (RoPE) layers keep at most `attention_chunk_size - 1` positions per row, global (NoPE) layers the
  whole context: the two-tier cost of herd.model.cache);
- a decode step is one model call over all rows, each at its real position: RoPE gets each row's real positions
  (`position_ids`), the chunk rule counts from each row's first real token (herd.model.layout.build_mask) and the
  NoPE layers' attention temperature gets real positions too (`temperature_positions`), so a left-padded row
  computes what it computes alone (only float summation order may differ);
- finished rows leave at once (their cache rows are dropped) and the left padding every remaining row has is trimmed.
Its shapes change every step, which costs nothing eagerly on a CPU but rules out CUDA graphs and makes torch.compile
specialise on every length: herd.infer.slot_batch.SlotBatch is the fixed-shape layout for those.

The layout interface (SlotBatch has the same): `admit(cache, mask, lens)` appends prefilled rows, `decode(ids,
lengths)` runs one step and returns (rows, V) logits, `keep(rows)` keeps only those rows, `reset()` empties the
batch, `warmup(progress)` prepares what it can before the first request (nothing here).
Shapes: R running rows, k newcomers, W their padded prompt width, S cache positions, G kv heads, D head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.model.cache import KVCache


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad (B, G, S, D) on the left of S with n zero positions."""
    return F.pad(t, (0, 0, n, 0)) if n else t


class PaddedBatch:
    def __init__(self, model, max_batch: int = 32):
        self.model, self.max_batch = model, max_batch
        self.device = next(model.parameters()).device
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (R, S) True = a real token (False: left padding)

    def warmup(self, progress=None) -> None:
        """Nothing to prepare: every step runs eagerly at whatever shape it has."""

    def admit(self, new: KVCache, new_mask: torch.Tensor, lens: list[int]) -> None:
        """Append a prefilled cache (k rows with padding mask `new_mask` (k, W); row j's real positions are its last
        lens[j]) to the batch, left-padding whichever is shorter."""
        if self.cache is None:
            self.cache, self.mask = new, new_mask
            return
        old, S = self.cache, max(self.cache.seen, new.seen)
        for i in range(len(old.k)):
            (a, av), (b, bv) = old.layer(i), new.layer(i)
            keep = min(S, old.chunk - 1) if old.chunked[i] else S
            old.put(i, torch.cat([_left_pad(a, keep - a.shape[2]), _left_pad(b, keep - b.shape[2])]),
                    torch.cat([_left_pad(av, keep - av.shape[2]), _left_pad(bv, keep - bv.shape[2])]))
        self.mask = torch.cat([F.pad(self.mask, (S - self.mask.shape[1], 0)),
                               F.pad(new_mask, (S - new_mask.shape[1], 0))])
        old.seen = S

    def decode(self, ids: list[int], lengths: list[int]) -> torch.Tensor:
        """One step: row r feeds ids[r] at its real position lengths[r]; returns next-token logits (R, V)."""
        R = len(ids)
        pos = torch.tensor(lengths, device=self.device)[:, None]  # (R, 1) real positions
        self.mask = torch.cat([self.mask, torch.ones(R, 1, dtype=torch.bool, device=self.device)], dim=1)
        logits = self.model(torch.tensor(ids, device=self.device)[:, None], attention_mask=self.mask,
                            position_ids=pos, temperature_positions=pos, cache=self.cache, logits_to_keep=1)
        return logits[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Keep only batch rows `rows`, then trim the left padding every remaining row has."""
        if not rows:
            self.reset()
            return
        idx = torch.tensor(rows, device=self.device)
        self.cache.reorder(idx)
        self.mask = self.mask[idx]
        lead = int((~self.mask).int().cumprod(-1).sum(-1).min())  # left padding common to all rows
        if lead:
            c, S = self.cache, self.cache.seen - lead
            for i in range(len(c.k)):
                k, v = c.layer(i)
                n = min(c.length[i], S)  # a chunked layer keeps min(S, C - 1), a global one S positions
                c.put(i, k[:, :, k.shape[2] - n:], v[:, :, v.shape[2] - n:])
            c.seen, self.mask = S, self.mask[:, lead:]

    def reset(self) -> None:
        self.cache = self.mask = None
