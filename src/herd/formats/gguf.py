"""GGUF (llama.cpp's single-file format) -> herd: `from_pretrained("model.gguf")` loads herd's own model.

A GGUF file holds typed metadata (`general.architecture`, `{arch}.block_count`, `tokenizer.ggml.*`, ...) and
tensors in ggml's names (`blk.{i}.attn_q.weight`) and types (F32, F16, BF16, Q8_0, Q4_K, ...). The `gguf` package
(llama.cpp's gguf-py) reads and writes it; key and tensor names here come from its `gguf.constants`, not literals.
herd reads a GGUF the way llama.cpp computes it, so a file means the same model in both:
- `llama` (dense Llama 2/3, SmolLM2, ...): mapped to the config.json keys of transformers' Llama and built by
  herd.formats.llama.config_from_llama, whose rules make a dense Llama a Llama 4 config (all layers dense and RoPE'd,
  no chunking, no QK-norm). Mixtral-style MoE (`expert_count` > 0, softmax routing) is refused: herd's MoE is Llama
  4's (sigmoid, shared expert).
- `llama4`: llama.cpp's graph (src/models/llama-iswa.cpp, hparams in src/llama-model.cpp) hard-codes chunked
  attention of 8192 in three layers of four, NoPE every fourth layer with attention temperature tuning (floor 8192,
  scale 0.1), and QK-norm unless the model has 128 experts (Maverick); `attention.sliding_window` = 0 turns the
  chunks and NoPE layers off (MobileLLM). The config takes exactly those values; the file holds no others.
- RoPE rows: llama.cpp rotates interleaved pairs (ggml's "normal" RoPE), so convert_hf_to_gguf.py permutes a
  Hugging Face Llama's q/k rows back to Meta's order (`LlamaModel.permute`, = herd.formats.llama._to_pairs) and
  leaves Llama 4's alone (`undo_permute = False`). herd rotates interleaved pairs too: rows load as stored.
- llama3 RoPE scaling is not metadata but a `rope_freqs.weight` tensor of per-frequency divisors (the converter's
  generate_extra_tensors). `_rope_scaling` recovers herd's llama3 parameters from it (they are defined only up to a
  common scale of the original context and both band factors, so one representative is chosen) and checks that herd
  computes the same frequencies; anything else is refused.
- experts: ggml keeps gate and up apart (`ffn_gate_exps`, `ffn_up_exps`, (E, F, D)) and down as (E, D, F); herd's
  `experts.gate_up_proj` is (E, D, 2F) with gate first, `experts.down_proj` (E, F, D), as the converter splits them.
Quantized tensors are dequantized on load (gguf.quants) to the requested dtype; types outside `SUPPORTED` and
unknown architectures are refused by name. The tokenizer is rebuilt in herd.formats.gguf_tokenizer.

Shapes: E experts, D hidden, F expert width, L layers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from herd.config import ConfigError, TextConfig
from herd.formats import hf_integrity as integrity
from herd.formats import llama
from herd.formats.hf_integrity import CheckpointError
from herd.model.attention import rope_inv_freq
from herd.model.build import Model, allocate, build_model


class GGUFError(CheckpointError):
    """A GGUF file herd cannot read: unknown architecture or tensor type, or metadata herd cannot compute."""


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


def _gguf():
    import gguf  # imported on use: only GGUF files need it

    return gguf


ARCHITECTURES = ("llama", "llama4")
# LLAMA4_* are llama.cpp's fixed llama4 settings (module docstring); a herd export is checked against them.
LLAMA4_CHUNK, LLAMA4_FLOOR_SCALE, LLAMA4_ATTN_SCALE, LLAMA4_NOPE_INTERVAL, MAVERICK_EXPERTS = 8192, 8192, 0.1, 4, 128


def supported_types() -> set:
    Q = _gguf().GGMLQuantizationType
    return {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}


# ---- reading --------------------------------------------------------------------------------------------------------
def open_reader(path: str | os.PathLike):
    """A gguf.GGUFReader over a regular file, errors naming the file (an unknown tensor type fails here)."""
    f = Path(path)
    if not f.is_file():
        raise GGUFError(f"GGUF file {path} does not exist (or is not a regular file)")
    try:
        return _gguf().GGUFReader(str(f))
    except ValueError as e:  # bad magic, truncated file, or a tensor type this gguf package does not know
        raise GGUFError(f"{path} is not a GGUF file herd can read: {e} (a tensor type unknown to the installed "
                        "`gguf` package needs a newer one, or re-quantize the file to a common type)") from e


def metadata(reader) -> dict:
    """{key: value} of every metadata field (strings, numbers, lists), as gguf-py decodes them."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _key(template: str, arch: str) -> str:
    return template.format(arch=arch)


