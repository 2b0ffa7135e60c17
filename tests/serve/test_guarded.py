"""Guarded serving through a real `herd serve --guard` process: prompts and answers scanned by a Llama Guard model
(herd.serve.guarding), blocked choices answering the refusal with finish_reason "content_filter", streams scanned in
windows, /v1/moderations through the official openai client, the guard's counters in /metrics.

The guard is a tiny model whose weights are set by hand, not trained (a few dozen SFT steps over the ~900-token
guard prompt take longer than this whole module should): it flags exactly the conversations that contain one
trigger token, answering "unsafe\\nS1", and answers "safe" (P(unsafe) ~ 2e-4) otherwise. Its one working attention
head, in the global (NoPE) layer, looks for the trigger anywhere in the prompt, so the same guard blocks a prompt
that holds the trigger on input, and passes a prompt without it but blocks the answer when the served model writes
the trigger. The trigger is chosen from what the unguarded server answers, so every outcome is known beforehand.

Run: .venv/bin/python -m pytest tests/serve/test_guarded.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.serve.server_process import ServerProcess, init_checkpoint
from tests.serve.server_process import post_json as _post

WRITES_TRIGGER = "Say something."  # candidates for the prompt whose answer holds the trigger
CLEAN = "Tell me about bread."  # a prompt whose whole answer passes the guard
MAX_TOKENS = 12
WINDOW = 4  # --guard-window: the clean stream is released in several windows
REFUSAL = "Sorry, not that."
# the crafted guard's hidden dimensions: constant, trigger seen here, trigger seen before (attention's output), and
# one flag per token of the category line it writes after "unsafe\n": "S", "1", then <|eot|>
ONE, TRIG, SEEN, NL, S, ONE_DIGIT = 0, 1, 2, 3, 4, 5


def _stream(base: str, path: str, body: dict) -> list:
    """The SSE events of a streamed request: parsed chunks, and the string "[DONE]"."""
    req = urllib.request.Request(base + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        lines = [line.decode().strip() for line in r]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def _chat(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS, "temperature": 0}


@torch.no_grad()
def craft_guard(model, tok, trigger: int) -> None:
    """Set `model` (the tiny preset, float32) to answer "unsafe\\nS1" when `trigger` is anywhere in its prompt and
    "safe" otherwise. Every layer adds nothing (o_proj and FFN outputs zero) except one head of the last, global
    (NoPE) layer, which attends to the trigger and copies a flag into dimension SEEN."""
    ids = {"un": tok.encode("unsafe")[0], "s": tok.encode("safe")[0], "nl": tok.encode("\n")[0],
           "S": tok.encode("S1")[0], "1": tok.encode("S1")[1], "eot": tok.encode("<|eot|>", allow_special=True)[0]}
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()
    emb = model.decoder.model.embed_tokens.weight  # (V, D)
    emb[:, ONE] = 1.0
    emb[trigger, TRIG] = 1.0
    emb[ids["nl"], NL], emb[ids["S"], S], emb[ids["1"], ONE_DIGIT] = 1.0, 1.0, 1.0
    layers = model.decoder.model.layers
    nope = [i for i, layer in enumerate(layers) if not layer.self_attn.use_rope][-1]
    attn = layers[nope].self_attn
    attn.q_proj.weight[0, ONE] = 10.0  # head 0 asks the same everywhere ...
    attn.k_proj.weight[0, TRIG] = 1.0  # ... and only the trigger answers: softmax puts ~all weight on it
    attn.v_proj.weight[0, TRIG] = 1.0
    attn.o_proj.weight[SEEN, 0] = 1.0
    head = model.decoder.lm_head.weight  # (V, D)
    head[ids["un"], SEEN] = 2.0  # "unsafe" once the trigger was seen, else "safe" (reads the constant)
    head[ids["s"], ONE] = 1.0
    head[ids["S"], NL], head[ids["1"], S], head[ids["eot"], ONE_DIGIT] = 30.0, 30.0, 30.0  # "\n" -> "S1" <|eot|>


def _prompt_ids(guard, messages: list[dict]) -> set[int]:
    return set(guard.prompt(messages, ("S14",))[0])  # the server's default categories: S1-S13


def pick_trigger(guard, tok, answers: dict[str, str]) -> tuple[str, int]:
    """(the prompt whose answer will be blocked, a trigger token): in that answer's guard prompt, absent from every
    guard prompt of the clean request (its prompt, and each prefix of its answer, as windows scan them), and typeable
    (a user message made of its text holds it)."""
    clean = _prompt_ids(guard, [{"role": "user", "content": CLEAN}])
    ans = answers[CLEAN]
    for k in range(len(ans) + 1):
        clean |= _prompt_ids(guard, [{"role": "user", "content": CLEAN}, {"role": "assistant", "content": ans[:k]}])
    for prompt, answer in answers.items():
        if prompt == CLEAN:
            continue
        user = _prompt_ids(guard, [{"role": "user", "content": prompt}])
        agent = _prompt_ids(guard, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
        special = {tok.encode("\n")[0], *tok.encode("S1"), tok.encode("unsafe")[0], tok.encode("safe")[0]}
        for t in sorted(agent - user - clean - special):
            if t in _prompt_ids(guard, [{"role": "user", "content": tok.decode([t])}]):
                return prompt, t
    raise AssertionError(f"no trigger token found in the answers {answers}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(unguarded server, guarded server, the prompt whose answer is blocked, the trigger's text, answers)."""
    from herd.formats.hf import from_pretrained, save_pretrained
    from herd.safety import Guard
    from herd.safety.taxonomy import LG4
    from herd.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("guarded")
    ckpt = init_checkpoint(root / "model")
    guard_dir = root / "guard"
    shutil.copytree(ckpt, guard_dir)  # tokenizer and config; the weights are replaced below
    with ServerProcess(ckpt, "--name", "tiny", log_path=root / "plain.log") as plain:
        answers = {}
        for p in (WRITES_TRIGGER, "Hi!", "What is 2 + 2?", CLEAN):
            status, body = _post(plain.base, "/v1/chat/completions", _chat(p))
            assert status == 200, body
            answers[p] = body["choices"][0]["message"]["content"]
        tok = Tokenizer.from_pretrained(ckpt)
        model = from_pretrained(ckpt, dtype=torch.float32).eval()
        bad_prompt, trigger = pick_trigger(Guard(model, tok, categories=LG4), tok, answers)
        craft_guard(model, tok, trigger)
        save_pretrained(model, guard_dir)
        with ServerProcess(ckpt, "--name", "tiny", "--guard", str(guard_dir), "--guard-window", str(WINDOW),
                           "--guard-refusal", REFUSAL, log_path=root / "guarded.log") as guarded:
            yield plain.base, guarded.base, bad_prompt, tok.decode([trigger]), answers, ckpt, guard_dir


