"""Vision tower and early-fusion parity with transformers (float32, max |diff| <= 1e-5), and fusion errors.

Covers the tower alone on a batch of tiles, and full multimodal logits for text-only prompts, one image, several
images with different grids (1x1, 1x2 + thumbnail, 2x2 + thumbnail) and eight images in one prompt.
Run: .venv/bin/python -m pytest tests/model/test_vision_parity.py -v
"""

from __future__ import annotations

import pytest
import torch

import herd
from tests.conftest import twin_multimodal

TOL = 1e-5


def _cfg(**vision):
    from herd.config import VISION_PRESETS

    v = herd.VisionConfig(**{**VISION_PRESETS["tiny"], **vision})
    text = herd.preset("tiny", vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return herd.Llama4Config(text_config=text, vision_config=v, boi_token_index=509, eoi_token_index=510,
                             image_token_index=511)


def _prompt(cfg, grids, n_text=5, seed=0):
    """Token ids laid out like a chat prompt with images (as transformers' `Llama4Processor` expands them), plus
    matching random pixel values."""
    g = torch.Generator().manual_seed(seed)
    K, patch = cfg.vision_config.tokens_per_tile, cfg.image_token_index
    boi, eoi = cfg.boi_token_index, cfg.eoi_token_index
    text = lambda n: torch.randint(3, 400, (n,), generator=g).tolist()  # noqa: E731
    ids, tiles = text(n_text), 0
    for rows, cols in grids:
        n_tiles = rows * cols + (1 if rows * cols > 1 else 0)
        ids += [boi] + [patch] * (K * n_tiles) + [eoi] + text(3)  # separators are ordinary text tokens here
        tiles += n_tiles
    S = cfg.vision_config.image_size
    pixels = torch.rand(tiles, 3, S, S, generator=g) * 2 - 1 if tiles else None
    return torch.tensor([ids]), pixels


def test_vision_tower_matches_transformers():
    cfg = _cfg(num_hidden_layers=3)
    ours, ref = twin_multimodal(cfg)
    pixels = torch.rand(5, 3, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        got = ours.vision_model(pixels)
        expected = ref.vision_model(pixels).last_hidden_state
    assert got.shape == expected.shape == (5, cfg.vision_config.tokens_per_tile, 48)
    assert (got - expected).abs().max().item() <= TOL


def test_real_tower_geometry_matches_transformers():
    """336-px tiles of 14-px patches (24x24 grid, 144 tokens per tile) at a small width, one layer."""
    cfg = _cfg(image_size=336, patch_size=14, hidden_size=32, intermediate_size=128, num_hidden_layers=1)
    ours, ref = twin_multimodal(cfg)
    pixels = torch.rand(2, 3, 336, 336, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        got = ours.vision_model(pixels)
        assert got.shape == (2, 144, 48)
        assert (got - ref.vision_model(pixels).last_hidden_state).abs().max().item() <= TOL


@pytest.mark.parametrize("grids", [[], [(1, 1)], [(1, 2), (1, 1), (2, 2)], [(1, 1), (2, 1)] * 4],
                         ids=["text-only", "one-image", "three-grids", "eight-images"])
def test_multimodal_logits_match_transformers(grids):
    cfg = _cfg()
    ours, ref = twin_multimodal(cfg, seed=3)
    ids, pixels = _prompt(cfg, grids, seed=len(grids))
    with torch.no_grad():
        got = ours(ids, pixel_values=pixels)
        expected = ref(input_ids=ids, pixel_values=pixels).logits
    assert (got - expected).abs().max().item() <= TOL
    if pixels is not None:  # the images really change the output
        with torch.no_grad():
            assert (ours(ids, pixel_values=-pixels) - got).abs().max().item() > 1e-4


def test_text_only_never_runs_the_vision_tower():
    cfg = _cfg()
    model = herd.build_model(cfg)
    model.vision_model.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(AssertionError("vision ran")))
    ids, _ = _prompt(cfg, [])
    with torch.no_grad():
        model(ids)


def test_patch_count_mismatch_is_a_clear_error():
    cfg = _cfg()
    model = herd.build_model(cfg)
    ids, pixels = _prompt(cfg, [(1, 2)])
    with torch.no_grad(), pytest.raises(ValueError, match=r"has 12 <\|patch\|> tokens, the 2 tiles give 8"):
        model(ids, pixel_values=pixels[:2])
    with torch.no_grad(), pytest.raises(ValueError, match="no pixel_values"):
        model(ids)
    with torch.no_grad(), pytest.raises(ValueError, match=r"pixel_values must be \(tiles, 3, 28, 28\)"):
        model(ids, pixel_values=torch.zeros(3, 3, 32, 32))


def test_generation_with_an_image_matches_transformers():
    cfg = _cfg()
    ours, ref = twin_multimodal(cfg, seed=4)
    ids, pixels = _prompt(cfg, [(1, 2)])
    n = 40
    expected = ref.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)
    got = herd.generate(ours, ids, n, pixel_values=pixels)
    assert torch.equal(got, expected)