def _arch(meta: dict) -> str:
    arch = meta.get(_gguf().Keys.General.ARCHITECTURE)
    if arch not in ARCHITECTURES:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported: herd reads {list(ARCHITECTURES)} (Llama and "
                        "Llama 4 text models)")
    return arch


def _need(meta: dict, arch: str, template: str):
    k = _key(template, arch)
    if k not in meta:
        raise GGUFError(f"GGUF metadata lacks {k}, which llama.cpp requires for {arch}")
    return meta[k]


def _rope_scaling(freqs: np.ndarray, head_dim: int, theta: float, orig_ctx: int | None) -> dict | None:
    """herd's llama3 rope_scaling for llama.cpp's `rope_freqs` divisors f (D/2,); GGUFError if none reproduces them.
    llama3 divides inverse frequencies by `factor` for wavelengths above old/low, keeps those below old/high and
    blends linearly in 1/wavelength between (smooth = (old/wavelen - low) / (high - low)), so scaling old, low and high
    together changes nothing: low = 1 is chosen, and old/high come from a line through the blended band."""
    f = freqs.astype(np.float64)
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(f.max())
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / base
    keep, low = np.isclose(f, 1.0, atol=1e-6), np.isclose(f, factor, rtol=1e-6)
    mid = ~keep & ~low
    if mid.sum() >= 2:  # smooth = a / wavelen + b, with a = old / (high - low), b = -low / (high - low)
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[mid], s, 1)
        lo, hi = 1.0, 1.0 - 1.0 / b if b < 0 else 4.0
        old = a * (hi - lo)
    else:  # no blended band: any old strictly between the kept and divided wavelengths (with low = high) fits
        top = wavelen[keep].max(initial=0.0)
        bottom = wavelen[low | mid].min(initial=math.inf)
        old = orig_ctx if orig_ctx and top < orig_ctx < bottom else next(
            (2.0**k for k in range(64) if top < 2.0**k < bottom), (top + bottom) / 2)
        lo = hi = 1.0
        if mid.any():  # one blended frequency: Llama 3's band (high = 4 low) through it
            s = float((1 / f[mid][0] - 1 / factor) / (1 - 1 / factor))
            hi = 4.0
            old = (s * (hi - lo) + lo) * float(wavelen[mid][0])
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": float(hi),
               "original_max_position_embeddings": int(old) if float(old).is_integer() else float(old)}
    got = rope_inv_freq(head_dim, theta, scaling).double().numpy()
    if not np.allclose(base / got, f, rtol=1e-4, atol=0):
        raise GGUFError("rope_freqs.weight is not a llama3 RoPE scaling herd can compute (herd implements the default "
                        "and llama3 RoPE); convert the model with rope scaling off or use llama.cpp")
    return scaling


