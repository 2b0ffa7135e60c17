"""The continuous-batching engine: equal to transformers' generate, batching that changes nothing, bounded chunked
caches, cancellation, stop strings, logprobs.

The tiny preset has 16-token attention chunks and temperature tuning from position 8 on (floor_scale 8), so every
test here crosses chunk boundaries and depends on positions being each row's own.
Run: .venv/bin/python -m pytest tests/infer/test_engine.py -v
"""

from __future__ import annotations

import pytest
import torch

import herd
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams
from herd.model.cache import SLACK
from herd.tokenizer import tiny_tokenizer
from tests.conftest import image_request, twin_models

GREEDY = dict(temperature=0.0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _prompts(cfg, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 900, (n,), generator=g).tolist() for n in lengths]


def test_one_request_equals_transformers_generate(tok):
    cfg = herd.preset("tiny")
    ours, ref = twin_models(cfg, seed=5)
    prompt = _prompts(cfg, [21])[0]
    n = 60
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)[0, 21:].tolist()
    req = Engine(ours, tok, prefill_chunk=8).generate([prompt], SamplingParams(max_new_tokens=n, **GREEDY))[0]
    assert req.output_ids == expected and req.finish_reason == "length"


def test_mixed_batch_equals_transformers_left_padded_generate(tok):
    """transformers batches by left padding, with temperature at padded positions: equal where it is still 1."""
    cfg = herd.preset("tiny", floor_scale=4096)
    ours, ref = twin_models(cfg, seed=6)
    prompts = _prompts(cfg, [19, 15, 8], seed=6)
    n = 40
    ids = torch.zeros(3, 19, dtype=torch.long)
    mask = torch.zeros(3, 19, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, 19 - len(p):], mask[r, 19 - len(p):] = torch.tensor(p), 1
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)[:, 19:]
    reqs = Engine(ours, tok).generate(prompts, SamplingParams(max_new_tokens=n, **GREEDY))
    assert [r.output_ids for r in reqs] == expected.tolist()


def test_batching_and_joining_change_nothing(tok):
    """Requests of different lengths joining a running batch at different steps give what each gives alone."""
    cfg = herd.preset("tiny")
    model = herd.build_model(cfg, seed=7).eval()
    prompts = _prompts(cfg, [5, 23, 40, 9, 31, 17], seed=7)
    settings = [SamplingParams(max_new_tokens=30 + 3 * i, **GREEDY) for i in range(4)] + \
               [SamplingParams(max_new_tokens=35, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True),
                SamplingParams(max_new_tokens=25, temperature=1.2, top_k=20, repetition_penalty=1.3, seed=3,
                               ignore_eos=True)]
    alone = [Engine(model, tok).generate([p], s)[0].output_ids for p, s in zip(prompts, settings, strict=True)]
    engine = Engine(model, tok, prefill_chunk=16)
    reqs = [engine.submit(p, s) for p, s in zip(prompts[:3], settings[:3], strict=True)]
    for _ in range(7):
        engine.step()
    reqs += [engine.submit(p, s) for p, s in zip(prompts[3:], settings[3:], strict=True)]
    engine.run()
    assert [r.output_ids for r in reqs] == alone
    assert engine.layout.cache is None and not engine.running  # everything finished and freed


def test_waiting_requests_join_once_enough_rows_are_free(tok):
    """With admit_fraction 0.5 of 4 rows, two waiting requests wait for two free rows, then join in one prefill pass;
    a lone waiting request joins as soon as one row is free; the tokens are each request's own."""
    cfg = herd.preset("tiny")
    model = herd.build_model(cfg, seed=9)
    prompts = _prompts(cfg, [6, 11, 8, 14, 5, 9, 12], seed=9)
    lengths = [3, 6, 20, 20, 10, 10, 4]
    params = [SamplingParams(max_new_tokens=n, **GREEDY) for n in lengths]
    alone = [Engine(model, tok).generate([p], s)[0].output_ids for p, s in zip(prompts, params, strict=True)]
    engine = Engine(model, tok, max_batch=4, admit_fraction=0.5)
    admitted = []
    real_admit = engine._admit
    engine._admit = lambda reqs: (admitted.append([prompts.index(r.prompt_ids) for r in reqs]), real_admit(reqs))
    reqs = [engine.submit(p, s) for p, s in zip(prompts[:6], params[:6], strict=True)]
    for _ in range(4):  # request 0 ends after its 3rd token: one row free, two waiting -> not yet
        engine.step()
    assert admitted == [[0, 1, 2, 3]] and len(engine.running) == 3 and len(engine.waiting) == 2
    for _ in range(3):  # request 1 ends too: both waiting requests join together
        engine.step()
    assert admitted == [[0, 1, 2, 3], [4, 5]] and len(engine.running) == 4
    while len(engine.running) == 4:
        engine.step()
    reqs.append(engine.submit(prompts[6], params[6]))  # alone in the queue, and a row is free: it joins at once
    engine.step()
    assert admitted[-1] == [6]
    engine.run()
    assert [r.output_ids for r in reqs] == alone
    with pytest.raises(ValueError, match="admit_fraction"):
        Engine(model, tok, admit_fraction=1.5)


