"""Where the tokens of one forward call sit and what each may attend to: positions and attend-masks.

The decoder has one forward (herd.model.text); what differs between training, prefill and the two decode engines is
how the batch is laid out, and that is described by a `Step`, made by whoever owns the layout:
- `sequence_step`: contiguous rows, optionally left-padded (`attention_mask`), optionally after `seen` positions a
  cache already holds (herd.model.cache.KVCache.step calls it with its own history);
- `packed_step`: packed training rows, several documents per row (`doc_ids`), each seeing only itself;
- herd.model.slot_cache.SlotCache.step: one new token per row, each row at its own position in a fixed-shape cache.
This is the shape of gpt-fast's and mlx-lm's decoders (the cache object makes the mask; the model just runs layers).

Chunked attention (iRoPE's local layers, Llama 4 model card): a query at position q sees the keys k <= q with
floor(k / C) == floor(q / C), C = attention_chunk_size, chunks aligned to the row's first real token (or to its
document's start when packed). Global (NoPE) layers see every earlier key.

Shapes: B batch, T new tokens, K keys visible this step, C chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Mask = torch.Tensor | str | None  # (B or 1, 1, T, K) bool, "causal" (SDPA's is_causal), or None (attend to all)


@dataclass
class Step:
    """What a forward call's tokens are: their RoPE positions (B or 1, T), the positions the NoPE layers' attention
    temperature is computed at ((B or 1, T) or (T,)), and the attend-mask of each layer kind ({chunked: Mask})."""

    positions: torch.Tensor
    temperature_positions: torch.Tensor
    masks: dict[bool, Mask]


def build_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, pad: torch.Tensor | None, chunk: int | None) -> Mask:
    """Boolean attend-mask (B, 1, T, K), or "causal" / None when SDPA needs no explicit mask.

    q_pos (T,), k_pos (K,) are absolute cache positions; pad (B, P) is the 2-D padding mask over all positions seen
    so far (P >= max k_pos + 1), True = real token. With `chunk`, the chunked-local rule applies:
    floor((k - lp) / C) == floor((q - lp) / C) where lp is the row's count of left-padding tokens.
    """
    T, K = q_pos.numel(), k_pos.numel()
    padded = pad is not None and not bool(pad.all())
    if not padded:
        one_chunk = chunk is None or (int(q_pos[-1]) // chunk == int(k_pos[0]) // chunk)
        if one_chunk and T == 1:
            return None
        if one_chunk and T == K and int(q_pos[0]) == int(k_pos[0]):
            return "causal"
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, K)
    if chunk is not None:
        lp = (~pad.bool()).int().cumprod(-1).sum(-1) if padded else torch.zeros(1, dtype=torch.long,
                                                                                device=q_pos.device)
        lp = lp.view(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        q_chunk = torch.div(q_pos.view(1, 1, T, 1) - lp, chunk, rounding_mode="floor")
        k_chunk = torch.div(k_pos.view(1, 1, 1, K) - lp, chunk, rounding_mode="floor")
        allowed = allowed & (q_chunk == k_chunk)
    if padded:
        allowed = allowed & pad.bool()[:, k_pos][:, None, None, :]
    return allowed


def sequence_step(B: int, T: int, device: torch.device, chunk: int, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None, temperature_positions: torch.Tensor | None = None,
                  seen: int = 0, kept: dict[bool, int] | None = None) -> Step:
    """B rows of T new tokens after `seen` earlier positions, of which each layer kind still holds the last
    kept[chunked] (a cache's bound; everything when None).

    Positions here are cache positions: left padding counts (the transformers convention). `position_ids` (B or 1, T)
    default to those; `temperature_positions` too. A batching engine passes each row's real positions for both, so a
    left-padded row computes what it computes alone (RoPE and the chunk rule already follow each row's own start).
    `attention_mask` (B, seen + T): 1 for real tokens, 0 for left padding.
    """
    q_pos = torch.arange(seen, seen + T, device=device)  # (T,) absolute cache positions (padding included)
    if attention_mask is not None:
        if attention_mask.shape != (B, seen + T):
            raise ValueError(f"attention_mask must be (batch, past + new) = {(B, seen + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(device).bool()
    masks = {}
    for chunked in (False, True):
        start = max(0, seen - kept[chunked]) if kept is not None else 0
        k_pos = torch.arange(start, seen + T, device=device)  # (K,)
        masks[chunked] = build_mask(q_pos, k_pos, attention_mask, chunk if chunked else None)
    positions = q_pos[None] if position_ids is None else position_ids.to(device)  # (1 or B, T)
    temp = q_pos if temperature_positions is None else temperature_positions.to(device)
    return Step(positions, temp, masks)


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document (B, T) for packed rows of doc ids (B, T), e.g. [7,7,7,9,9] ->
    [0,1,2,0,1]. A new document starts wherever the id changes."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(-1).values


def build_doc_mask(doc_ids: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Attend-mask (B, 1, T, T) for packed training rows: causal, never across documents, and (with `chunk`) chunks
    aligned to each document's own start - exactly what each document would see alone at inference."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device)
    allowed = (idx[None, :] <= idx[:, None])[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)
    if chunk is not None:
        c = torch.div(doc_positions(doc_ids), chunk, rounding_mode="floor")
        allowed = allowed & (c[:, :, None] == c[:, None, :])
    return allowed[:, None]


def packed_step(doc_ids: torch.Tensor, chunk: int, position_ids: torch.Tensor | None = None) -> Step:
    """Packed training rows (B, T) of document ids: positions, chunks and the attention temperature restart at each
    document, and attention never crosses a document boundary, as if every document ran alone."""
    pos = doc_positions(doc_ids)  # (B, T)
    masks = {False: build_doc_mask(doc_ids, None), True: build_doc_mask(doc_ids, chunk)}
    return Step(pos if position_ids is None else position_ids.to(doc_ids.device), pos, masks)
