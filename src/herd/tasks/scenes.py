"""Questions about the synthetic shape scenes (herd.data.synthetic), for multimodal models.

Each example is one scene image and one of its question/answer pairs (count, count by shape or colour, colour of a
shape, shape of a colour, left/right or above/below), every answer right by construction. Difficulty d (1..6) is
the most shapes a scene may hold (make_scene's max_shapes): at d=1 there is one shape and no relation to read.
The image travels in the user turn as an `image_url` part holding the PIL image, which herd.chat.prepare_chat
loads directly. Grounding (box) questions are left out: their answers are coordinates, not short exact answers.

The reference reply is `#### ANSWER` like every other task; the verifier also takes a bare one-line answer ("red"),
which is how scene_chat's training data answers, and compares case- and whitespace-normalised text.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from herd.data.synthetic import make_scene
from herd.tasks.base import ANSWER_INSTRUCTION, Example, Score, answer_reply, check_difficulty, final_answer, verdict

SCENE_STREAM = 7_041  # make_scene's `seed` argument: the task's scenes are their own stream; the example seed is
# the scene's index in it, so a task seed and a scene_chat seed that happen to be equal still draw different images


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().rstrip(".").strip()).lower()


@dataclass(frozen=True)
class SceneQA:
    name: str = "scenes"
    max_difficulty: int = 6
    multimodal: bool = True
    size: int = 224  # the canvas side in pixels (scene_chat's default)

    def example(self, seed: int, difficulty: int) -> Example:
        check_difficulty(self.name, difficulty, self.max_difficulty)
        scene = make_scene(SCENE_STREAM + difficulty, seed, self.size, max_shapes=difficulty)
        rng = random.Random(f"herd-task:{self.name}:{seed}:{difficulty}")
        question, answer = rng.choice(scene.qa)
        content = [{"type": "image_url", "image_url": {"url": scene.image}},
                   {"type": "text", "text": f"{question} {ANSWER_INSTRUCTION}"}]
        return Example(task=self.name, seed=seed, difficulty=difficulty,
                       messages=[{"role": "user", "content": content}], answer=answer_reply("", answer),
                       target=answer, meta={"question": question, "size": len(scene.shapes),
                                            "shapes": [s.name for s in scene.shapes]})

    def score(self, example: Example, completion: str) -> Score:
        got = final_answer(completion)
        if got is None and completion.strip() and "\n" not in completion.strip():
            got = completion  # a bare short answer, as scene_chat's data teaches
        if got is None:
            return verdict(False, format_ok=False)
        return verdict(_normalise(got) == _normalise(str(example.target)))
