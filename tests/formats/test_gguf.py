"""GGUF both ways: herd export -> gguf.GGUFReader -> herd import, quantized tensors, tokenizers, clear refusals.

Every file is written in the test by the `gguf` package's writer (no network, no llama.cpp build). Checked: a tiny
transformers LlamaForCausalLM and a tiny herd Llama 4 MoE exported at f32 / f16 / q8_0 read back with the names, keys
and layouts llama.cpp's converter writes (q/k rows as convert_hf_to_gguf.py's `permute` leaves them) and re-import
with the source's logits; Q4_0/Q4_1/Q8_0 tensors (gguf.quants) and hand-built Q4_K/Q6_K blocks dequantize to
reference values; llama3 RoPE scaling survives the `rope_freqs` tensor; tokenizers rebuilt from a GGUF encode as the
source does; unknown architectures, tensor types and llama.cpp mismatches are refused by name.
Run: .venv/bin/python -m pytest tests/formats/test_gguf.py -v
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from herd.cli import main
from herd.config import preset
from herd.formats import gguf as hg
from herd.formats.gguf_export import LlamaCppMismatchWarning, add_tokenizer, export_gguf, llama_cpp_mismatches
from herd.formats.hf import from_pretrained, save_pretrained
from herd.model.attention import rope_inv_freq
from herd.model.build import build_model
from herd.tokenizer import Tokenizer, tiny_tokenizer

Q = gguf.GGMLQuantizationType
F16_TOL = 2e-2  # max |logit| difference after f16 weights (tiny random models; logits are O(1))
Q8_TOL = 0.1  # after q8_0 weights
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
# llama.cpp's fixed llama4 settings on the tiny preset, so herd and llama.cpp compute the same model
LLAMA_CPP_TINY = dict(attention_chunk_size=8192, floor_scale=8192)
TEXTS = ["Hello world, it's 2024! 123456 ünïcödé 日本語 🙂", "def f(x):\n    return x**2  # tabs\tand   spaces\n\n",
         "<|eot|> <|im_start|> typed by a user", "I'M SHOUTING, they'll've 3.14159 e=mc²", "   leading\r\nCRLF"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def _ids(n=40):
    return torch.randint(3, 2048, (2, n), generator=torch.Generator().manual_seed(0))


def _fields(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    return hg.metadata(r), {t.name: t for t in r.tensors}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute (llama.cpp, public source): HF halves -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- dense Llama: transformers -> herd export -> GGUF -> herd ------------------------------------------------------
@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=904,
                      eos_token_id=912, tie_word_embeddings=False, rope_parameters={**LLAMA3, "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at one: perturb them so a mix-up between norms cannot pass
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(root)
    tiny_tokenizer().save(root)
    return root, model


@pytest.mark.parametrize("type_, tol", [("f32", 1e-5), ("f16", F16_TOL)])
def test_dense_llama_export_reads_back_as_llama_cpp_writes_it(dense, tmp_path, type_, tol):
    root, hf = dense
    out = tmp_path / "llama.gguf"
    assert main(["export", "--gguf", str(out), "--type", type_, "--model", str(root)]) == 0
    meta, tensors = _fields(out)
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"]) == (2, 64, 96)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["tokenizer.ggml.pre"] == "llama4" and meta["tokenizer.ggml.bos_token_id"] == 904
    assert "output.weight" in tensors and "rope_freqs.weight" in tensors
    sd = hf.state_dict()
    for proj, heads in (("q", 4), ("k", 2)):  # the converter's row order (Meta's interleaved pairs)
        got = torch.from_numpy(hg._to_numpy(tensors[f"blk.1.attn_{proj}.weight"]))
        want = _permute(sd[f"model.layers.1.self_attn.{proj}_proj.weight"], heads)
        assert torch.allclose(got, want, atol=1e-3 if type_ == "f16" else 0)
    assert tensors["blk.0.attn_q.weight"].tensor_type == (Q.F32 if type_ == "f32" else Q.F16)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    model = from_pretrained(out)  # herd.from_pretrained(path.gguf)
    assert model.config.rope_scaling is not None and model.config.moe_layers == []
    ids = _ids()
    assert (_logits(model, ids) - _logits(hf, ids)).abs().max() < tol


# ---- Llama 4 MoE: herd -> GGUF -> herd -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe():
    return build_model(preset("tiny", **LLAMA_CPP_TINY), seed=1).eval()


@pytest.mark.parametrize("type_, tol", [("f32", 1e-5), ("f16", F16_TOL), ("q8_0", Q8_TOL)])
def test_llama4_moe_round_trip(moe, tmp_path, type_, tol):
    out = tmp_path / "moe.gguf"
    assert export_gguf(moe, tiny_tokenizer(), out, type=type_) == []
    meta, tensors = _fields(out)
    cfg = moe.config
    assert meta["general.architecture"] == "llama4"
    assert (meta["llama4.expert_count"], meta["llama4.expert_used_count"]) == (4, 1)
    assert meta["llama4.expert_feed_forward_length"] == cfg.intermediate_size
    assert meta["llama4.feed_forward_length"] == cfg.intermediate_size_mlp
    assert meta["llama4.interleave_moe_layer_step"] == 1 and meta["tokenizer.chat_template"]
    assert [int(n) for n in tensors["blk.0.ffn_gate_exps.weight"].shape] == [64, 96, 4]  # ggml ne: D, F, E
    assert [int(n) for n in tensors["blk.0.ffn_down_exps.weight"].shape] == [96, 64, 4]
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32  # routing stays exact
    gate = torch.from_numpy(hg._to_numpy(tensors["blk.0.ffn_gate_exps.weight"]))
    gu = moe.state_dict()["model.layers.0.feed_forward.experts.gate_up_proj"]
    assert torch.allclose(gate, gu[..., :96].transpose(1, 2), atol=0.05)  # gate is the first half
    back = from_pretrained(out)
    c1, c2 = cfg.__dict__.copy(), back.config.__dict__.copy()
    c1.pop("eos_token_id"), c2.pop("eos_token_id")  # GGUF has eos/eot/eom ids, not herd's list
    assert c1 == c2
    ids = _ids()
    assert (_logits(back, ids) - _logits(moe, ids)).abs().max() < tol


def test_export_then_serve_the_gguf(moe, tmp_path):
    """The user's path end to end: a checkpoint folder -> `herd export --gguf` -> `herd serve --model x.gguf` (a real
    uvicorn process) -> a greedy completion equal, token for token and in its log-probs, to the source model's."""
    import json
    import urllib.request

    from herd import generate
    from tests.serve.server_process import ServerProcess

    src, out = tmp_path / "ckpt", tmp_path / "moe.gguf"
    save_pretrained(moe, src)
    tiny_tokenizer().save(src)
    assert main(["export", "--model", str(src), "--gguf", str(out), "--type", "f32"]) == 0
    prompt = _ids(12)[0].tolist()
    want = generate(moe, torch.tensor([prompt]), 10, eos_token_id=[])[0, len(prompt):].tolist()
    logp = torch.log_softmax(_logits(moe, torch.tensor([prompt + want])).float()[0, len(prompt) - 1:-1], -1)
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True}
    with ServerProcess(out, log_path=tmp_path / "serve.log") as srv:
        req = urllib.request.Request(f"{srv.base}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        got = json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["logprobs"]
    assert [int(t.removeprefix("token_id:")) for t in got["tokens"]] == want
    expected = logp.gather(1, torch.tensor(want)[:, None])[:, 0]
    assert (torch.tensor(got["token_logprobs"]) - expected).abs().max() < 1e-4


def test_import_dequantizes_to_the_requested_dtype(moe, tmp_path):
    out = tmp_path / "moe.gguf"
    export_gguf(moe, tiny_tokenizer(), out, type="q8_0")
    back = from_pretrained(out, dtype=torch.bfloat16)
    assert next(back.parameters()).dtype == torch.bfloat16
    assert Tokenizer.from_pretrained(out).encode(TEXTS[0]) == tiny_tokenizer().encode(TEXTS[0])


def test_export_refuses_what_llama_cpp_computes_differently(tmp_path, capsys):
    model = build_model(preset("tiny"), seed=0)  # chunk 16, floor_scale 8: llama.cpp hard-codes 8192 / 8192
    why = llama_cpp_mismatches(model)
    assert any("attention_chunk_size 16" in w for w in why) and any("floor_scale 8" in w for w in why)
    maverick = llama_cpp_mismatches(build_model(preset("tiny-maverick"), seed=0))
    assert any("use_qk_norm False" in w for w in maverick)
    with pytest.raises(hg.GGUFError, match="--force"):
        export_gguf(model, tiny_tokenizer(), tmp_path / "x.gguf")
    ckpt = tmp_path / "ckpt"
    save_pretrained(model, ckpt)
    tiny_tokenizer().save(ckpt)
    args = ["export", "--gguf", str(tmp_path / "x.gguf"), "--model", str(ckpt)]
    assert main(args) == 2 and "attention_chunk_size 16" in capsys.readouterr().err
    with pytest.warns(LlamaCppMismatchWarning):
        export_gguf(model, tiny_tokenizer(), tmp_path / "x.gguf", force=True)
    assert hg.load_config(tmp_path / "x.gguf").attention_chunk_size == 8192  # the file says what llama.cpp computes


# ---- quantized tensors ----------------------------------------------------------------------------------------------
def _q4_k_reference(block: bytes) -> np.ndarray:
    """llama.cpp's dequantize_row_q4_K (ggml-quants.c) for one 144-byte block of 256 values."""
    d, dmin = np.frombuffer(block[:4], np.float16).astype(np.float32)
    sc, q = block[4:16], block[16:]

    def scale_min(j):
        if j < 4:
            return sc[j] & 63, sc[j + 4] & 63
        return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

    y = []
    for j in range(4):
        (s1, m1), (s2, m2) = scale_min(2 * j), scale_min(2 * j + 1)
        qs = q[32 * j:32 * j + 32]
        y += [d * s1 * (b & 0xF) - dmin * m1 for b in qs] + [d * s2 * (b >> 4) - dmin * m2 for b in qs]
    return np.array(y, np.float32)


def _q6_k_reference(block: bytes) -> np.ndarray:
    """llama.cpp's dequantize_row_q6_K for one 210-byte block (ql 128, qh 64, int8 scales 16, f16 d)."""
    ql, qh = block[:128], block[128:192]
    sc = np.frombuffer(block[192:208], np.int8).astype(np.float32)
    d = float(np.frombuffer(block[208:210], np.float16)[0])
    y = np.zeros(256, np.float32)
    for n in range(2):
        L, H, S = ql[64 * n:], qh[32 * n:], sc[8 * n:]
        for i in range(32):
            s = i // 16
            q = [(L[i] & 0xF) | ((H[i] & 3) << 4), (L[i + 32] & 0xF) | (((H[i] >> 2) & 3) << 4),
                 (L[i] >> 4) | (((H[i] >> 4) & 3) << 4), (L[i + 32] >> 4) | (((H[i] >> 6) & 3) << 4)]
            for k in range(4):
                y[128 * n + i + 32 * k] = d * S[s + 2 * k] * (q[k] - 32)
    return y


def _k_blocks(kind, rows: int, rng) -> np.ndarray:
    """Random K-quant blocks (one per row) with finite f16 scales: gguf.quants cannot quantize K types."""
    size = gguf.GGML_QUANT_SIZES[kind][1]
    raw = rng.integers(0, 256, (rows, size), dtype=np.uint8)
    scale = np.full(rows, 0.01, np.float16).view(np.uint8).reshape(rows, 2)
    if kind == Q.Q4_K:
        raw[:, 0:2], raw[:, 2:4] = scale, scale
    else:
        raw[:, 208:210] = scale
    return raw


def test_quantized_tensors_dequantize_to_reference_values(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    f = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    for kind in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        w.add_tensor(kind.name, gguf.quants.quantize(x, kind), raw_dtype=kind)
    k_raw = {kind: _k_blocks(kind, 4, rng) for kind in (Q.Q4_K, Q.Q6_K)}
    for kind, raw in k_raw.items():
        w.add_tensor(kind.name, raw, raw_dtype=kind)
    w.add_tensor("BF16", gguf.quants.quantize(x, Q.BF16), raw_dtype=Q.BF16)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    tensors = {t.name: t for t in gguf.GGUFReader(str(f)).tensors}
    # max error of each block format on N(0, 1) values: half a step of the block's scale
    for name, bound in (("Q8_0", 0.02), ("Q4_1", 0.3), ("Q4_0", 0.4), ("BF16", 0.01)):
        got = hg._to_numpy(tensors[name])
        assert got.shape == (4, 256) and np.abs(got - x).max() < bound, name
    for kind, ref in ((Q.Q4_K, _q4_k_reference), (Q.Q6_K, _q6_k_reference)):
        got = hg._to_numpy(tensors[kind.name])
        want = np.stack([ref(bytes(row)) for row in k_raw[kind]])
        assert got.shape == (4, 256) and np.allclose(got, want, rtol=1e-6, atol=1e-6), kind.name


def test_unknown_architecture_and_tensor_type_are_named(tmp_path):
    f = tmp_path / "qwen.gguf"
    w = gguf.GGUFWriter(str(f), "qwen2")
    w.add_tensor("token_embd.weight", np.zeros((8, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(hg.GGUFError, match="'qwen2' is not supported"):
        from_pretrained(f)
    f = tmp_path / "i8.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 32), np.int8), raw_dtype=Q.I8)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(hg.GGUFError, match="blk.0.attn_q.weight has type I8"):
        hg._to_numpy(gguf.GGUFReader(str(f)).tensors[0])


def test_llama3_rope_scaling_is_recovered_from_rope_freqs():
    """The converter's rope_freqs (generate_extra_tensors, Llama 3.1's 8/1/4/8192 at head_dim 128) give back a
    scaling herd computes to the same frequencies."""
    dim, theta, factor, lo, hi, old = 128, 500000.0, 8.0, 1.0, 4.0, 8192
    freqs = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    f = []
    for fr in freqs:
        wl = 2 * math.pi / fr
        s = (old / wl - lo) / (hi - lo)
        f.append(1.0 if wl < old / hi else factor if wl > old / lo else 1 / ((1 - s) / factor + s))
    scaling = hg._rope_scaling(np.array(f, np.float32), dim, theta, None)
    want = rope_inv_freq(dim, theta, dict(LLAMA3, factor=factor, original_max_position_embeddings=old))
    assert torch.allclose(rope_inv_freq(dim, theta, scaling), want, rtol=1e-5)
    with pytest.raises(hg.GGUFError, match="rope_freqs"):
        hg._rope_scaling(np.linspace(1, 3, dim // 2).astype(np.float32)[::-1].copy(), dim, theta, None)


# ---- tokenizers -----------------------------------------------------------------------------------------------------
def _tokenizer_gguf(tok: Tokenizer, path, vocab_size: int):
    w = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer(w, tok, vocab_size)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return Tokenizer.from_pretrained(path)


def _byte_level(pre) -> Tokenizer:
    """A byte-level BPE trained here, SmolLM2-style specials (<|im_start|>, <|im_end|>) at the front."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t * 20 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog " * 50], trainer)
    tok.add_tokens([AddedToken("<tool>", normalized=False, special=False)])
    return Tokenizer(tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token=None,
                     chat_template="{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")


@pytest.mark.parametrize("which", ["herd-tiny", "gpt2", "smollm"])
def test_tokenizer_rebuilt_from_gguf_encodes_as_the_source(tmp_path, which):
    if which == "herd-tiny":
        src, n = tiny_tokenizer(), 2048
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        pre = byte_level if which == "gpt2" else pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
        src, n = _byte_level(pre), 640  # the model's vocabulary is larger: [PAD] slots fill it
    back = _tokenizer_gguf(src, tmp_path / "tok.gguf", n)
    assert gguf.GGUFReader(str(tmp_path / "tok.gguf")).fields["tokenizer.ggml.pre"].contents() == \
        {"herd-tiny": "llama4", "gpt2": "gpt2", "smollm": "smollm"}[which]
    for text in TEXTS:
        assert back.encode(text) == src.encode(text), text
        assert back.encode(text, allow_special=True) == src.encode(text, allow_special=True), text
        assert back.decode(back.encode(text)) == text
    assert (back.bos_id, back.eos_id, back.pad_id) == (src.bos_id, src.eos_id, src.pad_id)
    assert back.specials == src.specials and back.chat_template == src.chat_template


def test_unknown_pre_tokenizer_is_named(tmp_path):
    f = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    add_tokenizer(w, tiny_tokenizer(), 2048)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    meta = hg.metadata(gguf.GGUFReader(str(f)))
    from herd.formats.gguf_tokenizer import tokenizer_parts

    with pytest.raises(hg.GGUFError, match="'deepseek-coder' is not a pre-tokenizer herd knows"):
        tokenizer_parts({**meta, "tokenizer.ggml.pre": "deepseek-coder"}, "")
