"""Sparse upcycling: a dense checkpoint (herd's, or a Llama's) becomes a Llama 4 mixture of experts.

Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints" (arXiv:2212.05055):
copy each dense FFN into every expert of the MoE layer that replaces it, keep every other weight, and continue
training, instead of training the MoE from scratch. herd's MoE (herd.model.moe) computes, per token,

    shared(x) + routed_e(w * x),   e = argmax of the router logits,   w = sigmoid(logit_e)   (top-1)

where the router weight scales the routed expert's INPUT. SwiGLU is not homogeneous, so copying the FFN unchanged
into both would give FFN(x) + FFN(x / 2), not FFN(x). The construction here makes the first step the dense model:
- the router starts at zero, so every logit is 0 and w = sigmoid(0) = 1/2 for every token;
- every routed expert is the dense FFN with its gate and up projections doubled (undoing the 1/2 on its input) and
  its down projection halved; the shared expert is the dense FFN with its down projection halved;
- so shared(x) + routed_e(x / 2) = FFN(x) / 2 + FFN(x) / 2 = FFN(x) for whichever expert is chosen.
Every scaling is by a power of two, exact in floating point, so the only difference from the dense model is the
rounding of the routed expert's matmuls, which run through another kernel (grouped or per-expert) than nn.Linear:
the upcycled logits equal the dense ones to float32 rounding (tests assert 1e-5), and `upcycle_checkpoint` measures
the difference on a probe batch and reports it.
Ties: with a zero router all logits tie and top-1 picks the same expert for every token (which one does not matter:
the experts are identical). The chosen expert's router column still gets a gradient (the output depends on w), so
tokens start to move apart on the first step, and herd's load-balancing bias (herd.train.balance) spreads the
choices from the first update. `router_std > 0` starts the router from noise instead, as the paper does, which
breaks the ties at once but makes w differ from 1/2 per token: the first step is then close to, not equal to, the
dense model (the probe reports by how much).

`every` chooses which layers become MoE, as Llama 4's `interleave_moe_layer_step`: 1 all (Scout), 2 every second
(Maverick: layers 1, 3, ...); the others stay dense. Experts are as wide as the dense FFN.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from herd.config import ConfigError, TextConfig

W0 = 0.5  # sigmoid(0): the routed weight of every token while the router is zero
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True, kw_only=True)
class UpcycleResult:
    config: TextConfig
    moe_layers: list[int]
    max_logit_diff: float  # |upcycled - dense| logits on the probe batch, float32
    out: str | None = None


def upcycled_config(cfg: TextConfig, experts: int, every: int = 1) -> TextConfig:
    """The MoE config of a dense one: layers every-1, 2*every-1, ... become MoE with `experts` top-1 experts and a
    shared expert, each as wide as the dense FFN; everything else is kept."""
    if not isinstance(cfg, TextConfig):
        raise ConfigError("upcycling takes a text model; this checkpoint has a vision tower (upcycle its language "
                          "model: load it with text_only=True)")
    if cfg.moe_layers:
        raise ConfigError(f"the model already has MoE layers {cfg.moe_layers}: upcycle a dense checkpoint (every "
                          "layer a plain MLP)")
    if experts < 1 or every < 1:
        raise ConfigError(f"experts and every must be >= 1, got experts={experts}, every={every}")
    moe = list(range(every - 1, cfg.num_hidden_layers, every))
    return cfg.replace(moe_layers=moe, interleave_moe_layer_step=every, num_local_experts=experts,
                       num_experts_per_tok=1, intermediate_size=cfg.intermediate_size_mlp)


@torch.no_grad()
def upcycle(dense, experts: int, every: int = 1, router_std: float = 0.0, seed: int = 0):
    """A new Llama 4 MoE text model from a dense one (module docstring); `dense` is left unchanged."""
    import herd

    cfg = upcycled_config(dense.config, experts, every)
    dtype = next(dense.parameters()).dtype
    model = herd.build_model(cfg, device="cpu", dtype=dtype, seed=seed)
    old = dict(dense.state_dict())
    for name, p in model.state_dict().items():  # attention, norms, embeddings, dense layers: as they were
        if name in old:
            p.copy_(old[name])
    gen = torch.Generator().manual_seed(seed)
    for i in cfg.moe_layers:
        mlp, moe = dense.model.layers[i].feed_forward, model.model.layers[i].feed_forward
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # (F, D), (F, D), (D, F)
        moe.shared_expert.gate_proj.weight.copy_(gate)
        moe.shared_expert.up_proj.weight.copy_(up)
        moe.shared_expert.down_proj.weight.copy_(down * (1 - W0))
        moe.experts.gate_up_proj.copy_(torch.cat([gate.T, up.T], dim=-1) / W0)  # (D, 2F) broadcast over E
        moe.experts.down_proj.copy_(down.T * W0)  # (F, D) broadcast over E
        noise = torch.randn(moe.router.weight.shape, generator=gen) * router_std
        moe.router.weight.copy_(noise.to(dtype))
        moe.router.expert_bias.zero_()
    return model.eval()


@torch.no_grad()
def logit_difference(a, b, vocab_size: int, tokens: int = 64, seed: int = 0) -> float:
    """Max |a - b| of two models' logits (compared in float32) on random token ids (1, tokens)."""
    ids = torch.randint(0, vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    return (a(ids).float() - b(ids).float()).abs().max().item()


def upcycle_checkpoint(init: str | Path, out: str | Path, experts: int, every: int = 1, router_std: float = 0.0,
                       dtype: torch.dtype | None = None, seed: int = 0) -> UpcycleResult:
    """Read a dense checkpoint (a Hugging Face directory, herd's or a Llama's, or a herd training run), write its
    upcycled MoE to `out` as a Hugging Face directory (with the tokenizer files `init` has), and measure it."""
    from herd.formats.hf import save_pretrained
    from herd.train.snapshots import load_model

    dense, _ = load_model(init)
    dense = dense.eval()
    moe = upcycle(dense, experts, every, router_std, seed)
    diff = logit_difference(dense, moe, dense.config.vocab_size, min(64, dense.config.max_position_embeddings))
    save_pretrained(moe, out, dtype=dtype)
    for name in TOKENIZER_FILES:
        if (Path(init) / name).is_file():
            shutil.copyfile(Path(init) / name, Path(out) / name)
    return UpcycleResult(config=moe.config, moe_layers=list(moe.config.moe_layers), max_logit_diff=diff, out=str(out))
