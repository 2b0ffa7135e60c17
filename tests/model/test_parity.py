"""Logit parity with transformers' Llama4ForCausalLM in float32 (max |diff| <= 1e-5) on tiny random configs.

Together the configs cover: Scout-like (all MoE, QK-norm, llama3 RoPE scaling) and Maverick-like (interleaved
dense/MoE, no QK-norm); top-1 and top-2 routing; sequences spanning several attention chunks; temperature tuning
live (small floor_scale); a left-padded batch with an attention mask; head_dim != hidden / heads; a llama3 blend
band; explicit layer lists; tied embeddings. Run: .venv/bin/python -m pytest tests/model/test_parity.py -v
"""

from __future__ import annotations

import pytest
import torch

import herd
from tests.conftest import twin_models

TOL = 1e-5

CONFIGS = {
    "scout-like": herd.TextConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=48, intermediate_size_mlp=96, num_local_experts=4, use_qk_norm=True,
        attention_chunk_size=16, floor_scale=8, rope_theta=10000.0,
        rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                          original_max_position_embeddings=64)),
    "maverick-like-top2": herd.TextConfig(
        vocab_size=384, hidden_size=48, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
        head_dim=16, intermediate_size=40, intermediate_size_mlp=80, num_local_experts=6, num_experts_per_tok=2,
        interleave_moe_layer_step=2, use_qk_norm=False, attention_chunk_size=8, floor_scale=4, rope_theta=10000.0),
    "blend-band-top2": herd.TextConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        head_dim=24, intermediate_size=24, intermediate_size_mlp=40, num_local_experts=5, num_experts_per_tok=2,
        attention_chunk_size=12, floor_scale=6, rope_theta=500.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32)),
    "explicit-layers-tied": herd.TextConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4,
        head_dim=8, intermediate_size=24, intermediate_size_mlp=40, num_local_experts=3, moe_layers=[0, 3, 4],
        no_rope_layers=[1, 0, 1, 1, 0], attention_chunk_size=10, floor_scale=5, attn_scale=0.5,
        tie_word_embeddings=True, rope_theta=10000.0),
}


def _compare(cfg, ids, mask=None, rows=None):
    ours, ref = twin_models(cfg)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, output_router_logits=True)
        got, router = ours(ids, attention_mask=mask, return_router_logits=True)
    assert got.shape == expected.logits.shape
    diff = (got - expected.logits).abs().max().item()
    assert diff <= TOL, f"max |logit diff| {diff:.3g} > {TOL}"
    assert len(router) == len(expected.router_logits) == len(cfg.moe_layers)
    for a, b in zip(router, expected.router_logits, strict=False):
        assert (a - b).abs().max().item() <= TOL
    return got


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    cfg = CONFIGS[name]
    T = 5 * cfg.attention_chunk_size + 3  # several chunks, and temperature tuning past floor_scale
    assert T > 3 * cfg.attention_chunk_size and T > 2 * cfg.floor_scale
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    _compare(cfg, ids)


@pytest.mark.parametrize("name", ["scout-like", "maverick-like-top2"])
def test_left_padded_batch_matches_transformers(name):
    cfg = CONFIGS[name]
    T = 4 * cfg.attention_chunk_size + 5
    ids = torch.randint(0, cfg.vocab_size, (3, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :7] = 0  # left padding that shifts chunk alignment
    mask[2, : cfg.attention_chunk_size + 1] = 0
    _compare(cfg, ids, mask)


def test_parity_checks_are_sensitive():
    """The comparison above must notice a wrong temperature, chunk size or QK-norm (it is not vacuous)."""
    cfg = CONFIGS["scout-like"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (1, 5 * cfg.attention_chunk_size), generator=g)
    ours, ref = twin_models(cfg)
    with torch.no_grad():
        expected = ref(ids).logits
    for change in (dict(floor_scale=8192), dict(attention_chunk_size=4096), dict(use_qk_norm=False),
                   dict(rope_scaling=None)):
        wrong = herd.build_model(cfg.replace(**change))
        wrong.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert (wrong(ids) - expected).abs().max().item() > 1e-4, change


def test_moe_scales_expert_input_not_output():
    """Top-1 MoE output equals shared(x) + expert(sigmoid(logit) * x), computed here by hand."""
    cfg = CONFIGS["scout-like"]
    ours = herd.build_model(cfg, seed=4)
    moe = ours.model.layers[0].feed_forward
    x = torch.randn(7, cfg.hidden_size)
    with torch.no_grad():
        out, logits = moe(x)
        e = logits.argmax(-1)
        w = torch.sigmoid(logits.gather(1, e[:, None]))
        by_hand = moe.shared_expert(x) + torch.stack([moe.experts.expert(int(e[i]), (w[i] * x[i])[None])[0]
                                                      for i in range(7)])
    assert torch.allclose(out, by_hand, atol=1e-6)


# the grouped path runs where torch has the kernel: float32 on CPU, and bfloat16 on a Hopper GPU when one is present
GROUPED_CASES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,dtype", GROUPED_CASES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_experts_equal_the_loop(monkeypatch, top_k, device, dtype):
    """The grouped matmul path (all experts in two calls) and the per-expert loop give the same output and gradients,
    also with experts that get no token."""
    from herd.model import moe as moe_module

    cfg = CONFIGS["scout-like"].replace(num_local_experts=8, num_experts_per_tok=top_k)
    moe = herd.build_model(cfg, seed=4, dtype=dtype, device=device).model.layers[0].feed_forward
    x = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    assert moe_module.grouped_mm_ok(x)  # the grouped path is the one tested here
    runs = []
    for grouped in (True, False):
        monkeypatch.setattr(moe_module, "grouped_mm_ok", lambda t, g=grouped: g)
        xg = x.clone().requires_grad_(True)
        out, logits = moe(xg)
        out.float().square().sum().backward()
        runs.append((out.detach(), xg.grad, moe.experts.gate_up_proj.grad.clone(), moe.experts.down_proj.grad.clone()))
        moe.zero_grad()
    assert len(set(logits.topk(top_k).indices.flatten().tolist())) < cfg.num_local_experts  # some expert idle
    for a, b in zip(*runs, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:  # bfloat16: the kernels accumulate in different orders, so compare relative norms
            assert float((a.float() - b.float()).norm() / b.float().norm()) < 1e-2
