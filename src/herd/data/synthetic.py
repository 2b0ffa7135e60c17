"""Synthetic training and evaluation data, generated on the fly from a seed: shape scenes for image-text training and
retrieval documents for long-context mid-training.

Shape scenes (`make_scene`, `scene_chat`)
- A canvas (PIL) with 1..max_shapes coloured shapes (circle, square, triangle, diamond, star in six colours) that
  never overlap, so counts, colours and positions are unambiguous; each (colour, shape) pair occurs at most once, so
  "the red circle" names exactly one object. Everything is derived from the drawn objects, so every answer is right
  by construction: a caption (objects left to right), question/answer pairs (count, colour, shape, relative
  position) and grounding targets.
- Grounding format: `<box>x0,y0,x1,y1</box>`, the object's pixel box [x0, x1) x [y0, y1) scaled to a 0-1000 grid
  (x / width * 1000, y / height * 1000, rounded to integers; origin top left, y down), the normalized-integer
  convention of Qwen-VL / Kosmos-2-style grounding, independent of the image size.
- Deterministic per (seed, index): a `random.Random` seeded with the string "herd-scene:{seed}:{index}" (string
  seeds hash with SHA-512, stable across Python versions and platforms), and PIL drawing without antialiasing.
- `scene_chat` returns the image and OpenAI-style messages whose image part is `{"type": "image_url", "image_url":
  {"url": <the PIL image>}}`: herd.chat.prepare_chat / herd.image.load_image take a PIL image wherever they take a
  URL, so nothing is encoded; `image_format="data_url"` gives a PNG data URL instead (for JSON or other tools).

Long-context retrieval (`passkey_document`, `kv_document`), as in the needle-in-a-haystack family (RULER,
arXiv 2404.06654; the retrieval tests of Meta's "The Llama 4 herd" blog post)
- Passkey: the filler of Mohtashami & Jaggi, "Landmark Attention" (arXiv 2305.16300) - or built-in corpus prose
  (filler="corpus") - with "The pass key is N. Remember it. N is the pass key." at a chosen depth.
- Key-value: a JSON object of random UUID keys and values, as in Liu et al., "Lost in the Middle" (arXiv 2307.03172);
  the question names one key, placed at the chosen depth.
- Length in characters, or in tokens with a tokenizer (the largest document that fits `n_tokens`, found by
  bisection over whole sentences / pairs). Each returns (text, question, answer); the answer occurs in the text.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 195, 20),
          "purple": (140, 60, 180), "orange": (245, 130, 30)}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
BACKGROUND = (255, 255, 255)
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # pixel box (x0, y0, x1, y1), x1 and y1 exclusive

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass
class Scene:
    image: Image.Image
    shapes: list[Shape]
    caption: str
    qa: list[tuple[str, str]] = field(default_factory=list)  # (question, answer)
    grounding: list[tuple[str, str]] = field(default_factory=list)  # (question, "<box>x0,y0,x1,y1</box>")


def box_text(box: tuple[int, int, int, int], width: int, height: int) -> str:
    """A pixel box as `<box>x0,y0,x1,y1</box>` on the 0-1000 grid (see the module docstring)."""
    x0, y0, x1, y1 = box
    coords = (round(x0 * 1000 / width), round(y0 * 1000 / height), round(x1 * 1000 / width), round(y1 * 1000 / height))
    return "<box>" + ",".join(map(str, coords)) + "</box>"


def parse_box(text: str) -> tuple[int, int, int, int]:
    """The four grid coordinates of the first `<box>x0,y0,x1,y1</box>` in text; ValueError if there is none."""
    start = text.find("<box>")
    end = text.find("</box>", start)
    if start < 0 or end < 0:
        raise ValueError(f"no <box>...</box> in {text[:80]!r}")
    parts = text[start + 5:end].split(",")
    if len(parts) != 4:
        raise ValueError(f"a box has 4 coordinates, got {text[start:end + 6]!r}")
    x0, y0, x1, y1 = (int(p) for p in parts)
    return x0, y0, x1, y1


def _draw(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    x0, y0, x1, y1 = s.box
    fill, (cx, cy) = COLORS[s.color], s.center
    w, h = x1 - x0 - 1, y1 - y0 - 1  # PIL's boxes include the far edge; ours exclude it
    if s.kind == "circle":
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=fill)
    elif s.kind == "square":
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=fill)
    elif s.kind == "triangle":
        draw.polygon([(cx, y0), (x0 + w, y0 + h), (x0, y0 + h)], fill=fill)
    elif s.kind == "diamond":
        draw.polygon([(cx, y0), (x0 + w, cy), (cx, y0 + h), (x0, cy)], fill=fill)
    else:  # star: 5 points, inner radius 0.45 of the outer; the box is its bounding square
        r = w / 2
        pts = [(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=fill)


def _place(rng: random.Random, size: int, n: int) -> list[tuple[int, int, int, int]]:
    """Up to n square boxes of 14-26% of the canvas, apart by at least 3% (rejection sampling, 200 tries each)."""
    boxes: list[tuple[int, int, int, int]] = []
    gap = max(2, round(0.03 * size))
    for _ in range(n):
        for _ in range(200):
            side = rng.randint(round(0.14 * size), round(0.26 * size))
            x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap or b[1] >= box[3] + gap
                   for b in boxes):
                boxes.append(box)
                break
    return boxes


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _questions(rng: random.Random, shapes: list[Shape]) -> list[tuple[str, str]]:
    """Every question family the scene supports, each answer computed from the drawn objects."""
    qa = [("How many shapes are there?", str(len(shapes)))]
    kind = rng.choice(SHAPES)  # may be absent: "0" answers teach the model to look rather than guess
    qa.append((f"How many {kind}s are there?", str(sum(s.kind == kind for s in shapes))))
    color = rng.choice(sorted(COLORS))
    qa.append((f"How many {color} shapes are there?", str(sum(s.color == color for s in shapes))))
    single_kinds = [k for k in SHAPES if sum(s.kind == k for s in shapes) == 1]
    if single_kinds:
        k = rng.choice(single_kinds)
        qa.append((f"What color is the {k}?", next(s.color for s in shapes if s.kind == k)))
    single_colors = [c for c in COLORS if sum(s.color == c for s in shapes) == 1]
    if single_colors:
        c = rng.choice(single_colors)
        qa.append((f"What shape is the {c} one?", next(s.kind for s in shapes if s.color == c)))
    if len(shapes) >= 2:
        a, b = rng.sample(shapes, 2)
        (ax, ay), (bx, by) = a.center, b.center
        if abs(ax - bx) >= abs(ay - by):  # ask along the axis where they are clearly apart (boxes never overlap)
            qa.append((f"Is the {a.name} to the left or to the right of the {b.name}?", "left" if ax < bx else "right"))
        else:
            qa.append((f"Is the {a.name} above or below the {b.name}?", "above" if ay < by else "below"))
    return qa


# The question families _questions asks, in its order, each told by the start of its template: what a look report
# breaks accuracy down by (herd.train.vision_diagnostics.family_accuracy).
FAMILIES = ("count", "count by shape", "count by colour", "colour of a shape", "shape of a colour", "left or right",
            "above or below")


def question_family(question: str) -> str:
    """The family (FAMILIES) of one of _questions' questions; ValueError for any other text."""
    if question == "How many shapes are there?":
        return "count"
    if question.startswith("How many ") and question.endswith(" shapes are there?"):
        return "count by colour"
    if question.startswith("How many "):
        return "count by shape"
    if question.startswith("What color is the "):
        return "colour of a shape"
    if question.startswith("What shape is the "):
        return "shape of a colour"
    if " to the left or to the right of " in question:
        return "left or right"
    if " above or below " in question:
        return "above or below"
    raise ValueError(f"not a scene question: {question!r}")


