"""MoE load balancing: the aux-loss-free bias update evens out a skewed router; the Switch aux loss is transformers'."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.train.balance import expert_loads, routers, switch_aux_loss, update_biases

pytestmark = pytest.mark.usefixtures("one_thread")


def skewed_model(seed: int = 0, push: float = 4.0):
    """Tiny model whose routers all favour expert 0: its weight row gets a big component along the mean router
    input, so most tokens' top-1 is expert 0."""
    model = herd.build_model(herd.preset("tiny"), seed=seed).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed))
    inputs = []
    hooks = [r.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for r in routers(model)]
    with torch.no_grad():
        model(ids)
        for h in hooks:
            h.remove()
        for r, x in zip(routers(model), inputs, strict=True):
            u = x.mean(0)
            r.weight[0] += push * u / u.norm() ** 2  # + push on expert 0's logit for the average token
    return model, ids


def test_expert_loads_counts_the_forward_selection():
    model, ids = skewed_model()
    with torch.no_grad():
        logits, router_logits = model(ids, return_router_logits=True)
    loads = expert_loads(model, router_logits)
    assert loads.shape == (len(routers(model)), model.config.num_local_experts)
    assert torch.all(loads.sum(1) == ids.numel() * model.config.num_experts_per_tok)
    # a big bias on one expert moves all traffic there: the bias takes part in selection
    r = routers(model)[0]
    r.expert_bias[2] = 1e3
    assert expert_loads(model, router_logits)[0, 2] == ids.numel()


def test_bias_update_moves_load_toward_uniform():
    model, ids = skewed_model()

    def loads():
        with torch.no_grad():
            _, router_logits = model(ids, return_router_logits=True)
        return expert_loads(model, router_logits)

    before = loads()
    mean = before.mean(1, keepdim=True)
    assert (before.max(1).values / mean[:, 0]).min() > 2.5, before  # the skew is real: expert 0 dominates
    for _ in range(100):  # fixed weights, fixed inputs: only the biases move (balanced after ~60 steps)
        update_biases(model, loads(), rate=0.05)
    after = loads()
    spread_before = (before.max(1).values / before.min(1).values.clamp(min=1)).max()
    spread_after = (after.max(1).values / after.min(1).values.clamp(min=1)).max()
    assert spread_after < 2.5 and spread_after < spread_before / 20, (before, after)
    for r in routers(model):  # the centred update keeps the biases summing to zero
        assert abs(float(r.expert_bias.sum())) < 1e-4


def test_update_is_sign_rule_and_centred():
    model = herd.build_model(herd.preset("tiny"), seed=0)
    loads = torch.tensor([[10.0, 0.0, 5.0, 5.0]]).repeat(len(routers(model)), 1)
    update_biases(model, loads, rate=0.1)
    # sign(mean - n) = [-1, +1, 0, 0], minus its mean (0)
    torch.testing.assert_close(routers(model)[0].expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    # loads [9, 1, 1, 1]: sign(3 - n) = [-1, 1, 1, 1], centred to [-1.5, .5, .5, .5], times 0.1, added
    update_biases(model, torch.tensor([[9.0, 1.0, 1.0, 1.0]]).repeat(len(routers(model)), 1), rate=0.1)
    torch.testing.assert_close(routers(model)[0].expert_bias, torch.tensor([-0.25, 0.15, 0.05, 0.05]))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_switch_aux_loss_matches_transformers(top_k, masked):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(top_k)
    B, T, E = 3, 7, 8
    logits = tuple(torch.randn(B * T, E, generator=g) * 2 for _ in range(4))
    mask = (torch.rand(B, T, generator=g) > 0.3).long() if masked else None
    ref = load_balancing_loss_func(logits, E, top_k, mask)
    ours = switch_aux_loss(list(logits), top_k, E, attention_mask=mask)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_switch_aux_loss_is_minimal_when_balanced_and_differentiable():
    E = 4
    balanced = [torch.eye(E).repeat(8, 1) * 5]  # every expert wins 8 rows
    skewed = [torch.tensor([5.0, 0, 0, 0]).repeat(32, 1).requires_grad_()]
    assert float(switch_aux_loss(balanced, 1, E)) < float(switch_aux_loss(skewed, 1, E).detach())
    switch_aux_loss(skewed, 1, E).backward()
    assert skewed[0].grad[:, 0].mean() > 0  # gradient descent lowers the overloaded expert's logit
