"""Llama Guard 4 surgery: a Llama 4 mixture-of-experts checkpoint becomes a dense Llama 4 of the same family.

  herd guard-from-moe --init DIR --out DIR [--dtype float32|bfloat16|float16]

What Meta did to Llama 4 Scout to start Llama Guard 4 (the Llama Guard 4 model card, PurpleLlama
Llama-Guard4/12B/MODEL_CARD.md): each MoE layer has one shared expert and 16 routed experts; the routers and all
routed experts were pruned and the shared expert kept as the layer's dense FFN, so every layer is dense; attention
(chunked RoPE layers and global NoPE layers), norms, embeddings, the tokenizer and the vision tower stay as they were.
There was no further pretraining; the model was then post-trained as a safety classifier. This module does the
pruning on any herd MoE model (herd.model.moe) - the post-training is a separate step.

What the result computes: herd's MoE layer is shared(x) + routed(x) (herd.model.moe), and the dense layer here is
exactly shared(x), so the guard equals the source with the routed experts' contribution removed (the tests pin it).

The config says "no MoE layers" as transformers' Llama 4 converter writes a dense Llama Guard checkpoint
(transformers models/llama4/convert_llama4_weights_to_hf.py: `num_local_experts=0`, `interleave_moe_layer_step=0`,
`moe_layers=[]`): transformers reads `moe_layers`, while vLLM's Llama 4 places MoE layers by the step alone, so both
are written. The dense width (`intermediate_size_mlp`) becomes the shared expert's width (`intermediate_size`).

Sources that already have dense layers (Maverick-style `interleave_moe_layer_step=2`): every dense layer of a Llama 4
has one width, and the existing dense layers (`intermediate_size_mlp`) and the shared experts (`intermediate_size`)
usually differ. The narrower ones are zero-padded to the wider width: padded rows of gate/up and columns of down
are zero, so each padded unit adds down[:, j] * silu(0) * 0 = 0 and the layer computes what it computed before,
exactly; the padding is live capacity once the guard is post-trained. The report says which layers were padded.

Dropped: the routers, the routed experts and the routers' selection biases (herd.train.balance); a model without
MoE layers is refused. The output folder is a complete checkpoint: weights and config (herd.formats.hf), plus the
source's tokenizer, chat template, generation and preprocessor files, so `herd serve` and `herd chat` load it.
A text source whose layers turn out to be a plain Llama's (no NoPE or chunked layers, no QK-norm) is saved as
`LlamaForCausalLM`, as herd.formats.hf saves every such model.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from herd.config import ConfigError, Llama4Config, TextConfig
from herd.formats.hf_integrity import CheckpointError
from herd.model.build import Model, allocate, build_model
from herd.model.moe import MLP

# Files beside the weights that make the folder usable as it was: tokenizer and chat template (herd.tokenizer),
# sampling defaults (herd.formats.hf.generation_defaults), image preprocessing (transformers' Llama 4 processor).
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "chat_template.json", "tokenizer.model", "generation_config.json", "preprocessor_config.json",
                 "processor_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class GuardSurgery:
    """What `guard_from_moe_dir` did."""

    config: TextConfig | Llama4Config  # the dense model's
    pruned_layers: list[int]  # the MoE layers whose routers and routed experts were removed
    padded_layers: list[int]  # layers whose FFN was zero-padded to the common dense width (module docstring)
    width: int  # every layer's dense FFN width
    params_before: int
    params_after: int
    out: str


def guard_config(cfg: TextConfig | Llama4Config) -> TextConfig | Llama4Config:
    """The dense config of a MoE one: every layer a SwiGLU MLP as wide as the wider of the shared expert and any
    existing dense layer; everything else (attention, iRoPE layout, vision tower) unchanged."""
    text = cfg.text_config
    if not text.moe_layers:
        raise ConfigError("this checkpoint has no MoE layers (moe_layers is empty), so there are no routed experts "
                          "to remove: guard-from-moe takes a Llama 4 mixture-of-experts checkpoint (Scout, Maverick, "
                          "or one made by `herd init --preset tiny`); a dense model can be post-trained as a guard "
                          "as it is")
    has_dense = len(set(text.moe_layers)) < text.num_hidden_layers
    width = max(text.intermediate_size, text.intermediate_size_mlp) if has_dense else text.intermediate_size
    dense = text.replace(moe_layers=[], interleave_moe_layer_step=0, num_local_experts=0,
                         intermediate_size_mlp=width)
    return dense if isinstance(cfg, TextConfig) else dataclasses.replace(cfg, text_config=dense)


def _ffn(layer) -> MLP:
    """The part of a decoder layer's FFN that the guard keeps: the shared expert of a MoE layer, else the MLP."""
    return layer.feed_forward.shared_expert if layer.is_moe else layer.feed_forward


