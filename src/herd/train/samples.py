"""What a run's model says at the end: text continuations of fixed prompts and, for a multimodal run, answers about
held-out synthetic scenes next to the right answers. Greedy, so the samples of a run are reproducible.

The text prompts are openings in the corpus's own registers (prose, verse, scripture, glosses); the scene questions
come from the validation stream (seeds the run never trained on).

Does the model look? `scene_accuracy` asks n held-out questions (count, colour, shape, left/right, above/below) twice:
with the scene the question is about, and with the next scene's image instead (same question, wrong picture). A
model that answers from the question alone (the most common colour, "2") scores the same on both; the gap between
the two is what the image contributes. `chance` is the question-only predictor's accuracy (the most common training
answer to each question), and `family_accuracy` splits all three by question family.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

import torch

PROMPTS = ("It is a truth universally acknowledged, that", "To be, or not to be:", "In the beginning",
           "The king said to his daughter,")


def _device(model) -> torch.device:
    return next(model.parameters()).device if model is not None else torch.device("cpu")


@torch.no_grad()
def text_samples(model, tok, prompts=PROMPTS, max_new_tokens: int = 40) -> list[tuple[str, str]]:
    """[(prompt, continuation)] by greedy decoding from BOS + prompt."""
    from herd.infer.generate import generate

    out = []
    for p in prompts:
        ids = torch.tensor([[tok.bos_id] + tok.encode(p)], device=_device(model))
        new = generate(model, ids, max_new_tokens, eos_token_id=tok.stop_ids)[0, ids.shape[1]:]
        out.append((p, tok.decode(new.tolist(), skip_special=True)))
    return out


@torch.no_grad()
def scene_samples(model, tok, vcfg, seed: int, n: int = 3, size: int = 56, max_new_tokens: int = 24) -> list[dict]:
    """[{"question", "answer", "expected", "image"}] for n held-out scenes (the run's validation seeds)."""
    from herd.chat import prepare_chat, tiling
    from herd.data.synthetic import scene_chat
    from herd.infer.generate import generate
    from herd.train.inputs import VAL_OFFSET

    out = []
    for i in range(n):
        image, messages = scene_chat(seed + VAL_OFFSET, 10_000 + i, "qa", size=size, max_shapes=4)
        ids, batch = prepare_chat(messages[:1], tok, **tiling(vcfg))
        ids = torch.tensor([ids], device=_device(model))
        new = generate(model, ids, max_new_tokens, eos_token_id=tok.stop_ids,
                       pixel_values=batch.pixel_values.to(ids.device))
        question = next(p["text"] for p in messages[0]["content"] if p["type"] == "text")
        out.append({"question": question, "answer": tok.decode(new[0, ids.shape[1]:].tolist(), skip_special=True),
                    "expected": messages[1]["content"], "image": image})
    return out


def held_out_scenes(seed: int, n: int, size: int = 56) -> list[tuple]:
    """(image, messages) of the n held-out scene questions a run is asked (the validation seeds), plus one more
    scene, whose image stands in as "another scene's" for the last question."""
    from herd.data.synthetic import scene_chat
    from herd.train.inputs import VAL_OFFSET

    return [scene_chat(seed + VAL_OFFSET, 20_000 + i, "qa", size=size, max_shapes=4) for i in range(n + 1)]


def with_image(messages: list[dict], image) -> list[dict]:
    """The scene question's user content with `image` (a PIL image or a URL) in place of the scene's own."""
    return [p if p["type"] == "text" else {"type": "image_url", "image_url": {"url": image}}
            for p in messages[0]["content"]]


@torch.no_grad()
def scene_answers(model, tok, vcfg, seed: int, n: int = 100, size: int = 56) -> list[tuple[str, str, str]]:
    """(greedy answer with the scene's image, with the next scene's image, the right answer) for each of the n
    held-out scene questions."""
    from herd.chat import prepare_chat, tiling
    from herd.infer.generate import generate

    kw = tiling(vcfg)
    scenes = held_out_scenes(seed, n, size)
    out = []
    for i in range(n):
        answers = []
        for image in (scenes[i][0], scenes[i + 1][0]):
            ids, batch = prepare_chat([{"role": "user", "content": with_image(scenes[i][1], image)}], tok, **kw)
            ids = torch.tensor([ids], device=_device(model))
            new = generate(model, ids, 8, eos_token_id=tok.stop_ids, pixel_values=batch.pixel_values.to(ids.device))
            answers.append(tok.decode(new[0, ids.shape[1]:].tolist(), skip_special=True).strip())
        out.append((*answers, scenes[i][1][1]["content"]))
    return out


def scene_accuracy(model, tok, vcfg, seed: int, n: int = 100, size: int = 56, families: bool = False) -> dict:
    """Exact-match accuracy on n held-out scene questions with the right image and with another scene's image;
    `families`: also per question family ("scene_qa_families", family_accuracy)."""
    answers = scene_answers(model, tok, vcfg, seed, n, size)
    out = {"scene_qa_accuracy": sum(a == e for a, _, e in answers) / n,
           "scene_qa_accuracy_other_image": sum(o == e for _, o, e in answers) / n, "scene_qa_questions": n}
    if families:
        out["scene_qa_families"] = family_accuracy(answers, seed, size)
    return out


@functools.lru_cache(maxsize=8)  # the same figures at every evaluation of a run
def question_only_answers(seed: int, n: int, size: int, train_scenes: int = 4000) -> tuple[str | None, ...]:
    """The question-only predictor's answer to each held-out question: the most common training answer to the same
    question (to the same question with colours and shapes blanked where that question never occurred)."""
    from herd.data.synthetic import COLORS, SHAPES, make_scene
    names = re.compile(r"\b(" + "|".join((*COLORS, *SHAPES)) + r")s?\b")  # what a question names
    exact, family = {}, {}
    for i in range(train_scenes):
        scene = make_scene(seed, i, size, max_shapes=4)
        for q, a in scene.qa:
            exact.setdefault(q, Counter())[a] += 1
            family.setdefault(names.sub("_", q), Counter())[a] += 1
    out = []
    for _, messages in held_out_scenes(seed, n, size)[:n]:
        q = next(p["text"] for p in messages[0]["content"] if p["type"] == "text")
        votes = exact.get(q) or family.get(names.sub("_", q)) or Counter()
        out.append(votes.most_common(1)[0][0] if votes else None)
    return tuple(out)


def chance(seed: int, n: int, size: int) -> float:
    """Accuracy of the question-only predictor (question_only_answers) on the n held-out questions."""
    guesses = question_only_answers(seed, n, size)
    scenes = held_out_scenes(seed, n, size)[:n]
    return sum(g == m[1]["content"] for g, (_, m) in zip(guesses, scenes, strict=True)) / n


def family_accuracy(answers: list[tuple[str, str, str]], seed: int, size: int) -> dict[str, dict]:
    """Per question family (herd.data.synthetic.FAMILIES): {"questions", "right", "other", "question_only"}, the
    accuracies of `answers` (samples.scene_answers over the first len(answers) held-out questions) with the right
    image, with another scene's, and of the question-only predictor. Which families gain from the image says what
    the image features carry: a count needs only how much of the canvas is coloured, "what colour is the star" needs
    each object's colour and shape in the same place."""
    from herd.data.synthetic import FAMILIES, question_family
    n = len(answers)
    guesses = question_only_answers(seed, n, size)
    rows: dict[str, list[int]] = {}
    for (_, messages), (right, other, want), guess in zip(held_out_scenes(seed, n, size)[:n], answers, guesses,
                                                          strict=True):
        q = next(p["text"] for p in messages[0]["content"] if p["type"] == "text")
        r = rows.setdefault(question_family(q), [0, 0, 0, 0])
        r[0] += 1
        r[1] += right == want
        r[2] += other == want
        r[3] += guess == want
    return {f: {"questions": r[0], "right": r[1] / r[0], "other": r[2] / r[0], "question_only": r[3] / r[0]}
            for f in FAMILIES if (r := rows.get(f))}


def print_samples(model, tok, mcfg, seed: int, out_dir=None, scene_size: int = 56) -> dict:
    """Print text samples, and for a multimodal model scene answers (saving the scenes as PNGs in out_dir) and the
    held-out scene accuracy, which is returned ({} for a text model)."""
    was_training = model.training
    model.eval()
    print("samples (greedy):")
    for prompt, cont in text_samples(model, tok):
        print(f"  {prompt!r} -> {cont!r}")
    vcfg = mcfg.vision_config
    if vcfg is not None:
        for i, s in enumerate(scene_samples(model, tok, vcfg, seed, size=scene_size)):
            where = ""
            if out_dir is not None:
                path = f"{out_dir}/scene_{i}.png"
                s["image"].save(path)
                where = f" [{path}]"
            print(f"  image{where}: {s['question']!r} -> {s['answer']!r} (right answer: {s['expected']!r})")
        acc = scene_accuracy(model, tok, vcfg, seed, size=scene_size, families=True)
        print(f"held-out scene questions: {100 * acc['scene_qa_accuracy']:.0f}% right with their image, "
              f"{100 * acc['scene_qa_accuracy_other_image']:.0f}% with another scene's image "
              f"({acc['scene_qa_questions']} questions); by family, right / other image / question only:")
        for family, f in acc["scene_qa_families"].items():
            print(f"  {family:18s} {100 * f['right']:3.0f}% / {100 * f['other']:3.0f}% / "
                  f"{100 * f['question_only']:3.0f}% ({f['questions']} questions)")
    model.train(was_training)
    return acc if vcfg is not None else {}
