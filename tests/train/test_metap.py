"""MetaP rules: identity at the base shape, the documented multipliers away from it, and the coordinate check."""

from __future__ import annotations

import math

import pytest
import torch

import herd
from herd.train.metap import coord_check, init_, param_groups, role, scale_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scale_config_widens_heads_and_ffn_at_fixed_head_dim():
    base = herd.preset("tiny")
    cfg = scale_config(base, 256, depth=8)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (256, 16, 8, 32)
    assert (cfg.intermediate_size, cfg.intermediate_size_mlp, cfg.num_hidden_layers) == (384, 768, 8)
    assert len(cfg.no_rope_layers) == 8 and cfg.moe_layers == list(range(8))
    with pytest.raises(ValueError, match="integer"):
        scale_config(base, 40)


def test_every_parameter_has_a_role():
    for cfg in (herd.preset("tiny"), herd.preset("tiny-maverick"), herd.multimodal_preset("tiny")):
        model = herd.build_model(cfg, device="meta")
        roles = {role(n) for n, _ in model.named_parameters()}
        assert {"embedding", "hidden_in", "hidden_out", "router", "readout", "block_norm", "final_norm"} <= roles
    assert role("language_model.model.layers.3.feed_forward.experts.down_proj") == "hidden_out"
    assert role("model.layers.0.feed_forward.shared_expert.gate_proj.weight") == "hidden_in"
    assert role("vision_model.model.layers.0.mlp.fc1.weight") == "vision"


def test_base_shape_is_the_standard_parametrization():
    model = herd.build_model(herd.preset("tiny"), seed=3)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    init_(model, base_width=64, base_depth=4, seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k  # same draws, same order as init_weights
    groups = param_groups(model, lr=3e-3, weight_decay=0.1, base_width=64, base_depth=4)
    assert {g["lr"] for g in groups} == {3e-3}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.1}  # norms undecayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_multipliers_away_from_the_base():
    cfg = scale_config(herd.preset("tiny"), 256, depth=16)  # m = 4, d = 4 relative to (64, 4)
    model = init_(herd.build_model(cfg, seed=0), base_width=64, base_depth=4, seed=0)
    lr, wd = 1e-2, 0.1
    groups = {g["role"]: g for g in param_groups(model, lr, wd, base_width=64, base_depth=4)}
    expect = {"embedding": 1, "hidden_in": 1 / 8, "hidden_out": 1 / 16, "router": 1 / 8, "readout": 1 / 4,
              "block_norm": 1 / 2, "final_norm": 1}
    for r, mult in expect.items():
        assert groups[r]["lr"] == pytest.approx(lr * mult), r
        if not r.endswith("norm"):  # the decay per step, lr * wd, is the same everywhere
            assert groups[r]["lr"] * groups[r]["weight_decay"] == pytest.approx(lr * wd), r
    sigma = cfg.initializer_range
    layer = model.model.layers[0]
    for p, std in ((model.model.embed_tokens.weight, sigma), (layer.self_attn.q_proj.weight, sigma / 2),
                   (layer.self_attn.o_proj.weight, sigma / 4), (layer.feed_forward.experts.down_proj, sigma / 4),
                   (layer.feed_forward.router.weight, sigma / 4), (model.lm_head.weight, sigma / 4)):
        assert float(p.detach().std()) == pytest.approx(std, rel=0.1)
    opt = torch.optim.AdamW(list(groups.values()), lr=lr)  # torch accepts the groups (extra keys kept)
    assert math.isclose(opt.param_groups[0]["lr_mult"], groups[opt.param_groups[0]["role"]]["lr_mult"])


def test_coord_check_flat_with_herd_rules_growing_with_standard():
    """After 4 AdamW steps at lr 1e-2, activations at widths 64/128/256: flat under herd's rules; under SP the
    hidden updates (~lr per entry, correlated) grow the branch outputs about linearly in width."""
    widths = (64, 128, 256)
    ours = coord_check(widths, steps=4, parametrization="herd", lr=1e-2)
    sp = coord_check(widths, steps=4, parametrization="standard", lr=1e-2)

    def spread(res, key):
        vals = [res[w][key] for w in widths]
        return max(vals) / min(vals)

    for key in ("embed", "attn", "residual", "logits"):
        assert spread(ours, key) < 1.6, (key, ours)
    assert spread(ours, "ffn") < 3.0, ours  # the MoE output is noisier (routing flips), but does not trend
    for key in ("attn", "ffn", "residual"):
        growth = sp[256][key] / sp[64][key]
        assert growth > 5.0, (key, sp)
        assert growth > 3 * ours[256][key] / ours[64][key], key
    assert sp[256]["logits"] / sp[64]["logits"] > 2.0
