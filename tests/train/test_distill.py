"""Distillation loss math: KL(teacher || student) at temperature tau, tau^2 scaling, masking, alpha schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from herd.train.distill import alpha_at, distill_loss

B, T, V = 2, 5, 11


def logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def labels(seed: int = 9) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_kl_is_zero_when_student_equals_teacher_and_loss_reduces_to_ce():
    z, y = logits(0), labels()
    loss, parts = distill_loss(z, z.clone(), y, alpha=0.7, tau=2.0)
    assert abs(float(parts["kl"])) < 1e-12
    ce = F.cross_entropy(z.reshape(-1, V), y.reshape(-1))
    torch.testing.assert_close(loss, 0.3 * ce.float())  # only the hard term is left, computed in float32


def test_kl_matches_the_definition():
    s, t, y, tau = logits(0), logits(1), labels(), 1.7
    pt = torch.softmax(t / tau, -1)
    ref = (pt * (torch.log_softmax(t / tau, -1) - torch.log_softmax(s / tau, -1))).sum(-1).mean()
    loss, parts = distill_loss(s, t, y, alpha=1.0, tau=tau)
    torch.testing.assert_close(parts["kl"], ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, tau**2 * ref.float(), rtol=1e-5, atol=1e-6)  # alpha=1: soft term only
    assert float(parts["kl"]) > 0


def test_gradient_pulls_student_toward_teacher():
    s, t, y, tau = logits(0).float().requires_grad_(), logits(1).float(), labels(), 2.0
    loss, _ = distill_loss(s, t, y, alpha=1.0, tau=tau)
    loss.backward()
    # d/ds of tau^2 * mean KL = tau * (p_S - p_T) / N: descent moves p_S toward p_T
    expected = tau * (torch.softmax(s.detach() / tau, -1) - torch.softmax(t / tau, -1)) / (B * T)
    torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # one small step lowers the KL
        _, before = distill_loss(s, t, y, 1.0, tau)
        _, after = distill_loss(s - 0.5 * s.grad, t, y, 1.0, tau)
    assert float(after["kl"]) < float(before["kl"])


def test_tau_squared_keeps_soft_gradient_scale():
    """Hinton's reason for tau^2: at high tau the soft-term gradient stays O(1) instead of shrinking like 1/tau^2."""
    s, t, y = logits(0, scale=0.5).float(), logits(1, scale=0.5).float(), labels()
    norms = {}
    for tau in (4.0, 8.0):
        x = s.clone().requires_grad_()
        distill_loss(x, t, y, alpha=1.0, tau=tau)[0].backward()
        norms[tau] = x.grad.norm()
    # for logits small against tau, grad ~ (z_S - z_T) / (V tau) * tau^2 / tau = O(1): the ratio stays near 1
    assert 0.9 < float(norms[8.0] / norms[4.0]) < 1.1
    # the reported KL is the unscaled one: without tau^2 the gradient would have fallen by (8/4)^2
    loss, parts = distill_loss(s, t, y, alpha=1.0, tau=8.0)
    torch.testing.assert_close(loss, 64.0 * parts["kl"])


def test_masked_tokens_are_ignored():
    s, t, y = logits(0), logits(1), labels()
    y_masked = y.clone()
    y_masked[0, 2:] = -100
    keep = y_masked != -100
    loss, parts = distill_loss(s, t, y_masked, alpha=0.4, tau=1.5)
    # same as the loss on the kept tokens alone
    loss_kept, parts_kept = distill_loss(s[keep][None], t[keep][None], y[keep][None], alpha=0.4, tau=1.5)
    torch.testing.assert_close(loss, loss_kept)
    torch.testing.assert_close(parts["ce"], parts_kept["ce"])
    # changing logits at masked positions changes nothing
    s2, t2 = s.clone(), t.clone()
    s2[0, 3] += 10
    t2[0, 4] -= 10
    torch.testing.assert_close(distill_loss(s2, t2, y_masked, 0.4, 1.5)[0], loss)
    # an all-masked batch gives a zero that backward() accepts
    x = s.clone().float().requires_grad_()
    zero, _ = distill_loss(x, t, torch.full_like(y, -100), 0.5, 1.0)
    zero.backward()
    assert float(zero.detach()) == 0.0 and float(x.grad.abs().sum()) == 0.0


def test_teacher_gets_no_gradient():
    s, t = logits(0).float().requires_grad_(), logits(1).float().requires_grad_()
    distill_loss(s, t, labels(), alpha=0.5, tau=2.0)[0].backward()
    assert t.grad is None and s.grad is not None


def test_alpha_schedules():
    assert alpha_at(0, 100, "constant", start=0.3) == 0.3 == alpha_at(100, 100, "constant", start=0.3)
    assert alpha_at(0, 100, "linear", 0.9, 0.1) == pytest.approx(0.9)
    assert alpha_at(50, 100, "linear", 0.9, 0.1) == pytest.approx(0.5)
    assert alpha_at(100, 100, "linear", 0.9, 0.1) == pytest.approx(0.1)
    assert alpha_at(0, 100, "cosine", 0.9, 0.1) == pytest.approx(0.9)
    assert alpha_at(50, 100, "cosine", 0.9, 0.1) == pytest.approx(0.5)
    assert alpha_at(100, 100, "cosine", 0.9, 0.1) == pytest.approx(0.1)
    assert alpha_at(25, 100, "cosine", 0.9, 0.1) == pytest.approx(0.1 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert alpha_at(250, 100, "linear", 0.9, 0.1) == pytest.approx(0.1)  # clipped past the end
    with pytest.raises(ValueError, match="unknown alpha schedule"):
        alpha_at(0, 10, "step")
