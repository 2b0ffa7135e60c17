"""Co-distillation loss: a frozen teacher's soft targets mixed with the hard next-token labels.

Llama 4 Maverick and Scout were co-distilled from Behemoth with a loss that "dynamically weights the soft and hard
targets through training" (Meta's blog; the schedule is unpublished). herd uses Hinton et al.'s form
(arXiv:1503.02531):

    loss = alpha(t) * tau^2 * KL(p_T || p_S) + (1 - alpha(t)) * CE(labels, softmax(z_S))
    p_T = softmax(z_T / tau),  p_S = softmax(z_S / tau)

- KL(teacher || student) = sum_v p_T (log p_T - log p_S): the forward KL, whose student gradient is
  (p_S - p_T) / tau per logit, i.e. cross-entropy against the teacher's distribution.
- tau^2 keeps the soft term's gradient on the scale of the hard term's as tau changes (the 1/tau above, twice).
- Both terms are means over the tokens whose label is not -100 (padding, prompt or document-boundary positions),
  computed in float32. The teacher is detached: it is frozen.
- Logits and labels are ALIGNED: labels[b, t] is the target of logits[b, t] (shift before calling, as for
  F.cross_entropy). Student and teacher must share the vocabulary.

alpha(t) schedules (`alpha_at`), with progress s = step / total clipped to [0, 1]:
- "constant": alpha = start throughout;
- "linear":   alpha = start + (end - start) * s;
- "cosine":   alpha = end + (start - end) * (1 + cos(pi * s)) / 2 (flat at both ends, fastest change mid-run).
The defaults go from 0.9 to 0.1: lean on the teacher early, when its distribution carries most of the signal, and
on the data late; mixing hard labels back in helps against exposure bias (arXiv:2605.26246).

Shapes: B batch, T tokens, V vocab, N = B*T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("constant", "linear", "cosine")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 alpha: float | torch.Tensor, tau: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * tau^2 * KL(teacher || student) + (1 - alpha) * CE; returns (loss, {"kl": KL, "ce": CE}).

    The reported "kl" is the plain KL at temperature tau (without tau^2), both detached; `loss` carries the graph.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: distillation needs the same batch and vocabulary")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V).float()  # (N, V)
    t = teacher_logits.detach().reshape(-1, V).float()  # (N, V)
    keep = labels.reshape(-1) != -100  # (N,)
    s, t, y = s[keep], t[keep], labels.reshape(-1)[keep]
    n = y.numel()
    if n == 0:  # nothing to learn from; a zero that still connects to the graph keeps backward() valid
        zero = student_logits.sum() * 0.0
        return zero, {"kl": zero.detach(), "ce": zero.detach()}
    log_ps = F.log_softmax(s / tau, dim=-1)  # (n, V)
    log_pt = F.log_softmax(t / tau, dim=-1)  # (n, V)
    # kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q); "sum" / n = mean over tokens
    kl = F.kl_div(log_ps, log_pt, reduction="sum", log_target=True) / n
    ce = F.cross_entropy(s, y, reduction="mean")
    loss = alpha * tau**2 * kl + (1 - alpha) * ce
    return loss, {"kl": kl.detach(), "ce": ce.detach()}


def alpha_at(step: int, total: int, kind: str = "constant", start: float = 0.9, end: float = 0.1) -> float:
    """The soft-target weight alpha at `step` of `total` (see the module docstring for the three shapes)."""
    if kind not in KINDS:
        raise ValueError(f"unknown alpha schedule {kind!r}; choose one of {KINDS}")
    s = min(max(step / total, 0.0), 1.0) if total > 0 else 1.0
    if kind == "constant":
        return float(start)
    if kind == "linear":
        return float(start + (end - start) * s)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * s)))
