"""Hugging Face checkpoint format <-> herd: the one place where names, layouts, config keys and sidecars are mapped.

Because herd's modules carry the checkpoint's names, the tensor mapping is a prefix rule:
- `Llama4ForCausalLM` files: `model.layers.{i}...`, `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`
  load as they are;
- `Llama4ForConditionalGeneration` files: `language_model.` is stripped; `vision_model.*` and
  `multi_modal_projector.*` belong to the vision tower, which the text model skips (and reports).
Dense Llama checkpoints (`LlamaForCausalLM`) are Llama 4 configs too; their config keys, names and q/k row order
are mapped in herd.formats.llama, hooked in here (config_from_hf, iter_tensors, save_pretrained).
Config keys are the transformers `Llama4TextConfig` keys; both the v4 spelling (`rope_theta` + `rope_scaling`) and the
v5 one (`rope_parameters`) are read, and both are written so older and newer readers agree.

Loading streams: the model is built on the meta device, allocated once at the target dtype/device, and each tensor
is read from the memory-mapped safetensors file and copied into place, so peak memory is the model plus one tensor.
Pickle files (`.bin`, `.pt`) are read only with `torch.load(weights_only=True)`, which refuses arbitrary objects.

Router selection biases. herd's default MoE balancing (aux-loss-free, herd.train.balance) trains a bias per router
that shifts which expert is chosen; Llama 4's Hugging Face format has no place for it (transformers' and vLLM's
Llama 4 router is a plain linear). herd's trainer therefore decays the biases to zero over the end of a run
(`bias_cooldown`), so a finished run exports a model that every engine reads as it was evaluated. When a model still
has non-zero biases (a run stopped early, or `bias_cooldown=0`), `save_pretrained` writes them as extra tensors
`...feed_forward.router.expert_bias` and warns: herd loads them (the served model is the evaluated one), while
transformers reports them as unused weights, so the difference is never silent. `expert_bias.json` sidecars of older
exports are still read.

`generation_config.json` is written here and read here (`generation_defaults`): the server's sampling defaults.

Every problem raises `CheckpointError` naming the file and the tensors concerned; herd.formats.hf_integrity holds
what is checked before and while loading (weight files stay inside the directory and are regular files, the index is
well formed, one file per tensor, floating weights have floating dtypes, no NaN/inf, the model fits in memory).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from herd.config import ConfigError, Llama4Config, TextConfig, VisionConfig, config_field_names
from herd.formats import hf_integrity as integrity
from herd.formats import llama
from herd.formats.hf_integrity import CheckpointError
from herd.model.build import Model, allocate, build_model

# Keys transformers writes into every config.json that carry no architecture information for herd.
_GENERIC_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "output_router_logits",
    "layer_types", "_name_or_path", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder", "problem_type", "id2label", "label2id",
    "cache_implementation", "for_llm_compressor", "attn_implementation", "_attn_implementation_autoset",
    "quantization_config", "sep_token_id", "decoder_start_token_id", "task_specific_params", "prefix",
    "add_cross_attention", "finetuning_task", "tokenizer_class", "rope_parameters",
}
_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")
BIAS_SUFFIX = ".router.expert_bias"  # a router's selection bias, written only when non-zero (module docstring)
LEGACY_BIAS_FILE = "expert_bias.json"  # where exports before the biases joined the weights kept them
GENERATION_KEYS = ("temperature", "top_p", "top_k")  # sampling defaults a generation_config.json may carry
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class RoutingWarning(UserWarning):
    """A saved model routes with selection biases that transformers and vLLM do not read."""


# ---- config ----------------------------------------------------------------------------------------------------------
def _check_keys(d: dict, cls: type, what: str) -> dict:
    known = config_field_names(cls)
    unknown = sorted(k for k in d if k not in known and k not in _GENERIC_KEYS)
    if unknown:
        raise ConfigError(f"{what} has keys herd does not know: {unknown}")
    return {k: v for k, v in d.items() if k in known}


def _build(cls: type, kw: dict, what: str):
    try:
        return cls(**kw)
    except TypeError as e:  # e.g. a list where an int belongs
        raise ConfigError(f"{what} has a value of the wrong type: {e}") from e


def text_config_from_hf(d: dict) -> TextConfig:
    if d.get("model_type") not in (None, "llama4_text"):
        raise ConfigError(f"config.json model_type {d.get('model_type')!r} is not a Llama 4 model (llama4_text, "
                          "llama4) or a dense Llama (llama)")
    d = dict(d)
    rp = d.pop("rope_parameters", None)
    if isinstance(rp, dict):  # transformers v5: rope_theta and the scaling recipe live together
        d.setdefault("rope_theta", rp.get("rope_theta", 500000.0))
        if rp.get("rope_type", "default") != "default":
            d.setdefault("rope_scaling", {k: v for k, v in rp.items() if k != "rope_theta"})
    if isinstance(d.get("rope_scaling"), dict) and d["rope_scaling"].get("rope_type", "default") == "default":
        d["rope_scaling"] = None
    return _build(TextConfig, _check_keys(d, TextConfig, "config.json"), "config.json")


def vision_config_from_hf(d: dict, max_tiles: int | None = None) -> VisionConfig:
    d = dict(d)
    rp = d.pop("rope_parameters", None)
    if isinstance(rp, dict):
        d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
    for k in ("model_type", "vision_feature_layer"):  # the tower always uses its last layer
        d.pop(k, None)
    if max_tiles is not None:
        d["max_tiles"] = max_tiles
    return _build(VisionConfig, _check_keys(d, VisionConfig, "vision_config"), "vision_config")


def config_from_hf(d: dict, max_tiles: int | None = None) -> TextConfig | Llama4Config:
    """A herd config from a parsed config.json: `TextConfig` for `llama4_text` and for a dense `llama`
    (herd.formats.llama), `Llama4Config` for `llama4`."""
    if llama.is_llama(d):
        return llama.config_from_llama(d)
    if d.get("model_type") != "llama4" and "text_config" not in d:
        return text_config_from_hf(d)
    for part in ("text_config", "vision_config"):
        if not isinstance(d.get(part), dict):
            raise ConfigError(f"config.json of model_type 'llama4' has no {part} object")
    top = {k: d[k] for k in ("boi_token_index", "eoi_token_index", "image_token_index") if k in d}
    extra = sorted(set(d) - set(top) - {"text_config", "vision_config", "tie_word_embeddings", "pad_token_id"}
                   - _GENERIC_KEYS)
    if extra:
        raise ConfigError(f"config.json has keys herd does not know: {extra}")
    text = dict(d["text_config"])
    if "tie_word_embeddings" in d:
        text.setdefault("tie_word_embeddings", d["tie_word_embeddings"])
    return _build(Llama4Config, dict(text_config=text_config_from_hf(text),
                                     vision_config=vision_config_from_hf(d["vision_config"], max_tiles), **top),
                  "config.json")


def _text_to_hf(cfg: TextConfig) -> dict:
    d = {k: getattr(cfg, k) for k in sorted(config_field_names(TextConfig))}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(cfg.rope_scaling)
        rope["rope_type"] = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
    d["rope_parameters"] = rope
    d.update(model_type="llama4_text", layer_types=cfg.layer_types)
    return d


def config_to_hf(cfg: TextConfig | Llama4Config, dtype: torch.dtype | None = None) -> dict:
    """config.json for `Llama4ForCausalLM` or `Llama4ForConditionalGeneration`, readable by transformers 4.5x/5.x
    (both RoPE spellings are written)."""
    if isinstance(cfg, TextConfig):
        d = {**_text_to_hf(cfg), "architectures": ["Llama4ForCausalLM"]}
    else:
        v = cfg.vision_config
        vision = {k: getattr(v, k) for k in sorted(config_field_names(VisionConfig)) if k != "max_tiles"}
        vision.update(model_type="llama4_vision_model",
                      rope_parameters={"rope_type": "default", "rope_theta": v.rope_theta})
        d = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
             "text_config": _text_to_hf(cfg.text_config), "vision_config": vision,
             "boi_token_index": cfg.boi_token_index, "eoi_token_index": cfg.eoi_token_index,
             "image_token_index": cfg.image_token_index, "tie_word_embeddings": cfg.text_config.tie_word_embeddings}
    if dtype is not None:
        d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d


def preprocessor_config(v: VisionConfig) -> dict:
    """preprocessor_config.json in the form of transformers' Llama 4 image processor (tile size, max tiles)."""
    return {"image_processor_type": "Llama4ImageProcessorFast", "size": {"height": v.image_size,
            "width": v.image_size}, "max_patches": v.max_tiles, "resize_to_max_canvas": False, "do_resize": True,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "do_convert_rgb": True, "resample": 2}


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{f} must hold a JSON object")
    return d


