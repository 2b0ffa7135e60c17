"""herd.post.rl_loss: advantages and the clipped surrogate against numbers worked out by hand (written out below, not
recomputed with the code's formula), zero-advantage groups giving exactly zero gradient and being dropped,
clip-higher's two bounds, token vs sequence normalisation, the k3 KL, and the importance weight being a no-op at
staleness 0.

Run: .venv/bin/python -m pytest tests/post/test_rl_loss.py -v
"""

from __future__ import annotations

import math

import pytest
import torch

from herd.post.rl_loss import (
    group_advantages,
    k3_kl,
    keep_informative,
    policy_loss,
    reward_stats,
    token_logprobs,
    zero_advantage_groups,
)


def test_group_advantages_by_hand_sample_std():
    # group [0, 2, 4]: mean 2, deviations -2 0 2, sample variance (4 + 0 + 4) / 2 = 4, std 2 -> -1 0 1.
    # (the population std would be sqrt(8/3) = 1.633, giving -1.2247 0 1.2247.)
    # group [3, 3, 3]: all equal -> 0.
    rewards = torch.tensor([[0.0, 2.0, 4.0], [3.0, 3.0, 3.0]])
    assert torch.allclose(group_advantages(rewards, eps=0.0), torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    # with TRL's eps = 1e-4: 2 / (2 + 1e-4) = 0.99995000...
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([-0.99995, 0.0, 0.99995]), atol=1e-7, rtol=0)
    # Dr. GRPO: no std scaling, -2 0 2
    assert torch.equal(group_advantages(rewards, scale="none"), torch.tensor([[-2.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


def test_group_advantages_flat_with_group_ids_of_different_sizes():
    # group 7: [0, 2, 4] (as above, -1 0 1); group 1: [5, 5] all equal; group 3: [1] alone -> 0
    rewards = torch.tensor([0.0, 5.0, 2.0, 5.0, 4.0, 1.0])
    ids = torch.tensor([7, 1, 7, 1, 7, 3])
    adv = group_advantages(rewards, ids, eps=0.0)
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
    # groups in sorted id order: 1 (flat), 3 (one sample: flat), 7
    assert zero_advantage_groups(rewards, ids).tolist() == [True, True, False]


def test_all_equal_group_has_exactly_zero_advantage():
    # mean of three 0.1s is 0.10000000000000002 in float64: without the explicit zeroing r - mean is -2.8e-17 and
    # dividing by eps = 1e-4 would leave a nonzero advantage.
    rewards = torch.tensor([[0.1, 0.1, 0.1]], dtype=torch.float64)
    assert rewards.mean() != 0.1  # the floating-point fact this test relies on
    assert torch.equal(group_advantages(rewards), torch.zeros(1, 3, dtype=torch.float64))
    assert torch.equal(group_advantages(rewards, scale="none"), torch.zeros(1, 3, dtype=torch.float64))


def test_reward_stats_frac_reward_zero_std():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    s = reward_stats(rewards)
    assert s["frac_reward_zero_std"] == 0.5
    assert s["reward_mean"] == 0.5
    # per-group sample std: 0, 0, sqrt(0.5), sqrt(0.5) -> mean sqrt(0.5) / 2
    assert s["reward_std"] == pytest.approx(math.sqrt(0.5) / 2)


def test_keep_informative_drops_flat_groups():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])  # only group 1 is informative
    batch = {"ids": torch.arange(6).view(6, 1), "text": ["a", "b", "c", "d", "e", "f"]}
    kept, keep = keep_informative(batch, rewards)
    assert keep.tolist() == [False, False, True, True, False, False]
    assert kept["ids"].flatten().tolist() == [2, 3]
    assert kept["text"] == ["c", "d"]
    with pytest.raises(ValueError, match="one row per answer"):
        keep_informative({"ids": torch.arange(4)}, rewards)


# Hand example for the surrogate: 2 answers, 3 tokens, old log-probs 0 so ratio = exp(logprobs).
# answer 0: A = +1, 3 valid tokens, ratios 1.0 1.1 1.5
# answer 1: A = -1, 2 valid tokens, ratios 0.5 0.9 (third token is padding, ratio 3.0, ignored)
# eps_low 0.2, eps_high 0.28 -> clip range [0.8, 1.28]
# answer 0: min(r, clip(r)) = 1.0 1.1 1.28 (1.5 clipped above) -> per-token loss -1.0 -1.1 -1.28, sum -3.38
# answer 1: min(-r, -clip(r)) = -0.8 -0.9 (0.5 clipped below) -> per-token loss 0.8 0.9, sum 1.7
# token norm:    (-3.38 + 1.7) / 5 = -0.336
# sequence norm: (-3.38 / 3 + 1.7 / 2) / 2 = (-1.1266667 + 0.85) / 2 = -0.13833333
RATIOS = [[1.0, 1.1, 1.5], [0.5, 0.9, 3.0]]


def _example():
    lp = torch.tensor(RATIOS).log().requires_grad_()
    return lp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_policy_loss_token_norm_by_hand():
    lp, old, adv, mask = _example()
    loss, stats = policy_loss(lp, old, adv, mask)
    assert loss.item() == pytest.approx(-0.336, abs=1e-6)
    # d loss / d logprob = -A * r / 5 where unclipped, 0 where clipped or padded:
    # answer 0: -1.0/5 -1.1/5 0 ; answer 1: 0 (clipped) +0.9/5 0 (pad)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.2, -0.22, 0.0], [0.0, 0.18, 0.0]]), atol=1e-6)
    assert stats["clip_high_frac"] == pytest.approx(0.2)  # 1.5 with A > 0, 1 of 5 valid tokens
    assert stats["clip_low_frac"] == pytest.approx(0.2)  # 0.5 with A < 0
    assert stats["clip_frac"] == pytest.approx(0.4)
    assert stats["ratio_mean"] == pytest.approx(1.0)  # (1 + 1.1 + 1.5 + 0.5 + 0.9) / 5, padding's 3.0 left out
    assert stats["loss"] == pytest.approx(-0.336, abs=1e-6)


def test_policy_loss_sequence_norm_by_hand_differs_from_token_norm():
    lp, old, adv, mask = _example()
    loss, _ = policy_loss(lp, old, adv, mask, norm="sequence")
    assert loss.item() == pytest.approx(-0.13833333, abs=1e-6)
    # gradient: answer 0's tokens weigh 1/(2*3), answer 1's 1/(2*2)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-1 / 6, -1.1 / 6, 0.0], [0.0, 0.9 / 4, 0.0]]), atol=1e-6)
    # equal lengths: the two normalisations agree
    full = torch.ones(2, 3)
    a, _ = policy_loss(lp, old, adv, full)
    b, _ = policy_loss(lp, old, adv, full, norm="sequence")
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    # an explicit divisor (a step split into micro-batches): sum -1.68 over 10 tokens
    c, _ = policy_loss(lp, old, adv, mask, denom=10)
    assert c.item() == pytest.approx(-0.168, abs=1e-6)


def test_clip_higher_bounds():
    # A > 0: 1.25 lies inside [0.8, 1.28] (a symmetric 0.2 clip would stop it), 1.3 lies beyond 1.28;
    # 0.5 is below the lower bound but A > 0, so the unclipped (smaller) branch is taken and still has a gradient.
    # A < 0: 0.85 inside, 0.75 beyond 0.8; 1.5 is above but A < 0, so again the unclipped branch.
    lp = torch.tensor([[1.25, 1.3, 0.5], [0.85, 0.75, 1.5]]).log().requires_grad_()
    loss, stats = policy_loss(lp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.ones(2, 3))
    loss.backward()
    g = lp.grad
    assert g[0, 1] == 0 and g[1, 1] == 0  # beyond each bound
    assert (g[0, [0, 2]] != 0).all() and (g[1, [0, 2]] != 0).all()
    assert stats["clip_high_frac"] == pytest.approx(1 / 6) and stats["clip_low_frac"] == pytest.approx(1 / 6)
    # the symmetric clip (eps_high = eps_low) does stop 1.25
    lp.grad = None
    policy_loss(lp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.ones(2, 3), eps_high=0.2)[0].backward()
    assert lp.grad[0, 0] == 0


def test_zero_advantage_group_gets_exactly_zero_gradient():
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.0, 1.0, 1.0]])  # group 0 flat (and not exactly-representable)
    adv = group_advantages(rewards).flatten()  # (6,)
    torch.manual_seed(0)
    lp = (torch.randn(6, 4) * 0.3).requires_grad_()
    old = lp.detach() + torch.randn(6, 4) * 0.3  # off-policy: ratios away from 1
    loss, _ = policy_loss(lp, old, adv, torch.ones(6, 4))
    loss.backward()
    assert torch.equal(lp.grad[:3], torch.zeros(3, 4))
    assert (lp.grad[3:] != 0).any()
    # and keep_informative drops exactly that group
    kept, keep = keep_informative({"lp": lp.detach()}, rewards)
    assert keep.tolist() == [False] * 3 + [True] * 3 and torch.equal(kept["lp"], lp.detach()[3:])


