"""herd.post.dpo_loss: the DPO loss against numbers worked out by hand, the direction of its gradient, how beta
scales it, label smoothing, and sequence log-probs against a manual gather.

Run: .venv/bin/python -m pytest tests/post/test_dpo_loss.py -v
"""

from __future__ import annotations

import math

import pytest
import torch

from herd.post.dpo_loss import dpo_loss, sequence_logprobs

# pair 0: pc -1, rc -2, pr -3, rr -2 -> z = (1) - (-1) = 2; beta 0.5 -> 1; -log sigmoid(1) = log(1 + e^-1) = 0.31326169
# pair 1: pc -2, rc -1, pr -1, rr -1 -> z = -1 - 0 = -1; beta 0.5 -> -0.5; log(1 + e^0.5) = 0.97407698
PC, PR, RC, RR = [-1.0, -2.0], [-3.0, -1.0], [-2.0, -1.0], [-2.0, -1.0]


def _pairs():
    return (torch.tensor(PC, requires_grad=True), torch.tensor(PR, requires_grad=True), torch.tensor(RC),
            torch.tensor(RR))


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = _pairs()
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx((0.31326169 + 0.97407698) / 2, abs=1e-6)
    # implicit rewards: chosen 0.5, -0.5; rejected -0.5, 0 -> margins 1.0, -0.5
    assert stats["reward_chosen"] == pytest.approx(0.0)
    assert stats["reward_rejected"] == pytest.approx(-0.25)
    assert stats["reward_margin"] == pytest.approx(0.25)
    assert stats["accuracy"] == 0.5


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr, rc, rr = _pairs()
    dpo_loss(pc, pr, rc, rr, beta=0.5)[0].backward()
    # d loss / d pc = -beta * sigmoid(-beta z) / B: pair 0 -0.5 * sigmoid(-1) / 2 = -0.5 * 0.26894142 / 2
    # pair 1: -0.5 * sigmoid(0.5) / 2 = -0.5 * 0.62245933 / 2; d / d pr is the opposite
    want = torch.tensor([-0.06723536, -0.15561483])
    assert torch.allclose(pc.grad, want, atol=1e-6) and torch.allclose(pr.grad, -want, atol=1e-6)
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected


def test_dpo_step_on_logits_moves_the_sequence_logprobs_the_right_way():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)  # answer 0 chosen, answer 1 rejected
    labels = torch.tensor([[-100, 1, 2, 3], [-100, 4, 0, -100]])
    ref = sequence_logprobs(logits.detach(), labels)
    before = sequence_logprobs(logits, labels)
    loss, _ = dpo_loss(before[:1], before[1:], ref[:1], ref[1:])
    loss.backward()
    with torch.no_grad():
        after = sequence_logprobs(logits - 1.0 * logits.grad, labels)
    assert after[0] > before[0] and after[1] < before[1]


def test_beta_scaling():
    # at policy == reference, z = 0: the loss is log 2 whatever beta, and the gradient on pc is -beta / 2 per pair
    for beta in (0.1, 0.2, 1.0):
        pc = torch.zeros(1, requires_grad=True)
        loss, stats = dpo_loss(pc, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=beta)
        loss.backward()
        assert loss.item() == pytest.approx(math.log(2))
        assert pc.grad.item() == pytest.approx(-beta / 2)
    # the implicit rewards and margin are linear in beta
    pc, pr, rc, rr = _pairs()
    s1 = dpo_loss(pc, pr, rc, rr, beta=0.1)[1]
    s2 = dpo_loss(pc, pr, rc, rr, beta=0.2)[1]
    assert s2["reward_margin"] == pytest.approx(2 * s1["reward_margin"])
    # on a pair already right (z = 2) a larger beta gives a smaller loss: log(1 + e^-0.2) vs log(1 + e^-2)
    a = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.1)[0].item()
    b = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=1.0)[0].item()
    assert a == pytest.approx(0.59813887, abs=1e-6) and b == pytest.approx(0.12692801, abs=1e-6)


def test_label_smoothing_by_hand():
    # pair 0 at beta 0.5 (beta z = 1), eps 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    # = 0.9 * 0.31326169 + 0.1 * 1.31326169 = 0.41326169
    pc, pr, rc, rr = _pairs()
    loss, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.41326169, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_sequence_logprobs_equals_manual_gather():
    # labels are aligned (already shifted): labels[b, t] is scored by logits[b, t]; -100 positions contribute 0
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [0.0, 0.0, math.log(6)]],
                           [[math.log(3), 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # (2, 3, 3)
    labels = torch.tensor([[-100, 0, 2], [1, -100, -100]])
    # row 0: p(0) at t=1 = 2/4, p(2) at t=2 = 6/8 -> log(1/2) + log(3/4); row 1: p(1) at t=0 = 1/5
    want = torch.tensor([math.log(0.5) + math.log(0.75), math.log(0.2)])
    assert torch.allclose(sequence_logprobs(logits, labels), want, atol=1e-6)
    manual = torch.stack([logits[0].log_softmax(-1)[1, 0] + logits[0].log_softmax(-1)[2, 2],
                          logits[1].log_softmax(-1)[0, 1]])
    assert torch.allclose(sequence_logprobs(logits, labels), manual, atol=1e-6)
    with pytest.raises(ValueError, match="share"):
        sequence_logprobs(logits, labels[:, :2])
