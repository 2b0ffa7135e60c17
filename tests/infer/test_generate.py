"""Generation with herd's KV cache against transformers' `generate`, and cache invariants.

Run: .venv/bin/python -m pytest tests/infer/test_generate.py -v
"""

from __future__ import annotations

import torch

import herd
from herd.model.cache import SLACK, KVCache
from tests.conftest import twin_models


def _cfg(**kw):
    return herd.preset("tiny", **kw)  # chunk 16, floor_scale 8: 48+ new tokens cross several chunks


def test_greedy_matches_transformers_generate_across_chunks():
    cfg = _cfg()
    ours, ref = twin_models(cfg, seed=5)
    prompt = torch.randint(3, cfg.vocab_size, (1, 21), generator=torch.Generator().manual_seed(5))
    n = 64
    assert 21 + n > 4 * cfg.attention_chunk_size
    expected = ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    got = herd.generate(ours, prompt, n)
    assert got.shape == (1, 21 + n)
    assert torch.equal(got, expected)


def test_left_padded_batch_generation_matches_transformers():
    cfg = _cfg(num_hidden_layers=4)
    ours, ref = twin_models(cfg, seed=6)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, cfg.vocab_size, (3, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :11] = 0
    ids = ids.masked_fill(mask == 0, 0)
    n = 50
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)
    got = herd.generate(ours, ids, n, attention_mask=mask)
    assert torch.equal(got, expected)


def test_cached_and_uncached_decoding_agree():
    cfg = _cfg(num_experts_per_tok=2)
    model = herd.build_model(cfg, seed=7).eval()
    prompt = torch.randint(3, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))
    a = herd.generate(model, prompt, 48, use_cache=True)
    b = herd.generate(model, prompt, 48, use_cache=False)
    assert torch.equal(a, b)


def test_incremental_logits_equal_full_forward():
    """Prefill in uneven pieces through the cache gives the same logits as one full forward."""
    cfg = _cfg()
    model = herd.build_model(cfg, seed=8).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(cfg)
        pieces = [model(ids[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 40), (40, 41), (41, 70))]
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-5


def test_chunked_layers_keep_at_most_chunk_positions():
    cfg = _cfg()
    model = herd.build_model(cfg, seed=9).eval()
    cache = KVCache(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 3 * cfg.attention_chunk_size + 5))
    C = cfg.attention_chunk_size
    with torch.no_grad():
        model(ids, cache=cache)
        for i in range(cfg.num_hidden_layers):  # the long prefill step may allocate what it needs for itself
            assert cache.capacity(i) >= ids.shape[1]
        for _t in range(20):
            model(ids[:, :1], cache=cache)
    for i in range(cfg.num_hidden_layers):
        if cfg.uses_rope(i):
            assert cache.length[i] == C - 1
            assert cache.capacity(i) <= C - 1 + SLACK  # and gives it back on the next step
        else:
            assert cache.length[i] == cache.seen == ids.shape[1] + 20


def test_a_long_decode_through_the_sliding_window_equals_the_full_forward():
    """One token at a time for many times the chunk and the slack: the chunked layers' window slides and is
    compacted again and again, the global layers' buffer doubles; logits equal one full forward all along."""
    cfg = _cfg(attention_chunk_size=8)
    model = herd.build_model(cfg, seed=11).eval()
    n = 3 * SLACK + 10
    ids = torch.randint(0, cfg.vocab_size, (2, n), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(cfg)
        steps = [model(ids[:, :3], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(3, n)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


def test_sampling_is_seeded_and_respects_eos():
    cfg = _cfg()
    model = herd.build_model(cfg, seed=10).eval()
    prompt = torch.randint(3, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(10))
    a = herd.generate(model, prompt, 20, temperature=0.8, top_k=50, top_p=0.9,
                      generator=torch.Generator().manual_seed(1))
    b = herd.generate(model, prompt, 20, temperature=0.8, top_k=50, top_p=0.9,
                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    first = int(herd.generate(model, prompt[:1], 1)[0, -1])
    stopped = herd.generate(model, prompt[:1], 20, eos_token_id=first)
    assert stopped.shape[1] == 6  # stopped right after emitting the end-of-sequence id


def test_vocab_limit_keeps_ids_beyond_the_tokenizer_out():
    """A model whose vocabulary is padded past its tokenizer's: with vocab_limit no step may pick an id above it,
    greedy or sampled, even where the padded rows score highest."""
    cfg = _cfg(vocab_size=4096)
    model = herd.build_model(cfg, seed=12).eval()
    with torch.no_grad():
        model.lm_head.weight[3000:] *= 50  # make the padded ids the model's favourites
    prompt = torch.randint(3, 2048, (2, 6), generator=torch.Generator().manual_seed(12))
    assert (herd.generate(model, prompt, 10)[:, 6:] >= 2048).any()  # the setup bites without the limit
    for temperature in (0.0, 1.0):
        out = herd.generate(model, prompt, 10, temperature=temperature, vocab_limit=2048,
                            generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 16) and int(out[:, 6:].max()) < 2048


def test_generate_samples_with_the_engines_sampler(capsys):
    """One sampler: herd.generate, `herd generate` and the serving engine draw the same tokens for the same settings
    (seed, top-k, top-p, min-p, penalties), and a seeded batch row i draws with seed + i, as a request's n choices."""
    from herd.cli import main
    from herd.infer.engine import Engine
    from herd.infer.sampling import SamplingParams
    from herd.tokenizer import tiny_tokenizer

    # what `herd generate --preset tiny --seed 7` builds: the tiny multimodal model, weights from seed 7
    model, tok = herd.build_model(herd.multimodal_preset("tiny"), seed=7).eval(), tiny_tokenizer()
    prompt = torch.randint(3, 900, (24,), generator=torch.Generator().manual_seed(14)).tolist()
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.2,
                            presence_penalty=0.3, frequency_penalty=0.2, seed=7, max_new_tokens=20, ignore_eos=True)
    engine = Engine(model, tok)
    served = [r.output_ids for r in engine.generate([prompt], params)]
    served.append(engine.generate([prompt], SamplingParams(**{**vars(params), "seed": 8}))[0].output_ids)
    alone = herd.generate(model, torch.tensor([prompt] * 2), 20, params=params)[:, 24:].tolist()
    assert alone == served and served[0] != served[1]
    assert main(["generate", "--preset", "tiny", "--seed", "7", "--prompt-ids", ",".join(map(str, prompt)),
                 "--max-new-tokens", "20", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--min-p",
                 "0.02", "--repetition-penalty", "1.2", "--presence-penalty", "0.3", "--frequency-penalty", "0.2",
                 "--device", "cpu"]) == 0
    assert f"new ids:    {served[0]}" in capsys.readouterr().out  # (no stop token among them: all 20 printed)
