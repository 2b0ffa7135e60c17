"""Sampling: each processor against transformers' logits processors, per-row settings in a mixed batch, seeds that
make a request reproducible whatever else is in the batch, greedy rows, raw logprobs, parameter validation.

    .venv/bin/python -m pytest tests/infer/test_sampling.py -v
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from herd.infer.sampling import (
    SamplingParams,
    apply_min_p,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_generator,
    pick_tokens,
    process_logits,
    sample,
)

V = 257


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(B: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return 3 * torch.randn(B, vocab, generator=torch.Generator().manual_seed(seed))  # (B, V)


def _ids(B: int, L: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(0, L, (1,), generator=g)),), generator=g).tolist()
            for _ in range(B)]


def assert_same_filter(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """The same tokens filtered out, and the kept logits equal up to float rounding."""
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    torch.testing.assert_close(ours[kept], ref[kept], rtol=1e-6, atol=1e-6)


# ---- each processor, per row, against transformers on that row alone ------------------------------------------------
def test_repetition_penalty_matches_transformers():
    logits, prompts, outputs = _logits(4), _ids(4, 30, 1), _ids(4, 20, 2)
    penalties = [1.3, 0.7, 1.0, 2.5]
    zeros = torch.zeros(4)
    ours = apply_penalties(logits, prompts, outputs, torch.tensor(penalties), zeros, zeros)
    for i, pen in enumerate(penalties):
        history = torch.tensor([prompts[i] + outputs[i]], dtype=torch.long).reshape(1, -1)
        ref = RepetitionPenaltyLogitsProcessor(pen)(history, logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i:i + 1], ref, rtol=1e-6, atol=1e-6)


def test_frequency_and_presence_penalties_follow_openai():
    """logit[t] -= frequency * count(t in output) + presence * (t in output); the prompt does not count."""
    logits, prompts = _logits(3), [[5, 5, 6], [], [7]]
    outputs = [[1, 1, 1, 2], [3], []]
    freq, pres = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.5, 0.25, -2.0])
    ours = apply_penalties(logits, prompts, outputs, torch.ones(3), pres, freq)
    ref = logits.clone()
    for i, out in enumerate(outputs):
        for t in set(out):
            ref[i, t] -= freq[i] * out.count(t) + pres[i]
    torch.testing.assert_close(ours, ref)


def test_temperature_matches_transformers():
    logits, temps = _logits(3, 3), [0.3, 1.0, 1.7]
    ours = apply_temperature(logits, torch.tensor(temps))
    for i, t in enumerate(temps):
        torch.testing.assert_close(ours[i:i + 1], TemperatureLogitsWarper(t)(None, logits[i:i + 1]))


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_matches_transformers(ties):
    logits = _logits(5, 4)
    if ties:  # coarse logits: many tokens share the k-th value, and both keep all of them
        logits = logits.round()
    ks = [1, 5, 0, 40, V + 10]
    ours = apply_top_k(logits, torch.tensor(ks))
    for i, k in enumerate(ks):
        ref = logits[i:i + 1] if k == 0 else TopKLogitsWarper(k)(None, logits[i:i + 1])
        assert_same_filter(ours[i:i + 1], ref)


def test_top_p_matches_transformers():
    logits, ps = _logits(5, 5), [0.05, 0.5, 0.9, 0.999, 1.0]
    ours = apply_top_p(logits, torch.tensor(ps, dtype=torch.float64))
    for i, p in enumerate(ps):
        ref = logits[i:i + 1] if p == 1 else TopPLogitsWarper(p)(None, logits[i:i + 1])
        assert_same_filter(ours[i:i + 1], ref)
    assert (~torch.isinf(ours[0])).sum() >= 1 and not torch.isinf(ours[4]).any()


def test_min_p_matches_transformers():
    logits, mps = _logits(4, 6), [0.0, 0.01, 0.2, 1.0]
    ours = apply_min_p(logits, torch.tensor(mps))
    for i, m in enumerate(mps):
        assert_same_filter(ours[i:i + 1], MinPLogitsWarper(m)(None, logits[i:i + 1]))


# ---- the whole pipeline ---------------------------------------------------------------------------------------------
MIXED = [
    SamplingParams(),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9),
    SamplingParams(temperature=1.3, top_p=0.8, min_p=0.05, repetition_penalty=1.2),
    SamplingParams(temperature=0.5, top_k=3, min_p=0.3, repetition_penalty=0.8, seed=7),
    SamplingParams(top_k=-1, top_p=0.95, presence_penalty=0.5, frequency_penalty=0.3, seed=11),
]


def _transformers_pipeline(p: SamplingParams) -> LogitsProcessorList:
    """What transformers' generate builds for these settings: penalty first, then the warpers in its order."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if not p.greedy:
        if p.temperature != 1:
            procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1:
            procs.append(TopPLogitsWarper(p.top_p))
        if p.min_p > 0:
            procs.append(MinPLogitsWarper(p.min_p))
    return procs


