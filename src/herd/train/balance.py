"""MoE load balancing: the auxiliary-loss-free bias update (herd's default) and the Switch-style auxiliary loss.

Aux-loss-free balancing (Wang et al. 2024, arXiv:2408.15664; used by DeepSeek-V3): each router carries a bias
`expert_bias` (E,) that is added to the logits only to CHOOSE experts (herd.model.moe.Router); the gate weights come
from the unbiased logits, so the bias steers traffic without entering the gradient. After each optimizer step the
bias moves a fixed amount toward balance. herd follows torchtitan's rule (its MoE `_update_expert_bias`):

    dB = rate * sign(mean(n) - n);   dB -= mean(dB);   b += dB

n being the tokens each expert received. The mean-centering (torchtitan's addition, absent from the paper) keeps the
biases from drifting as a whole, which changes nothing about top-k but keeps them bounded. Over the run's last
`bias_cooldown` share of steps the update stops and the biases shrink linearly to exactly zero (`shrink_biases`), so
the final model routes by its router weights alone: Llama 4's checkpoint format and the engines that read it have
no router bias (herd.formats.hf). The README's experiment measures what that costs. Loads are summed over
data-parallel ranks first (an all-reduce when torch.distributed is initialised), so every rank applies the same
update and the replicated biases never diverge.

Switch auxiliary loss (Fedus et al. 2021, arXiv:2101.03961, eqs. 4-6), as transformers' `load_balancing_loss_func`
(models/mixtral in 5.23, the function every HF MoE with `router_aux_loss_coef` uses):

    loss = E * sum_e f_e * P_e,   f_e = share of top-k assignments to e,   P_e = mean softmax probability of e

with f and P pooled over all MoE layers (every layer's rows together, not a mean of per-layer losses). The caller
multiplies by `router_aux_loss_coef`. Llama4ForCausalLM in transformers 5.23 computes no aux loss at all (its output
has no aux_loss field), so the Mixtral formula is the compatible one.

Softmax vs sigmoid: Llama 4's gate weight is sigmoid(logit) of the chosen expert, but the loss uses a softmax over the
router logits, exactly like transformers. P must be a distribution over experts for the loss to push probability
away from overloaded experts (a sigmoid per expert has no such coupling), and top-k of softmax(l) is top-k of l, so
the experts it counts are the ones the model selects (without the bias; the two methods are alternatives).

Shapes: N tokens (B*T), E experts, L MoE layers, k experts per token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from herd.model.moe import Router


def routers(model: nn.Module) -> list[Router]:
    """The MoE routers in layer order (the order of the router logits the forward returns)."""
    return [m for m in model.modules() if isinstance(m, Router)]


@torch.no_grad()
def expert_loads(model: nn.Module, router_logits: list[torch.Tensor]) -> torch.Tensor:
    """Tokens routed to each expert (L, E) float32, selection = top-k(logits + expert_bias) as in the forward."""
    rs = routers(model)
    if len(rs) != len(router_logits):
        raise ValueError(f"{len(router_logits)} router logits for {len(rs)} MoE layers")
    loads = []
    for r, logits in zip(rs, router_logits, strict=True):
        # the same expression as Router.forward, so ties resolve identically
        idx = torch.topk(logits + r.expert_bias.to(logits.dtype), r.top_k, dim=1).indices  # (N, k)
        loads.append(torch.bincount(idx.reshape(-1), minlength=logits.shape[-1]).float())
    return torch.stack(loads)  # (L, E)


@torch.no_grad()
def update_biases(model: nn.Module, loads: torch.Tensor, rate: float = 1e-3) -> None:
    """One aux-loss-free step: every router's bias moves `rate` toward the experts below the mean load."""
    rs = routers(model)
    if loads.shape[0] != len(rs):
        raise ValueError(f"loads has {loads.shape[0]} rows for {len(rs)} MoE layers")
    loads = loads.detach().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        loads = loads.clone()  # the caller's tensor stays this rank's own counts
        dist.all_reduce(loads)  # summed over data-parallel ranks: every rank applies the same update
    for r, n in zip(rs, loads, strict=True):
        delta = rate * torch.sign(n.mean() - n)  # (E,) underloaded experts up, overloaded down
        delta -= delta.mean()
        r.expert_bias += delta.to(device=r.expert_bias.device, dtype=r.expert_bias.dtype)


@torch.no_grad()
def shrink_biases(model: nn.Module, factor: float) -> None:
    """Scale every router's bias by `factor` (the cooldown that takes them to zero by the end of a run)."""
    for r in routers(model):
        r.expert_bias *= factor


def switch_aux_loss(router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], top_k: int, n_experts: int,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e over all MoE layers (transformers' load_balancing_loss_func); multiply by the coef.

    `attention_mask` (B, T), optional, drops padding rows exactly as transformers does.
    """
    if not router_logits:
        raise ValueError("no router logits: the model has no MoE layer")
    device = router_logits[0].device
    counts = torch.zeros(n_experts, device=device)  # (E,) top-k assignments, all layers
    probs = torch.zeros(n_experts, device=device)  # (E,) summed softmax probabilities, all layers
    rows = torch.zeros((), device=device)
    mask = None if attention_mask is None else attention_mask.reshape(-1, 1).to(device=device, dtype=torch.float32)
    for logits in router_logits:
        p = F.softmax(logits.to(device).float(), dim=-1)  # (N, E)
        hit = F.one_hot(torch.topk(p, top_k, dim=-1).indices, n_experts).sum(1).float()  # (N, E)
        if mask is not None:
            p, hit = p * mask, hit * mask
        counts = counts + hit.sum(0)
        probs = probs + p.sum(0)
        rows = rows + (p.shape[0] if mask is None else mask.sum())
    return n_experts * torch.sum((counts / rows) * (probs / rows))


@torch.no_grad()
def routing_without_biases(model: nn.Module, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                           pixel_values: torch.Tensor | None = None) -> dict:
    """What dropping the routers' biases does to `model` on a batch: the share of (token, MoE layer) expert choices
    that change, and the largest logit change - what an engine without router biases computes instead. A batch with
    image tokens needs its `pixel_values` (a multimodal model)."""
    rs = routers(model)
    kw = {} if pixel_values is None else {"pixel_values": pixel_values}
    with_bias, router_logits = model(input_ids, doc_ids=doc_ids, return_router_logits=True, **kw)
    saved = [r.expert_bias.clone() for r in rs]
    changed = total = 0
    for r, logits in zip(rs, router_logits, strict=True):
        chosen = torch.topk(logits + r.expert_bias.to(logits.dtype), r.top_k, dim=1).indices  # (N, k)
        changed += int((torch.topk(logits, r.top_k, dim=1).indices != chosen).any(1).sum())
        total += chosen.shape[0]
    shrink_biases(model, 0.0)
    without = model(input_ids, doc_ids=doc_ids, **kw)
    for r, b in zip(rs, saved, strict=True):
        r.expert_bias.copy_(b)
    return {"routing_changed": changed / max(total, 1), "max_logit_change": float((with_bias - without).abs().max())}