def load_config(path: str | os.PathLike) -> TextConfig | Llama4Config:
    if str(path).lower().endswith(".gguf"):  # herd.formats.gguf
        from herd.formats import gguf
        return gguf.load_config(path)
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path} has no config.json")
    pre = Path(path) / "preprocessor_config.json"
    max_tiles = _read_json(pre).get("max_patches") if pre.is_file() else None
    return config_from_hf(_read_json(f), max_tiles)


# ---- tensors ---------------------------------------------------------------------------------------------------------
def herd_name(hf_name: str, multimodal: bool) -> str | None:
    """The herd parameter name of a checkpoint tensor; None for tensors the model does not hold (the vision tower's,
    when a multimodal checkpoint is read as a text model)."""
    if multimodal:
        return hf_name
    if hf_name.startswith(_VISION_PREFIXES):
        return None
    return hf_name.removeprefix("language_model.")


def _weight_files(root: Path) -> tuple[str, list[Path]]:
    """The weight files, each a regular file inside `root` (hf_integrity.regular_file), never opened before that."""
    index = root / "model.safetensors.index.json"
    if integrity.exists(index):
        return "safetensors", integrity.read_index(index, root)
    single = root / "model.safetensors"
    if integrity.exists(single):
        return "safetensors", [integrity.regular_file(single, root)]
    shards = sorted(root.glob("*.safetensors"))
    if shards:
        return "safetensors", [integrity.regular_file(f, root) for f in shards]
    pickles = sorted(root.glob("*.bin")) + sorted(root.glob("*.pt")) + sorted(root.glob("*.pth"))
    if pickles:
        return "pickle", [integrity.regular_file(f, root) for f in pickles]
    raise CheckpointError(f"{root} holds no weights (no *.safetensors, model.safetensors.index.json or *.bin)")


