"""`herd chat`: a conversation in the terminal, streamed token by token, with images and /commands.

    herd chat --model runs/demo/hf [--system "..."] [--temperature 0.7] [--max-new-tokens 256]

Type a message and press Enter. Commands:
  /image PATH     attach an image (a path or a data: URL) to your next message; repeat for several
  /system TEXT    set the system prompt (starts a new conversation); `/system` alone clears it
  /set KEY=VALUE  temperature, top_p, top_k, max_new_tokens, seed (e.g. `/set temperature=0.7 top_p=0.9`)
  /reset          forget the conversation          /show   the conversation and the settings
  /help           this text                        /quit   leave (also Ctrl-D)

The whole conversation is sent each turn in the Llama 4 chat format (herd.chat), with its images; the answer streams
as it is generated and stops at the end-of-turn token. Errors (an unreadable image, a conversation longer than the
model's context, a bad setting) are reported and the conversation stays as it was. This loop generates one request
at a time with herd.generate; the batching engine serves many (issue tracker: inference engine).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

import torch

HELP = __doc__.split("Type a message", 1)[1].split("\n\nThe whole", 1)[0]
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int, "seed": int}


@dataclass
class Session:
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    pending_images: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=lambda: {"temperature": 0.0, "top_p": None, "top_k": None,
                                                    "max_new_tokens": 256, "seed": 0})

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages


def _set(session: Session, items: list[str]) -> str:
    new = dict(session.settings)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SETTINGS:
            raise ValueError(f"use /set KEY=VALUE with KEY one of {', '.join(SETTINGS)}; got {item!r}")
        try:
            new[key] = None if value.lower() == "none" else SETTINGS[key](value)
        except ValueError:
            raise ValueError(f"{key} must be a {SETTINGS[key].__name__}, got {value!r}") from None
    if new["temperature"] < 0 or (new["top_p"] is not None and not 0 < new["top_p"] <= 1) or \
            new["max_new_tokens"] < 1 or (new["top_k"] is not None and new["top_k"] < 1):
        raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 1 and max_new_tokens >= 1")
    session.settings = new
    return " ".join(f"{k}={v}" for k, v in new.items())


def command(session: Session, line: str) -> str | None:
    """Apply a /command; returns what to print, or None for /quit."""
    name, _, rest = line[1:].partition(" ")
    if name in ("quit", "exit"):
        return None
    if name == "help":
        return HELP.strip("\n")
    if name == "reset":
        session.messages.clear()
        session.pending_images.clear()
        return "(new conversation)"
    if name == "system":
        session.system = rest.strip() or None
        session.messages.clear()
        return f"(system prompt {'set' if session.system else 'cleared'}; new conversation)"
    if name == "image":
        paths = shlex.split(rest)
        if not paths:
            raise ValueError("use /image PATH")
        from herd.image import load_image

        for p in paths:
            load_image(p)  # a missing or broken image is refused now, not when the message is sent
        session.pending_images += paths
        return f"({len(session.pending_images)} image(s) attached to your next message)"
    if name == "set":
        return f"({_set(session, rest.split())})"
    if name == "show":
        turns = [f"{m['role']}: {m['content'] if isinstance(m['content'], str) else _text(m['content'])}"
                 for m in session.conversation()]
        return "\n".join(turns + [f"settings: {session.settings}"])
    raise ValueError(f"unknown command /{name}; /help lists them")


def _text(parts: list[dict]) -> str:
    return " ".join(p["text"] if p["type"] == "text" else "[image]" for p in parts)


def reply(model, tok, session: Session, text: str, out=sys.stdout) -> str:
    """Send one user message (with any pending images), stream the answer to `out`, keep both in the session."""
    from herd.chat import prepare_chat, tiling
    from herd.infer.generate import generate

    content = [{"type": "image_url", "image_url": {"url": p}} for p in session.pending_images]
    user = {"role": "user", "content": content + [{"type": "text", "text": text}] if content else text}
    v = getattr(model.config, "vision_config", None)
    if content and v is None:
        raise ValueError("this is a text-only model: it cannot take images (/reset to drop them)")
    kw = tiling(v)
    ids, batch = prepare_chat(session.conversation() + [user], tok, **kw)  # raises on a bad image: nothing kept
    s = session.settings
    limit = getattr(model.config, "text_config", model.config).max_position_embeddings
    if len(ids) + s["max_new_tokens"] > limit:
        raise ValueError(f"the conversation is {len(ids)} tokens; with max_new_tokens={s['max_new_tokens']} it "
                         f"exceeds the model's {limit}: /reset, or /set max_new_tokens=...")
    stream, pieces = tok.stream(skip_special=True), []

    def show(step: torch.Tensor) -> None:
        t = int(step[0])
        if t not in tok.stop_ids:
            pieces.append(stream.put(t))
            print(pieces[-1], end="", file=out, flush=True)

    generate(model, torch.tensor([ids]), s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"],
             top_k=s["top_k"], eos_token_id=tok.stop_ids, generator=torch.Generator().manual_seed(s["seed"]),
             pixel_values=batch.pixel_values if batch is not None else None, on_token=show)
    pieces.append(stream.flush())
    print(pieces[-1], file=out, flush=True)
    answer = "".join(pieces)
    session.messages += [user, {"role": "assistant", "content": answer}]
    session.pending_images.clear()
    return answer


def run(model, tok, session: Session, lines=None, out=sys.stdout) -> int:
    """The read-reply loop over `lines` (default: stdin, with a prompt when it is a terminal)."""
    from herd.image import ImageError

    interactive = lines is None and sys.stdin.isatty()
    print("herd chat: type a message, /help for commands, /quit to leave", file=out, flush=True)
    source = iter(lines) if lines is not None else None
    while True:
        try:
            line = (input("> ") if interactive else next(source) if source else sys.stdin.readline())
        except (EOFError, StopIteration, KeyboardInterrupt):
            break
        if source is None and not interactive and line == "":
            break  # end of piped input
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                said = command(session, line)
                if said is None:
                    break
                print(said, file=out, flush=True)
            else:
                print("assistant: ", end="", file=out, flush=True)
                reply(model, tok, session, line, out)
        except (ValueError, ImageError) as e:
            print(f"\nerror: {e}", file=out, flush=True)
    return 0
