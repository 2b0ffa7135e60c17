"""Parameter, memory and KV-cache accounting from configs alone (no weights needed; `herd info` prints it).

Tests cross-check every count against real modules built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from herd.config import Llama4Config, TextConfig, VisionConfig


@dataclass
class ParamCounts:
    total: int
    active: int  # parameters touched per token: shared expert + top-k routed experts, embeddings included
    embedding: int
    by_part: dict = field(default_factory=dict)


def count_params(cfg: TextConfig) -> ParamCounts:
    D, F, Fd, E, k = cfg.hidden_size, cfg.intermediate_size, cfg.intermediate_size_mlp, cfg.num_local_experts, \
        cfg.num_experts_per_tok
    hd, H, KV = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    attn = D * hd * (2 * H + 2 * KV)
    norms = 2 * D
    expert = 3 * D * F
    n_moe = len(set(cfg.moe_layers))
    n_dense = cfg.num_hidden_layers - n_moe
    moe_total = E * expert + expert + D * E  # routed experts + shared expert + router
    moe_active = k * expert + expert + D * E
    dense = 3 * D * Fd
    emb = cfg.vocab_size * D * (1 if cfg.tie_word_embeddings else 2)
    base = cfg.num_hidden_layers * (attn + norms) + D + emb
    total = base + n_moe * moe_total + n_dense * dense
    active = base + n_moe * moe_active + n_dense * dense
    parts = {"embeddings": emb, "attention": cfg.num_hidden_layers * attn, "routed_experts": n_moe * E * expert,
             "shared_experts": n_moe * expert, "dense_mlp": n_dense * dense}
    return ParamCounts(total=total, active=active, embedding=emb, by_part=parts)


def count_vision_params(v: VisionConfig, text_hidden: int) -> int:
    """Vision tower + adapter + projector parameters (all always active for image tokens)."""
    D, n_pos = v.hidden_size, (v.image_size // v.patch_size) ** 2 + 1
    patch = v.num_channels * v.patch_size ** 2 * D
    layer = 4 * (D * D + D) + 2 * D * v.intermediate_size + v.intermediate_size + D + 4 * D
    adapter = v.intermediate_size * v.projector_input_dim + v.projector_input_dim * v.projector_output_dim
    projector = v.vision_output_dim * text_hidden + (text_hidden if v.multi_modal_projector_bias else 0)
    return patch + D + n_pos * D + 4 * D + v.num_hidden_layers * layer + adapter + projector


def kv_cache_bytes_per_token(cfg: TextConfig, bytes_per_elem: int = 2) -> dict:
    """K and V bytes one token adds. Chunked (RoPE) layers stop growing after `attention_chunk_size` tokens."""
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * bytes_per_elem
    n_global = sum(1 for i in range(cfg.num_hidden_layers) if not cfg.is_chunked(i))
    n_chunked = cfg.num_hidden_layers - n_global
    return {"all_layers": per_layer * cfg.num_hidden_layers, "global_layers": per_layer * n_global,
            "chunked_layers": per_layer * n_chunked,
            "chunked_cap_bytes": per_layer * n_chunked * cfg.attention_chunk_size}


def human(n: float, unit: str = "") -> str:
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}{unit}"
    return f"{n:.0f}{unit}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def describe(cfg: TextConfig | Llama4Config) -> list[tuple[str, str]]:
    """Rows for `herd info`: sizes, memory at several weight precisions, KV-cache cost."""
    vision = None
    if isinstance(cfg, Llama4Config):
        v, cfg = cfg.vision_config, cfg.text_config
        vision = count_vision_params(v, cfg.hidden_size)
    pc = count_params(cfg)
    total = pc.total + (vision or 0)
    kv = kv_cache_bytes_per_token(cfg)
    rows = [("layers", f"{cfg.num_hidden_layers} ({len(cfg.moe_layers)} MoE, "
                       f"{sum(1 for i in range(cfg.num_hidden_layers) if not cfg.uses_rope(i))} global NoPE)"),
            ("hidden / heads / kv heads / head_dim",
             f"{cfg.hidden_size} / {cfg.num_attention_heads} / {cfg.num_key_value_heads} / {cfg.head_dim}"),
            ("experts (top-k)", f"{cfg.num_local_experts} (top-{cfg.num_experts_per_tok}) + shared"
                                if cfg.moe_layers else "none (every layer dense)"),
            ("text parameters (total)", f"{human(pc.total)} ({pc.total:,})"),
            ("active parameters / text token", f"{human(pc.active)} ({pc.active:,})")]
    if vision is not None:
        rows += [("vision tower", f"{v.num_hidden_layers} layers x {v.hidden_size}, {v.image_size}-px tiles "
                                  f"(up to {v.max_tiles}), {v.tokens_per_tile} tokens per tile"),
                 ("vision parameters", f"{human(vision)} ({vision:,})"),
                 ("total parameters", f"{human(total)} ({total:,})")]
    for name, b in (("bf16", 2), ("fp8", 1), ("int4", 0.5)):
        rows.append((f"weights at {name}", _gib(total * b)))
    rows.append(("KV cache / token (bf16, all layers)", f"{kv['all_layers']:,} B"))
    rows.append(("KV cache / token beyond chunk (global only)", f"{kv['global_layers']:,} B"))
    rows.append(("chunked-layer KV cap (bf16)", _gib(kv["chunked_cap_bytes"])))
    rows.append(("attention chunk", f"{cfg.attention_chunk_size} tokens"))
    return rows