@pytest.fixture(scope="module")
def client(servers):
    from openai import OpenAI

    return OpenAI(base_url=f"{servers[1]}/v1", api_key="unused", max_retries=0, timeout=60)


def test_crafted_guard_flags_only_the_trigger(servers):
    """The test's own guard, in process: "unsafe\\nS1" with a high score when the trigger is there, else safe."""
    from herd.formats.hf import from_pretrained
    from herd.safety import Guard
    from herd.safety.taxonomy import LG4
    from herd.tokenizer import Tokenizer

    _, _, _, trigger, _, _, guard_dir = servers
    guard = Guard(from_pretrained(guard_dir).eval(), Tokenizer.from_pretrained(guard_dir), categories=LG4)
    flagged = guard.classify([{"role": "user", "content": f"well {trigger} then"}], exclude=("S14",))
    assert not flagged.safe and flagged.categories == ("S1",) and flagged.score > 0.99
    passed = guard.classify([{"role": "user", "content": CLEAN}], exclude=("S14",))
    assert passed.safe and passed.score < 0.01


def test_chat_blocked_on_input_is_never_generated(servers, client):
    _, _, _, trigger, _, _, _ = servers
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"ok {trigger}"}],
                                       max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert [c.finish_reason for c in r.choices] == ["content_filter"] * 2
    assert [c.message.content for c in r.choices] == [REFUSAL] * 2
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens > 0


def test_chat_that_passes_is_the_unguarded_answer(servers, client):
    _, _, _, _, answers, _, _ = servers
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CLEAN}],
                                       max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == answers[CLEAN]
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_blocked_on_output_is_replaced_by_the_refusal(servers, client):
    _, _, bad_prompt, _, answers, _, _ = servers
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": bad_prompt}],
                                       max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content == REFUSAL
    assert r.usage.completion_tokens > 0  # it was generated, then withheld


def test_stream_blocked_on_output_ends_with_content_filter(servers):
    """Only windows that passed went out (a strict prefix of the answer), then a content_filter chunk, [DONE]."""
    _, guarded, bad_prompt, _, answers, _, _ = servers
    events = _stream(guarded, "/v1/chat/completions", {**_chat(bad_prompt), "logprobs": True})
    assert events[-1] == "[DONE]"
    last = events[-2]["choices"][0]
    assert last["finish_reason"] == "content_filter" and last["delta"] == {}
    released = [e["choices"][0] for e in events[1:-2]]
    text = "".join(c["delta"].get("content") or "" for c in released)
    assert answers[bad_prompt].startswith(text) and text != answers[bad_prompt]
    assert all(c["finish_reason"] is None for c in released)
    # no logprob of a held-back token leaks: one per released token, WINDOW per released window
    assert sum(len(c["logprobs"]["content"]) for c in released) == WINDOW * len(released)