def make_scene(seed: int, index: int, size: int = 224, max_shapes: int = 5) -> Scene:
    """Scene number `index` of the stream `seed`: the image, its objects, caption, questions and boxes."""
    rng = random.Random(f"herd-scene:{seed}:{index}")
    boxes = _place(rng, size, rng.randint(1, max_shapes))
    pairs = rng.sample([(c, k) for c in COLORS for k in SHAPES], len(boxes))  # distinct (colour, shape) pairs
    shapes = [Shape(kind, color, box) for (color, kind), box in zip(pairs, boxes, strict=True)]
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        _draw(draw, s)
    ordered = sorted(shapes, key=lambda s: s.center[0])
    n = len(shapes)
    named = [("an " if s.name[0] in "aeiou" else "a ") + s.name for s in ordered]
    caption = (f"{NUMBER_WORDS[n].capitalize() if n < len(NUMBER_WORDS) else n} shape{'s' * (n > 1)} on a white "
               f"background: {_join(named)}" + (", from left to right." if n > 1 else "."))
    grounding = [(f"Where is the {s.name}? Answer with its bounding box.", box_text(s.box, size, size))
                 for s in shapes]
    return Scene(image, shapes, caption, _questions(rng, shapes), grounding)


def image_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


TASKS = ("caption", "qa", "ground", "mixed", "all")


