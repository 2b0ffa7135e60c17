"""Sampling for a continuous batch: per-request parameters, the logits pipeline, and the next-token pick.

Rows of a continuous batch belong to different requests, so every knob is a per-row (B,) tensor and one batched op
serves the whole batch. Letters: B = rows (requests) in the batch, V = vocabulary, N = top logprobs returned.

Order of the processors (transformers' `generate`, and vLLM):
  0. logit bias (OpenAI's `logit_bias`: a number in [-100, 100] added to a token's logit; -100 bans it in practice,
     +100 all but forces it), on the model's logits, as vLLM applies it before every other processor;
  1. penalties:
     - repetition (CTRL, Keskar et al. 2019, arXiv 1909.05858; transformers' and vLLM's form): over the prompt and the
       generated tokens, a positive logit is divided by the penalty and a negative one multiplied by it;
     - frequency and presence (OpenAI): over the generated tokens only, logit -= frequency * count + presence * seen.
  2. temperature. Below `GREEDY_EPS` a row is greedy: the argmax of its penalized logits (no warper below can move
     the argmax, so greedy rows go through them unharmed and stay batched with the rest).
  3. top-k, 4. top-p (nucleus, Holtzman et al. 2019, arXiv 1904.09751), 5. min-p (Nguyen et al. 2024,
     arXiv 2407.01082): transformers' order. vLLM V1 runs min-p before top-k/top-p; the two orders give different
     results only when min-p is combined with top-p.
Filters keep ties (every token equal to the k-th logit survives top-k) and always keep the most likely token.

Logprobs are "raw": the log-softmax of the model's logits before any penalty, temperature or filter, vLLM V1's
default (`logprobs_mode="raw_logprobs"`; its V0 returned the processed ones). Why raw: it exists for greedy rows
(temperature 0 has no processed distribution), it is finite for every token (a filtered token's processed logprob is
-inf, which JSON cannot carry), and it describes the model, not the request's knobs, so two requests with different
settings report comparable numbers. OpenAI documents a logprob only as "the log probability of this token".

Reproducibility: a request with a `seed` owns a `torch.Generator` (`make_generator`) and its row is drawn with
`torch.multinomial` on that generator alone, so its tokens do not depend on which other requests share the batch.
Unseeded rows share one draw from torch's default generator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a lower temperature is greedy (dividing by it would overflow the logits)
MAX_STOP_STRINGS = 4  # OpenAI's limit on `stop`
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on `top_logprobs`
MAX_TOP_K = 2**31 - 1  # past any vocabulary; a larger int would overflow the (B,) long column top-k is given as


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler. Defaults are vLLM's (`max_new_tokens` 16 as vLLM's `max_tokens`).

    `top_k` None, 0 or -1 means off (vLLM accepts 0 and -1; both are stored as None). `stop` also takes a single
    string. `stop_token_ids` add to the tokenizer's end-of-turn ids, which `ignore_eos` turns off (the explicit
    `stop_token_ids` still stop). `top_logprobs` > 0 needs `logprobs=True`, as in OpenAI's API.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 16
    stop_token_ids: Sequence[int] | None = ()
    stop: Sequence[str] | str | None = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    logit_bias: Mapping[int, float] | None = None  # token id -> bias in [-100, 100]
    # special tokens whose text stays in the output while the others are skipped (vLLM's skip_special_tokens);
    # herd serve keeps Llama 4's <|python_start|> / <|python_end|> for a request with tools, so herd.tools can read
    # a code-interpreter call
    keep_special: Sequence[str] = ()

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {rule}, got {getattr(self, name)!r}")

        check(_is_number(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0 (0 = greedy)")
        check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        if self.top_k in (0, -1):
            object.__setattr__(self, "top_k", None)
        check(self.top_k is None or (_is_int(self.top_k) and 1 <= self.top_k <= MAX_TOP_K), "top_k",
              f"None, 0 or -1 (off), or an int in [1, {MAX_TOP_K}]")
        check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]")
        check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
              "a number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            check(_is_number(getattr(self, name)) and -2 <= getattr(self, name) <= 2, name, "a number in [-2, 2]")
        check(self.seed is None or (_is_int(self.seed) and -2**63 <= self.seed < 2**64), "seed",
              "None or an int in [-2**63, 2**64) (what torch.Generator.manual_seed takes)")
        check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an int >= 1")
        # Stored as tuples (None, as OpenAI's null, means none) so a frozen params object cannot change.
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        check(all(_is_int(i) and i >= 0 for i in self.stop_token_ids), "stop_token_ids", "a list of ids >= 0")
        check(len(self.stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in self.stop), "stop",
              f"at most {MAX_STOP_STRINGS} non-empty strings")
        check(isinstance(self.logprobs, bool), "logprobs", "a bool")
        check(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
              f"an int in [0, {MAX_TOP_LOGPROBS}]")
        check(self.top_logprobs == 0 or self.logprobs, "top_logprobs", "0 unless logprobs=True")
        check(isinstance(self.ignore_eos, bool), "ignore_eos", "a bool")
        bias = self.logit_bias or {}
        bias = dict(bias) if isinstance(bias, tuple) else bias  # already normalised (dataclasses.replace)
        check(isinstance(bias, Mapping) and all(_is_int(k) and k >= 0 and _is_number(v) and -100 <= v <= 100
                                                for k, v in bias.items()), "logit_bias",
              "a mapping of token ids >= 0 to numbers in [-100, 100]")
        object.__setattr__(self, "logit_bias", tuple(sorted(bias.items())))  # frozen, like stop
        object.__setattr__(self, "keep_special", tuple(self.keep_special or ()))
        check(all(isinstance(t, str) and t for t in self.keep_special), "keep_special", "a list of token strings")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def never_sampled(model, vocab_limit: int | None, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """(V,) True for the ids no request may sample, or None: ids from `vocab_limit` on (a model vocabulary padded
    past its tokenizer's: the tokenizer could not decode them), and a multimodal model's image placeholder, which
    stands for an image feature that a generated token would not have."""
    V = model.text_config.vocab_size
    banned = torch.zeros(V, dtype=torch.bool, device=device)
    if vocab_limit is not None:
        banned[vocab_limit:] = True
    image_id = model.image_token_index
    if image_id is not None and image_id < V:
        banned[image_id] = True
    return banned if bool(banned.any()) else None


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The request's own random stream when it has a seed (create once per request, on the logits' device)."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


# ---- the processors, each on (B, V) float logits with per-row settings --------------------------------------------
def token_counts(ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """How often each id occurs in each row's list: (B, V) float32 (ragged lists padded with an extra column)."""
    width = max((len(r) for r in ids), default=0)
    padded = torch.tensor([list(r) + [vocab_size] * (width - len(r)) for r in ids], dtype=torch.long,
                          device=device).reshape(len(ids), width)  # (B, L)
    counts = torch.zeros(len(ids), vocab_size + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab_size]  # (B, V)


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[Sequence[tuple[int, float]]]) -> torch.Tensor:
    """Add each row's (token id, bias) pairs to its logits; ids past the vocabulary are an error."""
    rows = [i for i, b in enumerate(biases) for _ in b]
    ids = [t for b in biases for t, _ in b]
    if max(ids) >= logits.shape[-1]:
        raise ValueError(f"logit_bias names token id {max(ids)}, outside the vocabulary (size {logits.shape[-1]})")
    values = torch.tensor([v for b in biases for _, v in b], dtype=logits.dtype, device=logits.device)
    return logits.index_put((torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)),
                            values, accumulate=True)


