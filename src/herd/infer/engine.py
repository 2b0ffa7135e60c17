"""The inference engine: token ids in, token ids (and text) out, many requests at once. Knows nothing of HTTP.

Continuous batching: requests join and leave one running batch between decode steps.
- Requests waiting when a step begins are prefilled together, as one left-padded batch (up to `prefill_tokens`
  padded positions; vLLM and transformers' `generate` also prefill many prompts in one pass, which keeps the matrix
  multiplies large), in pieces of `prefill_chunk` positions (a long prompt never needs one huge attention), into a
  cache of their own. A prompt with images is prefilled alone and in one piece (an image's tokens must arrive
  together); its images are encoded once. Each request's first token is sampled from that pass.
- While rows are running, waiting requests are admitted once `admit_fraction` of `max_batch` rows (default a
  quarter) are free, or as soon as all of them fit: a prefill pass reads every weight like a decode step does, so a
  few larger passes beat one per finished row (mixed workload at batch 32 on the 2-core CPU: 13-16% more tokens/s and
  a lower median time to first token; no change at batch 8). An idle engine admits at once.
- They then join the batch: their cache is merged into the batch's by left padding (herd.model.cache.KVCache rows share
  one length). Chunked (RoPE) layers keep at most `attention_chunk_size - 1` positions per row, global (NoPE) layers
  the whole context, so memory is the two-tier cost of herd.model.cache.
- A left-padded row computes what it computes alone: RoPE gets each row's real positions (`position_ids`), the chunk
  rule counts from each row's first real token (herd.model.attention.build_mask), and the NoPE layers' attention
  temperature gets real positions too (`temperature_positions`). Only float summation order may differ from a batch
  of one, so greedy outputs are the same (tests/infer/test_engine.py).
- Every decode step feeds each running row its last token, samples all rows at once (herd.infer.sampling: per-row
  settings, per-request seeded generators), and runs each row's StopChecker (stop ids, stop strings, max tokens).
  Finished or cancelled rows leave the batch at once (their cache rows are dropped) and the shared left padding the
  batch no longer needs is trimmed. Ids the tokenizer lacks (a padded model vocabulary) and a multimodal model's
  image placeholder are never sampled: a generated `<|patch|>` would have no image feature behind it.
- A request whose input fails in the model while it is admitted (its group is then retried one by one) ends alone
  with finish_reason "error" and its message in `req.error`; the batch goes on. `fail_all` ends everything (a server
  calls it when a step itself raised).

Use:
    engine = Engine(model, tokenizer)
    req = engine.submit(prompt_ids, SamplingParams(max_new_tokens=64), on_delta=lambda r, text: print(text))
    engine.run()            # or engine.step() from your own loop; engine.cancel(req) at any time
    # from another thread: req = engine.request(...) there, then engine.add(req) on the engine's thread
    req.output_ids, req.text, req.finish_reason
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from herd.infer.sampling import SamplingParams, make_generator, never_sampled, sample
from herd.infer.stops import StopChecker
from herd.model.cache import KVCache


@dataclass(eq=False)
class Request:
    """One generation: the prompt, its settings, and what came out so far."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    pixel_values: torch.Tensor | None = None
    on_delta: Callable[[Request, str], None] | None = None  # called after every new token with its new text
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # what went wrong, when finish_reason is "error"
    checker: StopChecker | None = None
    generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The text streamed so far (the stop checker's: stop strings and held-back text excluded)."""
        return self.checker.text


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad (B, G, S, D) on the left of S with n zero positions."""
    return F.pad(t, (0, 0, n, 0)) if n else t


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 32, prefill_chunk: int = 512, prefill_tokens: int = 4096,
                 admit_fraction: float = 0.25):
        self.model, self.tok = model.eval(), tokenizer
        self.cfg = getattr(model.config, "text_config", model.config)
        self.max_batch, self.prefill_chunk, self.prefill_tokens = max_batch, prefill_chunk, prefill_tokens
        if not 0 <= admit_fraction <= 1:
            raise ValueError(f"admit_fraction must be in [0, 1], got {admit_fraction}")
        self.admit_fraction = admit_fraction
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # row r of the batch cache is running[r]
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (R, S) True = a real token (False: left padding)
        self.lengths: list[int] = []  # real tokens in each row's cache
        self.next_ids: list[int] = []  # each row's token not yet fed to the model
        self._ids = itertools.count()
        self._sampling = False  # inside _sample: a cancel from a callback only marks the request
        self.banned = never_sampled(model, tokenizer.vocab_size, self.device)  # (V,) or None

    # ---- requests --------------------------------------------------------------------------------------------------
    def request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                pixel_values: torch.Tensor | None = None, on_delta=None) -> Request:
        """Check and build a request without queueing it (safe from any thread: it touches no engine state)."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.cfg.max_position_embeddings:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is "
                             f"{self.cfg.max_position_embeddings}")
        if pixel_values is not None and not hasattr(self.model.config, "vision_config"):
            raise ValueError("this is a text-only model: it cannot take images")
        bad = next((t for t in prompt if not 0 <= t < self.cfg.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (size {self.cfg.vocab_size})")
        if params.logit_bias and params.logit_bias[-1][0] >= self.cfg.vocab_size:  # pairs are sorted by id
            raise ValueError(f"logit_bias names token id {params.logit_bias[-1][0]}, outside the vocabulary "
                             f"(size {self.cfg.vocab_size})")
        image_id = getattr(self.model.config, "image_token_index", None)
        if pixel_values is None and image_id is not None and image_id in prompt:
            raise ValueError(f"the prompt holds image placeholder tokens (id {image_id}) but no image was given")
        return Request(next(self._ids), prompt, params, pixel_values, on_delta,
                       checker=StopChecker(params, self.tok), generator=make_generator(params, self.device))

    def add(self, req: Request) -> Request:
        """Queue a request built by `request`; it joins the batch at the next step."""
        if not req.finished:
            self.waiting.append(req)
        return req

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               pixel_values: torch.Tensor | None = None, on_delta=None) -> Request:
        return self.add(self.request(prompt_ids, params, pixel_values, on_delta))

    def cancel(self, req: Request) -> None:
        """Stop a request now; a running one leaves the batch (and frees its cache rows) at once."""
        if req.finished:
            return
        req.finish_reason = "cancelled"
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running and not self._sampling:  # else _sample drops it when its loop ends
            self._drop([r for r in range(len(self.running)) if self.running[r] is not req])
        if req.on_delta is not None:  # its consumer learns at once that it ended
            req.on_delta(req, "")

    def fail_all(self, message: str) -> None:
        """End every request with finish_reason "error" and empty the batch (after a step raised: its state is
        unknown, and the next requests must start clean)."""
        reqs = list(self.waiting) + self.running
        self.waiting.clear()
        self.running, self.next_ids, self.lengths, self.cache, self.mask = [], [], [], None, None
        for req in reqs:
            self._fail(req, message)

    def _fail(self, req: Request, message: str) -> None:
        if not req.finished:
            req.finish_reason, req.error = "error", message
            if req.on_delta is not None:
                req.on_delta(req, "")

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> None:
        while self.busy:
            self.step()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> list[Request]:
        """Submit every prompt, run to the end, return the requests in order."""
        reqs = [self.submit(p, params) for p in prompts]
        self.run()
        return reqs

    # ---- one scheduler iteration -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting requests (prefill + first token), then one decode step for every running row."""
        free = self.max_batch - len(self.running)
        if self.running and free < min(len(self.waiting), max(1, int(self.admit_fraction * self.max_batch))):
            self._decode()  # too few free rows to be worth a prefill pass yet (module docstring)
            return
        group: list[Request] = []
        while self.waiting and len(self.running) + len(group) < self.max_batch:
            req = self.waiting.popleft()
            if req.pixel_values is not None:  # an image prompt is prefilled alone, in one piece
                self._try_admit([req])
                continue
            width = max([len(req.prompt_ids)] + [len(q.prompt_ids) for q in group])
            if group and width * (len(group) + 1) > self.prefill_tokens:  # the padded batch would be too big
                self._try_admit(group)
                group = []
            group.append(req)
        if group:
            self._try_admit(group)
        if self.running:
            self._decode()

    def _try_admit(self, reqs: list[Request]) -> None:
        """Admit `reqs` together; if their prefill fails, each alone, so that only a request whose own input fails
        in the model ends (with "error"); a failure after joining the batch leaves its state unknown: raise."""
        try:
            self._admit(reqs)
        except (ValueError, RuntimeError) as e:
            if any(q in self.running for q in reqs):
                raise
            if len(reqs) > 1:
                for q in reqs:
                    self._try_admit([q])
            else:
                self._fail(reqs[0], f"{type(e).__name__}: {e}")

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill `reqs` as one left-padded batch (in pieces of `prefill_chunk` positions, each row at its real
        positions) into a cache of their own, merge it into the batch, sample their first tokens."""
        lens = [len(q.prompt_ids) for q in reqs]
        W = max(lens)
        ids = torch.tensor([[0] * (W - n) + q.prompt_ids for q, n in zip(reqs, lens, strict=True)],
                           device=self.device)  # (k, W)
        mask = torch.arange(W, device=self.device)[None, :] >= torch.tensor([W - n for n in lens],
                                                                            device=self.device)[:, None]  # (k, W)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (k, W) real positions (0 on the padding)
        pixels = reqs[0].pixel_values
        piece = W if pixels is not None else self.prefill_chunk
        cache = KVCache(self.cfg)
        for a in range(0, W, piece):
            b = min(W, a + piece)
            extra = {"pixel_values": pixels.to(self.device)} if pixels is not None else {}
            logits = self.model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b],
                                temperature_positions=pos[:, a:b], cache=cache, logits_to_keep=1, **extra)
        self._merge(cache, mask, lens)
        first = len(self.running)
        self.running += reqs
        self.next_ids += [-1] * len(reqs)
        self._sample(logits[:, -1], list(range(first, first + len(reqs))))

    def _decode(self) -> None:
        R = len(self.running)
        ids = torch.tensor(self.next_ids, device=self.device)[:, None]  # (R, 1)
        pos = torch.tensor(self.lengths, device=self.device)[:, None]  # (R, 1) real positions
        self.mask = torch.cat([self.mask, torch.ones(R, 1, dtype=torch.bool, device=self.device)], dim=1)
        logits = self.model(ids, attention_mask=self.mask, position_ids=pos, temperature_positions=pos,
                            cache=self.cache, logits_to_keep=1)
        self.lengths = [n + 1 for n in self.lengths]
        self._sample(logits[:, -1], list(range(R)))

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Pick the next token of `rows` (logits (len(rows), V)), stream their text, retire finished rows."""
        reqs = [self.running[r] for r in rows]
        if self.banned is not None:
            logits = logits.masked_fill(self.banned, float("-inf"))
        self._sampling = True
        try:
            self._deliver(rows, reqs, logits)
        finally:
            self._sampling = False
        keep = [r for r, q in enumerate(self.running) if not q.finished]
        if len(keep) < len(self.running):
            self._drop(keep)

    def _deliver(self, rows: list[int], reqs: list[Request], logits: torch.Tensor) -> None:
        out = sample(logits, [q.params for q in reqs], [q.generator for q in reqs],
                     [q.prompt_ids for q in reqs], [q.output_ids for q in reqs])
        for i, (r, q) in enumerate(zip(rows, reqs, strict=True)):
            if q.finished:  # cancelled from an earlier row's callback in this loop
                continue
            t = int(out.tokens[i])
            q.output_ids.append(t)
            if q.params.logprobs:
                k = q.params.top_logprobs
                q.logprobs.append({"token": t, "logprob": float(out.logprobs[i]),
                                   "top": list(zip(out.top_ids[i, :k].tolist(), out.top_logprobs[i, :k].tolist(),
                                                   strict=True))})
            delta = q.checker.add(t)
            if not q.checker.finished and self.lengths[r] + 1 >= self.cfg.max_position_embeddings:
                delta += q.checker.finish("length")  # the context is full
            if q.checker.finished:
                q.finish_reason = q.checker.finish_reason
            self.next_ids[r] = t
            if q.on_delta is not None:  # every token, also one whose text is held back (""): logprobs stream too
                q.on_delta(q, delta)

    # ---- the batch cache -------------------------------------------------------------------------------------------
    def _merge(self, new: KVCache, new_mask: torch.Tensor, lens: list[int]) -> None:
        """Append a prefilled cache (rows with padding mask `new_mask` (k, W) and `lens` real positions) to the batch,
        left-padding whichever is shorter."""
        if self.cache is None:
            self.cache, self.mask, self.lengths = new, new_mask, list(lens)
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
        self.lengths += lens

    def _drop(self, keep: list[int]) -> None:
        """Keep only batch rows `keep`, then trim the left padding every remaining row has."""
        self.running = [self.running[r] for r in keep]
        self.next_ids = [self.next_ids[r] for r in keep]
        self.lengths = [self.lengths[r] for r in keep]
        if not keep:
            self.cache = self.mask = None
            return
        rows = torch.tensor(keep, device=self.device)
        self.cache.reorder(rows)
        self.mask = self.mask[rows]
        lead = int((~self.mask).int().cumprod(-1).sum(-1).min())  # left padding common to all rows
        if lead:
            c, S = self.cache, self.cache.seen - lead
            for i in range(len(c.k)):
                k, v = c.layer(i)
                n = min(c.length[i], S)  # a chunked layer keeps min(S, C - 1), a global one S positions
                c.put(i, k[:, :, k.shape[2] - n:], v[:, :, v.shape[2] - n:])
            c.seen, self.mask = S, self.mask[:, lead:]
