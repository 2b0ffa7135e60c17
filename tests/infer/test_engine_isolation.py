"""Failure isolation in the engine: a row whose own sampling, stop checker or callback fails ends alone with
finish_reason "error"; the rows beside it run on and produce what they produce without it. A failure that no row can
be blamed for (the model's decode step) still raises from `step()`, for the server to end everything.

Run: .venv/bin/python -m pytest tests/infer/test_engine_isolation.py -v
"""

from __future__ import annotations

import pytest

import herd
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams
from herd.tokenizer import tiny_tokenizer

GOOD = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return herd.build_model(herd.preset("tiny"), seed=21).eval()


@pytest.fixture(scope="module")
def alone(model, tok):
    """What the two good prompts generate without a bad neighbour."""
    return [r.output_ids for r in Engine(model, tok).generate(PROMPTS[:2], GOOD)]


def _past_validation(params: SamplingParams, **fields) -> SamplingParams:
    """`params` with values its checks refuse, as a value that slipped past them would be (top_k = 2**63 once did)."""
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


def test_sampling_params_bound_top_k_and_seed():
    for bad in (dict(top_k=2**63), dict(top_k=2**31), dict(seed=2**64), dict(seed=-2**63 - 1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(top_k=2**31 - 1, seed=2**64 - 1).top_k == 2**31 - 1


@pytest.mark.parametrize("late", [False, True], ids=["admitted-together", "joins-running-batch"])
def test_a_row_whose_sampling_fails_ends_alone(model, tok, alone, late):
    engine = Engine(model, tok)
    good = [engine.submit(p, GOOD) for p in PROMPTS[:2]]
    if late:  # the good rows are decoding when the bad one joins
        engine.step()
        engine.step()
    bad = engine.submit(PROMPTS[2], _past_validation(SamplingParams(max_new_tokens=12, top_k=5), top_k=2**63))
    engine.run()
    assert bad.finish_reason == "error" and "sampling failed" in bad.error and bad.output_ids == []
    assert [r.output_ids for r in good] == alone and all(r.finish_reason == "length" for r in good)
    assert not engine.busy and engine.running == []


def test_a_row_whose_stop_checker_or_callback_fails_ends_alone(model, tok, alone):
    engine = Engine(model, tok)
    seen = []

    def flaky(req, delta):  # the consumer of the third prompt fails on its fourth token
        seen.append(delta)
        if len(seen) == 4:
            raise RuntimeError("the consumer broke")

    good = [engine.submit(p, GOOD) for p in PROMPTS[:2]]
    bad_callback = engine.submit(PROMPTS[2], GOOD, on_delta=flaky)
    bad_checker = engine.submit(PROMPTS[2], GOOD)
    add = bad_checker.checker.add
    bad_checker.checker.add = lambda t: add(t) if len(bad_checker.output_ids) < 3 else 1 / 0
    engine.run()
    assert bad_callback.finish_reason == "error" and "the consumer broke" in bad_callback.error
    assert bad_checker.finish_reason == "error" and "ZeroDivisionError" in bad_checker.error
    assert len(bad_callback.output_ids) == 4 and len(bad_checker.output_ids) == 3
    assert [r.output_ids for r in good] == alone and all(r.finish_reason == "length" for r in good)


def test_a_failure_no_row_is_to_blame_for_still_raises(model, tok):
    engine = Engine(model, tok)
    engine.submit(PROMPTS[0], GOOD)
    engine.step()

    def broken(*args):
        raise RuntimeError("the decode step failed")

    engine.layout.decode = broken
    with pytest.raises(RuntimeError, match="decode step"):
        engine.step()
    engine.fail_all("ended")
    assert not engine.busy