def apply_penalties(logits: torch.Tensor, prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens, then OpenAI's frequency and presence penalties over output
    tokens only. `repetition`, `presence`, `frequency`: (B,)."""
    V = logits.shape[-1]
    out = token_counts(output_ids, V, logits.device)  # (B, V)
    seen = (token_counts(prompt_ids, V, logits.device) > 0) | (out > 0)  # (B, V)
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits < 0, logits * rep, logits / rep), logits)
    return logits - frequency[:, None] * out - presence[:, None] * (out > 0)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature (B,); greedy rows are left as they are (their argmax is all they need)."""
    t = torch.where(temperature < GREEDY_EPS, torch.ones_like(temperature), temperature)
    return logits / t[:, None]


def apply_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (and ties with the k-th); k (B,) int, 0 = off."""
    on = k > 0
    kmax = min(int(k.max()), logits.shape[-1])
    if kmax <= 0:
        return logits
    # One topk of the largest k in the batch serves every row: row i reads its own k-th value from it.
    kth = torch.topk(logits, kmax, dim=-1).values.gather(1, (k.clamp(1, kmax) - 1)[:, None])  # (B, 1)
    return logits.masked_fill(on[:, None] & (logits < kth), float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of most likely tokens whose probabilities sum to at least p; top_p (B,), 1 = off.

    Same arithmetic as transformers' TopPLogitsWarper (ascending sort, drop while the cumulative mass <= 1 - p), with
    1 - p taken in float64 first as Python does there, so both cut at the same token.
    """
    on = top_p < 1
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending: (B, V)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    drop = cum <= (1 - top_p.double()).to(cum.dtype)[:, None]
    drop[:, -1] = False  # the most likely token always stays
    drop &= on[:, None]
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the row's most likely token; min_p (B,), 0 = off."""
    probs = logits.softmax(dim=-1)  # (B, V)
    return logits.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))


