"""`herd chat`: a conversation in the terminal, streamed token by token, with images and /commands.

    herd chat --model runs/demo/dpo/hf [--system "..."] [--temperature 0.7] [--max-new-tokens 256]

Type a message and press Enter. Commands:
  /image PATH     attach an image (a path or a data: URL) to your next message; repeat for several
  /system TEXT    set the system prompt (starts a new conversation); `/system` alone clears it
  /set KEY=VALUE  temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, seed
                  (e.g. `/set temperature=0.7 top_p=0.9`; `none` turns a filter off)
  /reset          forget the conversation          /show   the conversation and the settings
  /help           this text                        /quit   leave (also Ctrl-D)

The whole conversation is sent each turn in the Llama 4 chat format (herd.chat), with its images; the answer streams
as it is generated and stops at the end-of-turn token; Ctrl-C while it streams stops the answer and keeps what came
so far. Errors (an unreadable image, a conversation longer than the model's context, a bad setting) are reported and
the conversation stays as it was. Answers come from herd's inference engine (herd.infer.engine, the same one
`herd serve` runs), so sampling, stop tokens and seeds behave exactly as they do through the API.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

HELP = __doc__.split("Type a message", 1)[1].split("\n\nThe whole", 1)[0]
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
            "max_new_tokens": int, "seed": int}


@dataclass
class Session:
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    pending_images: list[str] = field(default_factory=list)
    chat_template: str | None = None  # a Jinja chat template (herd.formats.chat_template); None: herd's own format
    settings: dict = field(default_factory=lambda: {"temperature": 0.0, "top_p": None, "top_k": None, "min_p": None,
                                                    "repetition_penalty": None, "max_new_tokens": 256, "seed": 0})

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
    _params(new)  # SamplingParams checks every value and names the bad one
    session.settings = new
    return " ".join(f"{k}={v}" for k, v in new.items())


def _params(settings: dict):
    """The engine's SamplingParams for these settings (None = the parameter's neutral value)."""
    from herd.infer.sampling import SamplingParams

    neutral = {"top_p": 1.0, "top_k": None, "min_p": 0.0, "repetition_penalty": 1.0, "seed": None}
    return SamplingParams(**{k: neutral[k] if v is None and k in neutral else v for k, v in settings.items()})


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


def reply(model, tok, session: Session, text: str, out=None) -> str:
    """Send one user message (with any pending images), stream the answer to `out` (default: sys.stdout as it is
    now, not as it was at import), keep both in the session."""
    out = out or sys.stdout
    from herd.chat import prepare_chat, tiling
    from herd.infer.engine import Engine

    content = [{"type": "image_url", "image_url": {"url": p}} for p in session.pending_images]
    user = {"role": "user", "content": content + [{"type": "text", "text": text}] if content else text}
    v = model.vision_config
    if content and v is None:
        raise ValueError("this is a text-only model: it cannot take images (/reset to drop them)")
    ids, batch = prepare_chat(session.conversation() + [user], tok, template=session.chat_template,
                              **tiling(v))  # a bad image raises: nothing kept
    params = _params(session.settings)
    limit = model.text_config.max_position_embeddings
    if len(ids) + params.max_new_tokens > limit:
        raise ValueError(f"the conversation is {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} it "
                         f"exceeds the model's {limit}: /reset, or /set max_new_tokens=...")
    engine, shown = Engine(model, tok, max_batch=1), []

    def show(_, delta: str) -> None:
        print(delta, end="", file=out, flush=True)
        shown.append(delta)

    req = engine.submit(ids, params, batch.pixel_values if batch is not None else None, on_delta=show)
    try:
        engine.run()
    except KeyboardInterrupt:  # stop this answer and keep what was generated, all of it shown
        engine.cancel(req)
        print(req.text[len("".join(shown)):] + " (stopped)", end="", file=out)
    print(file=out, flush=True)
    session.messages += [user, {"role": "assistant", "content": req.text}]
    session.pending_images.clear()
    return req.text


def run(model, tok, session: Session, lines=None, out=None) -> int:
    """The read-reply loop over `lines` (default: stdin, with a prompt when it is a terminal) to `out` (default:
    sys.stdout at call time)."""
    out = out or sys.stdout
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