def test_stream_that_passes_equals_the_unguarded_stream(servers, client):
    plain, _, _, _, answers, _, _ = servers
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CLEAN}],
                                                 max_tokens=MAX_TOKENS, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    unguarded = _stream(plain, "/v1/chat/completions", _chat(CLEAN))
    assert text == answers[CLEAN] == "".join(e["choices"][0]["delta"].get("content") or ""
                                             for e in unguarded[:-1])
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stream_blocked_on_input_sends_the_refusal(servers):
    _, guarded, _, trigger, _, _, _ = servers
    events = _stream(guarded, "/v1/chat/completions", _chat(trigger))
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "content_filter"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == REFUSAL


def test_concurrent_requests_each_get_their_own_verdict(servers):
    """Scans of concurrent requests queue on the one guard thread; each request gets its own outcome."""
    from concurrent.futures import ThreadPoolExecutor

    _, guarded, bad_prompt, trigger, answers, _, _ = servers
    asks = [trigger, CLEAN, bad_prompt, CLEAN, trigger, bad_prompt]
    with ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(lambda p: _post(guarded, "/v1/chat/completions", _chat(p)), asks))
    assert all(status == 200 for status, _ in got)
    reasons = [body["choices"][0]["finish_reason"] for _, body in got]
    assert [r == "content_filter" for r in reasons] == [True, False, True, False, True, True]
    assert got[1][1]["choices"][0]["message"]["content"] == got[3][1]["choices"][0]["message"]["content"] \
        == answers[CLEAN]


def test_completions_scan_the_prompt_as_a_user_turn(servers, client):
    _, _, _, trigger, _, _, _ = servers
    r = client.completions.create(model="tiny", prompt=[f"so {trigger}", CLEAN], max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    blocked, passed = r.choices
    assert (blocked.finish_reason, blocked.text) == ("content_filter", REFUSAL)
    assert passed.finish_reason == "length" and passed.text != REFUSAL


def test_moderations_through_the_openai_client(servers, client):
    _, _, _, trigger, _, _, guard_dir = servers
    r = client.moderations.create(input=[f"hm {trigger}", CLEAN])
    assert r.model == guard_dir.name and r.id.startswith("modr-")
    flagged, clean = r.results
    assert flagged.flagged and flagged.categories.violence and not flagged.categories.hate
    assert flagged.category_scores.violence > 0.99 and flagged.category_scores.hate == 0.0
    assert flagged.categories.model_extra["S1"] is True  # the Llama Guard codes are keys too
    assert flagged.category_applied_input_types.violence == ["text"]
    assert not clean.flagged and not any(clean.categories.model_dump().values())
    one = client.moderations.create(input=CLEAN)
    assert len(one.results) == 1 and not one.results[0].flagged


def test_moderations_without_a_guard_say_how_to_turn_it_on(servers):
    plain = servers[0]
    status, body = _post(plain, "/v1/moderations", {"input": "hello"})
    assert status == 404 and "--guard" in body["error"]["message"]
    assert body["error"]["code"] == "guard_disabled"


def test_a_conversation_the_guard_cannot_read_gets_400(servers):
    """Llama Guard's prompt holds user / assistant turns only: a tool message is a clear 400, nothing generated."""
    _, guarded, _, _, _, _, _ = servers
    status, body = _post(guarded, "/v1/chat/completions", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}], "max_tokens": 2})
    assert status == 400 and "Llama Guard" in body["error"]["message"]
    assert body["error"]["code"] == "guard_unsupported"


def test_metrics_count_scans_and_blocks(servers, client):
    _, guarded, bad_prompt, trigger, _, _, _ = servers
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": trigger}], max_tokens=2)
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": bad_prompt}],
                                   max_tokens=MAX_TOKENS, temperature=0)
    text = urllib.request.urlopen(f"{guarded}/metrics", timeout=10).read().decode()
    counts = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("herd_guard_")}
    assert counts['herd_guard_blocks_total{direction="input",category="S1"}'] >= 1
    assert counts['herd_guard_blocks_total{direction="output",category="S1"}'] >= 1
    assert counts['herd_guard_scans_total{direction="input"}'] >= 2
    assert counts['herd_guard_scans_total{direction="output"}'] >= 1
    assert "# TYPE herd_guard_blocks_total counter" in text


def test_unknown_guard_category_fails_at_startup(servers):
    _, _, _, _, _, ckpt, guard_dir = servers
    r = subprocess.run([sys.executable, "-m", "herd.cli", "serve", "--model", str(ckpt), "--guard", str(guard_dir),
                        "--guard-categories", "S1,S99", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "guard_categories" in r.stderr + r.stdout and "S99" in r.stderr + r.stdout


def test_guard_categories_need_a_guard():
    from herd.config import ConfigError
    from herd.serve.serve_config import ServeConfig

    with pytest.raises(ConfigError, match="--guard"):
        ServeConfig(model="x", guard_categories=("S1",))
    assert ServeConfig(model="x", guard=str(Path(__file__).parent), guard_categories=("S10", "S1")).guard_codes \
        == ("S1", "S10")
