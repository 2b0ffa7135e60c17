"""Scene questions through `herd serve`: a multimodal model answers held-out scene questions sent by the official
`openai` client with the image as a PNG data URL, and the server's answers are compared with the model's own
greedy answers in process (herd.train.samples.scene_answers: what the run's evaluation scores).

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_serve import free_port, start, stop  # noqa: E402 (the benchmarks' server helpers)

RESULTS = Path("experiments/results")


def main() -> None:
    from openai import OpenAI

    import herd
    from herd.data.synthetic import image_data_url
    from herd.tokenizer import Tokenizer
    from herd.train.samples import held_out_scenes, scene_answers, with_image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/exp-vision/cj-s0/hf")
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="the run's seed: its held-out scenes")
    a = ap.parse_args()
    scenes = held_out_scenes(a.seed, a.questions)
    model = herd.from_pretrained(a.model).eval()
    local = [(r, o) for r, o, _ in scene_answers(model, Tokenizer.from_pretrained(a.model), model.vision_config,
                                                 a.seed, a.questions)]  # what the run's evaluation asked
    del model
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
                    messages=[{"role": "user", "content": with_image(scenes[i][1], image_data_url(image))}])
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
