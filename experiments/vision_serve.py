"""Scene questions through `herd serve`: a multimodal model answers held-out scene questions sent by the official
`openai` client with the image as a PNG data URL, and the server's answers are compared with the model's own
greedy answers in process (herd.train.samples.scene_accuracy's prompts and scoring).

What it shows: the path a user takes (train -> export -> herd serve -> OpenAI chat request with an image) gives the
answers the run's evaluation measured, image for image, and the accuracy with the right image and with another
scene's image through the server. A recorded result, not a test: the demo-size model answers too few questions
right for a fixed-seed test to mean anything (docs/vision.md).

Run:  .venv/bin/python experiments/vision_serve.py --model runs/exp-vision/cj-s0/hf [--questions 100]
Writes experiments/results/vision_serve.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_serve import free_port, start, stop  # noqa: E402 (the benchmarks' server helpers)

RESULTS = Path("experiments/results")


def in_process(model_dir: str, scenes: list[tuple]) -> list[tuple[str, str]]:
    """(answer with the right image, answer with the next scene's image) per question, greedy, as
    scene_accuracy asks them."""
    import herd
    from herd.chat import prepare_chat, tiling
    from herd.infer.generate import generate
    from herd.tokenizer import Tokenizer

    model, tok = herd.from_pretrained(model_dir).eval(), Tokenizer.from_pretrained(model_dir)
    out = []
    for i in range(len(scenes) - 1):
        pair = []
        for image in (scenes[i][0], scenes[i + 1][0]):
            user = _user(scenes[i][1], image)
            ids, batch = prepare_chat([{"role": "user", "content": user}], tok, **tiling(model.vision_config))
            x = torch.tensor([ids])
            with torch.no_grad():
                new = generate(model, x, 8, eos_token_id=tok.stop_ids, pixel_values=batch.pixel_values)
            pair.append(tok.decode(new[0, x.shape[1]:].tolist(), skip_special=True).strip())
        out.append(tuple(pair))
    return out


def _user(messages: list[dict], image) -> list[dict]:
    return [p if p["type"] == "text" else {"type": "image_url", "image_url": {"url": image}}
            for p in messages[0]["content"]]


def main() -> None:
    from openai import OpenAI

    from herd.data.synthetic import image_data_url
    from herd.train.vision_diagnostics import _held_out

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/exp-vision/cj-s0/hf")
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="the run's seed: its held-out scenes")
    a = ap.parse_args()
    scenes = _held_out(a.seed, a.questions, 56)
    local = in_process(a.model, scenes)
    port = free_port()
    proc = start("herd serve", [sys.executable, "-m", "herd.cli", "serve", "--model", a.model, "--port", str(port)],
                 port, Path("/tmp/herd_vision_serve.log"), threads=2)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        name = client.models.list().data[0].id
        served, t0 = [], time.perf_counter()
        for i in range(a.questions):
            pair = []
            for image in (scenes[i][0], scenes[i + 1][0]):
                reply = client.chat.completions.create(
                    model=name, temperature=0, max_tokens=8, seed=0,
                    messages=[{"role": "user", "content": _user(scenes[i][1], image_data_url(image))}])
                pair.append((reply.choices[0].message.content or "").strip())
            served.append(tuple(pair))
        seconds = time.perf_counter() - t0
    finally:
        stop(proc)
    expected = [s[1][1]["content"] for s in scenes[:a.questions]]
    right = sum(s[0] == e for s, e in zip(served, expected, strict=True)) / a.questions
    other = sum(s[1] == e for s, e in zip(served, expected, strict=True)) / a.questions
    same = sum(s == loc for s, loc in zip(served, local, strict=True))
    result = {"model": a.model, "questions": a.questions, "served_right_image": right, "served_other_image": other,
              "answers_equal_in_process": same, "seconds": seconds,
              "examples": [{"question": next(p["text"] for p in s[1][0]["content"] if p["type"] == "text"),
                            "expected": e, "served": sv[0], "served_other_image": sv[1]}
                           for s, e, sv in list(zip(scenes[:a.questions], expected, served, strict=True))[:8]]}
    print(f"through herd serve: {right:.2f} right with the scene's image, {other:.2f} with another scene's; "
          f"{same}/{a.questions} answer pairs equal to the model's in-process greedy answers ({seconds:.0f}s)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vision_serve.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'vision_serve.json'}")


if __name__ == "__main__":
    main()
