"""The completions API's `echo` with `logprobs` (herd.serve.scoring) against a real `herd serve` process: the
prompt's logprobs equal the log-softmax of the same model run in this process (float32), for text and token-id
prompts, a batch of prompts, `max_tokens` 0 and more, streamed or not; bad combinations get a 400 naming the field.

Run: .venv/bin/python -m pytest tests/serve/test_echo_logprobs.py -v
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from herd.formats.hf import from_pretrained
from herd.tokenizer import Tokenizer
from tests.serve.server_process import ServerProcess, init_checkpoint

TOL = 1e-5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = init_checkpoint(tmp_path_factory.mktemp("tiny"))
    with ServerProcess(ckpt, "--name", "tiny", "--dtype", "float32") as srv:
        yield srv.base, from_pretrained(ckpt).float().eval(), Tokenizer.from_pretrained(ckpt)


def _post(base: str, body: dict, raw: bool = False):
    req = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            return r.status, text if raw else json.loads(text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _expected(model, ids: list[int]) -> torch.Tensor:
    """(T, V): position t's log-softmax, which scores token t + 1 (the in-process reference)."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def _check_prompt(lp: dict, ids: list[int], ref: torch.Tensor, top_n: int) -> None:
    n = len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing precedes the first token
    got = torch.tensor(lp["token_logprobs"][1:n])
    want = ref[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(got, want, atol=TOL, rtol=0), (got - want).abs().max()
    for t in range(1, n):
        top = lp["top_logprobs"][t]
        assert len(top) == top_n
        assert sorted(top.values(), reverse=True) == pytest.approx(ref[t - 1].topk(top_n).values.tolist(), abs=TOL)


def test_text_prompt_echo_logprobs_equal_the_in_process_log_softmax(served):
    base, model, tok = served
    prompt = "The old king walked to the river"
    code, out = _post(base, {"prompt": prompt, "echo": True, "logprobs": 3, "max_tokens": 0})
    assert code == 200, out
    ids = [tok.bos_id] + tok.encode(prompt)  # herd puts BOS before a text prompt
    (choice,) = out["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["tokens"][1:] == [tok.decode([t]) for t in ids[1:]]
    _check_prompt(lp, ids, _expected(model, ids), 3)
    # the BOS takes no characters of the echoed text: the offsets index the prompt's text
    assert lp["text_offset"][0] == lp["text_offset"][1] == 0
    assert "".join(lp["tokens"][1:]) == prompt
    assert all(prompt[o:].startswith(t) for o, t in zip(lp["text_offset"][1:], lp["tokens"][1:], strict=True))
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_a_batch_of_token_id_prompts_with_generated_tokens(served):
    """lm-eval's shape: token ids (no BOS added), logprobs 1, max_tokens 1, a batch; each choice lists its prompt's
    tokens then the generated one, whose offset follows the echoed text."""
    base, model, tok = served
    prompts = [tok.encode("Once upon a time"), tok.encode("A river ran through the old town")]
    code, out = _post(base, {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0})
    assert code == 200, out
    assert len(out["choices"]) == 2
    for ids, choice in zip(prompts, sorted(out["choices"], key=lambda c: c["index"]), strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1
        ref = _expected(model, ids)
        last = ref[-1]  # what the generated token is drawn from
        _check_prompt(lp, ids, ref, 1)
        for t in range(1, len(ids)):  # lm-eval's is_greedy test: the token's logprob vs the best alternative
            assert (lp["token_logprobs"][t] == max(lp["top_logprobs"][t].values())) == bool(
                ref[t - 1].argmax() == ids[t])
        echo = tok.decode(ids)
        assert choice["text"].startswith(echo) and lp["text_offset"][-1] == len(echo)
        # the generated token: greedy, so the argmax of the model's last position, with its logprob
        assert lp["tokens"][-1] == tok.decode([int(last.argmax())])
        assert lp["token_logprobs"][-1] == pytest.approx(float(last.max()), abs=TOL)


def test_text_prompts_in_a_batch_and_n_choices(served):
    base, model, tok = served
    prompts = ["Hello there", "The sea"]
    code, out = _post(base, {"prompt": prompts, "echo": True, "logprobs": 2, "max_tokens": 0, "n": 2})
    assert code == 200, out
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for j, choice in enumerate(out["choices"]):
        ids = [tok.bos_id] + tok.encode(prompts[j // 2])
        assert choice["text"] == prompts[j // 2]
        _check_prompt(choice["logprobs"], ids, _expected(model, ids), 2)


def test_logprobs_zero_and_token_ids_as_names(served):
    base, model, tok = served
    ids = tok.encode("to be or not")
    code, out = _post(base, {"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0,
                             "return_tokens_as_token_ids": True})
    assert code == 200, out
    lp = out["choices"][0]["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in ids]
    assert lp["top_logprobs"][1:] == [{}] * (len(ids) - 1)
    _check_prompt(lp, ids, _expected(model, ids), 0)


def test_streamed_echo_sends_the_prompt_logprobs_first(served):
    base, model, tok = served
    ids = tok.encode("Once upon a time")
    code, text = _post(base, {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 2, "temperature": 0,
                              "ignore_eos": True, "stream": True}, raw=True)
    assert code == 200
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    first = events[0]["choices"][0]
    assert first["text"] == tok.decode(ids)
    _check_prompt(first["logprobs"], ids, _expected(model, ids), 1)
    later = [c["logprobs"] for e in events[1:] for c in e["choices"] if c.get("logprobs")]
    offsets = [o for lp in later for o in lp["text_offset"]]
    assert len(offsets) == 2 and offsets[0] == len(tok.decode(ids))  # the generated tokens follow the echo


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # nothing generated and nothing echoed
    ({"prompt": "x", "max_completion_tokens": 0, "logprobs": 1}, "max_completion_tokens"),
    ({"prompt": "x", "echo": True, "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "echo": True, "logprobs": -1, "max_tokens": 0}, "logprobs"),
    ({"prompt": "x", "echo": True, "max_tokens": -1}, "max_tokens"),
])
def test_bad_combinations_get_a_400_naming_the_field(served, body, field):
    base, _, _ = served
    code, err = _post(base, body)
    assert code == 400 and err["error"]["param"] == field, err
    assert field in err["error"]["message"]
    code, out = _post(base, {"prompt": "x", "echo": True, "max_tokens": 0})  # and the server goes on
    assert code == 200 and out["choices"][0]["text"] == "x" and out["choices"][0]["logprobs"] is None
