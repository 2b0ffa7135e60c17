"""Greedy and sampled generation over herd's KV cache (token ids in, token ids out; no tokenizer here).

Batches may be left-padded: pass the 2-D `attention_mask` (1 = real token). Positions follow transformers'
`generate` (position = running count of real tokens - 1, padding at 0), so results match it token for token, and
chunked attention aligns chunks to each row's first real token.

`use_cache=False` re-runs the whole sequence every step; it exists to check the cache, not for speed.
"""

from __future__ import annotations

import torch

from herd.infer.sampling import never_sampled


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                banned: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax at temperature 0, else top-k / top-p sampling.
    Ids where `banned` (V,) bool is True are never chosen."""
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
             generator: torch.Generator | None = None, use_cache: bool = True,
             pixel_values: torch.Tensor | None = None, on_token=None, vocab_limit: int | None = None) -> torch.Tensor:
    """Return (B, T + n) ids: the prompt followed by up to `max_new_tokens` new tokens per row.

    Rows that emit an end-of-sequence id are padded with `pad_token_id` afterwards; generation stops early once
    every row has finished. For a multimodal model, `pixel_values` (tiles of every image, in prompt order) are
    encoded once, with the prompt; decode steps only read the cache. `on_token(ids)` is called with each step's
    new tokens (B,) as they are produced, for streaming. `vocab_limit` (the tokenizer's vocabulary size) keeps ids
    a padded model vocabulary has beyond the tokenizer's from ever being chosen; a multimodal model's image
    placeholder id is never chosen either (a generated `<|patch|>` would have no image feature behind it).
    """
    from herd.model.cache import KVCache

    B, T = input_ids.shape
    device = model.device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device).long()
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    banned = never_sampled(model, vocab_limit, device)
    cache = KVCache(getattr(model.config, "text_config", model.config)) if use_cache else None
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T)
    step_ids, step_pos = ids, pos
    for _ in range(max_new_tokens):
        if cache is None:
            step_ids, step_pos = ids, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        first = cache is None or cache.seen == 0
        extra = {"pixel_values": pixel_values.to(device)} if pixel_values is not None and first else {}
        logits = model(step_ids, attention_mask=mask, position_ids=step_pos, cache=cache, logits_to_keep=1, **extra)
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator, banned)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
        step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
        if eos.numel():
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
    return ids