def _copy_padded(src: MLP, dst: MLP) -> bool:
    """dst <- src, zero-padding the hidden units src lacks; True where padding was needed."""
    F = src.gate_proj.weight.shape[0]
    for name in ("gate_proj", "up_proj"):  # (F_dst, D): rows are hidden units
        w = getattr(dst, name).weight
        w.zero_()
        w[:F].copy_(getattr(src, name).weight)
    dst.down_proj.weight.zero_()  # (D, F_dst): columns are hidden units
    dst.down_proj.weight[:, :F].copy_(src.down_proj.weight)
    return F < dst.gate_proj.weight.shape[0]


def guard_from_moe(model: Model) -> Model:
    """A new dense model from a herd MoE model (text or multimodal): each MoE layer's shared expert becomes its dense
    FFN; routers, routed experts and their biases are dropped; every other tensor is copied as it is. `model` is
    left unchanged; the result has its dtype, device and train/eval mode."""
    return _prune(model)[0]


@torch.no_grad()
def _prune(model: Model) -> tuple[Model, list[int]]:
    """(guard model, the layers whose FFN was zero-padded)."""
    cfg = guard_config(model.config)
    p = next(model.parameters())
    guard = allocate(build_model(cfg, device="meta", dtype=p.dtype), p.device)
    old = model.state_dict()
    for name, t in guard.state_dict().items():  # attention, norms, embeddings, head, vision tower and projector
        if ".feed_forward." not in name:
            t.copy_(old[name])
    padded = [i for i, (a, b) in enumerate(zip(model.decoder.model.layers, guard.decoder.model.layers, strict=True))
              if _copy_padded(_ffn(a), b.feed_forward)]
    return guard.train(model.training), padded


def _count(model: Model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied head counts once, as it is stored once


def guard_from_moe_dir(init: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> GuardSurgery:
    """Read a Hugging Face MoE checkpoint folder, write its dense guard starting point to `out` (weights in `dtype`,
    default the source's) with the source's tokenizer, chat template, generation and preprocessor files."""
    from herd.formats.hf import from_pretrained, load_config, save_pretrained

    init, out = Path(init), Path(out)
    if out.exists() and out.resolve() == init.resolve():
        raise CheckpointError(f"--out {out} is the --init folder: write the guard to a new folder (the source's "
                              "weights would be overwritten while they are read)")
    guard_config(load_config(init))  # refuse a dense checkpoint before reading its weights
    model = from_pretrained(init)  # its own dtype: the kept weights are copied bit for bit
    guard, padded = _prune(model)
    save_pretrained(guard, out, dtype=dtype)
    for name in SIDECAR_FILES:  # the source's own files replace the defaults save_pretrained writes
        if (init / name).is_file():  # is_file: a regular file (or a link to one), never a FIFO
            shutil.copyfile(init / name, out / name)
    text = model.text_config
    return GuardSurgery(config=guard.config, pruned_layers=list(text.moe_layers), padded_layers=padded,
                        width=guard.text_config.intermediate_size_mlp, params_before=_count(model),
                        params_after=_count(guard), out=str(out))


# ---- CLI -------------------------------------------------------------------------------------------------------------
def cmd_guard_from_moe(args) -> int:
    r = guard_from_moe_dir(args.init, args.out, DTYPES[args.dtype] if args.dtype else None)
    L = r.config.text_config.num_hidden_layers
    removed = r.params_before - r.params_after
    print(f"wrote {r.out}: removed the routers and routed experts of {len(r.pruned_layers)} of {L} layers; every "
          f"layer is now a dense FFN of width {r.width} (each MoE layer's shared expert)")
    if r.padded_layers:
        print(f"zero-padded to width {r.width} (exact: padded units add 0): layers {r.padded_layers}")
    print(f"parameters: {r.params_before:,} -> {r.params_after:,} ({removed:,} removed, "
          f"{removed / r.params_before:.1%})")
    return 0


def add_guard_parser(sub) -> None:
    sp = sub.add_parser("guard-from-moe", help="Llama Guard 4 surgery: drop a MoE checkpoint's routers and routed "
                        "experts, keep each shared expert as a dense FFN",
                        description="Do to a Llama 4 MoE checkpoint what Meta did to Scout for Llama Guard 4 "
                                    "(herd.safety.surgery): all layers dense, shared experts kept bit for bit.")
    sp.add_argument("--init", required=True, metavar="DIR", help="a Llama 4 MoE checkpoint (Hugging Face folder)")
    sp.add_argument("--out", required=True, metavar="DIR", help="where the dense checkpoint is written")
    sp.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="weights' dtype on disk (default: the source's, so kept weights are bitwise the same)")
    sp.set_defaults(fn=cmd_guard_from_moe)
