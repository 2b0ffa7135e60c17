"""herd serve as an RL trainer's rollout server (issue 14), against real `herd serve` processes:

- `return_tokens_as_token_ids` (vLLM's): a seeded completion of a prompt given as token ids (ones that re-tokenize
  differently) returns, as "token_id:<id>", exactly the ids the in-process engine generates on the same checkpoint,
  with its logprobs (within 1e-5), the stop token included; streamed and chat answers name tokens the same way.
- POST /v1/weights: a different checkpoint of the same config, exported into --weights-dir, is swapped in: greedy
  completions then equal the in-process engine's on that checkpoint, GET /v1/weights reports its version; also with
  a torch.compiled decode step. Paths outside --weights-dir get 403, exports unlike the served model (config, shape,
  dtype) 400, a missing key 401, and the served weights are unchanged after each. Without --weights-dir the routes
  answer 404 saying how to turn them on (checked in process); quantize and cuda_graphs are refused at startup.

Run: .venv/bin/python -m pytest tests/serve/test_weight_updates.py -v
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from herd.config import ConfigError
from herd.formats.hf import export, from_pretrained
from herd.infer.engine import Engine
from herd.infer.sampling import SamplingParams
from herd.model.build import build_model
from herd.serve.schemas import WeightsRequest
from herd.serve.serve_config import ServeConfig
from herd.serve.service import APIError, Service
from herd.tokenizer import Tokenizer
from tests.serve.server_process import ServerProcess, init_checkpoint

KEY = "sk-test"
GREEDY = {"temperature": 0, "max_tokens": 6}


def call(srv, path: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, dict]:
    """(status, JSON body) of a GET (body None) or a JSON POST."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(srv.base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def complete(srv, prompt: list[int], **kw) -> dict:
    status, out = call(srv, "/v1/completions", {"prompt": prompt, **kw})
    assert status == 200, out
    return out


def engine_ids(model, tok, prompt: list[int], **kw) -> list[int]:
    return Engine(model, tok).generate([prompt], SamplingParams(**kw))[0].output_ids


