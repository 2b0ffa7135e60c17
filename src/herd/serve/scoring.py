"""Prompt logprobs: the completions API's `echo` with `logprobs`, what evaluation harnesses score with.

OpenAI's legacy completions API, asked for `echo: true` and `logprobs: N`, returns the prompt's tokens in the
`logprobs` columns before the generated ones: each prompt token's log-probability given the tokens before it (the
first token has none: null, and its `top_logprobs` entry is null too), its N most likely alternatives, its text and
its character offset in the returned text (platform.openai.com/docs/api-reference/completions/object). With
`max_tokens` 0 nothing is generated: the request only scores its prompt. lm-eval's `local-completions` model
(github.com/EleutherAI/lm-evaluation-harness, lm_eval/models/openai_completions.py) computes loglikelihoods
(multiple choice, rolling perplexity) this way: it sends context + continuation, `echo`, `logprobs` 1,
`max_tokens` 1, sums `token_logprobs[ctxlen:-1]`, and calls the continuation greedy when every token's logprob is
the largest of its `top_logprobs`.

Design:
- The engine's prefill keeps only the last position's logits (generation needs no more), so the prompt's logprobs
  come from a forward pass of their own: `prompt_logprobs`, run on the engine thread between two steps
  (herd.serve.worker's `call`: no weight swap or batch step runs meanwhile), one prompt per call so running
  generations go on between the prompts of a batch. The prompt goes through the model in pieces of `PIECE`
  positions over a KV cache, as the engine prefills, so the (positions, vocabulary) logits stay bounded.
- Logprobs are raw, as the generated tokens' are (herd.infer.sampling): the log-softmax of the model's logits,
  with the ids the engine never samples (a vocabulary padded past the tokenizer's, an image placeholder) left out,
  so the prompt's and the generated tokens' numbers come from the same distribution.
- A text prompt starts with the BOS token herd adds (herd.serve.service); it is listed first (logprob null, as the
  first token always is) and takes no characters of the echoed text, whose offsets start at its second token.
"""

from __future__ import annotations

import itertools

import torch

from herd.model.cache import KVCache

PIECE = 256  # prompt positions per forward pass: bounds the (PIECE, V) float32 logits held at once


@torch.no_grad()
def prompt_logprobs(model, ids: list[int], top_n: int, banned: torch.Tensor | None = None) -> list[dict | None]:
    """Per prompt token, in the engine's logprob shape ({"token", "logprob", "top": [(id, logprob)]}), None for the
    first one (nothing precedes it). Run on the engine's thread."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)  # (1, T)
    cache = KVCache(model.text_config)
    out: list[dict | None] = [None]
    for a in range(0, len(ids) - 1, PIECE):  # position p's logits score token p + 1; the last one scores nothing
        b = min(len(ids) - 1, a + PIECE)
        logits = model(x[:, a:b], cache=cache)[0].float()  # (b - a, V)
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        lp = logits.log_softmax(dim=-1)  # (b - a, V)
        nxt = x[0, a + 1:b + 1]  # (b - a,) the tokens these positions score
        chosen = lp.gather(-1, nxt[:, None])[:, 0].tolist()
        top_v, top_i = lp.topk(top_n, dim=-1)  # (b - a, N)
        out += [{"token": t, "logprob": v, "top": list(zip(ti, tv, strict=True))}
                for t, v, ti, tv in zip(nxt.tolist(), chosen, top_i.tolist(), top_v.tolist(), strict=True)]
    return out


def echo_columns(tok, ids: list[int], scored: list[dict | None], added_bos: bool, as_ids: bool = False) -> dict:
    """The prompt's part of the legacy `logprobs` columns (tokens, token_logprobs, top_logprobs, text_offset).
    `added_bos`: ids[0] is the BOS herd put before a text prompt, so it takes no characters of the echoed text.
    `as_ids`: tokens named "token_id:<id>" (vLLM's return_tokens_as_token_ids)."""
    def name(t: int, text: str | None = None) -> str:
        return f"token_id:{t}" if as_ids else text if text is not None else tok.decode([t])

    texts = [tok.decode([t]) for t in ids]
    widths = [0 if (added_bos and i == 0) else len(s) for i, s in enumerate(texts)]
    return {"tokens": [name(t, s) for t, s in zip(ids, texts, strict=True)],
            "token_logprobs": [None if e is None else e["logprob"] for e in scored],
            "top_logprobs": [None if e is None else {name(t): v for t, v in e["top"]} for e in scored],
            "text_offset": list(itertools.accumulate(widths[:-1], initial=0))}


def join(prompt: dict, generated: dict | None) -> dict:
    """The prompt's columns followed by the generated tokens' (None: nothing generated or streamed yet)."""
    return {k: v + generated[k] for k, v in prompt.items()} if generated else prompt
