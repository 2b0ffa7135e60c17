"""Guarded serving: a Llama Guard model (herd.safety) scans what a request sends and what the model answers, and
backs OpenAI's /v1/moderations. `herd serve --guard DIR` turns it on; herd.serve.completion calls it.

Design
- Scanners answer like LlamaFirewall's (herd.safety.ScanResult: ALLOW / HUMAN_IN_THE_LOOP_REQUIRED / BLOCK, a
  reason, a score, categories). The input side is a list of scanners, run in order until one blocks: the Llama Guard
  scanner (role "user") today, a Prompt Guard-style jailbreak classifier later as one more entry. The output side is
  the Llama Guard scanner with role "assistant", judging the answer in its conversation. Only BLOCK blocks: a server
  has no human in the loop to ask.
- A blocked request is still an ordinary OpenAI answer (HTTP 200): each blocked choice's content is the refusal text
  and its finish_reason is "content_filter", the value OpenAI's API uses when its filters withhold content. A prompt
  blocked on input is never generated from (0 completion tokens); an answer blocked on output was generated, and its
  tokens count in usage.
- Streams are scanned in windows: a choice's text is held back until the text so far (every `window` new tokens, and
  at the end) has passed a scan, so no unscanned token reaches the client, not even as a logprob. When a window is
  blocked the choice's generation is cancelled and its stream ends with an empty delta and finish_reason
  "content_filter" (as Azure OpenAI ends a filtered stream): the text already released stays released.
- The guard is one model: every forward runs on one thread of its own ("herd-guard"), so scans of concurrent
  requests queue behind each other, never run at once, and never block the event loop. A scan that fails answers
  its own request with an error (400 when the guard cannot read the conversation, e.g. a tool message; 500 when the
  model fails); the others go on.
- /v1/moderations classifies each input as a user message. Llama Guard gives one P(unsafe) for the whole text, not a
  score per category, so that score is reported under every flagged category (and 0 under the others); the
  categories come from the guard's second output line. Keys: OpenAI's category names, those that a Llama Guard
  category maps onto (MODERATION below), and the Llama Guard codes the prompt lists, so nothing is lost in mapping.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from herd.safety import Decision, Guard, GuardScanner, ScanResult
from herd.safety.taxonomy import LG4, codes
from herd.serve.service import APIError

if TYPE_CHECKING:
    from herd.serve.schemas import ModerationRequest
    from herd.serve.serve_config import ServeConfig

log = logging.getLogger("herd.serve")

# OpenAI's moderation categories (platform.openai.com/docs/guides/moderation), all sent, as its clients expect
OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                     "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors",
                     "violence", "violence/graphic")
# The Llama Guard categories with a natural OpenAI counterpart (Llama Guard 3/4 model cards vs OpenAI's guide);
# S3, S5-S8, S13 and S14 have none and show under their codes only
MODERATION = {"S1": "violence", "S2": "illicit", "S4": "sexual/minors", "S9": "illicit/violent", "S10": "hate",
              "S11": "self-harm", "S12": "sexual"}


class Scanner(Protocol):
    """What a scanner is to the server: herd.safety.GuardScanner, or a later Prompt Guard scanner."""

    def scan(self, messages: Sequence[dict]) -> ScanResult: ...


@dataclass
class Guarding:
    """The scanners of a guarded server, the thread they run on, and their counters for /metrics."""

    guard: Guard | None  # the Llama Guard model (for /v1/moderations; None: a Prompt Guard alone)
    name: str  # its model id in /v1/moderations
    inputs: list[Scanner]  # run on every prompt until one blocks
    output: GuardScanner | None  # judges every answer (None: --no-guard-output, or no Llama Guard)
    moderator: GuardScanner | None  # role "user": /v1/moderations
    refusal: str = "I can't help with that."
    window: int = 16  # streamed tokens per output scan
    scans: Counter = field(default_factory=Counter)  # direction -> scans
    blocks: Counter = field(default_factory=Counter)  # (direction, category) -> blocks
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="herd-guard"))

    async def scan(self, direction: str, messages: list[dict]) -> ScanResult | None:
        """The first BLOCK among this direction's scanners ("input" or "output"), or None when all allow."""
        scanners = self.inputs if direction == "input" else [s for s in (self.output,) if s is not None]
        loop = asyncio.get_running_loop()
        for s in scanners:
            try:
                r = await loop.run_in_executor(self.pool, s.scan, messages)
            except ValueError as e:  # a conversation the guard prompt cannot hold (herd.safety.guard_prompt)
                if direction == "input":
                    raise APIError(400, f"this server guards its model with Llama Guard, which cannot judge this "
                                        f"conversation: {e}", "messages", "guard_unsupported") from None
                raise self._failed(e) from None
            except Exception as e:
                raise self._failed(e) from None
            self.count(direction, r)
            if r.decision == Decision.BLOCK:
                return r
        return None

    @staticmethod
    def _failed(e: Exception) -> APIError:
        log.exception("the guard failed on a request")
        return APIError(500, f"the guard failed on this request ({type(e).__name__}: {e}); nothing was returned "
                             "unscanned", code="guard_error", kind="server_error")

    def count(self, direction: str, r: ScanResult) -> None:
        self.scans[direction] += 1
        if r.decision == Decision.BLOCK:
            for c in r.categories or ("none",):  # a block naming several categories counts under each
                self.blocks[direction, c] += 1

    async def prompts(self, convos: list[list[dict]]) -> list[ScanResult | None]:
        """Each prompt's input scan (`conversations` gives them)."""
        return [await self.scan("input", c) for c in convos]

    def metrics_lines(self) -> list[str]:
        lines = ["# TYPE herd_guard_scans_total counter"]
        lines += [f'herd_guard_scans_total{{direction="{d}"}} {self.scans[d]}' for d in ("input", "output")]
        lines += [f'herd_guard_scans_total{{direction="moderation"}} {self.scans["moderation"]}',
                  "# TYPE herd_guard_blocks_total counter"]
        lines += [f'herd_guard_blocks_total{{direction="{d}",category="{c}"}} {v}'
                  for (d, c), v in sorted(self.blocks.items())]
        return lines

    # ---- /v1/moderations -------------------------------------------------------------------------------------------
    async def moderate(self, req: ModerationRequest) -> dict:
        if self.moderator is None:
            raise APIError(404, "this server has a Prompt Guard but no Llama Guard, so /v1/moderations is off: start "
                                "herd serve with --guard DIR too", code="guard_disabled")
        if req.model not in (None, self.name):
            raise APIError(404, f"the moderation model {req.model!r} does not exist; this server's guard is "
                                f"{self.name!r} (or leave model out)", "model", "model_not_found")
        loop = asyncio.get_running_loop()
        listed = [c for c in codes(self.guard.categories) if c not in self.moderator.exclude]
        results = []
        for text in [req.input] if isinstance(req.input, str) else req.input:
            try:
                r = await loop.run_in_executor(self.pool, self.moderator.scan, [{"role": "user", "content": text}])
            except Exception as e:
                raise self._failed(e) from None
            self.count("moderation", r)
            results.append(_moderation(r, listed))
        return {"id": f"modr-{uuid.uuid4().hex[:24]}", "model": self.name, "results": results}


