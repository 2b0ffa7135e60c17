"""Dense Llama checkpoints (transformers' `LlamaForCausalLM`: Llama 2, Llama 3.x, SmolLM2, ...) as Llama 4 configs.

A dense Llama is a Llama 4 text model with every layer dense and every layer RoPE'd over the whole context: no MoE
layers, no NoPE layers, no chunked attention, no QK-norm (and so no attention temperature, which only NoPE layers
use). herd therefore loads these files into its own model (herd.model.text), not into a second model class:
- config: `moe_layers=[]`, `no_rope_layers` all 1, `use_qk_norm=False`, `attention_chunk_size =
  max_position_embeddings` (a chunk that spans the context cuts nothing: `TextConfig.is_chunked` is then False, so
  the layers attend globally and caches keep their keys as global layers do); Llama's one `intermediate_size` is
  the dense MLP width (`intermediate_size_mlp`) and, for sparse upcycling (herd.train.upcycle), the expert width;
- names: Llama's `model.layers.{i}.mlp.*` is herd's `model.layers.{i}.feed_forward.*`; everything else is the same;
- RoPE layout: transformers' Llama rotates the two HALVES of each head (`rotate_half`), so its conversion script
  (transformers models/llama/convert_llama_weights_to_hf.py, `permute`) reorders the rows of q_proj and k_proj
  from Meta's interleaved pairs. herd rotates interleaved pairs (as Meta's reference and Llama 4 do), so the rows
  are put back on load (`_to_pairs`) and permuted again on save (`_to_halves`); the two are exact inverses.
Saving (herd.formats.hf.save_pretrained) writes `LlamaForCausalLM` again for any config that `differences` finds
expressible, so a Llama round-trips and a herd-trained dense model is readable by every Llama engine.

What herd cannot compute is refused by name rather than approximated: `attention_bias`, `mlp_bias`, a
`hidden_act` other than silu, rope types other than default and llama3 (linear, dynamic, yarn, longrope), and
`rope_interleaved`. Other keys transformers' Llama does not read either (e.g. `pretraining_tp`, which its forward
ignores) are ignored here too.

Shapes: n heads, D head_dim, I in-features.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from herd.config import ConfigError, TextConfig

ARCHITECTURE = "LlamaForCausalLM"
_MLP = re.compile(r"^(model\.layers\.\d+\.)mlp\.")
_FFN = re.compile(r"^(model\.layers\.\d+\.)feed_forward\.")


def is_llama(d: dict) -> bool:
    """Whether a parsed config.json describes a dense Llama (model_type "llama")."""
    return d.get("model_type") == "llama"


# ---- config ----------------------------------------------------------------------------------------------------------
def _rope(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, herd's rope_scaling) from either spelling: v4's rope_theta + rope_scaling, v5's rope_parameters."""
    rp = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    theta = float(d.get("rope_theta", rp.get("rope_theta", 10000.0)))
    field = "rope_scaling" if isinstance(d.get("rope_scaling"), dict) else "rope_parameters"
    rs = d["rope_scaling"] if field == "rope_scaling" else rp
    kind = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"config.json {field}.rope_type {kind!r} is not supported for Llama checkpoints: herd "
                          "computes the default and 'llama3' RoPE only")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in rs]
    if missing:
        raise ConfigError(f"config.json {field} (llama3) lacks {missing}")
    return theta, {"rope_type": "llama3", **{k: rs[k] for k in keys}}