def iter_tensors(root: str | os.PathLike):
    """Yield (checkpoint name, tensor) one at a time from every weight file of a checkpoint directory; a dense
    Llama's come in herd's names and q/k row order (herd.formats.llama), so every reader sees one layout."""
    f = Path(root) / "config.json"
    try:  # is_file: never open a FIFO; a broken config.json is reported by load_config, not here
        d = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        d = {}
    if isinstance(d, dict) and llama.is_llama(d):
        yield from llama.herd_tensors(_stored_tensors(root), llama.config_from_llama(d))
    else:
        yield from _stored_tensors(root)


def _stored_tensors(root: str | os.PathLike):
    """(name, tensor) as stored, file by file. A name in two files is refused (with files read in order, the last
    would silently win)."""
    from safetensors import SafetensorError, safe_open

    kind, files = _weight_files(Path(root))
    seen: dict[str, str] = {}

    def once(name: str, f: Path) -> str:
        if name in seen:
            raise CheckpointError(f"tensor {name} is in both {seen[name]} and {f.name}: a checkpoint holds each "
                                  "tensor once; remove the stale shard (or fix the index)")
        seen[name] = f.name
        return name

    for f in files:
        if kind == "pickle":
            try:  # weights_only: tensors and plain containers only, never arbitrary code
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{f.name}: refused or unreadable as a weights-only pickle: {e}") from e
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f.name} does not hold a state dict")
            for name, t in sd.items():
                yield once(name, f), t
            continue
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    yield once(name, f), sf.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f.name} is corrupt or truncated: {e}") from e


def router_biases(model: Model) -> dict[str, torch.Tensor]:
    """{buffer name: (E,) bias} of every MoE router, e.g. `model.layers.0.feed_forward.router.expert_bias`."""
    return {n: b for n, b in model.named_buffers() if n.endswith(BIAS_SUFFIX)}