def scene_chat(seed: int, index: int, task: str = "mixed", size: int = 224, max_shapes: int = 5,
               image_format: str = "pil") -> tuple[Image.Image, list[dict]]:
    """(image, OpenAI-style messages) for one scene. task: "caption", "qa" (one question), "ground" (one box),
    "mixed" (one of the three, chosen by the seed), or "all" (a multi-turn chat: caption, every question, every box).
    The image travels in the first user message; image_format "pil" puts the PIL image itself there, "data_url" a
    PNG data URL."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if image_format not in ("pil", "data_url"):
        raise ValueError(f"image_format must be 'pil' or 'data_url', got {image_format!r}")
    scene = make_scene(seed, index, size, max_shapes)
    rng = random.Random(f"herd-scene-task:{seed}:{index}")
    turns = {"caption": [("Describe the image.", scene.caption)], "qa": [rng.choice(scene.qa)],
             "ground": [rng.choice(scene.grounding)]}
    if task == "mixed":
        task = rng.choice(("caption", "qa", "ground"))
    pairs = turns[task] if task != "all" else [*turns["caption"], *scene.qa, *scene.grounding]
    url = scene.image if image_format == "pil" else image_data_url(scene.image)
    messages = []
    for k, (question, answer) in enumerate(pairs):
        content = [{"type": "text", "text": question}]
        if k == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return scene.image, messages


# ---- long-context retrieval ------------------------------------------------------------------------------------------
class Retrieval(NamedTuple):
    text: str
    question: str
    answer: str


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")


def _fit(build, n_units: int, n_chars: int | None, n_tokens: int | None, tokenizer) -> tuple[int, str]:
    """(k, build(k)) for the largest k <= n_units within the length budget (bisection: the length grows with k)."""

    def length(text: str) -> int:
        return len(text) if n_chars is not None else len(tokenizer.encode(text))

    budget = n_chars if n_chars is not None else n_tokens
    if length(build(0)) > budget:
        raise ValueError(f"a budget of {budget} is too short for even the bare question and needle")
    lo, hi = 0, n_units
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if length(build(mid)) <= budget else (lo, mid - 1)
    return lo, build(lo)


def _budget(n_chars: int | None, n_tokens: int | None, tokenizer) -> int:
    """A character count that surely covers the budget (8 characters per token is more than any BPE averages)."""
    if (n_chars is None) == (n_tokens is None):
        raise ValueError("give exactly one of n_chars and n_tokens")
    if n_tokens is not None and tokenizer is None:
        raise ValueError("n_tokens needs a tokenizer to count tokens")
    return n_chars if n_chars is not None else 8 * n_tokens


def _filler(rng: random.Random, filler: str, n_chars: int) -> list[str]:
    """Sentences, each with the whitespace that follows it: the classic filler repeated, or Austen's prose from a
    seeded chapter on (paragraph breaks kept)."""
    if filler == "repeat":
        return [s + " " for s in PASSKEY_FILLER] * (n_chars // sum(len(x) + 1 for x in PASSKEY_FILLER) + 1)
    if filler != "corpus":
        raise ValueError(f"filler must be 'repeat' or 'corpus', got {filler!r}")
    from herd.data.corpus import documents  # imported here: the repeat filler needs no corpus

    chapters = documents("train", "austen")
    start, units, total = rng.randrange(len(chapters)), [], 0
    while total < n_chars:
        pieces = re.split(r"(?<=[.!?])(\s+)", chapters[start % len(chapters)] + "\n\n")
        units += [text + space for text, space in zip(pieces[::2], pieces[1::2], strict=False)]
        total += sum(map(len, pieces))
        start += 1
    return units


def passkey_document(seed: int, n_chars: int | None = None, n_tokens: int | None = None, tokenizer=None,
                     depth: float | None = None, filler: str = "repeat") -> Retrieval:
    """A passkey-retrieval document of at most n_chars characters (or n_tokens tokens with `tokenizer`): filler text
    with the needle at relative `depth` (0 = start, 1 = end; None: drawn from the seed). The answer is a 5-digit key;
    the question is separate from the text (prompt = text + question)."""
    rng = random.Random(f"herd-passkey:{seed}")
    key = str(rng.randint(10000, 99999))
    depth = rng.random() if depth is None else depth
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    units = _filler(rng, filler, _budget(n_chars, n_tokens, tokenizer))

    def build(k: int) -> str:
        at = round(depth * k)
        return "".join([PASSKEY_INTRO + "\n\n", *units[:at], needle, *units[at:k]]).rstrip()

    _, text = _fit(build, len(units), n_chars, n_tokens, tokenizer)
    return Retrieval(text, "What is the pass key?", key)


def kv_document(seed: int, n_chars: int | None = None, n_tokens: int | None = None, tokenizer=None,
                depth: float | None = None) -> Retrieval:
    """A key-value retrieval document: a JSON object of random UUID keys and values within the length budget; the
    question asks for the value of the key at relative position `depth` (None: drawn from the seed)."""
    rng = random.Random(f"herd-kv:{seed}")
    depth = rng.random() if depth is None else depth

    def uuid() -> str:
        h = f"{rng.getrandbits(128):032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    # a pair takes ~84 characters, so budget // 80 pairs are more than fit
    pairs = [(uuid(), uuid()) for _ in range(_budget(n_chars, n_tokens, tokenizer) // 80 + 1)]
    intro = "Extract the value corresponding to the specified key in the JSON object below.\n\n"

    def build(k: int) -> str:
        return intro + json.dumps(dict(pairs[:max(k, 1)]), indent=1)  # at least the pair that is asked for

    k, text = _fit(build, len(pairs), n_chars, n_tokens, tokenizer)
    key, value = pairs[round(depth * (max(k, 1) - 1))]
    return Retrieval(text, f'What is the value of key "{key}"?', value)