def test_k3_kl_by_hand_and_nonnegative():
    lp = torch.zeros(3)
    ref = torch.tensor([math.log(2), 0.0, -math.log(2)])
    # exp(d) - d - 1: d = ln 2 -> 2 - 0.6931472 - 1 = 0.3068528; d = 0 -> 0; d = -ln 2 -> 0.5 + 0.6931472 - 1
    assert torch.allclose(k3_kl(lp, ref), torch.tensor([0.3068528, 0.0, 0.1931472]), atol=1e-6)
    torch.manual_seed(0)
    a = torch.randn(10_000) * torch.logspace(-9, 1, 10_000)
    b = torch.randn(10_000) * torch.logspace(-9, 1, 10_000)
    assert (k3_kl(a, a + b) >= 0).all() and (k3_kl(a, b) >= 0).all()
    assert torch.equal(k3_kl(a, a), torch.zeros(10_000))


def test_kl_term_in_the_loss():
    # one token, A = 0: the loss is kl_coef * k3 = 0.1 * 0.3068528
    lp, old, adv, mask = torch.zeros(1, 1, requires_grad=True), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1)
    loss, stats = policy_loss(lp, old, adv, mask, ref_logprobs=torch.full((1, 1), math.log(2)), kl_coef=0.1)
    assert loss.item() == pytest.approx(0.03068528, abs=1e-7)
    assert stats["kl_mean"] == pytest.approx(0.3068528, abs=1e-6)
    # d/dlp [exp(ref - lp) - (ref - lp) - 1] = 1 - exp(ref - lp) = -1, times 0.1: the KL pulls lp towards ref
    loss.backward()
    assert lp.grad.item() == pytest.approx(-0.1, abs=1e-6)
    # ref == policy: KL 0 and no gradient from it
    lp.grad = None
    loss, stats = policy_loss(lp, old, adv, mask, ref_logprobs=lp.detach().clone(), kl_coef=0.1)
    loss.backward()
    assert loss.item() == 0 and stats["kl_mean"] == 0 and lp.grad.item() == 0
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, old, adv, mask, kl_coef=0.1)