def biased(model: Model) -> list[str]:
    """The routers whose selection bias is not zero (their routing differs without it)."""
    return [n.removesuffix(BIAS_SUFFIX) for n, b in router_biases(model).items() if bool(b.any())]


def load_weights(model: Model, root: str | os.PathLike, strict: bool = True, check_finite: bool = True) -> dict:
    """Stream a checkpoint's tensors into `model` (already allocated). Returns a report of what was skipped.
    Each tensor's dtype is checked before it is copied, and (check_finite) its values after (hf_integrity)."""
    multimodal = model.vision_config is not None
    declared = _declared_dtype(Path(root))
    params = dict(model.named_parameters(remove_duplicate=False))
    biases = router_biases(model)
    tied = model.text_config.tie_word_embeddings
    head = "language_model.lm_head.weight" if multimodal else "lm_head.weight"
    loaded, unexpected, mismatched, skipped = set(), [], [], []
    with torch.no_grad():
        for hf, t in iter_tensors(root):
            name = herd_name(hf, multimodal)
            if name is None:
                skipped.append(hf)
                continue
            p = params.get(name, biases.get(name))
            if p is None:
                unexpected.append(hf)
                continue
            if tuple(t.shape) != tuple(p.shape):
                mismatched.append(f"{hf}: checkpoint {tuple(t.shape)} vs model {tuple(p.shape)}")
                continue
            integrity.check_dtype(hf, t.dtype, p.dtype, declared)
            p.copy_(t)
            if check_finite:
                integrity.check_finite(hf, p, t)
            loaded.add(name)
        if not any(n in loaded for n in biases):
            _legacy_biases(model, Path(root), biases)
    missing = sorted(n for n in params if n not in loaded and not (tied and n == head))
    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(_mismatch_message(model.text_config, missing, unexpected, mismatched))
    return {"skipped": skipped, "missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def _legacy_biases(model: Model, root: Path, biases: dict[str, torch.Tensor]) -> None:
    """Router biases from an older export's expert_bias.json (names as herd's buffers, lists of floats)."""
    f = root / LEGACY_BIAS_FILE
    if not f.is_file():
        return
    try:
        saved = json.loads(f.read_text())
        values = {k: torch.tensor(v, dtype=torch.float32) for k, v in saved.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{f} is not a valid router-bias file: {e}") from e
    # the names of the model that was saved: a multimodal run's carry `language_model.`, which a text model lacks
    values = {next((n for n in (k, "language_model." + k, k.removeprefix("language_model.")) if n in biases), k): v
              for k, v in values.items()}
    if set(values) != set(biases) or any(v.shape != biases[k].shape for k, v in values.items()):
        raise CheckpointError(f"{f} names routers {sorted(values)} that do not match the model's {sorted(biases)}")
    for k, v in values.items():
        biases[k].copy_(v)


def _mismatch_message(cfg: TextConfig, missing, unexpected, mismatched) -> str:
    def few(xs):
        return ", ".join(xs[:8]) + (f" ... ({len(xs)} in all)" if len(xs) > 8 else "")

    parts = []
    if mismatched:
        parts.append(f"tensors with the wrong shape: {few(mismatched)}")
    if missing:
        parts.append(f"missing tensors: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected tensors: {few(unexpected)}")
    hint = (" - config.json contradicts the tensors (e.g. layer count, widths, experts)"
            if mismatched or any(".layers." in u for u in unexpected) else "")
    return f"checkpoint does not match its config ({cfg.num_hidden_layers} layers, {cfg.num_local_experts} " \
           f"experts, hidden {cfg.hidden_size}): " + "; ".join(parts) + hint


def _declared_dtype(root: Path) -> torch.dtype | None:
    """The weights' dtype config.json declares (torch_dtype, or transformers v5's dtype); None without one."""
    f = root / "config.json"
    try:  # is_file: never open a FIFO
        d = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        d = {}
    text = d.get("text_config") if isinstance(d, dict) else None
    text = text if isinstance(text, dict) else {}
    name = d.get("torch_dtype") or d.get("dtype") or text.get("torch_dtype") or text.get("dtype")
    return _DTYPES.get(name) if isinstance(name, str) else None


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, text_only: bool = False,
                    check_finite: bool = True) -> Model:
    """Load a Hugging Face Llama 4 checkpoint directory: `Llama4ForConditionalGeneration` files give the multimodal
    model (or, with text_only=True, just its language model), `Llama4ForCausalLM` files the text model.
    check_finite=False skips the NaN/inf test of each weight (to inspect a damaged checkpoint)."""
    if str(path).lower().endswith(".gguf"):  # llama.cpp's single-file format (herd.formats.gguf)
        from herd.formats import gguf
        return gguf.from_pretrained(path, dtype=dtype, device=device, check_finite=check_finite)
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg = load_config(root)
    if text_only:
        cfg = cfg.text_config
    dtype = dtype or _declared_dtype(root) or torch.float32
    device = device or "cpu"
    integrity.check_memory(cfg, dtype, device, f"{path}")  # before allocating: an absurd config is named, not OOM'd
    model = build_model(cfg, device="meta", dtype=dtype)
    try:
        allocate(model, device)
    except RuntimeError as e:  # torch.OutOfMemoryError, or the CPU allocator's "can't allocate memory"
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: allocating the model on {device} failed ({why}); it "
                              f"needs {integrity.weight_bytes(cfg, dtype):,} bytes of weights") from e
    load_weights(model, root, check_finite=check_finite)
    return model.eval()


