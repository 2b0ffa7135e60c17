"""MetaP-style hyper-parameter transfer: per-layer learning rates and init scales that hold across width and depth.

Meta says only that MetaP "reliably set[s] critical model hyper-parameters such as per-layer learning rates and
initialization scales" that "transfer well across different values of batch size, model width, depth, and training
tokens" ("The Llama 4 herd" blog post; no equations published). herd's rules are the published open analogues,
expressed purely through init scales and per-group Adam learning rates, so the model code and the Hugging Face
format stay untouched:

- width: muP for Adam (Yang et al., Tensor Programs V, arXiv:2203.03466, Table 3, the form without multipliers);
- depth: depth-muP (Yang et al., Tensor Programs VI, arXiv:2310.02244): residual branches x + a * f(x) with
  a = (L / L0)^-1/2 and hidden Adam learning rates times (L / L0)^-1/2. The multiplier is folded into each branch's
  output projection: init std times a, and, because Adam's step size ignores gradient scale, its learning rate times
  a as well; this reproduces the multiplied network's training (up to Adam's eps). (CompleteP, arXiv:2505.01618,
  generalises this to a = (L / L0)^-alpha with lr times (L / L0)^(alpha - 1); herd uses alpha = 1/2.)

With m = width / base_width (hidden_size), d = depth / base_depth (num_hidden_layers), sigma = initializer_range and
eta the global learning rate:

    parameter                                            init std            Adam lr
    embed_tokens (input weights)                         sigma               eta
    q/k/v_proj, gate/up_proj, experts.gate_up_proj       sigma / sqrt(m)     eta / (m sqrt(d))
    o_proj, down_proj, experts.down_proj (branch out)    sigma / sqrt(m d)   eta / (m d)
    router (width -> E experts: an output layer)         sigma / m           eta / (m sqrt(d))
    lm_head (readout)                                    sigma / m           eta / m
    norm weights inside blocks (input/post-attention)    1                   eta / sqrt(d)
    final norm                                           1                   eta

At the base shape (m = d = 1) every rule is the identity: herd's default init (normal(0, sigma), ones) and one
learning rate, the standard parametrization (SP) - so settings tuned on the base model are already in this form.
Notes on the choices:
- Width grows by adding heads at a fixed head_dim (`scale_config`), so muP's 1/d attention scale is not needed (the
  1/sqrt(d) of a fixed d is a constant), and QK-norm bounds the RoPE layers' logits anyway.
- The router is treated as a readout (its output dimension, E, does not grow), inside a block (depth factor).
- Norm weights are vector-like (muP's "biases": no width factor); those inside blocks change the branches' output,
  so they take the depth factor like every other parameter inside a block.
- Weight decay is made independent of the per-group learning rate: each group gets weight_decay * eta / lr_group,
  so every matrix shrinks by the same fraction eta * weight_decay per step ("independent" decay, which Wortsman et
  al., arXiv:2309.14322, found to make the loss less sensitive to the LR). Norm weights are not decayed.
- Tied embeddings (not used by Llama 4) follow the embedding rule only.
- The vision tower keeps the standard parametrization (Meta trains it apart).

NOTE the footgun: each group's lr differs. A schedule must scale every group (torch's LRScheduler classes do, from
each group's `initial_lr`); code that sets lr by hand must set `group["lr"] = lr_t * group["lr_mult"]`.

`coord_check` is the muP paper's diagnostic: train a few steps at several widths and compare activation sizes; they
stay flat with these rules and grow with width under SP (tests/train/test_metap.py, experiments/metap_lr_sweep.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import TextConfig, preset
from herd.model.build import build_model

IN_PROJ = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight", "gate_up_proj")
OUT_PROJ = ("o_proj.weight", "down_proj.weight", "experts.down_proj")


def role(name: str) -> str:
    """The MetaP role of a parameter, from its (Hugging Face) name."""
    if "vision" in name or "multi_modal_projector" in name:
        return "vision"
    if name.endswith("embed_tokens.weight"):
        return "embedding"
    if name.endswith("norm.weight"):
        return "block_norm" if ".layers." in name else "final_norm"
    if name.endswith("lm_head.weight"):
        return "readout"
    if name.endswith("router.weight"):
        return "router"
    if name.endswith(OUT_PROJ):
        return "hidden_out"
    if name.endswith(IN_PROJ):
        return "hidden_in"
    raise ValueError(f"no MetaP rule for parameter {name!r}")


def multipliers(r: str, m: float, d: float) -> tuple[float, float]:
    """(init std multiplier, lr multiplier) of role r at width ratio m and depth ratio d (the table above)."""
    return {
        "embedding": (1.0, 1.0),
        "hidden_in": (m**-0.5, 1 / (m * d**0.5)),
        "hidden_out": ((m * d) ** -0.5, 1 / (m * d)),
        "router": (1 / m, 1 / (m * d**0.5)),
        "readout": (1 / m, 1 / m),
        "block_norm": (1.0, d**-0.5),
        "final_norm": (1.0, 1.0),
        "vision": (1.0, 1.0),
    }[r]


def _ratios(model: nn.Module, base_width: int | None, base_depth: int | None) -> tuple[TextConfig, float, float]:
    """(text config, m, d); a base left as None is the model's own size (ratio 1)."""
    cfg = model.text_config
    m = cfg.hidden_size / (base_width or cfg.hidden_size)
    d = cfg.num_hidden_layers / (base_depth or cfg.num_hidden_layers)
    return cfg, m, d


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, base_width: int | None = None,
                 base_depth: int | None = None) -> list[dict]:
    """AdamW parameter groups with herd's per-role learning rates (and lr-independent weight decay).

    base_width / base_depth default to the model's own (every multiplier 1: the standard parametrization). Each
    group carries "role" and "lr_mult" (its lr / lr) besides torch's keys.
    """
    cfg, m, d = _ratios(model, base_width, base_depth)
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():  # tied weights appear once, under their first name
        if not p.requires_grad:
            continue
        r = role(name)
        g = groups.get(r)
        if g is None:
            mult = multipliers(r, m, d)[1]
            decay = 0.0 if r.endswith("norm") else weight_decay / mult  # lr_group * wd_group = lr * weight_decay
            g = groups[r] = {"params": [], "lr": lr * mult, "lr_mult": mult, "weight_decay": decay, "role": r}
        g["params"].append(p)
    return list(groups.values())


