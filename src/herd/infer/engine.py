"""The inference engine: token ids in, token ids (and text) out, many requests at once. Knows nothing of HTTP.

Continuous batching: requests join and leave one running batch between decode steps. The engine owns the requests -
admission, prefill, sampling, stops, logprobs, streaming and cancellation, written once - and holds a batch layout
that owns where the running rows' keys live and runs the decode step as one model call:
herd.infer.padded_batch.PaddedBatch (default: one left-padded cache, any shape, eager) or
herd.infer.slot_batch.SlotBatch (a fixed-shape row per request: torch.compile and CUDA graphs).
- Requests waiting when a step begins are prefilled together, as one left-padded batch (up to `prefill_tokens`
  padded positions; vLLM and transformers' `generate` also prefill many prompts in one pass, which keeps the matrix
  multiplies large), in pieces of `prefill_chunk` positions (a long prompt never needs one huge attention), into a
  cache of their own. A prompt with images is prefilled alone and in one piece (an image's tokens must arrive
  together); its images are encoded once. Each request's first token is sampled from that pass, and the layout
  takes its rows (`admit`).
- While rows are running, waiting requests are admitted once `admit_fraction` of `max_batch` rows (default a
  quarter) are free, or as soon as all of them fit: a prefill pass reads every weight like a decode step does, so a
  few larger passes beat one per finished row (measured in the README's engine benchmark). An idle engine admits
  at once.
- Prefill gives every row its real positions (`position_ids`, `temperature_positions`) so a left-padded row computes
  what it computes alone; only float summation order may differ from a batch of one, so greedy outputs are the same
  (tests/infer/test_engine.py).
- Every decode step feeds each running row its last token, samples all rows at once (herd.infer.sampling: per-row
  settings, per-request seeded generators), and runs each row's StopChecker (stop ids, stop strings, max tokens).
  Finished or cancelled rows leave the batch at once (`keep`). Ids the tokenizer lacks (a padded model vocabulary)
  and a multimodal model's image placeholder are never sampled: a generated `<|patch|>` would have no image feature
  behind it.
- A request whose input fails in the model while it is admitted (its group is then retried one by one), or whose
  row fails in sampling (the batch's draw is then retried row by row), its stop checker or its callback, ends alone
  with finish_reason "error" and its message in `req.error`; the batch goes on. A failure that no row can be blamed
  for (the model's decode step) leaves the batch's state unknown: `step` raises, and `fail_all` ends everything (a
  server calls it when a step itself raised).

Use:
    engine = Engine(model, tokenizer)    # or Engine(model, tokenizer, layout=SlotBatch(model, 8, compile=True))
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

from herd.infer.padded_batch import PaddedBatch
from herd.infer.sampling import SampleOutput, SamplingParams, make_generator, never_sampled, sample
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


class Engine:
    def __init__(self, model, tokenizer, max_batch: int | None = None, prefill_chunk: int = 512,
                 prefill_tokens: int = 4096, admit_fraction: float = 0.25, layout=None):
        """`layout`: where running rows live (module docstring); by default a PaddedBatch of `max_batch` rows (32).
        A given layout brings its own max_batch."""
        self.model, self.tok = model.eval(), tokenizer
        self.cfg = model.text_config
        if layout is not None and max_batch not in (None, layout.max_batch):
            raise ValueError(f"max_batch {max_batch} contradicts the layout's {layout.max_batch}")
        self.layout = layout if layout is not None else PaddedBatch(model, max_batch or 32)
        self.max_batch, self.prefill_chunk, self.prefill_tokens = self.layout.max_batch, prefill_chunk, prefill_tokens
        if not 0 <= admit_fraction <= 1:
            raise ValueError(f"admit_fraction must be in [0, 1], got {admit_fraction}")
        self.admit_fraction = admit_fraction
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # the layout's row r is running[r]
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
        if pixel_values is not None and self.model.vision_config is None:
            raise ValueError("this is a text-only model: it cannot take images")
        bad = next((t for t in prompt if not 0 <= t < self.cfg.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (size {self.cfg.vocab_size})")
        if params.logit_bias and params.logit_bias[-1][0] >= self.cfg.vocab_size:  # pairs are sorted by id
            raise ValueError(f"logit_bias names token id {params.logit_bias[-1][0]}, outside the vocabulary "
                             f"(size {self.cfg.vocab_size})")
        image_id = self.model.image_token_index
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
        self.running, self.next_ids, self.lengths = [], [], []
        self.layout.reset()
        for req in reqs:
            self._fail(req, message)

    def _fail(self, req: Request, message: str) -> None:
        if not req.finished:
            req.finish_reason, req.error = "error", message
            if req.on_delta is not None:
                try:
                    req.on_delta(req, "")
                except Exception:  # its consumer failed too (maybe why it failed): it has ended either way
                    pass

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def warmup(self, progress=None) -> None:
        """Prepare the layout's decode step for every batch size before the first request (SlotBatch compiles or
        captures it; `progress(i, n, b)` before each size). Only on an idle engine."""
        if self.running:
            raise RuntimeError("warmup() needs an idle engine: its steps would overwrite running rows")
        self.layout.warmup(progress)

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
        self.layout.admit(cache, mask, lens)
        self.lengths += lens
        first = len(self.running)
        self.running += reqs
        self.next_ids += [-1] * len(reqs)
        self._sample(logits[:, -1], list(range(first, first + len(reqs))))

    def _decode(self) -> None:
        logits = self.layout.decode(self.next_ids, self.lengths)  # (R, V)
        self.lengths = [n + 1 for n in self.lengths]
        self._sample(logits, list(range(len(self.running))))

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

    def _draw(self, logits: torch.Tensor, reqs: list[Request]) -> list[tuple[SampleOutput, int] | None]:
        """Each row's (sample output, its row there): one batched draw; if that raises, each row alone, so that a
        row whose own settings fail (a processor that overflows, a bias the vocabulary lacks) ends alone with
        "error" (None here) and the others go on. (A seeded row then draws again, from its own generator.)"""
        try:
            out = sample(logits, [q.params for q in reqs], [q.generator for q in reqs],
                         [q.prompt_ids for q in reqs], [q.output_ids for q in reqs])
            return [(out, i) for i in range(len(reqs))]
        except Exception:
            picks: list[tuple[SampleOutput, int] | None] = []
        for i, q in enumerate(reqs):
            try:
                picks.append((sample(logits[i:i + 1], [q.params], [q.generator], [q.prompt_ids], [q.output_ids]), 0))
            except Exception as e:
                self._fail(q, f"sampling failed: {type(e).__name__}: {e}")
                picks.append(None)
        return picks

    def _deliver(self, rows: list[int], reqs: list[Request], logits: torch.Tensor) -> None:
        """Give each row its token: what fails for one row here (sampling, its stop checker, its callback) ends that
        row's request alone."""
        for r, q, pick in zip(rows, reqs, self._draw(logits, reqs), strict=True):
            if q.finished or pick is None:  # cancelled from an earlier row's callback in this loop, or failed
                continue
            try:
                self._take(r, q, *pick)
            except Exception as e:
                self._fail(q, f"{type(e).__name__}: {e}")

    def _take(self, r: int, q: Request, out: SampleOutput, i: int) -> None:
        """Row r's next token, row i of `out`: its logprobs, stops and streamed text."""
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

    def _drop(self, keep: list[int]) -> None:
        """Keep only running rows `keep` (the layout frees the others' rows)."""
        self.running = [self.running[r] for r in keep]
        self.next_ids = [self.next_ids[r] for r in keep]
        self.lengths = [self.lengths[r] for r in keep]
        self.layout.keep(keep)