def test_importance_weight_is_bitwise_noop_at_zero_staleness():
    torch.manual_seed(1)
    lp0 = torch.randn(4, 5) * 0.5
    old = lp0 + torch.randn(4, 5) * 0.2
    adv, mask = torch.randn(4), (torch.rand(4, 5) > 0.3).float()
    ref = lp0 + torch.randn(4, 5) * 0.1
    for norm in ("token", "sequence"):
        lp_a, lp_b = lp0.clone().requires_grad_(), lp0.clone().requires_grad_()
        a, _ = policy_loss(lp_a, old, adv, mask, ref_logprobs=ref, kl_coef=0.05, norm=norm)
        b, stats = policy_loss(lp_b, old, adv, mask, ref_logprobs=ref, kl_coef=0.05, norm=norm,
                               behaviour_logprobs=old.clone())
        a.backward(), b.backward()
        assert torch.equal(a, b) and torch.equal(lp_a.grad, lp_b.grad)
        assert stats["is_weight_mean"] == 1.0 and stats["is_truncated_frac"] == 0.0


def test_importance_weight_truncation_by_hand():
    # ratio 1 everywhere (lp = old = 0), A = 1, two tokens; old - behaviour = ln 3 and ln 0.5:
    # weights min(3, 2) = 2 and 0.5 -> loss -(2 * 1 + 0.5 * 1) / 2 = -1.25
    lp = torch.zeros(1, 2, requires_grad=True)
    behaviour = -torch.tensor([[math.log(3), math.log(0.5)]])
    loss, stats = policy_loss(lp, torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), behaviour_logprobs=behaviour)
    assert loss.item() == pytest.approx(-1.25, abs=1e-6)
    assert stats["is_weight_mean"] == pytest.approx(1.25) and stats["is_truncated_frac"] == 0.5
    loss.backward()  # the weight is a constant: the gradient is -A * r * w / 2
    assert torch.allclose(lp.grad, torch.tensor([[-1.0, -0.25]]), atol=1e-6)


def test_token_logprobs_aligned_labels():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0]]])  # (1, 2, 2): p = (1/2, 1/2), (3/4, 1/4)
    labels = torch.tensor([[-100, 1]])
    assert torch.allclose(token_logprobs(logits, labels), torch.tensor([[0.0, math.log(0.25)]]))


def test_bad_shapes_say_what_to_pass():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(6))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(2, 3), scale="batch")
