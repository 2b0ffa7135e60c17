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
Values for Scout/Maverick: the released config.json files of meta-llama/Llama-4-Scout-17B-16E(-Instruct) and
Llama-4-Maverick-17B-128E(-Instruct) on the Hugging Face hub.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

LLAMA4_VOCAB = 202048  # 200000 BPE ranks + 2048 special-token slots
_NO_MOE_ZEROS = ("num_local_experts", "interleave_moe_layer_step")  # may be 0 in a config without MoE layers


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
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "intermediate_size_mlp", "num_local_experts", "num_experts_per_tok",
                     "no_rope_layer_interval", "interleave_moe_layer_step"):
            v = getattr(self, name)
            low = 0 if name in _NO_MOE_ZEROS and self._no_moe() else 1
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
                raise ConfigError(f"{name} must be a {'non-negative' if low == 0 else 'positive'} int, got {v!r}")
        L = self.num_hidden_layers
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        if not self.no_rope_layers:
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(L)]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, L, step)) if step else []
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
        need(not self.moe_layers or self.num_experts_per_tok <= self.num_local_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts ({self.num_local_experts})")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        need(len(self.no_rope_layers) >= self.num_hidden_layers,
             f"no_rope_layers has {len(self.no_rope_layers)} entries, need one per layer ({self.num_hidden_layers})")
        need(all(v in (0, 1) for v in self.no_rope_layers), "no_rope_layers entries must be 0 (NoPE) or 1 (RoPE)")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        need(not bad, f"moe_layers {bad} out of range for {self.num_hidden_layers} layers")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = getattr(self, name)
            for t in ids if isinstance(ids, list) else [] if ids is None else [ids]:
                need(isinstance(t, int) and 0 <= t < self.vocab_size,
                     f"{name} {t!r} is outside the vocabulary (size {self.vocab_size})")
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

    def _no_moe(self) -> bool:
        """Whether the config says "no MoE layers" the way a dense Llama 4 (Llama Guard 4) is written: moe_layers []
        with 0 experts and MoE step 0 (transformers' Llama 4 converter; vLLM places MoE layers by the step alone)."""
        return self.moe_layers == [] or (self.moe_layers is None and self.interleave_moe_layer_step == 0)

    # --- derived facts used across the code base -------------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    def uses_rope(self, i: int) -> bool:
        return bool(self.no_rope_layers[i])

    def is_chunked(self, i: int) -> bool:
        """Whether layer i attends in chunks: a RoPE layer, unless the chunk spans the whole context (a chunk of at
        least max_position_embeddings cuts nothing, so the layer is global: a dense Llama's layers, herd.formats.llama,
        and caches then keep its keys as a global layer's instead of allocating a chunk-sized ring)."""
        return self.uses_rope(i) and self.attention_chunk_size < self.max_position_embeddings

    # --- what a config is: a text config is its own text part and has no vision part (as Llama4Config's fields) -----
    @property
    def text_config(self) -> TextConfig:
        return self

    @property
    def vision_config(self) -> None:
        return None

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

# The shipped tiny tokenizer (herd/assets/tiny-tokenizer: 904 BPE ranks, then the 1144 named Llama 4 special
# tokens in Meta's order) puts the special tokens at 904 + their offset from 200000; tests check these numbers.
_TINY_TOKENS = dict(bos_token_id=904, eos_token_id=[905, 911, 912], pad_token_id=922)
TINY_IMAGE_TOKENS = dict(boi_token_index=984, eoi_token_index=985, image_token_index=996)

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
                 **_TINY_TOKENS),
    "tiny-maverick": dict(vocab_size=2048, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=16, intermediate_size=96, intermediate_size_mlp=192,
                          num_local_experts=8, interleave_moe_layer_step=2, use_qk_norm=False,
                          attention_chunk_size=16, floor_scale=8, rope_theta=10000.0, max_position_embeddings=4096,
                          **_TINY_TOKENS),
}


