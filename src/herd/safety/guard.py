"""A Llama Guard model at work: the unsafe score, the verdict, and a LlamaFirewall-shaped scanner.

`Guard` wraps a loaded herd model and its tokenizer (`Guard.from_pretrained` loads both the way `herd serve` does:
herd.formats.hf.from_pretrained and Tokenizer.from_pretrained). Prompts go through herd.safety.guard_prompt and
herd.chat.prepare_chat, so images are tiled and laid out as in any Llama 4 chat.

Design
- The score follows the Llama Guard 3 model card: "we look at the probability for the first token, and use that as
  the 'unsafe' class probability. We can then apply score thresholding". One forward pass over the prompt and the
  generation prompt. The reply is tokenized two ways, `reply_prefix + "safe"` and `reply_prefix + "unsafe"`; if the
  two share leading tokens (Llama Guard 4's own template stops at `<|header_end|>`, so its replies begin with "\n\n",
  and small vocabularies may split both words alike) those are teacher-forced in the same pass, and the score is
  softmax over the full vocabulary, at the first position where the two differ, of the token "unsafe" has there.
  herd's generation prompt already ends with "\n\n", so the default `reply_prefix` is "".
- `classify`: unsafe iff score >= threshold. The categories then come from a short greedy continuation of
  "unsafe\n" (herd.infer.generate), parsed by parse_guard_output. If that continuation is not a list of known codes
  the verdict stays unsafe, with no categories and the text kept in `raw`: the score already decided, and a guard
  that raised on an unreadable category line would leave its caller to choose between failing open and crashing.
  A continuation naming only excluded categories makes the verdict safe (llama-stack's rule).
- `GuardScanner` answers like LlamaFirewall's scanners (ScanResult: decision ALLOW / HUMAN_IN_THE_LOOP_REQUIRED /
  BLOCK, a reason, the score). It scans the last message, which must have the scanner's role: "user" guards prompts,
  "assistant" guards responses. Scores between `review_threshold` and `threshold` ask for a human.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from herd.safety.guard_prompt import GuardOutputError, GuardVerdict, conversation, guard_messages, parse_guard_output
from herd.safety.taxonomy import DEFAULT, Category, codes
from herd.tokenizer import Tokenizer


@dataclass
class Guard:
    model: torch.nn.Module  # a herd Llama4ForCausalLM or Llama4ForConditionalGeneration (images need the latter)
    tokenizer: Tokenizer
    categories: tuple[Category, ...] = DEFAULT  # the taxonomy the prompt lists (herd.safety.taxonomy)
    with_policy: bool = False  # list each category's description too
    reply_prefix: str = ""  # what the reply starts with before "safe" / "unsafe" (see the module docstring)
    max_new_tokens: int = 10  # for the category line after "unsafe\n"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **kw) -> Guard:
        """A Llama Guard checkpoint directory (Hugging Face layout, as `herd serve` loads it)."""
        from herd.formats.hf import from_pretrained

        tok = Tokenizer.from_pretrained(path)  # first: a bad tokenizer fails before the weights load
        return cls(from_pretrained(path, dtype=dtype, device=device).eval(), tok, **kw)

    def prompt(self, messages: Sequence[dict], exclude: Iterable[str] = ()) -> tuple[list[int], torch.Tensor | None]:
        """Token ids of the guard conversation with the generation prompt, and the images' pixel values (or None)."""
        from herd.chat import prepare_chat, tiling

        convo = guard_messages(messages, self.categories, exclude, self.with_policy)
        v = self.model.vision_config
        if v is None and any(p.get("type") != "text" for p in convo[0]["content"]):
            raise ValueError("this guard model is text-only: classify the text alone, or load a multimodal guard")
        ids, batch = prepare_chat(convo, self.tokenizer, **tiling(v))
        limit = self.model.text_config.max_position_embeddings
        if len(ids) + 8 > limit:  # + the few reply tokens the score and the category line read
            raise ValueError(f"the guard prompt for this conversation is {len(ids)} tokens, more than this guard "
                             f"model's {limit}-token context holds: send a shorter conversation (the guard prompt "
                             "itself adds the task text and the category list)")
        return ids, batch.pixel_values if batch is not None else None

    @torch.no_grad()
    def unsafe_score(self, messages: Sequence[dict], exclude: Iterable[str] = ()) -> float:
        """P(unsafe): the probability of the token that starts "unsafe" where the answer decides (one forward)."""
        ids, pixels = self.prompt(messages, exclude)
        return answer_score(self.model, self.tokenizer, ids, self.reply_prefix + "unsafe", self.reply_prefix + "safe",
                            pixels)

    @torch.no_grad()
    def classify(self, messages: Sequence[dict], threshold: float = 0.5, exclude: Iterable[str] = ()) -> GuardVerdict:
        """The verdict: unsafe iff unsafe_score >= threshold, with the categories the model then names."""
        from herd.infer.generate import generate

        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        exclude = tuple(exclude)
        score = self.unsafe_score(messages, exclude)
        if score < threshold:
            return GuardVerdict(True, (), score)
        ids, pixels = self.prompt(messages, exclude)
        ids += self.tokenizer.encode(self.reply_prefix + "unsafe\n")
        tok = self.tokenizer
        out = generate(self.model, torch.tensor([ids]), self.max_new_tokens, eos_token_id=tok.stop_ids,
                       pixel_values=pixels, vocab_limit=tok.vocab_size)
        new = [t for t in out[0, len(ids):].tolist() if t not in tok.stop_ids]
        line = tok.decode(new, skip_special=True).split("\n")[0]
        try:
            v = parse_guard_output("unsafe\n" + line, exclude, known=codes(self.categories))
        except GuardOutputError:
            return GuardVerdict(False, (), score, raw=line)
        return GuardVerdict(v.safe, v.categories, score, raw=line)