def config_from_gguf(reader) -> TextConfig:
    """herd's TextConfig for a GGUF file's metadata (module docstring: llama via herd.formats.llama, llama4 with
    llama.cpp's fixed settings)."""
    g = _gguf()
    K, meta = g.Keys, metadata(reader)
    arch = _arch(meta)
    tensors = {t.name: t for t in reader.tensors}
    hidden, L = _need(meta, arch, K.LLM.EMBEDDING_LENGTH), _need(meta, arch, K.LLM.BLOCK_COUNT)
    heads = _need(meta, arch, K.Attention.HEAD_COUNT)
    head_dim = meta.get(_key(K.Attention.KEY_LENGTH, arch), hidden // heads)
    if meta.get(_key(K.Attention.VALUE_LENGTH, arch), head_dim) != head_dim:
        raise GGUFError("GGUF attention.value_length differs from key_length; herd's heads have one head_dim")
    if meta.get(_key(K.Rope.DIMENSION_COUNT, arch), head_dim) != head_dim:
        raise GGUFError(f"GGUF rope.dimension_count {meta[_key(K.Rope.DIMENSION_COUNT, arch)]} is not the head "
                        f"size {head_dim}: herd rotates whole heads (no partial RoPE)")
    kind = meta.get(_key(K.Rope.SCALING_TYPE, arch), "none")
    if kind not in ("none", ""):
        raise GGUFError(f"GGUF rope.scaling.type {kind!r} is not supported: herd computes the default and llama3 RoPE")
    if _key(K.Attention.SCALE, arch) in meta:
        raise GGUFError("GGUF attention.scale is set; herd's attention scale is 1/sqrt(head_dim)")
    theta = float(meta.get(_key(K.Rope.FREQ_BASE, arch), 10000.0))
    rope_name = g.TENSOR_NAMES[g.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    scaling = None
    if rope_name in tensors:
        scaling = _rope_scaling(_to_numpy(tensors[rope_name]), head_dim, theta,
                                meta.get(_key(K.Rope.SCALING_ORIG_CTX_LEN, arch)))
    embd = tensors.get(g.TENSOR_NAMES[g.MODEL_TENSOR.TOKEN_EMBD] + ".weight")
    vocab = meta.get(_key(K.LLM.VOCAB_SIZE, arch)) or (int(embd.shape[1]) if embd is not None else None) \
        or len(meta.get(K.Tokenizer.LIST, []))
    tied = g.TENSOR_NAMES[g.MODEL_TENSOR.OUTPUT] + ".weight" not in tensors
    ids = {k: meta.get(key) for k, key in (("bos_token_id", K.Tokenizer.BOS_ID), ("pad_token_id", K.Tokenizer.PAD_ID))}
    ids = {k: int(v) if v is not None and 0 <= int(v) < vocab else None for k, v in ids.items()}
    eos = sorted({int(meta[k]) for k in (K.Tokenizer.EOS_ID, K.Tokenizer.EOT_ID, K.Tokenizer.EOM_ID)
                  if k in meta and 0 <= int(meta[k]) < vocab})  # every end-of-generation id llama.cpp stops on
    ids["eos_token_id"] = eos[0] if len(eos) == 1 else eos or None
    ctx = int(meta.get(_key(K.LLM.CONTEXT_LENGTH, arch), 2048))
    # stored as float32: 7 significant digits give back the float64 the exporter had (1e-05, not 9.9999997e-06)
    eps = float(f"{float(meta.get(_key(K.Attention.LAYERNORM_RMS_EPS, arch), 1e-5)):.7g}")
    experts = int(meta.get(_key(K.LLM.EXPERT_COUNT, arch), 0))
    try:
        if arch == "llama":
            if experts:
                raise GGUFError(f"GGUF llama model with {experts} experts (Mixtral-style softmax routing) is not "
                                "supported: herd's MoE is Llama 4's (sigmoid router, shared expert)")
            d = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=L,
                     intermediate_size=_need(meta, arch, K.LLM.FEED_FORWARD_LENGTH), num_attention_heads=heads,
                     num_key_value_heads=meta.get(_key(K.Attention.HEAD_COUNT_KV, arch), heads), head_dim=head_dim,
                     rms_norm_eps=eps, rope_theta=theta, rope_scaling=scaling, max_position_embeddings=ctx,
                     tie_word_embeddings=tied, **ids)
            return llama.config_from_llama(d)
        step = int(meta.get(_key(K.LLM.INTERLEAVE_MOE_LAYER_STEP, arch), 1))
        no_chunks = meta.get(_key(K.Attention.SLIDING_WINDOW, arch)) == 0  # llama.cpp: "always use rope" (MobileLLM)
        layout = dict(no_rope_layers=[1] * L, attention_chunk_size=ctx) if no_chunks else \
            dict(no_rope_layer_interval=LLAMA4_NOPE_INTERVAL, attention_chunk_size=LLAMA4_CHUNK)
        moe = dict(num_local_experts=experts, num_experts_per_tok=int(_need(meta, arch, K.LLM.EXPERT_USED_COUNT)),
                   interleave_moe_layer_step=step) if experts else \
            dict(num_local_experts=1, num_experts_per_tok=1, moe_layers=[])
        return TextConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=L, num_attention_heads=heads,
                          num_key_value_heads=meta.get(_key(K.Attention.HEAD_COUNT_KV, arch), heads), head_dim=head_dim,
                          intermediate_size=int(meta.get(_key(K.LLM.EXPERT_FEED_FORWARD_LENGTH, arch), 1)),
                          intermediate_size_mlp=_need(meta, arch, K.LLM.FEED_FORWARD_LENGTH), rms_norm_eps=eps,
                          use_qk_norm=experts != MAVERICK_EXPERTS, attn_temperature_tuning=not no_chunks,
                          floor_scale=LLAMA4_FLOOR_SCALE, attn_scale=LLAMA4_ATTN_SCALE, rope_theta=theta,
                          rope_scaling=scaling, max_position_embeddings=ctx, tie_word_embeddings=tied,
                          **layout, **moe, **ids)
    except (ConfigError, TypeError) as e:
        raise GGUFError(f"GGUF metadata does not make a valid herd config: {e}") from e


def load_config(path: str | os.PathLike) -> TextConfig:
    return config_from_gguf(open_reader(path))


# ---- tensors --------------------------------------------------------------------------------------------------------
def _to_numpy(t) -> np.ndarray:
    """A reader tensor as float32 in PyTorch order (ggml's ne reversed), dequantized by gguf.quants."""
    g = _gguf()
    if t.tensor_type not in supported_types():
        raise GGUFError(f"tensor {t.name} has type {t.tensor_type.name}, which herd does not dequantize (supported: "
                        f"{sorted(q.name for q in supported_types())})")
    Q = g.GGMLQuantizationType
    data = np.asarray(t.data) if t.tensor_type in (Q.F32, Q.F16) else g.quants.dequantize(t.data, t.tensor_type)
    return np.array(data, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))  # a writable copy