def _column(values: list, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)  # (B,)


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                   prompt_ids: Sequence[Sequence[int]] | None = None,
                   output_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """(B, V) last-position logits -> (B, V) float32 logits to sample from, row i processed with params[i].

    `prompt_ids[i]` / `output_ids[i]`: row i's prompt and generated tokens so far (needed only for penalties).
    Processors that no row uses are skipped: a batch of plain rows comes back as its float32 logits.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(params)} rows of params")
    B, dev = len(params), logits.device
    logits = logits.float()
    if any(p.logit_bias for p in params):
        logits = apply_logit_bias(logits, [p.logit_bias for p in params])
    if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
        logits = apply_penalties(
            logits, prompt_ids or [[]] * B, output_ids or [[]] * B,
            _column([p.repetition_penalty for p in params], dev),
            _column([p.presence_penalty for p in params], dev),
            _column([p.frequency_penalty for p in params], dev))
    if any(p.temperature != 1 for p in params):
        logits = apply_temperature(logits, _column([p.temperature for p in params], dev))
    if any(p.top_k for p in params):
        logits = apply_top_k(logits, _column([p.top_k or 0 for p in params], dev, torch.long))
    if any(p.top_p < 1 for p in params):
        logits = apply_top_p(logits, _column([p.top_p for p in params], dev, torch.float64))
    if any(p.min_p > 0 for p in params):
        logits = apply_min_p(logits, _column([p.min_p for p in params], dev))
    return logits


def pick_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """Next token per row (B,) from processed logits: argmax for greedy rows, else a multinomial draw.

    A row with a generator is drawn alone on it, so the draw depends only on that row; rows without one share a
    single draw from torch's default generator.
    """
    generators = generators if generators is not None else [None] * len(params)
    if len(generators) != len(params):
        raise ValueError(f"{len(generators)} generators for {len(params)} rows")
    tokens = logits.argmax(dim=-1)  # (B,)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    shared = [i for i in rows if generators[i] is None]
    if shared:
        probs = logits[shared].softmax(dim=-1)  # (b, V)
        tokens[shared] = torch.multinomial(probs, 1).squeeze(-1)
    for i in rows:
        if generators[i] is not None:
            tokens[i] = torch.multinomial(logits[i].softmax(dim=-1), 1, generator=generators[i])[0]
    return tokens


@dataclass
class SampleOutput:
    """One step's result. The logprob fields are filled when any row asked for logprobs, for every row (a row reads
    its own first `top_logprobs` columns); they hold raw logprobs (see the module docstring)."""

    tokens: torch.Tensor  # (B,) long
    logprobs: torch.Tensor | None = None  # (B,) raw logprob of the chosen token
    top_ids: torch.Tensor | None = None  # (B, N) the N most likely ids, N = the largest top_logprobs in the batch
    top_logprobs: torch.Tensor | None = None  # (B, N) their raw logprobs, descending


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None] | None = None,
           prompt_ids: Sequence[Sequence[int]] | None = None,
           output_ids: Sequence[Sequence[int]] | None = None) -> SampleOutput:
    """The whole step: process the (B, V) logits, pick each row's token, and gather logprobs if asked."""
    raw = logits.float().log_softmax(dim=-1) if any(p.logprobs for p in params) else None  # (B, V)
    tokens = pick_tokens(process_logits(logits, params, prompt_ids, output_ids), params, generators)
    if raw is None:
        return SampleOutput(tokens)
    chosen = raw.gather(1, tokens[:, None]).squeeze(1)  # (B,)
    top = raw.topk(max(p.top_logprobs for p in params), dim=-1)  # (B, N)
    return SampleOutput(tokens, chosen, top.indices, top.values)
