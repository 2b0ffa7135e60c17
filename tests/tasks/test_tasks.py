"""herd.tasks: determinism, the train/held-out split, verifiers, difficulty, and rendering through herd.chat.
python -m pytest tests/tasks -q"""

from __future__ import annotations

import statistics

import pytest

import herd.tasks as tasks
from herd.chat import format_chat, prepare_chat, tiling
from herd.config import multimodal_preset
from herd.tasks.base import ANSWER_PREFIX, assistant_message, final_answer, is_heldout, parse_int, problem_hash
from herd.tokenizer import tiny_tokenizer

TEXT_TASKS = [n for n, t in tasks.TASKS.items() if not t.multimodal]
ALL = list(tasks.TASKS)


def _prompt(ex) -> str:
    return "\x1e".join(str(m["content"]) for m in ex.messages if m["role"] == "user" and isinstance(m["content"], str))


def test_registry_and_errors():
    assert set(ALL) >= {"arithmetic", "counting", "sorting", "strings", "tool_use", "scenes"}
    with pytest.raises(KeyError, match="arithmetic"):  # the message lists the names
        tasks.get("arithmetc")
    with pytest.raises(ValueError, match="difficulty 1..6"):
        tasks.get("arithmetic").example(0, 7)
    with pytest.raises(ValueError, match="split"):
        tasks.draw("arithmetic", "test", 1, 1)


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_example(name):
    t = tasks.get(name)
    a, b = t.example(123, 2), t.example(123, 2)
    assert a == b and problem_hash(a) == problem_hash(b)
    assert any(t.example(s, 2).messages != a.messages for s in range(124, 130))
    assert tasks.draw(name, "heldout", 3, 2) == tasks.draw(name, "heldout", 3, 2)


def test_scene_hash_ignores_the_image_objects_identity():
    # a PIL image's repr holds its address: the hash must come from the pixels, or held-out would change per run
    t = tasks.get("scenes")
    a, b = t.example(7, 3), t.example(7, 3)  # both alive: two image objects at two addresses
    assert problem_hash(a) == problem_hash(b)
    assert problem_hash(t.example(7, 3)) != problem_hash(t.example(8, 3))


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_train_and_heldout_never_share_a_problem(name):
    train = tasks.draw(name, "train", 300, 1)
    held = tasks.draw(name, "heldout", 100, 1)
    assert all(not is_heldout(e) for e in train) and all(is_heldout(e) for e in held)
    assert all(e.seed < tasks.HELDOUT_BASE for e in train) and all(e.seed >= tasks.HELDOUT_BASE for e in held)
    assert not {_prompt(e) for e in train} & {_prompt(e) for e in held}
    assert [e.seed for e in tasks.draw(name, "train", 5, 1, start=40)] == \
           [e.seed for e in train if e.seed >= 40][:5]  # start offsets the same seed sequence


def test_scene_split():
    train, held = tasks.draw("scenes", "train", 30, 2), tasks.draw("scenes", "heldout", 5, 2)
    assert not {problem_hash(e) for e in train} & {problem_hash(e) for e in held}


@pytest.mark.parametrize("name", ALL)
def test_reference_scores_correct_and_wrong_scores_zero(name):
    t = tasks.get(name)
    for ex in tasks.draw(name, "train", 25, 2) + tasks.draw(name, "train", 10, t.max_difficulty):
        s = t.score(ex, ex.answer)
        assert (s.reward, s.correct, s.format_ok) == (1.0, True, True), (ex, s)
        assert t.score(ex, "I am not sure what the answer is, sorry about that.\nMaybe later.").format_ok is False
        assert t.score(ex, "").reward == 0.0


WRONG = {"arithmetic": lambda ex: f"#### {ex.target + 1}", "counting": lambda ex: f"#### {ex.target + 1}",
         "sorting": lambda ex: ANSWER_PREFIX + ", ".join(reversed(ex.target)) if len(set(ex.target)) > 1 else None,
         "strings": lambda ex: ANSWER_PREFIX + ex.target + "x",
         "tool_use": lambda ex: None, "scenes": lambda ex: "#### purple-ish"}


@pytest.mark.parametrize("name", ALL)
def test_wrong_answers_score_zero(name):
    t, checked = tasks.get(name), 0
    for ex in tasks.draw(name, "train", 20, 3):
        wrong = WRONG[name](ex)
        if wrong is not None:
            s = t.score(ex, wrong)
            assert (s.reward, s.correct, s.format_ok) == (0.0, False, True), (ex, wrong)
            checked += 1
    assert checked or name == "tool_use"  # tool_use's wrong calls are in test_tool_use.py


def test_assistant_message_parses_calls_only_when_tools_were_offered():
    assert assistant_message("#### [f(x=1)]") == {"role": "assistant", "content": "#### [f(x=1)]"}
    msg = assistant_message('[calculator(expression="1+1")]', tasks.get("tool_use").example(0, 1).tools)
    assert msg["content"] is None and msg["tool_calls"][0]["function"]["name"] == "calculator"


def test_answer_convention():
    assert final_answer("work\n#### 12\n") == "12" and final_answer("#### 1\n#### 2") == "2"
    assert final_answer("no answer") is None and final_answer("####   \n") is None
    assert parse_int("1,234") == 1234 and parse_int("-7.") == -7 and parse_int("12a") is None
    assert parse_int("1,23") is None
    ar = tasks.get("arithmetic")
    ex = ar.example(0, 3)
    assert ar.score(ex, f"The answer: {ex.target}").format_ok is False  # no #### line
    assert ar.score(ex, f"#### {ex.target:,}").correct  # thousands commas are the same integer
    sc = tasks.get("scenes")
    ex = sc.example(3, 3)
    assert sc.score(ex, f"  {str(ex.target).upper()} ").correct  # a bare answer, any case
    so = tasks.get("sorting")
    ex = next(e for e in tasks.draw("sorting", "train", 20, 2) if e.meta["kind"] != "words")
    assert so.score(ex, "#### [" + ", ".join(ex.target) + "]").correct


@pytest.mark.parametrize("name", ALL)
def test_difficulty_changes_the_problem_size(name):
    t = tasks.get(name)
    sizes = [statistics.mean(t.example(s, d).meta["size"] for s in range(40)) for d in (1, t.max_difficulty)]
    assert sizes[1] > sizes[0]
    if name == "arithmetic":
        ex = t.example(1, 6)
        assert len(str(ex.meta["a"])) == 6


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_reference_renders_as_an_assistant_turn(name):
    tok = tiny_tokenizer()
    for ex in tasks.draw(name, "train", 6, 2):
        reply = assistant_message(ex.answer, ex.tools)
        assert bool(reply.get("tool_calls")) == (name == "tool_use")
        ids = format_chat([*ex.messages, reply], tok, add_generation_prompt=False, tools=ex.tools)
        assert ids[-1] in (tok.special("eot"), tok.special("eom"))
        text = tok.decode(ids)
        if name == "tool_use":
            assert "<|python_start|><|python_end|>" + ex.answer in text
        else:
            assert ex.answer in text


def test_scene_examples_build_with_an_image_for_the_tiny_multimodal_preset():
    tok, cfg = tiny_tokenizer(), multimodal_preset("tiny")
    for ex in tasks.draw("scenes", "train", 3, 3):
        assert tasks.get("scenes").multimodal
        ids, batch = prepare_chat([*ex.messages, assistant_message(ex.answer)], tok, add_generation_prompt=False,
                                  **tiling(cfg.vision_config))
        assert batch is not None and len(batch.grids) == 1
        assert ids.count(tok.special("image_start")) == 1 and ex.answer in tok.decode(ids)
