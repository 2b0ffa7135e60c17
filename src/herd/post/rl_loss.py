"""The loss math of online RL with verifiable rewards: group-relative advantages, zero-advantage filtering and the
clipped policy-gradient surrogate (GRPO, with DAPO's and Dr. GRPO's changes). Pure torch functions; the RL trainer,
rollouts and CLI are built on top of them.

    A = group_advantages(rewards)                       # (G, S) rewards -> (G, S) advantages
    batch, keep = keep_informative(batch, rewards)      # DAPO dynamic sampling: drop all-equal groups
    loss, stats = policy_loss(lp, old_lp, A.flatten(), mask)

Advantages (GRPO, DeepSeekMath arXiv:2402.03300, section 4.1.2): each prompt gets S sampled answers (a group);
A_i = (r_i - mean(r)) / (std(r) + eps) within the group, the same for every token of answer i.
- std is the SAMPLE (unbiased, n - 1) standard deviation, as TRL's GRPOTrainer computes it (torch.std's default),
  with TRL's eps = 1e-4. A group of one has no spread: its advantage is 0.
- scale="none" drops the division (Dr. GRPO, arXiv:2503.20783): the std scaling up-weights groups that are nearly
  all right or all wrong, a question-difficulty bias.
- A group whose rewards are all equal (all correct or all wrong) carries no signal. Its advantages are set to
  exactly 0: r - mean(r) is not always exactly 0 in floating point (mean of three 0.1s is 0.10000000000000002),
  and eps would not hide that, so such a group would otherwise give a tiny, pure-noise gradient.
- `keep_informative` drops those groups (DAPO's dynamic sampling, arXiv:2503.14476 section 3.2; Llama 4's
  "zero-advantage filtering"); `reward_stats` logs their share as `frac_reward_zero_std`, TRL's name for it.

Policy loss, per token t of answer i, with ratio r = pi_theta / pi_old = exp(logprobs - old_logprobs):
    loss_t = -min(r * A_i, clip(r, 1 - eps_low, 1 + eps_high) * A_i)  [* w_t]  [+ kl_coef * k3_t]
- Clip-Higher (DAPO section 3.1): eps_high (0.28) > eps_low (0.2) lets low-probability tokens that earned a
  positive advantage grow further before the clip stops them, against entropy collapse.
- norm="token" (DAPO section 3.3, TRL's default loss_type="dapo"): the sum over every valid token of the batch
  divided by their number, so long answers weigh by their length. norm="sequence" (the original GRPO): each answer's
  token mean, then the mean over answers, so a token of a short answer weighs more. `denom` overrides the divisor
  (the step's total token or sequence count when a step is split into micro-batches, as herd's trainer does for
  cross-entropy).
- k3 KL to a reference (Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html; as
  in GRPO eq. 4): with d = ref_logprobs - logprobs, k3 = exp(d) - d - 1, unbiased for KL(pi_theta || pi_ref) under
  samples from pi_theta and >= 0 for every sample. Computed as expm1(d) - d, which stays >= 0 in floating point.
  Added after the importance weight, as TRL does.
- Truncated importance sampling for stale rollouts (asynchronous RL): the answers were sampled by a behaviour
  policy mu (the generator's older weights, or another engine's numerics), not by pi_old. Each token's surrogate is
  weighted by w = min(pi_old / mu, max_is_ratio) = min(exp(old - behaviour), C), a constant (no gradient). The
  truncation bounds the variance, as V-trace does (IMPALA, arXiv:1802.01561, section 4.1); Yao et al., "Your
  Efficient RL Framework Secretly Brings You Off-Policy RL Training" (2025) apply it to LLM RL, and TRL exposes it as
  vllm_importance_sampling_correction. With behaviour == old every weight is exactly 1, so the loss is bitwise the
  uncorrected one.

Shapes: G groups, S samples per group, N = G * S answers (= B), B batch of answers, T answer tokens.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

IGNORE = -100  # herd's label for "no target here" (herd.train.inputs)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(labels[b, t] | ...) from logits (B, T, V), in float32; 0 where labels is -100. Logits and labels are
    ALIGNED as in herd's batches: labels[b, t] is the token that logits[b, t] predicts (already shifted)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must share (B, T)")
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(labels.shape)  # (B, T)


def _grouped(rewards: torch.Tensor, group_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(flat rewards (N,), group index 0..n-1 per reward (N,), n groups) from (G, S) rewards or flat + group ids."""
    r = rewards if rewards.is_floating_point() else rewards.float()
    if group_ids is None:
        if r.dim() != 2:
            raise ValueError(f"rewards of shape {tuple(r.shape)}: pass (groups, samples), or flat rewards and "
                             "group_ids")
        G, S = r.shape
        return r.flatten(), torch.arange(G, device=r.device).repeat_interleave(S), G
    if r.dim() != 1 or group_ids.shape != r.shape:
        raise ValueError(f"flat rewards {tuple(r.shape)} need group_ids of the same shape, got "
                         f"{tuple(group_ids.shape)}")
    uniq, inv = torch.unique(group_ids, return_inverse=True)  # groups numbered in sorted order of their ids
    return r, inv, len(uniq)


