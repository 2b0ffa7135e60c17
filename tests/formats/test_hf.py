"""Hugging Face checkpoint I/O: round trips with transformers both ways, sharding, dtypes, the multimodal layout,
and every kind of bad checkpoint raising a clear error that names the problem.

Run: .venv/bin/python -m pytest tests/formats/test_hf.py -v
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import herd
from herd.config import ConfigError
from herd.formats.hf import CheckpointError, config_from_hf
from tests.conftest import hf_config

TOL = 1e-5


@pytest.fixture(scope="module")
def cfg():
    return herd.preset("tiny", vocab_size=512, num_local_experts=3, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def ids(cfg):
    return torch.randint(0, cfg.vocab_size, (2, 3 * cfg.attention_chunk_size + 4),
                         generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(cfg, tmp_path_factory):
    """A checkpoint written by herd (float32, single file) and the model that wrote it."""
    path = tmp_path_factory.mktemp("ckpt")
    model = herd.build_model(cfg, seed=1).eval()
    herd.save_pretrained(model, path)
    return path, model


def _copy(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_transformers_checkpoint_loads_into_herd(cfg, ids, tmp_path):
    from transformers import Llama4ForCausalLM

    ref = Llama4ForCausalLM(hf_config(cfg)).eval()
    ref.save_pretrained(tmp_path, max_shard_size="400KB")  # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = herd.from_pretrained(tmp_path)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= TOL


def test_herd_checkpoint_loads_into_transformers(cfg, ids, saved):
    from transformers import Llama4ForCausalLM

    path, model = saved
    ref = Llama4ForCausalLM.from_pretrained(path).eval()
    assert ref.config.rope_parameters["rope_type"] == "llama3"  # the scaling recipe survived the trip
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() <= TOL


def test_sharded_bf16_round_trip(cfg, ids, tmp_path):
    model = herd.build_model(cfg, seed=2).eval()
    herd.save_pretrained(model, tmp_path, max_shard_bytes=200_000, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = herd.from_pretrained(tmp_path)
    assert back.dtype == torch.bfloat16  # the checkpoint's dtype by default
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=False):
        assert torch.equal(a.to(torch.bfloat16), b), n
    as_f32 = herd.from_pretrained(tmp_path, dtype=torch.float32)
    assert as_f32.dtype == torch.float32


def test_multimodal_checkpoint_loads_text_part(cfg, ids, tmp_path):
    """A Llama4ForConditionalGeneration file: language_model.* is taken, vision_model.* is left to the vision issue."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                  image_size=28, patch_size=7, vision_output_dim=32, projector_input_dim=32,
                  projector_output_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    full = Llama4ForConditionalGeneration(Llama4Config(text_config=hf_config(cfg).to_dict(), vision_config=vision,
                                                       image_token_index=cfg.vocab_size - 1))
    full.eval().save_pretrained(tmp_path)
    ours = herd.from_pretrained(tmp_path, text_only=True)
    assert isinstance(ours, herd.Llama4ForCausalLM)
    with torch.no_grad():
        assert (ours(ids) - full(input_ids=ids).logits).abs().max().item() <= TOL


