"""Typed model configs and named presets.

`TextConfig` uses the field names of Hugging Face's `Llama4TextConfig` (config.json keys), so reading and writing a
checkpoint's config is a dictionary copy with validation, not a translation. Derived fields (`moe_layers`,
`no_rope_layers`) are resolved on construction exactly as transformers resolves them, and the invariants the model
relies on are checked there with messages that say what to change.

Presets:
- `llama4-scout`    Llama-4-Scout-17B-16E: 48 layers, all MoE, 16 experts, QK-norm, llama3 RoPE scaling (16/1/1).
- `llama4-maverick` Llama-4-Maverick-17B-128E: 48 layers, MoE every second layer (odd), 128 experts, no QK-norm.
- `llama4-behemoth` a *preview* shape (Meta published only "16 experts, 288B active, ~2T total"; no config). Derived
  by solving active = 288B and total ~= 2T for a Llama-4 block (GQA 128-dim heads, 8 KV heads, top-1 + shared expert,
  all layers MoE, 202048 vocab): hidden 16384 (128 heads), 96 layers (a multiple of the iRoPE period 4), expert
  width 24576 (1.5 x hidden) gives 293B active / 2.03T total. Treat it as plausible, not official.
- `tiny`, `tiny-maverick` run in seconds on a laptop CPU and keep every structural feature.
Values for Scout/Maverick: shared/spec/llama4-architecture.md section 1.1 (from the released config.json files).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

LLAMA4_VOCAB = 202048  # 200000 BPE ranks + 2048 special-token slots


class ConfigError(ValueError):
    """A config is malformed or contradicts itself."""


@dataclass(kw_only=True)
class TextConfig:
    vocab_size: int = 2048
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    intermediate_size: int = 128  # width of each routed expert and of the shared expert
    intermediate_size_mlp: int = 256  # width of the dense SwiGLU MLP (non-MoE layers)
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    # Mixture of experts: top-k on raw router logits, sigmoid score that scales the expert input, shared expert.
    num_local_experts: int = 4
    num_experts_per_tok: int = 1
    interleave_moe_layer_step: int = 1
    moe_layers: list[int] | None = None  # None -> range(step - 1, L, step), as transformers derives it
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    # iRoPE: 1 = RoPE layer with chunked local attention, 0 = NoPE layer with global attention.
    no_rope_layers: list[int] | None = None  # None or [] -> int((i + 1) % interval != 0)
    no_rope_layer_interval: int = 4
    attention_chunk_size: int = 8192
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3", factor, low/high_freq_factor, original_max...}
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 200000
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "intermediate_size_mlp", "num_local_experts", "num_experts_per_tok",
                     "no_rope_layer_interval", "interleave_moe_layer_step"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        L = self.num_hidden_layers
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        if not self.no_rope_layers:
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(L)]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, L, step))
        self.moe_layers = [int(i) for i in self.moe_layers]
        self.no_rope_layers = [int(v) for v in self.no_rope_layers]
        if isinstance(self.attn_temperature_tuning, int):  # hub files store 4; any truthy value enables it
            self.attn_temperature_tuning = bool(self.attn_temperature_tuning)
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(isinstance(self.head_dim, int) and self.head_dim > 0,
             f"head_dim must be a positive int, got {self.head_dim!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads}) for grouped-query attention")
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(isinstance(self.attention_chunk_size, int) and self.attention_chunk_size > 0,
             f"attention_chunk_size must be a positive int, got {self.attention_chunk_size!r}")
        need(self.num_experts_per_tok <= self.num_local_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts ({self.num_local_experts})")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        need(len(self.no_rope_layers) >= self.num_hidden_layers,
             f"no_rope_layers has {len(self.no_rope_layers)} entries, need one per layer ({self.num_hidden_layers})")
        need(all(v in (0, 1) for v in self.no_rope_layers), "no_rope_layers entries must be 0 (NoPE) or 1 (RoPE)")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        need(not bad, f"moe_layers {bad} out of range for {self.num_hidden_layers} layers")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        need(self.floor_scale > 0, f"floor_scale must be > 0, got {self.floor_scale}")
        need(not self.attention_bias, "attention_bias=True is not a Llama 4 feature and is not supported")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("rope_type", rs.get("type"))
            need(kind in ("llama3", "default"), f"rope_scaling type {kind!r} is not supported (llama3 or default)")
            if kind == "llama3":
                keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                missing = [k for k in keys if k not in rs]
                need(not missing, f"llama3 rope_scaling lacks {missing}")
                need(rs["factor"] > 0, "rope_scaling.factor must be > 0")

    # --- derived facts used across the code base -------------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    def uses_rope(self, i: int) -> bool:
        return bool(self.no_rope_layers[i])

    @property
    def layer_types(self) -> list[str]:
        return ["chunked_attention" if self.uses_rope(i) else "full_attention" for i in range(self.num_hidden_layers)]

    def replace(self, **kw) -> TextConfig:
        """A copy with some fields changed; derived layer lists are re-derived unless given."""
        d = dataclasses.asdict(self)
        if {"num_hidden_layers", "no_rope_layer_interval"} & kw.keys() and "no_rope_layers" not in kw:
            d["no_rope_layers"] = None
        if {"num_hidden_layers", "interleave_moe_layer_step"} & kw.keys() and "moe_layers" not in kw:
            d["moe_layers"] = None
        d.update(kw)
        return TextConfig(**d)


_SCOUT = dict(
    vocab_size=LLAMA4_VOCAB, hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
    head_dim=128, intermediate_size=8192, intermediate_size_mlp=16384, num_local_experts=16, num_experts_per_tok=1,
    interleave_moe_layer_step=1, attention_chunk_size=8192, use_qk_norm=True, rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                      original_max_position_embeddings=8192),
    max_position_embeddings=10485760, bos_token_id=200000, eos_token_id=[200001, 200007, 200008], pad_token_id=200018,
)

PRESETS: dict[str, dict] = {
    "llama4-scout": _SCOUT,
    "llama4-maverick": {**_SCOUT, "num_local_experts": 128, "interleave_moe_layer_step": 2, "use_qk_norm": False,
                        "rope_scaling": None, "max_position_embeddings": 1048576},
    "llama4-behemoth": {**_SCOUT, "hidden_size": 16384, "num_attention_heads": 128, "num_hidden_layers": 96,
                        "intermediate_size": 24576, "intermediate_size_mlp": 49152, "max_position_embeddings": 262144},
    # Tiny presets: every feature active at sizes that run in seconds (chunk 16 so prompts cross chunks; floor_scale 8
    # so temperature tuning is live after 8 tokens).
    "tiny": dict(vocab_size=2048, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=96, intermediate_size_mlp=192, num_local_experts=4,
                 attention_chunk_size=16, floor_scale=8, rope_theta=10000.0, max_position_embeddings=4096,
                 rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                   original_max_position_embeddings=64),
                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "tiny-maverick": dict(vocab_size=2048, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=16, intermediate_size=96, intermediate_size_mlp=192,
                          num_local_experts=8, interleave_moe_layer_step=2, use_qk_norm=False,
                          attention_chunk_size=16, floor_scale=8, rope_theta=10000.0, max_position_embeddings=4096,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def preset(name: str, **overrides) -> TextConfig:
    """The named preset as a `TextConfig`, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return TextConfig(**{**PRESETS[name], **overrides})