def test_pipeline_matches_transformers_order():
    params = [p for p in MIXED if not (p.presence_penalty or p.frequency_penalty)]  # transformers has neither
    B = len(params)
    logits, prompts, outputs = _logits(B, 8), _ids(B, 30, 9), _ids(B, 10, 10)
    ours = process_logits(logits, params, prompts, outputs)
    for i, p in enumerate(params):
        history = torch.tensor([prompts[i] + outputs[i]], dtype=torch.long).reshape(1, -1)
        ref = _transformers_pipeline(p)(history, logits[i:i + 1].clone())
        if p.greedy:  # transformers skips the warpers; ours may filter, but never moves the argmax
            assert ours[i].argmax() == ref[0].argmax()
        else:
            assert_same_filter(ours[i:i + 1], ref)


def test_mixed_batch_rows_equal_rows_alone():
    B = len(MIXED)
    logits, prompts, outputs = _logits(B, 12), _ids(B, 30, 13), _ids(B, 10, 14)
    batch = process_logits(logits, MIXED, prompts, outputs)
    for i, p in enumerate(MIXED):
        alone = process_logits(logits[i:i + 1], [p], prompts[i:i + 1], outputs[i:i + 1])
        assert torch.equal(batch[i:i + 1], alone), i


def test_greedy_rows_take_argmax_of_penalized_logits():
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5, top_k=5, top_p=0.5),
              SamplingParams(temperature=0.0), SamplingParams(temperature=1e-7)]
    logits, prompts = _logits(3, 15), [[0], [], []]
    logits[0, 0] = 100.0  # the raw argmax, pushed down by the repetition penalty below row 0's runner-up
    logits[0, 1] = 90.0
    out = sample(logits, params, [make_generator(p) for p in params], prompt_ids=prompts)
    assert out.tokens.tolist() == [1, int(logits[1].argmax()), int(logits[2].argmax())]


def test_filters_that_leave_one_token_sample_it():
    logits = _logits(3, 16)
    params = [SamplingParams(top_k=1, seed=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0, seed=2)]
    tokens = pick_tokens(process_logits(logits, params), params, [make_generator(p) for p in params])
    assert torch.equal(tokens, logits.argmax(-1))


def test_draws_follow_the_processed_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -5.0]])
    p = SamplingParams(temperature=0.5, top_k=3)
    n = 20000
    processed = process_logits(logits.expand(n, -1), [p] * n)
    counts = torch.bincount(pick_tokens(processed, [p] * n), minlength=5).float() / n
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 0.5, 0)
    torch.testing.assert_close(counts[:3], expected, atol=0.015, rtol=0)
    assert counts[3:].sum() == 0


# ---- seeds ----------------------------------------------------------------------------------------------------------
def _run(params: list[SamplingParams], steps: int, row_logits) -> list[list[int]]:
    """Sample `steps` tokens for every row, each request keeping its own generator and history."""
    gens = [make_generator(p) for p in params]
    outputs: list[list[int]] = [[] for _ in params]
    for step in range(steps):
        logits = torch.stack([row_logits(p, step) for p in params])  # (B, V)
        tokens = sample(logits, params, gens, [[1, 2, 3]] * len(params), outputs).tokens
        for out, t in zip(outputs, tokens.tolist(), strict=True):
            out.append(t)
    return outputs


def _request_logits(p: SamplingParams, step: int) -> torch.Tensor:
    """A deterministic stand-in model: a request's logits depend only on its own settings and the step."""
    return _logits(1, 1000 * step + (p.seed or 0))[0]