def name_map(cfg: TextConfig) -> dict[str, str]:
    """{gguf tensor name: herd parameter name} for every tensor that maps one to one (the experts are split)."""
    g = _gguf()
    T, names = g.MODEL_TENSOR, g.TENSOR_NAMES
    out = {names[T.TOKEN_EMBD] + ".weight": "model.embed_tokens.weight",
           names[T.OUTPUT_NORM] + ".weight": "model.norm.weight", names[T.OUTPUT] + ".weight": "lm_head.weight"}
    per_layer = {T.ATTN_NORM: "input_layernorm.weight", T.FFN_NORM: "post_attention_layernorm.weight",
                 T.ATTN_Q: "self_attn.q_proj.weight", T.ATTN_K: "self_attn.k_proj.weight",
                 T.ATTN_V: "self_attn.v_proj.weight", T.ATTN_OUT: "self_attn.o_proj.weight",
                 T.FFN_GATE: "feed_forward.gate_proj.weight", T.FFN_UP: "feed_forward.up_proj.weight",
                 T.FFN_DOWN: "feed_forward.down_proj.weight", T.FFN_GATE_INP: "feed_forward.router.weight",
                 T.FFN_GATE_SHEXP: "feed_forward.shared_expert.gate_proj.weight",
                 T.FFN_UP_SHEXP: "feed_forward.shared_expert.up_proj.weight",
                 T.FFN_DOWN_SHEXP: "feed_forward.shared_expert.down_proj.weight"}
    for i in range(cfg.num_hidden_layers):
        for t, herd in per_layer.items():
            out[names[t].format(bid=i) + ".weight"] = f"model.layers.{i}.{herd}"
    return out


def expert_names(i: int) -> tuple[str, str, str]:
    """The gguf names of layer i's routed experts: (gate, up, down)."""
    g = _gguf()
    T, names = g.MODEL_TENSOR, g.TENSOR_NAMES
    return tuple(names[t].format(bid=i) + ".weight" for t in (T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP))


def herd_tensors(reader, cfg: TextConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(herd name, float32 tensor) for every weight of the file, dequantized one at a time; unknown names raise."""
    g = _gguf()
    names, tensors = name_map(cfg), {t.name: t for t in reader.tensors}
    skip = {g.TENSOR_NAMES[g.MODEL_TENSOR.ROPE_FREQS] + ".weight"}  # read into the config (rope_scaling)
    for i in cfg.moe_layers:
        gate, up, down = expert_names(i)
        if gate in tensors and up in tensors and down in tensors:
            skip |= {gate, up, down}
            gu = torch.cat([torch.from_numpy(_to_numpy(tensors[gate])), torch.from_numpy(_to_numpy(tensors[up]))], 1)
            yield f"model.layers.{i}.feed_forward.experts.gate_up_proj", gu.transpose(1, 2)  # (E, D, 2F)
            yield f"model.layers.{i}.feed_forward.experts.down_proj", \
                torch.from_numpy(_to_numpy(tensors[down])).transpose(1, 2)  # (E, F, D)
    unknown = [n for n in tensors if n not in names and n not in skip]
    if unknown:
        raise GGUFError(f"GGUF tensors herd does not know: {unknown[:8]} (the metadata says {cfg.num_hidden_layers} "
                        f"layers, MoE layers {cfg.moe_layers})")
    for name, t in tensors.items():
        if name not in skip:
            yield names[name], torch.from_numpy(_to_numpy(t))


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, check_finite: bool = True) -> Model:
    """herd's text model from a GGUF file, every tensor dequantized to `dtype` (float32 by default)."""
    reader = open_reader(path)
    cfg = config_from_gguf(reader)
    dtype, device = dtype or torch.float32, device or "cpu"
    integrity.check_memory(cfg, dtype, device, str(path))
    model = allocate(build_model(cfg, device="meta", dtype=dtype), device)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    with torch.no_grad():
        for name, t in herd_tensors(reader, cfg):
            p = params[name]
            if tuple(t.shape) != tuple(p.shape):
                raise GGUFError(f"{path}: tensor for {name} has shape {tuple(t.shape)}, the metadata implies "
                                f"{tuple(p.shape)}")
            p.copy_(t)
            if check_finite:
                integrity.check_finite(name, p, t)
            loaded.add(name)
    missing = sorted(n for n in params if n not in loaded and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if missing:
        raise GGUFError(f"{path} lacks tensors for {missing[:8]} ({len(missing)} in all)")
    return model.eval()
