"""Shared helpers: the reference (transformers) twin of a herd config, and random weights both sides share."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.formats.hf import config_to_hf

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster when the machine is busy (no thread handoffs).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_config(cfg: herd.TextConfig):
    """transformers' Llama4TextConfig for a herd TextConfig, built from the same config.json dict herd writes."""
    from transformers import Llama4TextConfig

    d = config_to_hf(cfg)
    for k in ("architectures", "model_type", "rope_theta", "rope_scaling", "torch_dtype"):
        d.pop(k, None)
    hcfg = Llama4TextConfig(**d)
    hcfg._attn_implementation = "sdpa"
    return hcfg


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights start at 1; perturb them so a mix-up between norms cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def twin_models(cfg: herd.TextConfig, seed: int = 0):
    """(herd model, transformers model) in float32 with identical random weights, both in eval mode."""
    from transformers import Llama4ForCausalLM

    torch.manual_seed(seed)
    ours = herd.build_model(cfg, seed=seed)
    randomize_norms(ours, seed)
    ref = Llama4ForCausalLM(hf_config(cfg)).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")], missing
    return ours.eval(), ref


@pytest.fixture(scope="session")
def tiny_cfg() -> herd.TextConfig:
    return herd.preset("tiny")


def hf_mm_config(cfg: herd.Llama4Config):
    """transformers' Llama4Config for a herd Llama4Config (through the config.json herd writes)."""
    from transformers import Llama4Config

    d = config_to_hf(cfg)
    text = {k: v for k, v in d["text_config"].items() if k not in ("model_type", "rope_theta", "rope_scaling")}
    hcfg = Llama4Config(text_config=text, vision_config=d["vision_config"],
                        **{k: d[k] for k in ("boi_token_index", "eoi_token_index", "image_token_index")})
    hcfg._attn_implementation = "sdpa"
    hcfg.text_config._attn_implementation = "sdpa"
    hcfg.vision_config._attn_implementation = "sdpa"
    return hcfg


def twin_multimodal(cfg: herd.Llama4Config, seed: int = 0):
    """(herd, transformers) Llama4ForConditionalGeneration in float32 with identical random weights."""
    from transformers import Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    ours = herd.build_model(cfg, seed=seed)
    randomize_norms(ours, seed)
    ref = Llama4ForConditionalGeneration(hf_mm_config(cfg)).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return ours.eval(), ref


def image_request(model, tok, new_tokens: int):
    """A one-image chat prompt for a tiny multimodal model: (prompt ids, pixel values, what herd.generate gives it
    alone greedily: `new_tokens` ids) - the reference an engine's image request must equal."""
    from herd.chat import prepare_chat
    from herd.data.synthetic import scene_chat

    v = model.config.vision_config
    ids, images = prepare_chat(scene_chat(0, 1, "qa", size=56)[1][:1], tok, tile_size=v.image_size,
                               max_tiles=v.max_tiles, tokens_per_tile=v.tokens_per_tile)
    alone = herd.generate(model, torch.tensor([ids]), new_tokens, pixel_values=images.pixel_values)
    return ids, images.pixel_values, alone[0, len(ids):].tolist()