def test_same_seed_same_tokens_whatever_the_batch():
    me = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.1, seed=1234)
    alone = _run([me], 20, _request_logits)
    assert _run([me], 20, _request_logits) == alone
    others = [SamplingParams(seed=1), SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=99)]
    crowded = _run(others[:2] + [me] + others[2:], 20, _request_logits)
    assert crowded[2] == alone[0]
    assert _run([SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.1, seed=4321)], 20,
                _request_logits) != alone


def test_unseeded_rows_do_not_disturb_a_seeded_one():
    me = SamplingParams(seed=5)
    before = _run([me], 10, _request_logits)[0]
    torch.manual_seed(123)  # moves the default generator the unseeded rows draw from
    assert _run([SamplingParams(), me, SamplingParams()], 10, _request_logits)[1] == before


# ---- logprobs -------------------------------------------------------------------------------------------------------
def test_logprobs_are_raw_and_ignore_the_knobs():
    logits = _logits(3, 20)
    raw = torch.log_softmax(logits, -1)
    params = [SamplingParams(logprobs=True, top_logprobs=5, temperature=0.0),
              SamplingParams(logprobs=True, top_logprobs=2, temperature=0.3, top_k=4, seed=3),
              SamplingParams(temperature=2.0, repetition_penalty=2.0, seed=4)]
    out = sample(logits, params, [make_generator(p) for p in params], prompt_ids=[[0, 1, 2]] * 3)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.tokens[:, None]).squeeze(1))
    assert out.top_ids.shape == out.top_logprobs.shape == (3, 5)
    assert torch.equal(out.top_ids, raw.topk(5, dim=-1).indices)
    torch.testing.assert_close(out.top_logprobs, raw.topk(5, dim=-1).values)
    assert sample(logits, [SamplingParams()] * 3).logprobs is None


def test_logprobs_from_bf16_logits_are_float32():
    out = sample(_logits(2, 21).bfloat16(), [SamplingParams(temperature=0.0, logprobs=True)] * 2)
    assert out.logprobs.dtype == torch.float32 and out.top_ids.shape == (2, 0)


# ---- validation -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 2.5), ("top_k", True),
    ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("seed", 1.5), ("seed", "7"),
    ("max_new_tokens", 0), ("max_new_tokens", 3.0), ("stop_token_ids", [1, -1]), ("stop", [""]),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", [1]), ("logprobs", 1), ("top_logprobs", 21),
    ("top_logprobs", -1), ("ignore_eos", None), ("logit_bias", {5: 101}), ("logit_bias", {-1: 3}),
    ("logit_bias", {"5": 3}), ("logit_bias", [5, 3]),
])
def test_invalid_params_name_the_field(field, value):
    kw = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams(**kw, **{field: value})


def test_top_logprobs_needs_logprobs():
    with pytest.raises(ValueError, match="top_logprobs.*logprobs=True"):
        SamplingParams(top_logprobs=3)


def test_params_normalisation():
    assert SamplingParams(top_k=0).top_k is None and SamplingParams(top_k=-1).top_k is None
    p = SamplingParams(stop="###", stop_token_ids=[3, 4])
    assert p.stop == ("###",) and p.stop_token_ids == (3, 4)
    assert SamplingParams(stop=None, stop_token_ids=None).stop == ()
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.01).greedy
    assert make_generator(SamplingParams()) is None


def test_logit_bias_shifts_only_its_rows_tokens():
    logits = _logits(3)
    params = [SamplingParams(logit_bias={7: -100, 9: 2.5}), SamplingParams(), SamplingParams(logit_bias={7: 100})]
    out = process_logits(logits, params)
    expected = logits.clone()
    expected[0, 7] -= 100
    expected[0, 9] += 2.5
    expected[2, 7] += 100
    assert torch.equal(out, expected)
    assert pick_tokens(out, [SamplingParams(temperature=0)] * 3)[2] == 7  # +100 wins the argmax
    assert dataclasses.replace(params[0], max_new_tokens=3).logit_bias == ((7, -100), (9, 2.5))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        process_logits(logits, [SamplingParams(logit_bias={V: 1.0})] * 3)


def test_mismatched_batch_is_an_error():
    with pytest.raises(ValueError, match="rows"):
        process_logits(_logits(2), [SamplingParams()])
    with pytest.raises(ValueError, match="generators"):
        pick_tokens(_logits(2), [SamplingParams()] * 2, [None])