def config_from_llama(d: dict) -> TextConfig:
    """herd's TextConfig for a `LlamaForCausalLM` config.json (module docstring); ConfigError naming any field
    whose value herd cannot compute."""
    arch = d.get("architectures") or [ARCHITECTURE]
    if arch != [ARCHITECTURE]:
        raise ConfigError(f"config.json architectures {arch} is not supported for model_type 'llama': herd reads "
                          f"{ARCHITECTURE} (decoder-only language models)")
    for key, fine in (("attention_bias", False), ("mlp_bias", False), ("rope_interleaved", False),
                      ("hidden_act", "silu")):
        if d.get(key, fine) != fine:
            raise ConfigError(f"config.json {key}={d[key]!r} is not supported: herd's Llama layers have "
                              f"{key}={fine!r} (no projection biases, SwiGLU, halves-rotated RoPE in the file)")
    theta, scaling = _rope(d)
    need = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in d]
    if need:
        raise ConfigError(f"config.json lacks {need}")
    L, width = d["num_hidden_layers"], d["intermediate_size"]
    max_pos = d.get("max_position_embeddings", 2048)  # LlamaConfig's default
    kw = dict(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=L,
              num_attention_heads=d["num_attention_heads"],
              num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
              head_dim=d.get("head_dim"), intermediate_size=width, intermediate_size_mlp=width,
              rms_norm_eps=d.get("rms_norm_eps", 1e-6), num_local_experts=1, num_experts_per_tok=1, moe_layers=[],
              no_rope_layers=[1] * L, attention_chunk_size=max_pos, use_qk_norm=False, attn_temperature_tuning=False,
              rope_theta=theta, rope_scaling=scaling, max_position_embeddings=max_pos,
              attention_dropout=d.get("attention_dropout", 0.0),
              tie_word_embeddings=d.get("tie_word_embeddings", False),
              initializer_range=d.get("initializer_range", 0.02), bos_token_id=d.get("bos_token_id"),
              eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"))
    try:
        return TextConfig(**kw)
    except TypeError as e:
        raise ConfigError(f"config.json has a value of the wrong type: {e}") from e


def differences(cfg) -> list[str]:
    """Why `cfg` is not a dense Llama ([] when it is one and saves as LlamaForCausalLM)."""
    if not isinstance(cfg, TextConfig):
        return ["it has a vision tower"]
    L = range(cfg.num_hidden_layers)
    why = []
    if cfg.moe_layers:
        why.append(f"MoE layers {cfg.moe_layers}")
    if not all(cfg.uses_rope(i) for i in L):
        why.append("NoPE layers")
    elif any(cfg.is_chunked(i) for i in L):
        why.append(f"chunked attention (attention_chunk_size {cfg.attention_chunk_size} < max_position_embeddings "
                   f"{cfg.max_position_embeddings})")
    if cfg.use_qk_norm:
        why.append("QK-norm")
    return why


def config_to_llama(cfg: TextConfig, dtype: torch.dtype | None = None) -> dict:
    """config.json of `LlamaForCausalLM` for a config without `differences`; both RoPE spellings are written (as
    herd.formats.hf does for Llama 4) so transformers 4.x and 5.x read the same model."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(cfg.rope_scaling, rope_type="llama3")
    d = dict(architectures=[ARCHITECTURE], model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
             intermediate_size=cfg.intermediate_size_mlp, num_hidden_layers=cfg.num_hidden_layers,
             num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
             head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
             initializer_range=cfg.initializer_range, rms_norm_eps=cfg.rms_norm_eps,
             tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
             rope_parameters=rope, attention_bias=False, attention_dropout=cfg.attention_dropout, mlp_bias=False,
             bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    if dtype is not None:
        d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d


# ---- tensors ---------------------------------------------------------------------------------------------------------
def _to_pairs(w: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of a q/k projection (n*D, I) from the halves layout (transformers' Llama) to interleaved pairs (herd)."""
    return w.reshape(n, 2, -1, w.shape[-1]).transpose(1, 2).reshape(w.shape)  # (n, D/2, 2, I) flattened


def _to_halves(w: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `_to_pairs`: transformers' `permute` in convert_llama_weights_to_hf.py."""
    return w.reshape(n, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)  # (n, 2, D/2, I) flattened


def herd_tensors(tensors: Iterable[tuple[str, torch.Tensor]], cfg: TextConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """A Llama file's (name, tensor) pairs in herd's names and q/k row order. Rotary `inv_freq` buffers that old
    pickled checkpoints carry are dropped: herd computes them from the config."""
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        name = _MLP.sub(r"\1feed_forward.", name)
        proj = name.split(".")[-2] if name.endswith(".weight") else None
        yield name, (_to_pairs(t, heads[proj]) if proj in heads else t)


def llama_tensors(sd: dict[str, torch.Tensor], cfg: TextConfig) -> dict[str, torch.Tensor]:
    """herd's state dict in `LlamaForCausalLM` names and q/k row order (the inverse of `herd_tensors`)."""
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    out = {}
    for name, t in sd.items():
        proj = name.split(".")[-2] if name.endswith(".weight") else None
        out[_FFN.sub(r"\1mlp.", name)] = _to_halves(t, heads[proj]) if proj in heads else t
    return out
