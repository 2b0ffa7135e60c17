"""Llama Guard 4 surgery (herd.safety.surgery): shared experts kept bit for bit as dense FFNs, the result computes the
source without its routed experts, and the folder it writes loads in herd and in transformers with the same logits.

Run: .venv/bin/python -m pytest tests/safety/test_surgery.py -v
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import herd
from herd.cli import main
from herd.config import ConfigError
from herd.formats.hf import CheckpointError
from herd.safety.surgery import guard_from_moe, guard_from_moe_dir
from herd.tokenizer import Tokenizer, tiny_tokenizer
from tests.conftest import randomize_norms
from tests.model.test_vision_parity import _cfg, _prompt

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _source(cfg, seed=0):
    model = herd.build_model(cfg, seed=seed)
    randomize_norms(model, seed)  # a mix-up between norms cannot go unnoticed
    return model.eval()


def _ids(cfg, seed=0):
    n = 3 * cfg.text_config.attention_chunk_size + 4  # crosses chunk boundaries: chunked and global layers differ
    return torch.randint(3, cfg.text_config.vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


def _routed_off(model):
    """A copy of a MoE model whose routed experts output nothing: each MoE layer computes its shared expert only."""
    off = copy.deepcopy(model)
    with torch.no_grad():
        for layer in off.decoder.model.layers:
            if layer.is_moe:
                layer.feed_forward.experts.down_proj.zero_()
    return off


def _mlp_weights(mlp):
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def _save(model, path, tokenizer=True):
    herd.save_pretrained(model, path)
    if tokenizer:
        tiny_tokenizer().save(path)
    return path


@pytest.fixture(scope="module")
def text_dirs(tmp_path_factory):
    """(source model, its folder, the guard folder guard_from_moe_dir wrote, its report) for the tiny preset."""
    root = tmp_path_factory.mktemp("surgery")
    src = _source(herd.preset("tiny"), seed=1)
    init = _save(src, root / "moe")
    (init / "generation_config.json").write_text(json.dumps({"bos_token_id": 904, "temperature": 0.6}))
    report = guard_from_moe_dir(init, root / "guard")
    return src, init, root / "guard", report


# ---- the pure transform ----------------------------------------------------------------------------------------------
def test_shared_experts_become_the_dense_ffns_bitwise():
    src = _source(herd.preset("tiny"), seed=2)
    before = {n: t.clone() for n, t in src.state_dict().items()}
    guard = guard_from_moe(src)
    cfg = guard.config
    assert cfg.moe_layers == [] and cfg.num_local_experts == 0 and cfg.interleave_moe_layer_step == 0
    assert cfg.intermediate_size_mlp == src.config.intermediate_size  # the shared expert's width
    for a, b in zip(src.model.layers, guard.model.layers, strict=True):
        assert a.is_moe and not b.is_moe
        for w_src, w_guard in zip(_mlp_weights(a.feed_forward.shared_expert), _mlp_weights(b.feed_forward),
                                  strict=True):
            assert torch.equal(w_src, w_guard)
    sd = guard.state_dict()
    assert not [n for n in sd if ".router." in n or ".experts." in n or "shared_expert" in n]
    assert not [n for n, _ in guard.named_buffers() if n.endswith("expert_bias")]
    for n, t in sd.items():  # everything outside the FFNs is copied as it is
        if ".feed_forward." not in n:
            assert torch.equal(t, before[n]), n
    assert all(torch.equal(t, before[n]) for n, t in src.state_dict().items())  # the source is left alone


def test_guard_computes_the_source_without_its_routed_experts():
    src = _source(herd.preset("tiny"), seed=3)
    with torch.no_grad():  # selection biases change which routed expert runs; the guard has none to honour
        for layer in src.model.layers:
            layer.feed_forward.router.expert_bias.normal_()
    guard, ids = guard_from_moe(src), _ids(src.config)
    with torch.no_grad():
        want = _routed_off(src)(ids)
        assert (guard(ids) - want).abs().max().item() <= TOL
        assert (src(ids) - want).abs().max().item() > 1e-3  # the routed experts mattered: something was removed


@pytest.mark.parametrize("overrides,padded", [
    ({}, "moe"),  # tiny-maverick: shared experts (96) narrower than the dense layers (192)
    ({"intermediate_size": 96, "intermediate_size_mlp": 64}, "dense"),  # dense layers narrower than the experts
])
def test_interleaved_source_is_zero_padded_to_one_exact_width(overrides, padded):
    """Every second layer MoE (Maverick's layout): the narrower FFNs are zero-padded to the wider width, which
    changes nothing they compute, and the kept weights sit bitwise in the leading units."""
    src = _source(herd.preset("tiny-maverick", **overrides), seed=4)
    guard = guard_from_moe(src)
    width = max(src.config.intermediate_size, src.config.intermediate_size_mlp)
    assert guard.config.intermediate_size_mlp == width and guard.config.moe_layers == []
    for a, b in zip(src.model.layers, guard.model.layers, strict=True):
        kept = a.feed_forward.shared_expert if a.is_moe else a.feed_forward
        F = kept.gate_proj.weight.shape[0]
        assert (F < width) == (padded == ("moe" if a.is_moe else "dense"))
        gate, up, down = _mlp_weights(b.feed_forward)
        assert torch.equal(gate[:F], kept.gate_proj.weight) and torch.equal(up[:F], kept.up_proj.weight)
        assert torch.equal(down[:, :F], kept.down_proj.weight)
        assert not gate[F:].any() and not up[F:].any() and not down[:, F:].any()
    ids = _ids(src.config)
    with torch.no_grad():
        assert (guard(ids) - _routed_off(src)(ids)).abs().max().item() <= TOL


def test_multimodal_guard_keeps_the_vision_tower_and_matches_transformers(tmp_path):
    from transformers import Llama4ForConditionalGeneration

    src = _source(_cfg(), seed=5)
    guard = guard_from_moe(src)
    assert isinstance(guard, herd.Llama4ForConditionalGeneration) and guard.text_config.moe_layers == []
    for part in ("vision_model", "multi_modal_projector"):
        a, b = getattr(src, part).state_dict(), getattr(guard, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    ids, pixels = _prompt(src.config, [(1, 2)])
    with torch.no_grad():
        assert (guard(ids, pixel_values=pixels) - _routed_off(src)(ids, pixel_values=pixels)).abs().max() <= TOL
    # the folder: the multimodal architecture in transformers, with the same logits on an image prompt
    _save(src, tmp_path / "moe", tokenizer=False)
    guard_from_moe_dir(tmp_path / "moe", tmp_path / "guard")
    ref = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "guard").eval()
    ours = herd.from_pretrained(tmp_path / "guard")
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels).logits
        assert (ours(ids, pixel_values=pixels) - want).abs().max().item() <= TOL
        assert (guard(ids, pixel_values=pixels) - want).abs().max().item() <= TOL


# ---- the folder ------------------------------------------------------------------------------------------------------
def test_guard_folder_loads_in_herd_and_transformers_with_equal_logits(text_dirs, tmp_path):
    from transformers import Llama4ForCausalLM

    src, init, out, report = text_dirs
    d = json.loads((out / "config.json").read_text())
    assert d["architectures"] == ["Llama4ForCausalLM"]
    # how transformers' converter writes a dense Llama Guard: vLLM places MoE layers by the step alone
    assert (d["moe_layers"], d["interleave_moe_layer_step"], d["num_local_experts"]) == ([], 0, 0)
    ours = herd.from_pretrained(out)
    ref = Llama4ForCausalLM.from_pretrained(out).eval()
    assert not any(layer.is_moe_layer for layer in ref.model.layers)
    ids = _ids(src.config)
    with torch.no_grad():
        want = ref(ids).logits
        assert (ours(ids) - want).abs().max().item() <= TOL
        assert (ours(ids) - _routed_off(src)(ids)).abs().max().item() <= TOL
    # and the config transformers itself writes for it reads back into herd
    ref.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert (herd.from_pretrained(tmp_path / "hf")(ids) - want).abs().max().item() <= TOL
    assert report.pruned_layers == list(range(src.config.num_hidden_layers)) and report.padded_layers == []
    assert report.params_before == herd.count_params(src.config).total
    assert report.params_after == herd.count_params(ours.config).total == sum(p.numel() for p in ours.parameters())


def test_guard_folder_is_complete_for_serving(text_dirs):
    """Tokenizer, chat template and generation settings come along, so `herd serve` / `herd chat` load the folder."""
    _, init, out, _ = text_dirs
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (init / name).read_bytes(), name
    assert herd.formats.hf.generation_defaults(out) == {"temperature": 0.6}
    tok = Tokenizer.from_pretrained(out)
    model = herd.from_pretrained(out)
    prompt = torch.tensor([tok.encode("safe?", bos=True)])
    assert herd.generate(model, prompt, 2).shape == (1, prompt.shape[1] + 2)


def test_cli_writes_the_guard_and_prints_what_it_removed(text_dirs, tmp_path, capsys):
    src, init, _, report = text_dirs
    assert main(["guard-from-moe", "--init", str(init), "--out", str(tmp_path / "g"), "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert f"parameters: {report.params_before:,} -> {report.params_after:,}" in printed
    assert f"routed experts of {src.config.num_hidden_layers} of {src.config.num_hidden_layers} layers" in printed
    guard = herd.from_pretrained(tmp_path / "g")
    assert guard.dtype == torch.bfloat16
    assert torch.equal(guard.model.layers[0].feed_forward.down_proj.weight,
                       src.model.layers[0].feed_forward.shared_expert.down_proj.weight.to(torch.bfloat16))


def test_cli_reports_padding_of_an_interleaved_source(tmp_path, capsys):
    src = _save(_source(herd.preset("tiny-maverick"), seed=6), tmp_path / "moe")
    assert main(["guard-from-moe", "--init", str(src), "--out", str(tmp_path / "g")]) == 0
    assert "zero-padded to width 192 (exact: padded units add 0): layers [1, 3, 5, 7]" in capsys.readouterr().out


# ---- refusals --------------------------------------------------------------------------------------------------------
def test_a_checkpoint_without_moe_layers_is_refused(tmp_path, capsys):
    dense = _save(_source(herd.preset("tiny", moe_layers=[]), seed=7), tmp_path / "dense")
    assert main(["guard-from-moe", "--init", str(dense), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "has no MoE layers" in err and "takes a Llama 4 mixture-of-experts checkpoint" in err
    assert not (tmp_path / "g").exists()
    with pytest.raises(ConfigError, match="no MoE layers"):  # nor can a guard be pruned twice
        guard_from_moe(guard_from_moe(_source(herd.preset("tiny"))))


def test_out_must_not_be_the_source_folder(text_dirs):
    _, init, _, _ = text_dirs
    with pytest.raises(CheckpointError, match="is the --init folder"):
        guard_from_moe_dir(init, init)


def test_the_guard_folder_is_described_and_checked_for_gguf_as_a_dense_model(text_dirs, capsys):
    """`herd info` says every layer is dense; the GGUF export's llama.cpp check reads step 0 as no MoE layers."""
    from herd.formats.gguf_export import llama_cpp_mismatches

    _, _, out, _ = text_dirs
    assert main(["info", "--model", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "none (every layer dense)" in printed and "(0 MoE," in printed
    why = llama_cpp_mismatches(herd.from_pretrained(out))
    assert not any("MoE layers" in w for w in why), why