def test_pickle_checkpoints_load_only_as_weights(cfg, ids, saved, tmp_path):
    path, model = saved
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text((path / "config.json").read_text())
    torch.save(model.state_dict(), plain / "pytorch_model.bin")
    with torch.no_grad():
        assert torch.equal(herd.from_pretrained(plain)(ids), model(ids))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((path / "config.json").read_text())

    class Exploit:
        def __reduce__(self):
            return (print, ("this code must never run",))

    (evil / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": Exploit()}))
    with pytest.raises(CheckpointError, match="weights-only"):
        herd.from_pretrained(evil)


# ---- bad checkpoints ----------------------------------------------------------------------------------------------
def _edit_tensors(path, fn):
    f = path / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_missing_tensor_is_named(saved, tmp_path):
    bad = _copy(saved[0], tmp_path / "bad")
    _edit_tensors(bad, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight"):
        herd.from_pretrained(bad)


def test_unexpected_tensor_is_named(saved, tmp_path):
    bad = _copy(saved[0], tmp_path / "bad")
    _edit_tensors(bad, lambda sd: sd.__setitem__("model.layers.0.self_attn.rogue.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.rogue\.weight"):
        herd.from_pretrained(bad)


def test_wrong_shape_is_named(saved, tmp_path):
    bad = _copy(saved[0], tmp_path / "bad")
    _edit_tensors(bad, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(7)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: checkpoint \(7,\) vs model \(64,\)"):
        herd.from_pretrained(bad)


def test_config_contradicting_tensors(saved, tmp_path):
    bad = _copy(saved[0], tmp_path / "bad")
    d = json.loads((bad / "config.json").read_text())
    d["num_local_experts"] = 5  # tensors hold 3 experts
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"experts\.gate_up_proj: checkpoint \(3, .*contradicts"):
        herd.from_pretrained(bad)
    d["num_local_experts"], d["num_hidden_layers"] = 3, 2  # tensors hold 4 layers
    d.pop("no_rope_layers"), d.pop("moe_layers"), d.pop("layer_types")
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.2\..*contradicts"):
        herd.from_pretrained(bad)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_or_truncated_file(saved, tmp_path, damage):
    bad = _copy(saved[0], tmp_path / "bad")
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\x01not a safetensors file" * 10,
                   "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        herd.from_pretrained(bad)


def test_missing_pieces(saved, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        herd.from_pretrained(tmp_path / "nowhere")
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        herd.from_pretrained(no_cfg)
    no_weights = _copy(saved[0], tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        herd.from_pretrained(no_weights)
    idx = _copy(saved[0], tmp_path / "idx")
    (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002.safetensors"):
        herd.from_pretrained(idx)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (lambda d: d.update(attention_chunk_size=0), "attention_chunk_size must be a positive int"),
    (lambda d: d.update(hidden_sise=64), r"keys herd does not know: \['hidden_sise'\]"),
    (lambda d: d.update(num_hidden_layers="four"), "num_hidden_layers must be a positive int"),
    (lambda d: d.update(model_type="mistral"), "not a Llama 4 model"),  # "llama": herd.formats.llama
    (lambda d: d.update(num_experts_per_tok=9), "exceeds num_local_experts"),
])
def test_malformed_config(saved, edit, match):
    d = json.loads((saved[0] / "config.json").read_text())
    edit(d)
    with pytest.raises(ConfigError, match=match):
        config_from_hf(d)


def test_config_not_json(saved, tmp_path):
    bad = _copy(saved[0], tmp_path / "bad")
    (bad / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        herd.from_pretrained(bad)


def test_v4_style_config_is_read(cfg):
    """Older files spell RoPE as rope_theta + rope_scaling and store attn_temperature_tuning as 4."""
    d = {"model_type": "llama4_text", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 4, "vocab_size": 100, "intermediate_size": 32, "intermediate_size_mlp": 64,
         "rope_theta": 500000.0, "attn_temperature_tuning": 4, "no_rope_layers": [],
         "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                          "original_max_position_embeddings": 8192}}
    c = config_from_hf(d)
    assert c.rope_scaling["factor"] == 16.0 and c.attn_temperature_tuning is True
    assert c.no_rope_layers == [1, 1, 1, 0] and c.head_dim == 16


def test_loading_streams_into_the_target_dtype(saved):
    """The model is allocated once at the target dtype; no float32 copy of the whole model is made first."""
    model = herd.from_pretrained(saved[0], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def test_bf16_checkpoint_gives_bit_identical_logits(tmp_path):
    """Loaded as bfloat16 on both sides (transformers keeps its RoPE frequencies in float32, so does herd), the
    logits agree exactly, top-1 and top-2 routing alike."""
    from transformers import Llama4ForCausalLM

    for k in (1, 2):
        cfg = herd.preset("tiny", num_experts_per_tok=k)
        herd.save_pretrained(herd.build_model(cfg, seed=k), tmp_path / str(k), dtype=torch.bfloat16)
        ref = Llama4ForCausalLM.from_pretrained(tmp_path / str(k), dtype=torch.bfloat16).eval()
        ours = herd.from_pretrained(tmp_path / str(k))
        ids = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            assert torch.equal(ours(ids), ref(ids).logits)


def test_meta_build_then_materialize(cfg, ids):
    model = herd.build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    herd.materialize(model, "cpu", seed=3)
    again = herd.build_model(cfg, seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_router_biases_travel_with_the_weights_in_bfloat16_too(cfg, ids, tmp_path):
    """A model that routes with selection biases: a bfloat16 export keeps them in float32 next to the weights (they
    decide top-k, where rounding would change choices) and loads back routing as before; the legacy JSON sidecar of
    older exports must name the model's routers."""
    from herd.formats.hf import LEGACY_BIAS_FILE, RoutingWarning, biased, router_biases

    model = herd.build_model(cfg, seed=3).eval()
    assert biased(model) == []
    g = torch.Generator().manual_seed(3)
    for b in router_biases(model).values():
        b.copy_(torch.randn(b.shape, generator=g))
    with pytest.warns(RoutingWarning, match="4 MoE router"):
        herd.save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_bytes=100_000)
    loaded = herd.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert all(torch.equal(a, router_biases(model)[n]) for n, a in router_biases(loaded).items())
    with torch.no_grad():  # the same choices as the saved model with bfloat16-rounded weights
        rounded = herd.build_model(cfg, seed=3).eval()
        rounded.load_state_dict({n: p.bfloat16().float() for n, p in model.state_dict().items()})
        for n, b in router_biases(rounded).items():
            b.copy_(router_biases(model)[n])
        torch.testing.assert_close(loaded(ids), rounded(ids), atol=0, rtol=0)
    unbiased = tmp_path / "old"
    herd.save_pretrained(herd.build_model(cfg, seed=3), unbiased)
    (unbiased / LEGACY_BIAS_FILE).write_text(json.dumps({"model.layers.9.feed_forward.router.expert_bias": [0.0]}))
    with pytest.raises(CheckpointError, match="do not match the model's"):
        herd.from_pretrained(unbiased)


def test_generation_defaults_are_read_where_they_are_written(saved, tmp_path):
    from herd.formats.hf import generation_defaults

    path, _ = saved
    written = json.loads((path / "generation_config.json").read_text())
    assert written == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0} and generation_defaults(path) == {}
    _copy(path, tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({**written, "temperature": 0.6, "top_p": 0.9,
                                                                 "do_sample": True}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9}
    assert generation_defaults(tmp_path / "nowhere") == {}