def preset(name: str, **overrides) -> TextConfig:
    """The named preset as a `TextConfig`, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return TextConfig(**{**PRESETS[name], **overrides})


def config_field_names(cls: type = None) -> set[str]:
    return {f.name for f in fields(cls or TextConfig)}


@dataclass(kw_only=True)
class VisionConfig:
    """The MetaCLIP-style vision tower, pixel-shuffle adapter and tiling limits (transformers' Llama4VisionConfig
    names; `max_tiles` is the preprocessor's `max_patches` and is written to preprocessor_config.json)."""

    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 128  # encoder MLP width; must equal hidden_size / pixel_shuffle_ratio**2 (see validate)
    image_size: int = 28  # tile side in pixels
    patch_size: int = 14
    num_channels: int = 3
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 64  # adapter fc1 output
    projector_output_dim: int = 64  # adapter fc2 output
    vision_output_dim: int = 64  # input of multi_modal_projector.linear_1 (= projector_output_dim)
    multi_modal_projector_bias: bool = False
    hidden_act: str = "gelu"
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    attention_dropout: float = 0.0
    projector_dropout: float = 0.0
    initializer_range: float = 0.02
    max_tiles: int = 16

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"vision config: {msg}")

        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                     "patch_size", "projector_input_dim", "projector_output_dim", "vision_output_dim", "max_tiles"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive int, got {v!r}")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        need((self.hidden_size // self.num_attention_heads) % 4 == 0,
             "head dim must be a multiple of 4 (2-D RoPE splits each head into x and y halves of complex pairs)")
        need(self.image_size % self.patch_size == 0, f"image_size {self.image_size} is not a multiple of patch_size")
        grid, keep = self.image_size // self.patch_size, round(1 / self.pixel_shuffle_ratio)
        need(abs(self.pixel_shuffle_ratio * keep - 1) < 1e-9 and grid % keep == 0,
             f"pixel_shuffle_ratio {self.pixel_shuffle_ratio} must be 1/n with n dividing the {grid}-patch grid")
        need(self.intermediate_size == round(self.hidden_size / self.pixel_shuffle_ratio ** 2),
             f"intermediate_size ({self.intermediate_size}) must equal hidden_size / pixel_shuffle_ratio**2 "
             f"({round(self.hidden_size / self.pixel_shuffle_ratio ** 2)}): the adapter reads the shuffled width")
        need(self.vision_output_dim == self.projector_output_dim,
             "vision_output_dim must equal projector_output_dim (the projector reads the adapter output)")
        need(self.hidden_act == "gelu", f"hidden_act must be 'gelu', got {self.hidden_act!r}")

    @property
    def tokens_per_tile(self) -> int:
        """Vision tokens one tile becomes after pixel shuffle (144 for 336-px tiles of 14-px patches)."""
        return round((self.image_size // self.patch_size) ** 2 * self.pixel_shuffle_ratio ** 2)


@dataclass(kw_only=True)
class Llama4Config:
    """Text decoder + vision tower + the token ids that tie them together (transformers' Llama4Config)."""

    text_config: TextConfig
    vision_config: VisionConfig
    boi_token_index: int = 200080  # <|image_start|>
    eoi_token_index: int = 200081  # <|image_end|>
    image_token_index: int = 200092  # <|patch|>: the positions that receive vision features

    def __post_init__(self) -> None:
        if not 0 <= self.image_token_index < self.text_config.vocab_size:
            raise ConfigError(f"image_token_index {self.image_token_index} is outside the text vocabulary "
                              f"({self.text_config.vocab_size})")


# The released Scout and Maverick share one vision tower (their config.json files; transformers' defaults are NOT
# these).
_VISION_LLAMA4 = dict(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16, intermediate_size=5632,
                      image_size=336, patch_size=14, projector_input_dim=4096, projector_output_dim=4096,
                      vision_output_dim=4096, max_tiles=16)
_VISION_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    image_size=28, patch_size=7, projector_input_dim=48, projector_output_dim=48,
                    vision_output_dim=48, max_tiles=6)
VISION_PRESETS: dict[str, dict] = {"llama4-scout": _VISION_LLAMA4, "llama4-maverick": _VISION_LLAMA4,
                                   "llama4-behemoth": _VISION_LLAMA4, "tiny": _VISION_TINY,
                                   "tiny-maverick": _VISION_TINY}


def multimodal_preset(name: str, **text_overrides) -> Llama4Config:
    """The named preset as a full multimodal config (text decoder + vision tower)."""
    text = preset(name, **text_overrides)
    ids = TINY_IMAGE_TOKENS if name.startswith("tiny") else {}
    return Llama4Config(text_config=text, vision_config=VisionConfig(**VISION_PRESETS[name]), **ids)
