"""The full `Llama4ForConditionalGeneration` checkpoint format: transformers <-> herd both ways, sharded, with the
preprocessor settings (tile size, max tiles) carried in preprocessor_config.json.

Run: .venv/bin/python -m pytest tests/formats/test_hf_multimodal.py -v
"""

from __future__ import annotations

import json

import pytest
import torch

import herd
from herd.formats.hf import CheckpointError
from tests.conftest import hf_mm_config, twin_multimodal
from tests.model.test_vision_parity import _cfg, _prompt

TOL = 1e-5


def test_transformers_multimodal_checkpoint_loads_into_herd(tmp_path):
    from transformers import Llama4ForConditionalGeneration

    cfg = _cfg()
    ref = Llama4ForConditionalGeneration(hf_mm_config(cfg)).eval()
    ref.save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = herd.from_pretrained(tmp_path)
    assert isinstance(ours, herd.Llama4ForConditionalGeneration)
    ids, pixels = _prompt(cfg, [(1, 2), (1, 1)])
    with torch.no_grad():
        assert (ours(ids, pixel_values=pixels) - ref(input_ids=ids, pixel_values=pixels).logits).abs().max() <= TOL


def test_herd_multimodal_checkpoint_loads_into_transformers(tmp_path):
    from transformers import AutoModelForImageTextToText

    cfg = _cfg()
    ours, _ = twin_multimodal(cfg, seed=5)
    herd.save_pretrained(ours, tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert any(k.startswith("vision_model.") for k in index["weight_map"])
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 28, "width": 28} and pre["max_patches"] == cfg.vision_config.max_tiles
    ref = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    ids, pixels = _prompt(cfg, [(2, 2)])
    with torch.no_grad():
        assert (ours(ids, pixel_values=pixels) - ref(input_ids=ids, pixel_values=pixels).logits).abs().max() <= TOL
    back = herd.from_pretrained(tmp_path)
    assert back.config == ours.config
    text = herd.from_pretrained(tmp_path, text_only=True)
    assert isinstance(text, herd.Llama4ForCausalLM)


def test_missing_vision_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = _cfg()
    herd.save_pretrained(herd.build_model(cfg), tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["vision_model.model.layers.1.mlp.fc2.bias"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors: vision_model\.model\.layers\.1\.mlp\.fc2\.bias"):
        herd.from_pretrained(tmp_path)


@pytest.mark.parametrize("name,total", [("llama4-scout", 109e9), ("llama4-maverick", 400e9)])
def test_published_totals_with_vision(name, total):
    from herd.sizes import count_params, count_vision_params

    cfg = herd.multimodal_preset(name)
    with torch.device("meta"):
        model = herd.Llama4ForConditionalGeneration(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_params(cfg.text_config).total + count_vision_params(cfg.vision_config, 5120)
    assert abs(n / total - 1) < 0.02, f"{name}: {n / 1e9:.2f}B"
    v = sum(p.numel() for m in (model.vision_model, model.multi_modal_projector) for p in m.parameters())
    assert abs(v / 0.87e9 - 1) < 0.01  # the tower is ~0.87B in both