def ids_of(lp: dict) -> list[int]:
    assert all(t.startswith("token_id:") for t in lp["tokens"]), lp["tokens"]
    return [int(t.removeprefix("token_id:")) for t in lp["tokens"]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A server on checkpoint A with --weights-dir W, where W/a is A's export and W/b another seed's."""
    tmp = tmp_path_factory.mktemp("weights")
    ckpt = init_checkpoint(tmp / "a")
    tok = Tokenizer.from_pretrained(ckpt)
    model_a = from_pretrained(ckpt)
    model_b = build_model(model_a.config, seed=1)
    wdir = tmp / "w"
    shutil.copytree(ckpt, wdir / "a")
    export(model_b, tok, wdir / "b")
    # the prompt: "hello world" one character per token, which tokenizing its text would merge
    prompt = [tok.bos_id] + [t for c in "hello world" for t in tok.encode(c)]
    assert tok.encode(tok.decode(prompt[1:])) != prompt[1:]
    with ServerProcess(ckpt, "--weights-dir", str(wdir), "--api-key", KEY, "--max-batch", "4") as srv:
        srv.initial, srv.ckpt = call(srv, "/v1/weights"), ckpt
        yield srv, tok, model_a, model_b, wdir, prompt


# ---- 1. token ids and logprobs ---------------------------------------------------------------------------------------
def test_token_ids_and_logprobs_equal_the_engines(setup):
    srv, tok, model_a, _, _, prompt = setup
    kw = {"temperature": 1.0, "seed": 7, "max_tokens": 12}
    out = complete(srv, prompt, logprobs=0, return_tokens_as_token_ids=True, **kw)
    ref = Engine(model_a, tok).generate([prompt], SamplingParams(temperature=1.0, seed=7, max_new_tokens=12,
                                                                logprobs=True))[0]
    lp = out["choices"][0]["logprobs"]
    assert ids_of(lp) == ref.output_ids and len(ref.output_ids) == 12
    assert lp["token_logprobs"] == pytest.approx([x["logprob"] for x in ref.logprobs], abs=1e-5)
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12}
    # without the flag, the same tokens as text
    plain = complete(srv, prompt, logprobs=0, **kw)["choices"][0]["logprobs"]
    assert plain["tokens"] == [tok.decode([t]) for t in ref.output_ids]
    assert plain["text_offset"] == lp["text_offset"]


def test_the_stop_token_is_returned_with_its_logprob(setup):
    srv, tok, model_a, _, _, prompt = setup
    eot = tok.special("eot")
    out = complete(srv, prompt, logprobs=2, return_tokens_as_token_ids=True, logit_bias={str(eot): 100}, **GREEDY)
    choice = out["choices"][0]
    ref = Engine(model_a, tok).generate([prompt], SamplingParams(temperature=0, max_new_tokens=6, logprobs=True,
                                                                top_logprobs=2, logit_bias={eot: 100}))[0]
    assert choice["finish_reason"] == "stop" and ref.output_ids == [eot]
    assert ids_of(choice["logprobs"]) == [eot]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx([ref.logprobs[0]["logprob"]], abs=1e-5)
    top = choice["logprobs"]["top_logprobs"][0]
    assert list(top) == [f"token_id:{t}" for t, _ in ref.logprobs[0]["top"]]


def test_streamed_and_chat_answers_name_tokens_by_id(setup):
    srv, tok, model_a, _, _, prompt = setup
    body = {"prompt": prompt, "logprobs": 1, "return_tokens_as_token_ids": True, "stream": True, **GREEDY}
    req = urllib.request.Request(srv.base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    tokens = []
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                tokens += lp["tokens"] if lp else []
    ref = engine_ids(model_a, tok, prompt, temperature=0, max_new_tokens=6)
    assert tokens == [f"token_id:{t}" for t in ref]
    status, out = call(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "logprobs": True, "top_logprobs": 2,
                                                     "return_tokens_as_token_ids": True, **GREEDY})
    assert status == 200, out
    content = out["choices"][0]["logprobs"]["content"]
    assert content and all(c["token"].startswith("token_id:") for c in content)
    assert all(t["token"].startswith("token_id:") for c in content for t in c["top_logprobs"])


# ---- 2. weight updates -----------------------------------------------------------------------------------------------
def test_pushed_weights_serve_like_their_checkpoint(setup):
    srv, tok, model_a, model_b, _, prompt = setup
    assert srv.initial == (200, {"version": 0, "path": None, "dtype": "float32"})
    want_a = engine_ids(model_a, tok, prompt, temperature=0, max_new_tokens=6)
    want_b = engine_ids(model_b, tok, prompt, temperature=0, max_new_tokens=6)
    assert want_a != want_b  # else the test could not tell the weights apart
    try:
        assert call(srv, "/v1/weights", {"path": "b", "version": 3}) == (200, {"version": 3, "loaded": "b"})
        assert call(srv, "/v1/weights") == (200, {"version": 3, "path": "b", "dtype": "float32"})
        out = complete(srv, prompt, logprobs=0, return_tokens_as_token_ids=True, **GREEDY)
        assert ids_of(out["choices"][0]["logprobs"]) == want_b
    finally:
        assert call(srv, "/v1/weights", {"path": "a", "version": 4})[0] == 200
    out = complete(srv, prompt, logprobs=0, return_tokens_as_token_ids=True, **GREEDY)
    assert ids_of(out["choices"][0]["logprobs"]) == want_a


def _bad_exports(wdir: Path, outside: Path) -> None:
    """Folders in wdir that must be refused: a config that differs, a tensor with another shape / dtype, links out."""
    if (wdir / "shape").exists():
        return
    for name in ("config", "shape", "dtype"):
        shutil.copytree(wdir / "a", wdir / name)
    cfg = json.loads((wdir / "config" / "config.json").read_text())
    (wdir / "config" / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    sd = load_file(wdir / "a" / "model.safetensors")
    save_file({**sd, "model.norm.weight": sd["model.norm.weight"][:-1]}, wdir / "shape" / "model.safetensors")
    save_file({n: t.to(torch.bfloat16) for n, t in sd.items()}, wdir / "dtype" / "model.safetensors")
    os.symlink(outside, wdir / "link")
    (wdir / "files").mkdir()
    shutil.copy(wdir / "a" / "config.json", wdir / "files" / "config.json")
    os.symlink(outside / "model.safetensors", wdir / "files" / "model.safetensors")


@pytest.mark.parametrize("path, status, says", [
    ("../a", 403, "without '..'"),
    ("/etc", 403, "relative"),
    ("link", 403, "outside"),  # a symlink in the folder to a checkpoint outside it
    ("files", 400, "outside the checkpoint directory"),  # a weight file linked from outside
    ("nothing", 400, "does not exist"),
    ("config", 400, "rms_norm_eps"),
    ("shape", 400, "model.norm.weight has shape (63,)"),
    ("dtype", 400, "export with dtype=torch.float32"),
])
def test_a_refused_push_changes_nothing(setup, path, status, says):
    srv, tok, _, _, wdir, prompt = setup
    _bad_exports(wdir, srv.ckpt)
    before_info, before = call(srv, "/v1/weights"), complete(srv, prompt, **GREEDY)["choices"][0]["text"]
    got, err = call(srv, "/v1/weights", {"path": path, "version": 9})
    assert got == status and says in err["error"]["message"], err
    assert call(srv, "/v1/weights") == before_info
    assert complete(srv, prompt, **GREEDY)["choices"][0]["text"] == before


def test_pushes_need_the_api_key(setup):
    srv, *_ = setup
    assert call(srv, "/v1/weights", {"path": "b", "version": 5}, key=None)[0] == 401
    assert call(srv, "/v1/weights", key=None)[0] == 401
    assert call(srv, "/v1/weights")[1]["version"] != 5


def test_pushes_reach_a_compiled_decode_step(setup, tmp_path):
    srv, tok, _, model_b, wdir, prompt = setup
    want_b = engine_ids(model_b, tok, prompt, temperature=0, max_new_tokens=6)
    with ServerProcess(srv.ckpt, "--weights-dir", str(wdir), "--compile", "--max-batch", "1",
                       log_path=tmp_path / "compiled.log", timeout=120) as compiled:
        assert call(compiled, "/v1/weights", {"path": "b", "version": 1}, key=None)[0] == 200
        out = call(compiled, "/v1/completions", {"prompt": prompt, "logprobs": 0,
                                                 "return_tokens_as_token_ids": True, **GREEDY}, key=None)[1]
        assert ids_of(out["choices"][0]["logprobs"]) == want_b


def test_without_weights_dir_the_routes_say_how_to_turn_them_on(setup):
    """In process (a server start costs seconds): the APIError is what the app answers, as for every route."""
    srv, tok, model_a, *_ = setup
    svc = Service(ServeConfig(model=str(srv.ckpt)), SimpleNamespace(engine=SimpleNamespace(model=model_a)), tok)
    with pytest.raises(APIError) as got:
        svc.weights_info()
    with pytest.raises(APIError) as pushed:
        asyncio.run(svc.push_weights(WeightsRequest(path="b", version=1)))
    for e in (got.value, pushed.value):
        assert e.status == 404 and "--weights-dir" in e.message and e.code == "weights_disabled"


def test_weights_dir_is_refused_where_a_push_could_not_be_applied(tmp_path):
    with pytest.raises(ConfigError, match="quantize"):
        ServeConfig(model="m", weights_dir=str(tmp_path), quantize="int8")
    with pytest.raises(ConfigError, match="cuda_graphs"):
        ServeConfig(model="m", weights_dir=str(tmp_path), cuda_graphs=True)
    with pytest.raises(ConfigError, match="not a directory"):
        ServeConfig(model="m", weights_dir=str(tmp_path / "none"))