@torch.no_grad()
def answer_score(model: torch.nn.Module, tokenizer: Tokenizer, ids: list[int], positive: str, negative: str,
                 pixel_values: torch.Tensor | None = None) -> float:
    """P(the reply to the prompt `ids` is `positive` rather than `negative`): the softmax over the whole vocabulary,
    at the first token where the two replies' tokens differ, of `positive`'s token there; their shared leading
    tokens are teacher-forced after the prompt in the same forward pass."""
    pos, neg = tokenizer.encode(positive), tokenizer.encode(negative)
    k = 0
    while k < min(len(pos), len(neg)) and pos[k] == neg[k]:
        k += 1
    if k == len(pos) or k == len(neg):
        raise ValueError(f"this tokenizer writes {positive!r} and {negative!r} so that one is a prefix of the other: "
                         "no single token tells them apart")
    device = next(model.parameters()).device
    x = torch.tensor([ids + pos[:k]], device=device)  # (1, T)
    extra = {"pixel_values": pixel_values.to(device)} if pixel_values is not None else {}
    logits = model(x, logits_to_keep=1, **extra)[0, -1].float()  # (V,)
    return float(torch.softmax(logits, dim=-1)[pos[k]])


class Decision(StrEnum):
    """LlamaFirewall's ScanDecision."""
    ALLOW = "allow"
    HUMAN_IN_THE_LOOP_REQUIRED = "human_in_the_loop_required"
    BLOCK = "block"


@dataclass(frozen=True)
class ScanResult:
    decision: Decision
    reason: str
    score: float
    categories: tuple[str, ...] = ()


@dataclass
class GuardScanner:
    guard: Guard
    role: str = "user"  # "user": scans prompts; "assistant": scans responses
    threshold: float = 0.5  # BLOCK at or above this unsafe score
    exclude: tuple[str, ...] = field(default_factory=tuple)  # category codes this deployment allows
    review_threshold: float | None = None  # HUMAN_IN_THE_LOOP_REQUIRED from here up to `threshold`

    def __post_init__(self):
        if self.role not in ("user", "assistant"):
            raise ValueError(f"role must be 'user' (scan prompts) or 'assistant' (scan responses), got {self.role!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.review_threshold is not None and not 0.0 <= self.review_threshold <= self.threshold:
            raise ValueError(f"review_threshold must be in [0, threshold={self.threshold}], "
                             f"got {self.review_threshold}")
        self.exclude = tuple(self.exclude)

    def scan(self, messages: Sequence[dict]) -> ScanResult:
        """Judge the last message of `messages` (which must be a `role` message) in its conversation."""
        last = conversation(messages)[-1]["role"]
        if last != self.role:
            raise ValueError(f"this scanner checks {self.role} messages, but the conversation ends with a {last} "
                             f"message: use GuardScanner(role={last!r}) for it")
        v = self.guard.classify(messages, self.threshold, self.exclude)
        names = {c.code: c.name for c in self.guard.categories}
        if not v.safe:
            what = ", ".join(f"{c} ({names[c]})" for c in v.categories) or f"no readable categories ({v.raw!r})"
            return ScanResult(Decision.BLOCK, f"unsafe {self.role} message: {what}", v.score, v.categories)
        if self.review_threshold is not None and v.score >= self.review_threshold:
            return ScanResult(Decision.HUMAN_IN_THE_LOOP_REQUIRED,
                              f"unsafe score {v.score:.3f} is between review_threshold {self.review_threshold} and "
                              f"threshold {self.threshold}", v.score)
        return ScanResult(Decision.ALLOW, "safe", v.score)
