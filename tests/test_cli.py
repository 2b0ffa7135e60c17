"""The `herd` command end to end, as a user runs it (subprocesses, real files).

Run: .venv/bin/python -m pytest tests/test_cli.py -v
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

IMAGES = Path(__file__).parent / "data" / "images"


def herd(*args, ok=True):
    out = subprocess.run([sys.executable, "-m", "herd.cli", *map(str, args)], capture_output=True, text=True)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinymm")
    herd("init", "--preset", "tiny", "--multimodal", "--out", path)
    assert (path / "tokenizer.json").is_file() and (path / "preprocessor_config.json").is_file()
    return path


def test_info_of_a_checkpoint(ckpt):
    out = herd("info", "--model", ckpt).stdout
    assert "vision parameters" in out and "28-px tiles (up to 6), 4 tokens per tile" in out


def test_generate_from_a_chat_prompt_with_images(ckpt):
    out = herd("generate", "--model", ckpt, "--prompt", "What is this?", "--image", IMAGES / "square_h224_w224.png",
               "--image", IMAGES / "strip_h100_w2000.png", "--max-new-tokens", "6", "--temperature", "0")
    assert "new tokens in" in out.stderr
    # 1x1 image: 4 patches + 3 markers; the strip is 1x6 tiles + thumbnail; the rest is chat scaffolding and text
    prompt_tokens = int(out.stderr.split("[")[1].split()[0])
    assert prompt_tokens > (4 + 3) + (5 * 6 + 4 + 7)


def test_generate_from_token_ids(ckpt):
    out = herd("generate", "--model", ckpt, "--prompt-ids", "1,2,3", "--max-new-tokens", "5")
    assert "new ids:" in out.stdout and "[3 prompt tokens, 5 new tokens" in out.stderr


def test_generate_and_serve_quantized(ckpt):
    """--quantize swaps the decoder's weights before generating: the CLI's tokens are the library's on the same
    quantized model, and the server's engine runs on quantized modules."""
    import asyncio

    import torch

    import herd as lib
    from herd.infer.quant import QuantExperts, QuantLinear, quantize_scheme
    from herd.infer.sampling import SamplingParams
    from herd.serve import build_service
    from herd.serve.serve_config import ServeConfig

    model = lib.from_pretrained(ckpt).eval()
    quantize_scheme(model, "fp8-dynamic")
    want = lib.generate(model, torch.tensor([[1, 2, 3]]), 5)[0, 3:].tolist()
    out = herd("generate", "--model", ckpt, "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--device", "cpu",
               "--quantize", "fp8-dynamic")
    assert "quantized 32 modules to fp8 weights and activations" in out.stderr
    assert out.stdout.split("new ids:")[1].strip() == str(want)
    out = herd("generate", "--model", ckpt, "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
               "--quantize", "int4", "--group-size", "32")
    assert "to int4 (groups of 32): converted weights 6.40x smaller" in out.stderr

    service = build_service(ServeConfig(model=str(ckpt), device="cpu", quantize="int8"))
    try:
        decoder = service.worker.engine.model.language_model.model.layers
        assert isinstance(decoder[0].self_attn.q_proj, QuantLinear)
        assert isinstance(decoder[0].feed_forward.experts, QuantExperts)

        async def ask():
            req, queue = service.worker.submit([1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=4,
                                                                         ignore_eos=True))
            while not req.finished:
                await asyncio.wait_for(queue.get(), 60)
            return req
        req = asyncio.run(ask())
        assert req.finish_reason == "length" and len(req.output_ids) == 4
    finally:
        service.worker.stop(0)


def test_bad_runtime_options_fail_cleanly(ckpt):
    bad = herd("generate", "--model", ckpt, "--prompt-ids", "1,2", "--quantize", "int4", ok=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "group_size=128 does not divide" in bad.stderr and "group sizes that fit every layer: [16, 32]" in bad.stderr
    bad = herd("serve", "--model", ckpt, "--quantize", "int4", "--group-size", "48", ok=False)
    assert bad.returncode == 2 and "group_size=48" in bad.stderr and "Traceback" not in bad.stderr
    bad = herd("generate", "--model", ckpt, "--prompt-ids", "1,2", "--device", "tpu9", ok=False)
    assert bad.returncode == 2 and "--device tpu9" in bad.stderr and "Traceback" not in bad.stderr
    bad = herd("generate", "--model", ckpt, "--prompt-ids", "1,2", "--quantize", "int3", ok=False)
    assert bad.returncode == 2 and "invalid choice: 'int3'" in bad.stderr
    bad = herd("serve", "--model", ckpt, "--device", "cpu", "--cuda-graphs", ok=False)
    assert bad.returncode == 2 and "cuda_graphs needs a model on a CUDA device" in bad.stderr


def test_serve_compile_runs_the_slot_layout(ckpt, capsys):
    """`herd serve --compile`: the service decodes on a compiled SlotBatch layout whose step was compiled before the
    server would listen; a request then gets the plain engine's tokens and compiles nothing."""
    import asyncio

    from torch._dynamo.utils import counters

    from herd.infer.engine import Engine
    from herd.infer.sampling import SamplingParams
    from herd.infer.slot_batch import SlotBatch
    from herd.serve import build_service
    from herd.serve.serve_config import ServeConfig

    service = build_service(ServeConfig(model=str(ckpt), device="cpu", compile=True, max_batch=1))
    try:
        engine = service.worker.engine
        assert isinstance(engine.layout, SlotBatch) and engine.layout.compiled and not engine.layout.cuda_graphs
        assert "preparing the decode step for 1 rows (1/1)" in capsys.readouterr().out
        graphs = counters["stats"]["unique_graphs"]
        params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)

        async def ask():
            req, queue = service.worker.submit([1, 2, 3], params)
            while not req.finished:
                await asyncio.wait_for(queue.get(), 60)
            return req
        req = asyncio.run(ask())
        assert req.output_ids == Engine(engine.model, engine.tok).generate([[1, 2, 3]], params)[0].output_ids
        assert counters["stats"]["unique_graphs"] == graphs and engine.layout.compiled
    finally:
        service.worker.stop(0)