def _moderation(r: ScanResult, listed: list[str]) -> dict:
    flagged = r.decision == Decision.BLOCK
    hit = set(r.categories) if flagged else set()
    names = {MODERATION[c] for c in hit if c in MODERATION}
    cats = {**{k: k in names for k in OPENAI_CATEGORIES}, **{c: c in hit for c in listed}}
    return {"flagged": flagged, "categories": cats,
            "category_scores": {k: r.score if v else 0.0 for k, v in cats.items()},
            "category_applied_input_types": {k: ["text"] if v else [] for k, v in cats.items()}}


def conversations(body, chat: bool, tokenizer) -> list[list[dict]]:
    """The conversation of each prompt of a request, as the guard reads it: a chat's messages as the client sent
    them, or each completions prompt (text, or token ids decoded) as one user turn."""
    if chat:
        return [[m.model_dump(exclude_unset=True) for m in body.messages]]
    return [[{"role": "user", "content": p if isinstance(p, str) else tokenizer.decode(p)}] for p in body.prompts]


def load_guarding(cfg: ServeConfig, device: str, dtype) -> Guarding:
    """The scanners cfg asks for, on the served model's device: the Prompt Guard (cfg.prompt_guard) first on the input
    side (one short forward per 512-token window), then the Llama Guard (cfg.guard) listing cfg.guard_categories in
    its prompt (the other Llama Guard 4 codes excluded, never renumbered) on input and output."""
    inputs: list[Scanner] = []
    if cfg.prompt_guard:
        from herd.safety.prompt_guard import PromptGuard, PromptGuardScanner

        t0 = time.perf_counter()
        inputs.append(PromptGuardScanner(PromptGuard.from_pretrained(cfg.prompt_guard, dtype=dtype, device=device),
                                         cfg.prompt_guard_threshold))
        print(f"prompt guard {cfg.prompt_guard} loaded in {time.perf_counter() - t0:.1f}s: threshold "
              f"{cfg.prompt_guard_threshold}, scanning input", flush=True)
    guard = user = output = None
    if cfg.guard:
        t0 = time.perf_counter()
        guard = Guard.from_pretrained(cfg.guard, dtype=dtype, device=device, categories=LG4)
        exclude = tuple(c for c in codes(LG4) if c not in cfg.guard_codes)
        user = GuardScanner(guard, "user", cfg.guard_threshold, exclude)
        output = GuardScanner(guard, "assistant", cfg.guard_threshold, exclude) if cfg.guard_output else None
        inputs.append(user)
        print(f"guard {cfg.guard} loaded in {time.perf_counter() - t0:.1f}s: categories "
              f"{', '.join(cfg.guard_codes)}, threshold {cfg.guard_threshold}, scanning input"
              f"{' and output' if output else ' only'}", flush=True)
    name = Path(cfg.guard or cfg.prompt_guard).resolve().name
    return Guarding(guard, name, inputs, output, user, cfg.guard_refusal, cfg.guard_window)


class StreamGate:
    """One streamed choice's output scans: its text is held until the text so far passed a scan (module docstring)."""

    def __init__(self, guarding: Guarding, convo: list[dict]):
        self.guarding, self.convo = guarding, convo
        self.released, self.held = "", ""
        self.tokens = 0  # tokens whose text is held
        self.passed = 0  # tokens released: their logprobs may go out

    async def feed(self, delta: str, finished: bool) -> str | ScanResult | None:
        """The text to release now, a ScanResult when the text so far is blocked, or None while it is held."""
        self.held += delta
        self.tokens += 1
        if not finished and self.tokens < self.guarding.window:
            return None
        if self.held or (finished and not self.released):
            turn = {"role": "assistant", "content": self.released + self.held}
            if (r := await self.guarding.scan("output", [*self.convo, turn])) is not None:
                return r
        out, self.held = self.held, ""
        self.released += out
        self.passed, self.tokens = self.passed + self.tokens, 0
        return out
