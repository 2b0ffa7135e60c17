"""herd -> GGUF: a file llama.cpp loads, written as its convert_hf_to_gguf.py writes a Llama or Llama 4 checkpoint.

- Architecture: a dense Llama (herd.formats.llama.differences is empty) is written as `llama`, anything else as
  `llama4`, with the hyperparameter keys llama.cpp reads for them (src/llama-model.cpp): context, embedding and
  feed-forward lengths, heads, kv heads, key/value length, RoPE base and dimension, RMS eps, vocabulary size, and for
  llama4 the expert count, experts per token, expert width and `interleave_moe_layer_step`.
- Tensors: herd.formats.gguf's name map (names from gguf.constants), experts split into gate/up/down as the
  converter does, no q/k permutation (herd's rows are already in the interleaved order llama.cpp rotates), llama3
  RoPE scaling as the `rope_freqs` divisors. `--type`: f32; f16 (norms, router and rope_freqs stay f32, as the
  converter keeps them); q8_0 (matrices whose rows are multiples of 32, else f16).
- Tokenizer and chat template: herd.formats.gguf_tokenizer.add_tokenizer, then the tokenizer's own template or
  herd's (herd.formats.chat_template.HERD_CHAT_TEMPLATE).

What llama.cpp would compute differently is listed by `llama_cpp_mismatches` and refused unless `force`: its llama4
graph ignores the file for the chunk size (8192), temperature floor and scale (8192, 0.1), NoPE layout (every
fourth layer) and QK-norm (on unless 128 experts), places MoE layers by `interleave_moe_layer_step` only, routes
without herd's selection biases, and always tunes the NoPE layers' temperature. With `force` the file still
describes what llama.cpp computes (herd re-imports it that way), and the list is printed as a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from herd.config import TextConfig
from herd.formats import gguf as gg
from herd.formats import llama
from herd.formats.gguf import GGUFError, _gguf
from herd.formats.gguf_tokenizer import LLAMA3_PATTERN, PRE_TOKENIZERS
from herd.model.attention import rope_inv_freq
from herd.tokenizer import O200K_PATTERN

TYPES = ("f32", "f16", "q8_0")


class LlamaCppMismatchWarning(UserWarning):
    """A forced GGUF export that llama.cpp computes differently from herd."""


def architecture(cfg: TextConfig) -> str:
    return "llama" if not llama.differences(cfg) else "llama4"


def llama_cpp_mismatches(model) -> list[str]:
    """Every way llama.cpp's graph for this model's GGUF would compute differently from herd ([] when none)."""
    cfg = model.config
    if not isinstance(cfg, TextConfig):
        return ["the vision tower is not exported (text model only)"]
    if architecture(cfg) == "llama":
        return []
    L, why = range(cfg.num_hidden_layers), []
    nope = [i for i in L if not cfg.uses_rope(i)]
    if nope != [i for i in L if (i + 1) % gg.LLAMA4_NOPE_INTERVAL == 0]:
        why.append(f"NoPE layers {nope}: llama.cpp makes every {gg.LLAMA4_NOPE_INTERVAL}th layer NoPE")
    if any(cfg.is_chunked(i) for i in L) and cfg.attention_chunk_size != gg.LLAMA4_CHUNK:
        why.append(f"attention_chunk_size {cfg.attention_chunk_size}: llama.cpp chunks by {gg.LLAMA4_CHUNK}")
    elif not any(cfg.is_chunked(i) for i in L) and cfg.max_position_embeddings > gg.LLAMA4_CHUNK:
        why.append(f"global RoPE layers: llama.cpp chunks them by {gg.LLAMA4_CHUNK} beyond that many tokens")
    if nope and not cfg.attn_temperature_tuning:
        why.append("attn_temperature_tuning off: llama.cpp always tunes the NoPE layers' temperature")
    if nope and (cfg.floor_scale, cfg.attn_scale) != (gg.LLAMA4_FLOOR_SCALE, gg.LLAMA4_ATTN_SCALE):
        why.append(f"floor_scale {cfg.floor_scale} / attn_scale {cfg.attn_scale}: llama.cpp uses "
                   f"{gg.LLAMA4_FLOOR_SCALE} / {gg.LLAMA4_ATTN_SCALE}")
    qk = cfg.num_local_experts != gg.MAVERICK_EXPERTS
    if cfg.use_qk_norm != qk:
        why.append(f"use_qk_norm {cfg.use_qk_norm}: llama.cpp applies QK-norm {'unless' if qk else 'only unless'} "
                   f"a model has {gg.MAVERICK_EXPERTS} experts (here {cfg.num_local_experts})")
    step = cfg.interleave_moe_layer_step
    if list(cfg.moe_layers) != [i for i in L if step and (i + 1) % step == 0]:  # step 0: dense (Llama Guard 4)
        why.append(f"MoE layers {cfg.moe_layers}: llama.cpp places them every {step} layers from {step - 1}")
    from herd.formats.hf import biased

    if routers := biased(model):
        why.append(f"{len(routers)} router(s) with non-zero selection biases (e.g. {routers[0]}): llama.cpp routes "
                   "without them")
    return why


def _rope_freqs(cfg: TextConfig) -> np.ndarray | None:
    if cfg.rope_scaling is None or cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) != "llama3":
        return None
    base = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None).double()
    return (base / rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).double()).float().numpy()


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """{gguf name: float32 array} in llama.cpp's names and layouts (the inverse of gguf.herd_tensors)."""
    cfg = model.config
    names = {h: g for g, h in gg.name_map(cfg).items()}
    out = {}
    for n, p in model.named_parameters():  # a tied lm_head appears once (as embed_tokens): llama.cpp reuses it
        t = p.detach().float().cpu()
        if n.endswith("experts.gate_up_proj"):
            gate, up, down = gg.expert_names(int(n.split(".")[2]))
            gu = t.transpose(1, 2)  # (E, 2F, D)
            out[gate], out[up] = (x.contiguous().numpy() for x in gu.split(gu.shape[1] // 2, dim=1))
        elif n.endswith("experts.down_proj"):
            out[gg.expert_names(int(n.split(".")[2]))[2]] = t.transpose(1, 2).contiguous().numpy()
        else:
            out[names[n]] = t.numpy()
    if (freqs := _rope_freqs(cfg)) is not None:
        g = _gguf()
        out[g.TENSOR_NAMES[g.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = freqs
    return out


def _keep_f32(name: str, a: np.ndarray) -> bool:
    g = _gguf()
    return a.ndim <= 1 or name.endswith(("_norm.weight", g.TENSOR_NAMES[g.MODEL_TENSOR.FFN_GATE_INP].split(".")[-1]
                                         + ".weight"))


def _write_hparams(w, cfg: TextConfig, arch: str) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size_mlp)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama4":
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.intermediate_size)
        w.add_interleave_moe_layer_step(cfg.interleave_moe_layer_step)


# ---- tokenizer -----------------------------------------------------------------------------------------------------
def pre_name(tok) -> str:
    """The `tokenizer.ggml.pre` name of a herd Tokenizer, recognised from its pre-tokenizer (the inverse of
    `PRE_TOKENIZERS`); GGUFError for one llama.cpp would not split the same way."""
    pre = json.loads(tok._tok.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = parts[0].get("pattern", {}).get("Regex")
        for name, regex in (("llama4", O200K_PATTERN), ("llama-bpe", LLAMA3_PATTERN)):
            if pattern == regex:
                return name
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    raise GGUFError(f"the tokenizer's pre-tokenizer ({kinds}) is not one llama.cpp knows by name (herd writes "
                    f"{sorted(PRE_TOKENIZERS)}); llama.cpp would split text differently")


def add_tokenizer(writer, tok, vocab_size: int) -> None:
    """Write `tok` into a gguf.GGUFWriter as llama.cpp's convert_hf_to_gguf.py does (_set_vocab_gpt2): every id
    below the model's `vocab_size`, ids the tokenizer lacks as `[PAD{i}]` unused tokens."""
    g = _gguf()
    TT = g.TokenType
    model = json.loads(tok._tok.to_str())["model"]
    if model.get("type") != "BPE":
        raise GGUFError(f"the tokenizer is a {model.get('type')} model; GGUF export writes byte-level BPE only")
    inverse = {i: t for t, i in tok._tok.get_vocab(with_added_tokens=True).items()}
    added = tok._tok.get_added_tokens_decoder()
    if max(inverse) >= vocab_size:
        raise GGUFError(f"the tokenizer has ids up to {max(inverse)}, beyond the model's {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in inverse:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
        else:
            tokens.append(inverse[i])
            types.append(TT.NORMAL if i not in added else TT.CONTROL if added[i].special else TT.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    if tok.pad_id is not None:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(tok._tok.post_processor is not None)


# ---- the file --------------------------------------------------------------------------------------------------------
def export_gguf(model, tokenizer, path: str | os.PathLike, type: str = "f16", force: bool = False,
                name: str | None = None) -> list[str]:
    """Write `model` (and `tokenizer`) as one GGUF file; returns the llama.cpp mismatches (non-empty only when
    forced, with a LlamaCppMismatchWarning)."""
    if type not in TYPES:
        raise GGUFError(f"GGUF export type {type!r} is not supported; choose one of {list(TYPES)}")
    why = llama_cpp_mismatches(model)
    if why and not force:
        raise GGUFError("llama.cpp would compute this model differently from herd: " + "; ".join(why) +
                        ". Retrain or re-init with llama.cpp's settings, or pass --force to export anyway")
    if why:
        warnings.warn("forced GGUF export: llama.cpp computes this model differently: " + "; ".join(why),
                      LlamaCppMismatchWarning, stacklevel=2)
    g = _gguf()
    Q, FT = g.GGMLQuantizationType, g.LlamaFileType
    cfg = model.text_config
    arch = architecture(cfg)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = g.GGUFWriter(str(tmp), arch)
    w.add_type(g.GGUFType.MODEL)
    w.add_name(name or out.stem)
    w.add_file_type({"f32": FT.ALL_F32, "f16": FT.MOSTLY_F16, "q8_0": FT.MOSTLY_Q8_0}[type])
    w.add_quantization_version(g.GGML_QUANT_VERSION)
    _write_hparams(w, cfg, arch)
    add_tokenizer(w, tokenizer, cfg.vocab_size)
    for role in ("eot", "eom"):
        if f"<|{role}|>" in tokenizer.specials:  # llama.cpp's end-of-generation tokens besides eos
            getattr(w, f"add_{role}_token_id")(tokenizer.specials[f"<|{role}|>"])
    from herd.formats.chat_template import HERD_CHAT_TEMPLATE

    w.add_chat_template(tokenizer.chat_template or HERD_CHAT_TEMPLATE)
    for n, a in gguf_tensors(model).items():
        if type == "f32" or _keep_f32(n, a):
            w.add_tensor(n, a.astype(np.float32))
        elif type == "q8_0" and a.shape[-1] % g.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
            w.add_tensor(n, g.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(n, a.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return why


def export_checkpoint(model_path: str | os.PathLike, out: str | os.PathLike, type: str = "f16",
                      force: bool = False) -> list[str]:
    """`herd export --gguf`: load a herd/Hugging Face checkpoint directory (or a GGUF file) and its tokenizer, write
    the GGUF file. Float32 weights are read, so the output type alone decides the precision."""
    from herd.formats.hf import from_pretrained
    from herd.tokenizer import Tokenizer

    model = from_pretrained(model_path, dtype=torch.float32, text_only=True)
    return export_gguf(model, Tokenizer.from_pretrained(model_path), out, type=type, force=force,
                       name=Path(model_path).stem)