@torch.no_grad()
def init_(model: nn.Module, base_width: int | None = None, base_depth: int | None = None,
          seed: int | None = 0) -> nn.Module:
    """Re-initialise the text model with herd's init scales (normal(0, sigma * mult), norms at 1), in place.

    Draws in the order and from the generator of `init_weights`, so at the base shape (the default) it reproduces
    `model.init_weights(seed)` exactly. Vision parameters are left as they are.
    """
    cfg, m, d = _ratios(model, base_width, base_depth)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():
        r = role(name)
        if r == "vision":
            continue
        if r.endswith("norm"):
            p.fill_(1.0)
            continue
        std = cfg.initializer_range * multipliers(r, m, d)[0]
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
    return model


def scale_config(cfg: TextConfig, width: int, depth: int | None = None) -> TextConfig:
    """`cfg` widened to hidden_size `width` (heads and FFN widths in proportion, head_dim fixed), `depth` layers."""
    ratio = width / cfg.hidden_size
    scaled = {}
    for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "intermediate_size_mlp"):
        v = getattr(cfg, k) * ratio
        if v != int(v) or v < 1:
            raise ValueError(f"width {width} does not scale {k}={getattr(cfg, k)} of width {cfg.hidden_size} to an "
                             "integer")
        scaled[k] = int(v)
    return cfg.replace(hidden_size=width, head_dim=cfg.head_dim, num_hidden_layers=depth or cfg.num_hidden_layers,
                       **scaled)


def build(cfg: TextConfig, parametrization: str, base_width: int, base_depth: int, lr: float,
          weight_decay: float = 0.0, seed: int = 0):
    """(model, AdamW) under "herd" (MetaP rules relative to the base shape) or "standard" (one lr, sigma init)."""
    model = build_model(cfg, seed=seed)  # standard init: normal(0, sigma)
    if parametrization == "herd":
        init_(model, base_width, base_depth, seed)
        groups = param_groups(model, lr, weight_decay, base_width, base_depth)
    elif parametrization == "standard":
        groups = param_groups(model, lr, weight_decay)  # multipliers all 1
    else:
        raise ValueError(f"parametrization must be 'herd' or 'standard', got {parametrization!r}")
    return model, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


@torch.no_grad()
def activation_rms(model: nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """RMS of the embeddings, attention and FFN branch outputs (over all layers), last layer output and logits."""
    acts: dict[str, list[torch.Tensor]] = {"embed": [], "attn": [], "ffn": [], "residual": [], "logits": []}

    def record(key):  # MoE blocks and decoder layers return tuples; their first element is the activation
        return lambda mod, args, output: acts[key].append(output[0] if isinstance(output, tuple) else output)

    text = model.model
    hooks = [text.embed_tokens.register_forward_hook(record("embed")),
             text.layers[-1].register_forward_hook(record("residual")),
             model.lm_head.register_forward_hook(record("logits"))]
    for layer in text.layers:
        hooks += [layer.self_attn.register_forward_hook(record("attn")),
                  layer.feed_forward.register_forward_hook(record("ffn"))]
    try:
        model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return {k: math.sqrt(sum(float(t.float().pow(2).mean()) for t in v) / len(v)) for k, v in acts.items()}


def coord_check(widths, steps: int = 4, parametrization: str = "herd", lr: float = 1e-2, base_width: int | None = None,
                depth: int = 2, seed: int = 0, batch: int = 4, seq: int = 32, base: TextConfig | None = None) -> dict:
    """{width: {"embed", "attn", "ffn", "residual", "logits": activation RMS}} after `steps` AdamW steps.

    Same data and seed at every width; "attn" / "ffn" are the RMS of the branch outputs over all layers, "residual"
    the last layer's output, "logits" the lm_head output. Under a good parametrization each is flat in width.
    """
    base = base or preset("tiny")
    base_width = base_width or widths[0]
    data = torch.randint(0, base.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed + 1))
    out = {}
    for w in widths:
        cfg = scale_config(base, w, depth)
        model, opt = build(cfg, parametrization, base_width, depth, lr, seed=seed)
        for _ in range(steps):
            loss = F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[w] = activation_rms(model, data[:, :-1])
    return out