def _group_moments(r: torch.Tensor, inv: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group: mean, sample std (0 for a group of one) and whether all its rewards are equal."""
    count = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / count
    sq = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, inv, (r - mean[inv]) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()  # unbiased, like torch.std
    hi = torch.full((n,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amax")
    lo = torch.full((n,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amin")
    return mean, std, hi == lo


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | None = None,
                     scale: Literal["std", "none"] = "std", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages, the shape of `rewards`: (r - group mean) / (group sample std + eps) for
    scale="std" (GRPO), r - group mean for scale="none" (Dr. GRPO); exactly 0 in groups whose rewards are all equal.
    rewards: (G, S), or flat (N,) with group_ids (N,) (any integers; groups may differ in size)."""
    if scale not in ("std", "none"):
        raise ValueError(f"scale={scale!r}: use 'std' (GRPO) or 'none' (Dr. GRPO)")
    r, inv, n = _grouped(rewards, group_ids)
    mean, std, flat = _group_moments(r, inv, n)
    adv = r - mean[inv]
    if scale == "std":
        adv = adv / (std[inv] + eps)
    adv = torch.where(flat[inv], torch.zeros_like(adv), adv)
    return adv.view(rewards.shape)


def zero_advantage_groups(rewards: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(n_groups,) bool: True for a group whose rewards are all equal (zero advantage, no learning signal). Groups
    are rows of (G, S) rewards, or the distinct group_ids in sorted order."""
    r, inv, n = _grouped(rewards, group_ids)
    return _group_moments(r, inv, n)[2]


def reward_stats(rewards: torch.Tensor, group_ids: torch.Tensor | None = None) -> dict[str, float]:
    """Logged per step (TRL's names): frac_reward_zero_std (share of groups with all-equal rewards), reward_mean,
    reward_std (the mean over groups of the within-group sample std)."""
    r, inv, n = _grouped(rewards, group_ids)
    _, std, flat = _group_moments(r, inv, n)
    return {"frac_reward_zero_std": flat.float().mean().item(), "reward_mean": r.mean().item(),
            "reward_std": std.mean().item()}


def keep_informative(batch: dict[str, Any], rewards: torch.Tensor,
                     group_ids: torch.Tensor | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """DAPO dynamic sampling's filter: drop every answer of a group whose rewards are all equal.
    batch maps names to per-answer tensors or lists, answer n first (N = G * S in row order for (G, S) rewards).
    Returns (the batch with only the kept answers, keep (N,) bool); the caller refills with new groups."""
    r, inv, n = _grouped(rewards, group_ids)
    keep = ~_group_moments(r, inv, n)[2][inv]  # (N,)
    idx = keep.nonzero().flatten().tolist()
    out: dict[str, Any] = {}
    for name, v in batch.items():
        if len(v) != len(keep):
            raise ValueError(f"batch[{name!r}] has {len(v)} rows but there are {len(keep)} rewards: every entry "
                             "must hold one row per answer")
        out[name] = v[keep.to(v.device)] if isinstance(v, torch.Tensor) else [v[i] for i in idx]
    return out, keep


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = ref - logprobs; >= 0, 0 iff equal.
    The gradient flows through logprobs."""
    d = ref_logprobs.float() - logprobs.float()
    return torch.expm1(d) - d


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                eps_low: float = 0.2, eps_high: float = 0.28, ref_logprobs: torch.Tensor | None = None,
                kl_coef: float = 0.0, norm: Literal["token", "sequence"] = "token",
                behaviour_logprobs: torch.Tensor | None = None, max_is_ratio: float = 2.0,
                denom: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate of GRPO/DAPO (see the module docstring) -> (scalar loss to minimise, stats).

    logprobs (B, T) of the answer tokens under the policy being trained (with grad); old_logprobs (B, T) under the
    policy at the start of this update (pi_old); advantages (B,); mask (B, T), 1 on answer tokens; ref_logprobs
    (B, T) for the k3 KL (needed when kl_coef > 0); behaviour_logprobs (B, T) as reported by the generator that
    sampled the answers, for the truncated importance weight min(exp(old - behaviour), max_is_ratio).
    stats: loss, clip_low_frac / clip_high_frac (share of valid tokens where the lower / upper clip is the
    active branch of the min), clip_frac, ratio_mean, and kl_mean, is_weight_mean, is_truncated_frac when given."""
    B, T = logprobs.shape
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs),
                    ("behaviour_logprobs", behaviour_logprobs)):
        if t is not None and t.shape != (B, T):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; it must match logprobs {(B, T)}")
    if advantages.shape != (B,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; pass one per answer, ({B},)")
    if norm not in ("token", "sequence"):
        raise ValueError(f"norm={norm!r}: use 'token' (DAPO) or 'sequence' (GRPO)")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"eps_low={eps_low}, eps_high={eps_high}: need 0 <= eps_low < 1 and eps_high >= 0")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs (the reference policy's log-probs); or set kl_coef=0")
    if max_is_ratio < 1:
        raise ValueError(f"max_is_ratio={max_is_ratio}: the truncation must be >= 1 so that on-policy weights stay 1")

    m = mask.float()  # (B, T)
    n_tok = m.sum()
    A = advantages.float()[:, None]  # (B, 1)
    ratio = torch.exp(logprobs.float() - old_logprobs.float())  # (B, T)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)  # (B, T)
    per_token = -torch.min(ratio * A, clipped * A)  # (B, T)

    stats: dict[str, torch.Tensor] = {}
    if behaviour_logprobs is not None:
        w = torch.exp(old_logprobs.float() - behaviour_logprobs.float()).detach()  # (B, T)
        per_token = per_token * w.clamp(max=max_is_ratio)
        stats["is_weight_mean"] = (w.clamp(max=max_is_ratio) * m).sum() / n_tok.clamp(min=1)
        stats["is_truncated_frac"] = ((w > max_is_ratio).float() * m).sum() / n_tok.clamp(min=1)
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)  # (B, T)
        stats["kl_mean"] = (kl * m).sum() / n_tok.clamp(min=1)
        if kl_coef != 0:
            per_token = per_token + kl_coef * kl

    if norm == "token":
        loss = (per_token * m).sum() / (n_tok.clamp(min=1) if denom is None else denom)
    else:
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)  # (B,)
        loss = per_seq.sum() / (B if denom is None else denom)

    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (A < 0)).float()  # the min picks the clipped branch, below
        high = ((ratio > 1 + eps_high) & (A > 0)).float()  # ... and above
        stats["clip_low_frac"] = (low * m).sum() / n_tok.clamp(min=1)
        stats["clip_high_frac"] = (high * m).sum() / n_tok.clamp(min=1)
        stats["clip_frac"] = stats["clip_low_frac"] + stats["clip_high_frac"]
        stats["ratio_mean"] = (ratio * m).sum() / n_tok.clamp(min=1)
        stats["loss"] = loss.detach()
    return loss, {k: float(v.detach()) for k, v in stats.items()}