@pytest.mark.parametrize("prefill_tokens", [4096, 100])  # one group of four; groups split by the token budget
def test_prompts_prefilled_together_equal_each_alone(tok, prefill_tokens):
    """Waiting requests are prefilled as one left-padded batch in pieces: with pieces of 16 positions the short
    prompts' first pieces are all padding, and the chunk rule, RoPE and temperature must still follow each row."""
    # temperature scaling from position 3 on, and a NoPE layer (3) with layers after it: real positions matter
    cfg = herd.preset("tiny", floor_scale=4, num_hidden_layers=8, initializer_range=0.2)  # sharp attention
    model = herd.build_model(cfg, seed=14)
    prompts = _prompts(cfg, [3, 40, 17, 90], seed=14)
    params = SamplingParams(max_new_tokens=24, **GREEDY)
    alone = [Engine(model, tok).generate([p], params)[0].output_ids for p in prompts]
    engine = Engine(model, tok, prefill_chunk=16, prefill_tokens=prefill_tokens)
    assert [r.output_ids for r in engine.generate(prompts, params)] == alone


def test_chunked_layers_stay_bounded_on_a_long_generation(tok):
    cfg = herd.preset("tiny")
    engine = Engine(herd.build_model(cfg, seed=8), tok)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=120 - 30 * i, **GREEDY))
            for i, p in enumerate(_prompts(cfg, [12, 30, 3], seed=8))]
    widest = 0
    while engine.busy:
        engine.step()
        if engine.layout.cache is not None:
            for i, chunked in enumerate(engine.layout.cache.chunked):
                if chunked:
                    widest = max(widest, engine.layout.cache.length[i])
                    assert engine.layout.cache.length[i] <= cfg.attention_chunk_size - 1
                    assert engine.layout.cache.capacity(i) <= cfg.attention_chunk_size - 1 + SLACK  # allocated, too
    assert widest == cfg.attention_chunk_size - 1  # it filled up to the bound and no further
    assert [len(r.output_ids) for r in reqs] == [120, 90, 60]


def test_cancel_frees_the_row_at_once_also_from_a_callback(tok):
    cfg = herd.preset("tiny")
    engine = Engine(herd.build_model(cfg, seed=9), tok)
    prompts = _prompts(cfg, [6, 14, 10], seed=9)
    seen = []

    def stop_after_three(req, text):
        seen.append(text)
        if len(req.output_ids) == 3:
            engine.cancel(req)

    a = engine.submit(prompts[0], SamplingParams(max_new_tokens=50, **GREEDY))
    b = engine.submit(prompts[1], SamplingParams(max_new_tokens=50, **GREEDY), on_delta=stop_after_three)
    c = engine.submit(prompts[2], SamplingParams(max_new_tokens=50, **GREEDY))
    for _ in range(5):
        engine.step()
    assert b.finish_reason == "cancelled" and len(b.output_ids) == 3 and b not in engine.running
    engine.cancel(a)
    assert a.finish_reason == "cancelled" and engine.running == [c] and engine.layout.cache.k[0].shape[0] == 1
    engine.run()
    assert c.finish_reason == "length" and len(c.output_ids) == 50
    assert c.output_ids == Engine(engine.model, tok).generate([prompts[2]], c.params)[0].output_ids


