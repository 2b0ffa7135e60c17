"""Dense Llama checkpoints (transformers' LlamaForCausalLM) load into herd's own model and save back as Llama.

Tiny random configs written by transformers: tied and untied embeddings, with and without llama3 RoPE scaling,
grouped-query attention. Checked: logits equal transformers' in float32, a KV-cached greedy generation through
herd's engine equal to transformers' greedy, the round trip through herd's save_pretrained, and a clear error for
each thing herd cannot compute.
Run: .venv/bin/python -m pytest tests/formats/test_llama_dense.py -v
"""

from __future__ import annotations

import json

import pytest
import torch

import herd
from herd.config import ConfigError
from herd.formats.llama import differences
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams
from herd.model.slot_cache import SlotCache
from herd.tokenizer import tiny_tokenizer

TOL = 1e-5
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(tmp_path, seed=0, **kw):
    """A random LlamaForCausalLM written by transformers to tmp_path; returns the transformers model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = dict(vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
    base.update(kw)
    rope = base.pop("rope_scaling", None) or {"rope_type": "default"}
    cfg = LlamaConfig(**base, rope_parameters={**rope, "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at one: perturb them so a mix-up between norms cannot pass
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def _ids(n=40, seed=0):
    return torch.randint(3, 2048, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [dict(tie_word_embeddings=True),
                                dict(tie_word_embeddings=False, rope_scaling=LLAMA3),
                                dict(tie_word_embeddings=True, rope_scaling=LLAMA3, num_key_value_heads=1),
                                dict(num_key_value_heads=4, head_dim=32)],
                         ids=["tied", "untied-llama3", "tied-llama3-mqa", "mha-head_dim"])
def test_llama_logits_equal_transformers(tmp_path, kw):
    ref = _llama(tmp_path, **kw)
    ours = herd.from_pretrained(tmp_path)
    cfg = ours.config
    assert cfg.moe_layers == [] and not differences(cfg)  # herd's own model, every layer dense, RoPE'd, global
    assert not any(layer.chunked or layer.is_moe for layer in ours.model.layers)
    assert (cfg.rope_scaling or {}).get("factor") == kw.get("rope_scaling", {}).get("factor")
    ids = _ids(200)  # past the llama3 scaling's original context (32)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= TOL


def test_kv_cached_greedy_equals_transformers(tmp_path):
    ref = _llama(tmp_path, seed=3, rope_scaling=LLAMA3)
    ours = herd.from_pretrained(tmp_path)
    # global layers: a serving cache holds `capacity` positions per row, not a max_position_embeddings-slot ring
    assert SlotCache(ours.config, 2, 64, "cpu", torch.float32).k[0].shape[2] == 64
    prompts = [_ids(21, seed=1)[0].tolist(), _ids(9, seed=2)[0].tolist()]
    n = 40
    reqs = Engine(ours, tiny_tokenizer(), prefill_chunk=8).generate(
        prompts, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
    for prompt, req in zip(prompts, reqs, strict=True):
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)[0, len(prompt):].tolist()
        assert req.output_ids == want


def test_save_round_trip_writes_llama(tmp_path):
    from transformers import LlamaForCausalLM

    ref = _llama(tmp_path / "a", rope_scaling=LLAMA3, tie_word_embeddings=False)
    ours = herd.from_pretrained(tmp_path / "a")
    herd.save_pretrained(ours, tmp_path / "b")
    d = json.loads((tmp_path / "b" / "config.json").read_text())
    assert d["architectures"] == ["LlamaForCausalLM"] and d["model_type"] == "llama"
    back = LlamaForCausalLM.from_pretrained(tmp_path / "b").eval()
    for name, t in ref.state_dict().items():  # the same tensors, bit for bit, in transformers' layout
        assert torch.equal(t, back.state_dict()[name]), name
    again = herd.from_pretrained(tmp_path / "b")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_herd_dense_config_saves_as_llama_and_moe_does_not(tmp_path):
    """A herd model with a dense Llama's shape is written as LlamaForCausalLM; a Llama 4 one stays Llama 4."""
    from transformers import LlamaForCausalLM

    cfg = herd.TextConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size_mlp=64, moe_layers=[], no_rope_layers=[1, 1],
                          use_qk_norm=False, attention_chunk_size=128, max_position_embeddings=128)
    model = herd.build_model(cfg, seed=4).eval()
    herd.save_pretrained(model, tmp_path / "dense")
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "dense").eval()
    ids = torch.randint(0, 512, (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() <= TOL
    tiny = herd.build_model(herd.preset("tiny"), seed=0)
    assert differences(tiny.config)  # MoE, NoPE, chunks, QK-norm
    herd.save_pretrained(tiny, tmp_path / "moe")
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["model_type"] == "llama4_text"


@pytest.mark.parametrize("field, value", [("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"),
                                          ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
                                          ("rope_parameters", {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 10000.0}),
                                          ("architectures", ["LlamaForSequenceClassification"])])
def test_inexpressible_llama_fails_naming_the_field(tmp_path, field, value):
    _llama(tmp_path)
    f = tmp_path / "config.json"
    d = json.loads(f.read_text())
    d.pop("rope_parameters" if field == "rope_scaling" else "rope_scaling", None)
    d[field] = value
    f.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=field):
        herd.from_pretrained(tmp_path)
