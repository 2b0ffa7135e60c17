"""The engine thread behind the server (herd.serve.worker), in process: a failing step ends the requests in flight
with "error" and the next request is served; a request posted while another runs joins at the next step. Both
batch layouts: the left-padded one and the fixed-shape one (herd.infer.slot_batch, `herd serve --cuda-graphs`).

Run: .venv/bin/python -m pytest tests/serve/test_worker.py -v
"""

from __future__ import annotations

import asyncio

import pytest

import herd
from herd.infer.engine import Engine
from herd.infer.padded_batch import PaddedBatch
from herd.infer.sampling import SamplingParams
from herd.infer.slot_batch import SlotBatch
from herd.serve.worker import EngineWorker
from herd.tokenizer import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
LONG = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=400)


async def _wait(req, queue, timeout=60.0):
    async def loop():
        while not req.finished:
            await queue.get()
    await asyncio.wait_for(loop(), timeout)


@pytest.mark.parametrize("layout", [PaddedBatch, SlotBatch])
def test_a_failing_step_ends_the_requests_in_flight_and_the_worker_goes_on(layout):
    model = herd.build_model(herd.preset("tiny"), seed=0)
    engine = Engine(model, tiny_tokenizer(), layout=layout(model))
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory (simulated)")
        real_step()

    engine.step = flaky_step
    worker = EngineWorker(engine)

    async def scenario():
        a, qa = worker.submit([5, 6, 7], LONG)
        b, qb = worker.submit([8, 9], LONG)
        await _wait(a, qa)
        await _wait(b, qb)
        c, qc = worker.submit([5, 6, 7], SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=6))
        await _wait(c, qc)
        return a, b, c

    try:
        a, b, c = asyncio.run(scenario())
    finally:
        worker.stop(0)
    for req in (a, b):
        assert req.finish_reason == "error" and "RuntimeError: out of memory (simulated)" in req.error
    assert c.finish_reason == "length" and len(c.output_ids) == 6
    assert not engine.running and not worker.thread.is_alive()
    if layout is PaddedBatch:
        assert engine.layout.cache is None
    else:
        assert engine.layout.free == list(range(engine.max_batch)) and not engine.layout.slots


@pytest.mark.parametrize("layout", [PaddedBatch, SlotBatch])
def test_a_new_request_joins_while_another_runs(layout):
    model = herd.build_model(herd.preset("tiny"), seed=0)
    engine = Engine(model, tiny_tokenizer(), layout=layout(model))
    worker = EngineWorker(engine)

    async def scenario():
        long, ql = worker.submit([5, 6, 7], SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=3000))
        await ql.get()  # it is generating
        short, qs = worker.submit([8, 9], SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=4))
        await _wait(short, qs)
        was_running = not long.finished
        worker.cancel(long)
        await _wait(long, ql)
        return long, short, was_running

    try:
        long, short, was_running = asyncio.run(scenario())
    finally:
        worker.stop(0)
    assert was_running and len(short.output_ids) == 4 and long.finish_reason == "cancelled"