def test_bad_inputs_fail_cleanly(ckpt, tmp_path):
    bad = herd("info", "--model", tmp_path / "none", ok=False)
    assert bad.returncode == 2 and "no config.json" in bad.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    bad = herd("generate", "--model", ckpt, "--prompt", "x", "--image", broken, ok=False)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    text_only = tmp_path / "text"
    herd("init", "--preset", "tiny", "--out", text_only)
    bad = herd("generate", "--model", text_only, "--prompt", "x", "--image", IMAGES / "square_h224_w224.png", ok=False)
    assert bad.returncode == 2 and "text-only model" in bad.stderr


def test_chat_in_the_terminal(ckpt):
    """`herd chat` with piped input: answers stream, images attach, bad input is reported and changes nothing."""
    script = "\n".join(["hello", "/set max_new_tokens=6 temperature=0", f"/image {IMAGES / 'square_h224_w224.png'}",
                        "what is in the picture?", "/image missing.png", "/set top_p=7", "/bogus", "/show",
                        "/system Be brief.", "/show", "/quit", "never read"]) + "\n"
    out = subprocess.run([sys.executable, "-m", "herd.cli", "chat", "--model", str(ckpt), "--max-new-tokens", "4"],
                         input=script, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.count("assistant: ") == 2 + 2  # two answers, and two in the first /show
    assert "(1 image(s) attached to your next message)" in text
    assert "error: image file 'missing.png' does not exist" in text  # refused when attached
    assert "error: SamplingParams.top_p must be a number in (0, 1], got 7.0" in text
    assert "error: unknown command /bogus" in text
    first_show = text.split("settings:")[0]
    assert "user: hello" in first_show and "user: [image] what is in the picture?" in first_show
    assert "(system prompt set; new conversation)" in text
    assert text.rstrip().endswith("settings: {'temperature': 0.0, 'top_p': None, 'top_k': None, 'min_p': None, "
                                  "'repetition_penalty': None, 'max_new_tokens': 6, 'seed': 0}")  # empty again


def test_chat_refuses_a_conversation_longer_than_the_context(ckpt):
    from herd.formats.hf import from_pretrained
    from herd.terminal_chat import Session, reply
    from herd.tokenizer import Tokenizer

    model, tok = from_pretrained(ckpt).eval(), Tokenizer.from_pretrained(ckpt)
    session = Session()
    session.settings["max_new_tokens"] = 4096
    with pytest.raises(ValueError, match="exceeds the model's 4096"):
        reply(model, tok, session, "hi")
    assert session.messages == []  # nothing kept


def test_chat_answers_come_from_the_engine(ckpt):
    """The terminal chat streams exactly what the inference engine produces for the same prompt and settings."""
    import io

    from herd.chat import prepare_chat
    from herd.formats.hf import from_pretrained
    from herd.infer.engine import Engine
    from herd.terminal_chat import Session, _params, reply
    from herd.tokenizer import Tokenizer

    model, tok = from_pretrained(ckpt).eval(), Tokenizer.from_pretrained(ckpt)
    session, out = Session(), io.StringIO()
    session.settings.update(temperature=0.9, top_k=40, max_new_tokens=12, seed=3)
    answer = reply(model, tok, session, "hi there", out=out)
    ids, _ = prepare_chat([{"role": "user", "content": "hi there"}], tok)
    alone = Engine(model, tok).generate([ids], _params(session.settings))[0]
    assert answer and answer == alone.text and out.getvalue() == answer + "\n"
    assert session.messages[-1] == {"role": "assistant", "content": answer}


def test_ctrl_c_stops_a_chat_answer_and_keeps_what_came(ckpt):
    """Ctrl-C while an answer streams: the request is cancelled, the partial answer stays in the conversation."""
    import io

    from herd.formats.hf import from_pretrained
    from herd.terminal_chat import Session, reply
    from herd.tokenizer import Tokenizer

    class CtrlCAfter(io.StringIO):  # the terminal: the user presses Ctrl-C once, on the third piece of text
        writes = 0

        def write(self, text):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return super().write(text)

    model, tok = from_pretrained(ckpt).eval(), Tokenizer.from_pretrained(ckpt)
    session, out = Session(), CtrlCAfter()
    session.settings.update(max_new_tokens=200, temperature=1.0, seed=1)
    answer = reply(model, tok, session, "tell me a long story", out=out)
    assert out.getvalue().endswith(" (stopped)\n")
    assert session.messages[-1] == {"role": "assistant", "content": answer}
    assert answer and answer == out.getvalue().removesuffix(" (stopped)\n")  # what was shown is what is kept
