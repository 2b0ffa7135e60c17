"""The reference generation loop: one batch, a KV cache, the model called once per token (token ids in, token ids out;
no tokenizer here). herd.infer.engine.Engine is the serving path (continuous batching); both sample through
herd.infer.sampling, so the same SamplingParams (temperature, top-k / top-p / min-p, penalties, logit bias, seed)
give the same tokens on either.

Batches may be left-padded: pass the 2-D `attention_mask` (1 = real token). Positions follow transformers'
`generate` (position = running count of real tokens - 1, padding at 0), so results match it token for token, and
chunked attention aligns chunks to each row's first real token.

`use_cache=False` re-runs the whole sequence every step; it exists to check the cache, not for speed.
"""

from __future__ import annotations

import dataclasses

import torch

from herd.infer.sampling import SamplingParams, make_generator, never_sampled, sample
from herd.model.cache import KVCache


def _row_params(params: SamplingParams, B: int) -> list[SamplingParams]:
    """Row i of a seeded batch draws with seed + i (the server's rule for a request's n choices)."""
    if params.seed is None:
        return [params] * B
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(B)]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
             generator: torch.Generator | None = None, use_cache: bool = True,
             pixel_values: torch.Tensor | None = None, on_token=None, vocab_limit: int | None = None,
             params: SamplingParams | None = None) -> torch.Tensor:
    """Return (B, T + n) ids: the prompt followed by up to `max_new_tokens` new tokens per row.

    Sampling: `params` (herd.infer.sampling.SamplingParams; its max_new_tokens and stops are not used here), or the
    shorthand `temperature` / `top_k` / `top_p` (greedy by default). A seeded `params` gives row i its own stream
    (seed + i); `generator` draws every unseeded row from one given generator instead of torch's default.

    Rows that emit an end-of-sequence id are padded with `pad_token_id` afterwards; generation stops early once
    every row has finished. For a multimodal model, `pixel_values` (tiles of every image, in prompt order) are
    encoded once, with the prompt; decode steps only read the cache. `on_token(ids)` is called with each step's
    new tokens (B,) as they are produced, for streaming. `vocab_limit` (the tokenizer's vocabulary size) keeps ids
    a padded model vocabulary has beyond the tokenizer's from ever being chosen; a multimodal model's image
    placeholder id is never chosen either (a generated `<|patch|>` would have no image feature behind it).
    """
    B, T = input_ids.shape
    device = model.device
    if params is None:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=1.0 if top_p is None else top_p,
                                max_new_tokens=max(1, max_new_tokens))
    rows = _row_params(params, B)
    gens = [make_generator(p, device) or generator for p in rows]
    ids = input_ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device).long()
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]  # for the penalties
    outputs: list[list[int]] = [[] for _ in range(B)]
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    banned = never_sampled(model, vocab_limit, device)
    cache = KVCache(model.text_config) if use_cache else None
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T)
    step_ids, step_pos = ids, pos
    for _ in range(max_new_tokens):
        if cache is None:
            step_ids, step_pos = ids, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        first = cache is None or cache.seen == 0
        extra = {"pixel_values": pixel_values.to(device)} if pixel_values is not None and first else {}
        logits = model(step_ids, attention_mask=mask, position_ids=step_pos, cache=cache, logits_to_keep=1, **extra)
        logits = logits[:, -1]
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        nxt = sample(logits, rows, gens, prompts, outputs).tokens  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        for out, t, finished in zip(outputs, nxt.tolist(), done.tolist(), strict=True):
            if not finished:
                out.append(t)
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