def generation_defaults(path: str | os.PathLike) -> dict:
    """The sampling defaults of a checkpoint's generation_config.json ({} without one): temperature, top_p, top_k."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return {}
    return {k: v for k, v in _read_json(f).items() if k in GENERATION_KEYS}


def save_pretrained(model: Model, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`)."""
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    sd = {n: p.detach() for n, p in model.named_parameters()}  # tied lm_head appears once (as embed_tokens)
    as_llama = not llama.differences(model.config)  # a dense Llama is written back as one (herd.formats.llama)
    if as_llama:
        sd = llama.llama_tensors(sd, model.config)
    if dtype is not None:
        sd = {n: t.to(dtype) for n, t in sd.items()}
    routers = biased(model)
    if routers:  # kept in float32 whatever the weights' dtype: they decide top-k, where rounding changes choices
        sd.update({n: b.detach().float() for n, b in router_biases(model).items()})
        warnings.warn(f"{path}: {len(routers)} MoE router(s) route with non-zero selection biases (e.g. "
                      f"{routers[0]}), which Llama 4's Hugging Face format has no place for. herd loads them (as "
                      f"extra '*{BIAS_SUFFIX}' tensors), but transformers and vLLM ignore them and route differently. "
                      "Finish the run with its bias cooldown (herd.train: bias_cooldown > 0, the default) for an "
                      "export every engine reads the same", RoutingWarning, stacklevel=2)
    shards, cur, size = [], {}, 0
    for n, t in sd.items():
        b = t.numel() * t.element_size()
        if cur and size + b > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[n], size = t, size + b
    shards.append(cur)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards, strict=False):
        tmp = root / (fname + ".tmp")
        save_file({n: t.contiguous().cpu() for n, t in shard.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, root / fname)
    index = root / "model.safetensors.index.json"
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in sd.values())
        wm = {n: fname for fname, shard in zip(names, shards, strict=False) for n in shard}
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    elif index.exists():
        index.unlink()
    wdtype = dtype or next(iter(sd.values())).dtype
    config = llama.config_to_llama(model.config, wdtype) if as_llama else config_to_hf(model.config, wdtype)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    if model.vision_config is not None:
        pre = preprocessor_config(model.vision_config)
        (root / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    text = model.text_config
    gen = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id}
    (root / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}))
    (root / LEGACY_BIAS_FILE).unlink(missing_ok=True)  # the biases, if any, are in the weights now


def export(model: Model, tokenizer, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """A complete Hugging Face model directory: weights and config (save_pretrained) and the tokenizer."""
    save_pretrained(model, path, dtype=dtype)
    tokenizer.save(path)
