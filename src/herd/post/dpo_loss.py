"""The loss math of DPO: a policy's summed log-probs of an answer, and the DPO loss on (chosen, rejected) pairs.
Pure torch functions; the DPO stage (pairs, reference log-probs, the trainer's loop) is built on top of them.

    pc, pr = sequence_logprobs(logits_c, labels_c), sequence_logprobs(logits_r, labels_r)
    loss, stats = dpo_loss(pc, pr, ref_chosen, ref_rejected, beta=0.1)

DPO (Rafailov et al., arXiv:2305.18290, eq. 7): with z = (log pi(y+|x) - log ref(y+|x)) - (log pi(y-|x) -
log ref(y-|x)), the loss is -log sigmoid(beta * z), averaged over pairs. beta * (log pi - log ref) is the answer's
implicit reward; beta (TRL's default 0.1) is how far the policy may move from the reference: the gradient is
-beta * sigmoid(-beta * z) on the chosen log-prob, so a larger beta pushes harder while the pair is still wrong and
stops sooner once it is right.
- label_smoothing = eps (conservative DPO: Mitchell, "A note on DPO with noisy preferences & relationship to IPO",
  2023; TRL's `label_smoothing`): each label is assumed flipped with probability eps, so the loss is
  -(1 - eps) * log sigmoid(beta z) - eps * log sigmoid(-beta z), which has a finite optimum instead of pushing z to
  infinity.
- Log-probs are sums over the answer's tokens (not means), as in the paper: the likelihood of the whole answer.
- stats, as TRL logs them: reward_chosen, reward_rejected (means of the implicit rewards), reward_margin (their
  difference), accuracy (share of pairs whose chosen reward is above the rejected one).

Shapes: B pairs (or answers), T tokens, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.post.rl_loss import token_logprobs


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probs of the labelled tokens, in float32. logits (B, T, V), labels (B, T) with -100 where
    there is no target (prompt, padding). Labels are ALREADY SHIFTED, as in herd's batches (herd.train.inputs:
    labels[t] = ids[t + 1]): labels[b, t] is the token logits[b, t] predicts; no shift happens here."""
    return token_logprobs(logits, labels).sum(-1)  # (B,)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over pairs of -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z), z = (pc - rc) - (pr - rr);
    all four inputs are (B,) summed log-probs (reference ones without grad). Returns (loss, stats)."""
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four log-prob tensors must all be (B,), got shapes {sorted(shapes)}")
    if beta <= 0:
        raise ValueError(f"beta={beta}: must be > 0 (TRL's default is 0.1)")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: must be in [0, 0.5); 0 is plain DPO")
    chosen = policy_chosen.float() - ref_chosen.float()  # (B,) log pi/ref of the chosen answer
    rejected = policy_rejected.float() - ref_rejected.float()  # (B,)
    z = beta * (chosen - rejected)  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)  # (B,)
    with torch.no_grad():
        rc, rr = beta * chosen, beta * rejected  # implicit rewards
        stats = {"reward_chosen": rc.mean().item(), "reward_rejected": rr.mean().item(),
                 "reward_margin": (rc - rr).mean().item(), "accuracy": (rc > rr).float().mean().item()}
    return losses.mean(), stats