def config_field_names() -> set[str]:
    return {f.name for f in fields(TextConfig)}


# ---- parameter and memory accounting (analytic; tests cross-check it against real modules on the meta device) ------
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


def kv_cache_bytes_per_token(cfg: TextConfig, bytes_per_elem: int = 2) -> dict:
    """K and V bytes one token adds. Chunked (RoPE) layers stop growing after `attention_chunk_size` tokens."""
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * bytes_per_elem
    n_global = sum(1 for i in range(cfg.num_hidden_layers) if not cfg.uses_rope(i))
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


def describe(cfg: TextConfig) -> list[tuple[str, str]]:
    """Rows for `herd info`: sizes, memory at several weight precisions, KV-cache cost."""
    pc = count_params(cfg)
    kv = kv_cache_bytes_per_token(cfg)
    rows = [("layers", f"{cfg.num_hidden_layers} ({len(cfg.moe_layers)} MoE, "
                       f"{sum(1 for i in range(cfg.num_hidden_layers) if not cfg.uses_rope(i))} global NoPE)"),
            ("hidden / heads / kv heads / head_dim",
             f"{cfg.hidden_size} / {cfg.num_attention_heads} / {cfg.num_key_value_heads} / {cfg.head_dim}"),
            ("experts (top-k)", f"{cfg.num_local_experts} (top-{cfg.num_experts_per_tok}) + shared"),
            ("total parameters", f"{human(pc.total)} ({pc.total:,})"),
            ("active parameters / token", f"{human(pc.active)} ({pc.active:,})")]
    for name, b in (("bf16", 2), ("fp8", 1), ("int4", 0.5)):
        rows.append((f"weights at {name}", _gib(pc.total * b)))
    rows.append(("KV cache / token (bf16, all layers)", f"{kv['all_layers']:,} B"))
    rows.append(("KV cache / token beyond chunk (global only)", f"{kv['global_layers']:,} B"))
    rows.append(("chunked-layer KV cap (bf16)", _gib(kv["chunked_cap_bytes"])))
    rows.append(("attention chunk", f"{cfg.attention_chunk_size} tokens"))
    return rows


def rope_is_scaled(cfg: TextConfig) -> bool:
    rs = cfg.rope_scaling
    return rs is not None and rs.get("rope_type", rs.get("type")) == "llama3"

