"""The vision encoder's training stages, as `herd train` stages (`TrainConfig.stage`), and the model surgery they need.

Llama 4's recipe ("The Llama 4 herd", https://ai.meta.com/blog/llama-4-multimodal-intelligence/): a MetaCLIP-based
vision encoder, trained separately in conjunction with a frozen Llama model, then early fusion in joint
pretraining. herd's stages, each one `herd train` run (checkpoints, exact resume, metrics, plots, export):
- `stage=contrastive` (preset `vision-contrastive`): the tower against the frozen decoder's caption embeddings
  (herd.train.contrastive); reports zero-shot retrieval.
- `stage=align` (preset `vision-align`): image-text chats only (captions and scene questions; no text rows, which
  would teach a frozen decoder nothing), the loss on the answers; `freeze=decoder` keeps every decoder weight
  bitwise as it was, so only the tower, adapter and projector learn to be read. `freeze=decoder,tower` trains
  the adapter and projector alone first.
- `stage=lm` (the default; preset `tiny-multimodal`): joint early fusion, text rows plus `image_rows` image chats
  per micro-batch, starting from the aligned checkpoint; `image_rows` / `image_weight` set the mix.

Surgery: `vision=PRESET` gives a text-only `init` a fresh vision tower (herd.config.VISION_PRESETS) with the image
token ids of the run's tokenizer, so the stages start from any text checkpoint; `freeze` stops gradients into named
parts (their weights never change: no gradient, not in the optimizer); `model_overrides` on an `init` may change
only the attention geometry (`INIT_OVERRIDES`: chunk size and temperature tuning), which is no weight's shape.
"""

from __future__ import annotations

import dataclasses

import torch

from herd.config import ConfigError

STAGES = ("lm", "contrastive", "align")
PARTS = ("decoder", "tower", "adapter", "projector")
INIT_OVERRIDES = ("attention_chunk_size", "attn_temperature_tuning", "floor_scale", "attn_scale")


def parts(model) -> dict[str, list[torch.nn.Parameter]]:
    """A multimodal model's parameters by part: decoder, tower (the ViT), adapter (pixel shuffle MLP), projector."""
    vm = model.vision_model
    adapter = {id(p) for p in vm.vision_adapter.parameters()}
    return {"decoder": list(model.language_model.parameters()),
            "tower": [p for p in vm.parameters() if id(p) not in adapter],
            "adapter": list(vm.vision_adapter.parameters()),
            "projector": list(model.multi_modal_projector.parameters())}


def freeze(model, names: tuple[str, ...]) -> None:
    """requires_grad=False on the named parts (a text model has only its decoder)."""
    if not names:
        return
    if model.vision_config is None:
        if set(names) - {"decoder"}:
            raise ConfigError(f"freeze={','.join(names)}: a text model has no vision parts")
        model.requires_grad_(False)
        return
    groups = parts(model)
    for name in names:
        for p in groups[name]:
            p.requires_grad_(False)


def attach_tower(model, preset: str, tok, seed: int):
    """The multimodal model of a text model plus a fresh vision tower of `preset` (random, seeded), the image token
    ids read from the tokenizer; the decoder's weights (router biases included) are kept bit for bit."""
    import herd
    from herd.config import VISION_PRESETS, Llama4Config, VisionConfig
    from herd.train.snapshots import expert_biases, set_expert_biases

    if preset not in VISION_PRESETS:
        raise ConfigError(f"vision={preset!r}: not a vision preset; choose one of {sorted(VISION_PRESETS)}")
    need = ("<|image_start|>", "<|image_end|>", "<|patch|>")
    missing = [t for t in need if t not in tok.specials]
    if missing:
        raise ConfigError(f"vision={preset}: the tokenizer has no {', '.join(missing)}, which image prompts need")
    cfg = Llama4Config(text_config=model.config, vision_config=VisionConfig(**VISION_PRESETS[preset]),
                       boi_token_index=tok.specials["<|image_start|>"], eoi_token_index=tok.specials["<|image_end|>"],
                       image_token_index=tok.specials["<|patch|>"])
    mm = herd.build_model(cfg, seed=seed)
    mm.language_model.load_state_dict(model.state_dict())
    set_expert_biases(mm.language_model, expert_biases(model))
    return mm, cfg


def with_overrides(model, mcfg, overrides: dict):
    """The model rebuilt with `overrides` (INIT_OVERRIDES only) applied to its decoder config, same weights."""
    import herd
    from herd.train.snapshots import expert_biases, set_expert_biases

    text_cfg = mcfg.text_config
    overrides = {k: v for k, v in overrides.items() if getattr(text_cfg, k, object()) != v}  # what changes
    if not overrides:
        return model, mcfg
    bad = sorted(set(overrides) - set(INIT_OVERRIDES))
    if bad:
        raise ConfigError(f"model.{bad[0]}: with init, only the attention geometry may change "
                          f"({', '.join(INIT_OVERRIDES)}); the weights fix everything else")
    text = dataclasses.replace(text_cfg, **overrides)
    new_cfg = dataclasses.replace(mcfg, text_config=text) if mcfg.vision_config is not None else text
    new = herd.build_model(new_cfg, device="meta")
    from herd.model.build import allocate

    allocate(new, "cpu")
    new.load_state_dict(model.state_dict())
    set_expert_biases(new, expert_biases(model))
    return new, new_cfg


def vision_config(cfg):
    """The VisionConfig the run's model will have before it is built: init's, or the `vision` preset's when
    attaching a tower (None: a text model)."""
    from herd.config import VISION_PRESETS, VisionConfig
    from herd.train.snapshots import init_vision_config as init_vision

    found = init_vision(cfg.init) if cfg.init else None
    if found is None and cfg.vision:
        if cfg.vision not in VISION_PRESETS:
            raise ConfigError(f"vision={cfg.vision!r}: not a vision preset; choose one of {sorted(VISION_PRESETS)}")
        return VisionConfig(**VISION_PRESETS[cfg.vision])
    return found


def image_chat_rows(vcfg):
    """`rows` for the align stage: batches of `batch_size` image-text chats and nothing else (herd.train.inputs
    .ImageRows with batch_size rows)."""
    from herd.train.inputs import ImageRows

    def rows(cfg, tok, split, rank=0, world=1):
        return ImageRows(cfg.replace(image_rows=cfg.batch_size), tok, vcfg, split, rank, world)

    return rows


def stage_hooks(cfg) -> tuple:
    """(rows, objective) the trainer runs `cfg.stage` with ((None, None) for "lm")."""
    if cfg.stage == "lm":
        return None, None
    if cfg.init is None:
        raise ConfigError(f"stage={cfg.stage} trains a vision tower for a trained decoder: give init=DIR (with "
                          "vision=PRESET when it is a text-only checkpoint)")
    vcfg = vision_config(cfg)
    if vcfg is None:
        raise ConfigError(f"stage={cfg.stage}: {cfg.init} is a text-only model; set vision=PRESET (e.g. "
                          "vision=tiny) to give it a fresh vision tower")
    if cfg.stage == "contrastive":
        from herd.train.contrastive import contrastive_stage

        return contrastive_stage(cfg, vcfg)
    return image_chat_rows(vcfg), None
