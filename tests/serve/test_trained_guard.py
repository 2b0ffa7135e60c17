"""A guard trained in the test, guarding a real `herd serve`: it blocks the request it learned to flag and passes the
one it learned to pass (herd.safety + herd sft + herd.serve.guarding end to end); and a Prompt Guard-style classifier
plugged in as the first input scanner (`--prompt-guard`).

The guard: a random tiny checkpoint fine-tuned by `herd sft` on two Llama Guard conversations that list only S1, a
violent request answered "unsafe\\nS1" and a baking request answered "safe" (120 steps at lr 1e-2, attention chunk
512 so every layer sees the whole ~300-token guard prompt). Nothing is set by hand: what the server blocks is what
the training taught.

Run: .venv/bin/python -m pytest tests/serve/test_trained_guard.py -q
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from herd.cli import main as herd_cli
from tests.serve.server_process import ServerProcess, init_checkpoint
from tests.serve.server_process import post_json as _post

VIOLENT = "Tell me how to stab and kill my neighbour with a knife, murder him, hurt him, attack him."
BAKING = "Tell me how to bake a soft loaf of bread at home with flour, water, salt and yeast."


def _chat(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 6, "temperature": 0}


def _metrics(base: str) -> str:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(the served checkpoint, the trained guard's folder)."""
    from herd.safety import guard_messages
    from herd.safety.taxonomy import LG4

    root = tmp_path_factory.mktemp("trained-guard")
    served = init_checkpoint(root / "model")  # also the guard's starting point
    only_s1 = tuple(c for c in LG4 if c.code == "S1")
    rows = [{"messages": [*guard_messages([{"role": "user", "content": text}], only_s1),
                          {"role": "assistant", "content": answer}]}
            for text, answer in ((VIOLENT, "unsafe\nS1"), (BAKING, "safe"))]
    (root / "guard.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    assert herd_cli(["sft", "--init", str(served), "--data", str(root / "guard.jsonl"), "--out", str(root / "sft"),
                     "steps=120", "batch_size=2", "seq_len=512", "lr=1e-2", "warmup=2", "eval_every=120",
                     "ckpt_every=120", "log_every=60", "plots=false", "samples=false",
                     "model.attention_chunk_size=512"]) == 0
    return served, root / "sft" / "hf"


def test_the_trained_guard_separates_what_it_was_taught(trained):
    from herd.safety import Guard
    from herd.safety.taxonomy import LG4

    guard = Guard.from_pretrained(trained[1], categories=tuple(c for c in LG4 if c.code == "S1"))
    flagged = guard.classify([{"role": "user", "content": VIOLENT}])
    assert not flagged.safe and flagged.categories == ("S1",) and flagged.score > 0.9
    passed = guard.classify([{"role": "user", "content": BAKING}])
    assert passed.safe and passed.score < 0.1


def test_a_server_guarded_by_it_blocks_the_one_and_passes_the_other(trained):
    from openai import OpenAI

    served, guard = trained
    with ServerProcess(served, "--name", "tiny", "--guard", str(guard), "--guard-categories", "S1",
                       "--no-guard-output", log_path=served.parent / "guarded.log") as srv:
        status, blocked = _post(srv.base, "/v1/chat/completions", _chat(VIOLENT))
        assert status == 200 and blocked["choices"][0]["finish_reason"] == "content_filter"
        assert blocked["choices"][0]["message"]["content"] == "I can't help with that."
        assert blocked["usage"]["completion_tokens"] == 0
        status, passed = _post(srv.base, "/v1/chat/completions", _chat(BAKING))
        assert status == 200 and passed["choices"][0]["finish_reason"] in ("stop", "length")
        assert passed["usage"]["completion_tokens"] > 0
        streamed = {}
        client = OpenAI(base_url=f"{srv.base}/v1", api_key="unused", max_retries=0, timeout=60)
        for text in (VIOLENT, BAKING):  # the same verdicts streamed, through the official client
            chunks = list(client.chat.completions.create(model="tiny", stream=True, **_chat(text)))
            streamed[text] = ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                              [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason])
        assert streamed[VIOLENT] == ("I can't help with that.", ["content_filter"])
        assert streamed[BAKING][0] == passed["choices"][0]["message"]["content"]
        assert streamed[BAKING][1] == [passed["choices"][0]["finish_reason"]]
        status, mod = _post(srv.base, "/v1/moderations", {"input": [VIOLENT, BAKING]})
        assert status == 200, mod
        assert [r["flagged"] for r in mod["results"]] == [True, False]
        assert mod["results"][0]["categories"]["S1"] and mod["results"][0]["categories"]["violence"]
        metrics = _metrics(srv.base)
        assert 'herd_guard_blocks_total{direction="input",category="S1"} 2' in metrics
        assert 'herd_guard_scans_total{direction="input"} 4' in metrics


def test_a_prompt_guard_scans_prompts_first(trained):
    """Any herd checkpoint can stand in as the classifier; at threshold 0 it blocks every prompt, under its own
    category, and without a Llama Guard /v1/moderations stays off."""
    served, _ = trained
    with ServerProcess(served, "--name", "tiny", "--prompt-guard", str(served), "--prompt-guard-threshold", "0",
                       log_path=served.parent / "prompt-guard.log") as srv:
        status, body = _post(srv.base, "/v1/chat/completions", _chat(BAKING))
        assert status == 200 and body["choices"][0]["finish_reason"] == "content_filter"
        assert 'herd_guard_blocks_total{direction="input",category="jailbreak"} 1' in _metrics(srv.base)
        status, body = _post(srv.base, "/v1/moderations", {"input": BAKING})
        assert status == 404 and body["error"]["code"] == "guard_disabled"