def test_stop_strings_eos_and_logprobs(tok):
    cfg = herd.preset("tiny")
    model = herd.build_model(cfg, seed=10)
    free = Engine(model, tok).generate([_prompts(cfg, [8], seed=10)[0]], SamplingParams(max_new_tokens=40,
                                                                                         **GREEDY))[0]
    stop = free.text[5:9]  # a string the model is known to produce
    params = SamplingParams(max_new_tokens=40, stop=[stop], logprobs=True, top_logprobs=3, **GREEDY)
    req = Engine(model, tok).generate([_prompts(cfg, [8], seed=10)[0]], params)[0]
    assert req.finish_reason == "stop" and req.text == free.text[:free.text.index(stop)]
    assert len(req.logprobs) == len(req.output_ids)
    first = req.logprobs[0]
    assert first["token"] == first["top"][0][0] and len(first["top"]) == 3  # greedy picks the most likely
    assert first["logprob"] <= 0
    with pytest.raises(ValueError, match="the model's context is 4096"):
        Engine(model, tok).submit(list(range(3, 4099)))


def test_an_image_request_in_a_batch_equals_generate_alone(tok):
    cfg = herd.multimodal_preset("tiny")
    model = herd.build_model(cfg, seed=11).eval()
    ids, pixels, expected = image_request(model, tok, 25)
    engine = Engine(model, tok, prefill_chunk=8)  # the image prompt is prefilled whole; the text one in pieces
    text_req = engine.submit(_prompts(cfg.text_config, [30], seed=11)[0], SamplingParams(max_new_tokens=30, **GREEDY))
    engine.step()
    image_req = engine.submit(ids, SamplingParams(max_new_tokens=25, **GREEDY), pixel_values=pixels)
    engine.run()
    assert image_req.output_ids == expected and len(text_req.output_ids) == 30
    with pytest.raises(ValueError, match="text-only model"):
        Engine(herd.build_model(cfg.text_config, seed=0), tok).submit(ids, pixel_values=pixels)


def test_a_padded_vocabulary_never_yields_ids_the_tokenizer_lacks(tok):
    cfg = herd.preset("tiny", vocab_size=4096)  # the tokenizer has 2048 ids
    model = herd.build_model(cfg, seed=12)
    with torch.no_grad():
        model.lm_head.weight[2048:] *= 50  # make the padding ids the most likely ones
    reqs = Engine(model, tok).generate(_prompts(cfg, [10, 20], seed=12), SamplingParams(max_new_tokens=20, **GREEDY))
    assert all(0 <= t < tok.vocab_size for r in reqs for t in r.output_ids) and all(len(r.output_ids) == 20
                                                                                   for r in reqs)


def test_image_placeholders_are_refused_without_images_and_never_generated(tok):
    """A multimodal model: a prompt holding <|patch|> ids but no image is refused at once; a generated <|patch|> (it
    would have no image feature behind it) can never happen, even when the model favours it; and a request whose
    input fails inside the model ends alone with "error" while the batch goes on."""
    cfg = herd.multimodal_preset("tiny")
    model = herd.build_model(cfg, seed=13).eval()
    patch = cfg.image_token_index

    def favour_patch(module, inputs, logits):  # the model's favourite token, whatever the input
        logits[..., patch] += 100.0
        return logits

    model.language_model.lm_head.register_forward_hook(favour_patch)
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="image placeholder tokens"):
        engine.submit([5, 6, patch, 7])
    prompts = _prompts(cfg.text_config, [9, 14], seed=13)
    assert int(model(torch.tensor(prompts[:1]))[0, -1].argmax()) == patch  # the setup bites
    assert herd.generate(model, torch.tensor(prompts[:1]), 1)[0, -1] != patch  # banned in herd.generate too
    good = engine.submit(prompts[0], SamplingParams(max_new_tokens=12, **GREEDY))
    engine.step()
    bad = engine.request(prompts[1], SamplingParams(max_new_tokens=12, **GREEDY))
    bad.prompt_ids.append(patch)  # slipped past the check: the model itself raises when it is admitted
    engine.add(bad)
    engine.run()
    assert bad.finish_reason == "error" and "no pixel_values" in bad.error and not bad.output_ids
    assert good.finish_reason == "length" and patch not in good.output_ids and len(good.output_ids) == 12
