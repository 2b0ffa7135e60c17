"""`herd serve` as users run it: a real uvicorn process on 127.0.0.1, the official `openai` client, raw HTTP for the
bad requests. The model is the tiny multimodal preset (random weights) with the shipped tokenizer.

Run: .venv/bin/python -m pytest tests/serve/test_server.py -v
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.serve.server_process import ServerProcess, init_checkpoint
from tests.serve.server_process import post_json as _post

IMAGE = Path(__file__).parents[1] / "data" / "images" / "square_h224_w224.png"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The one folder whose files requests may name by path (--media-dir)."""
    media = tmp_path_factory.mktemp("media")
    shutil.copy(IMAGE, media / "square.png")
    (media / "big.png").write_bytes(b"\0" * 600_000)  # over --max-image-mb
    os.symlink(IMAGE, media / "link.png")  # a link that leads out of the folder
    (media.parent / "secret.png").write_bytes(IMAGE.read_bytes())  # next to it, not in it
    return media


@pytest.fixture(scope="module")
def server(tmp_path_factory, media):
    ckpt = init_checkpoint(tmp_path_factory.mktemp("tinymm"), "--multimodal")
    with ServerProcess(ckpt, "--name", "tiny", "--max-images", "2", "--max-image-mb", "0.5", "--media-dir",
                       str(media)) as srv:
        yield srv.base


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_chat(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                         max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 3
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streaming_equals_non_streaming_with_usage(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices


def test_completions_seed_stop_n_and_logprobs(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text  # the same seed, the same tokens
    many = client.completions.create(**kw, n=3)  # choice i draws with seed 7 + i, as in vLLM
    assert [c.index for c in many.choices] == [0, 1, 2] and many.choices[0].text == a.choices[0].text
    assert len({c.text for c in many.choices}) == 3  # n different answers, not one answer n times
    assert many.choices[2].text == client.completions.create(**{**kw, "seed": 9}).choices[0].text
    greedy = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0)
    text = greedy.choices[0].text
    if len(text) > 6:
        cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                        stop=[text[3:6]])
        assert cut.choices[0].text == text[:text.index(text[3:6])] and cut.choices[0].finish_reason == "stop"
    legacy = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                       logprobs=2, extra_body={"ignore_eos": True})
    cl = legacy.choices[0].logprobs  # the completions API's own columns
    assert len(cl.tokens) == len(cl.token_logprobs) == len(cl.top_logprobs) == len(cl.text_offset) == 6
    assert all(v <= 0 for v in cl.token_logprobs) and all(1 <= len(d) <= 2 for d in cl.top_logprobs)
    assert cl.text_offset[0] == 0 and cl.text_offset[1] == len(cl.tokens[0])
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == cl.tokens
    assert [o for s in streamed for o in s.text_offset] == cl.text_offset
    lp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                        temperature=0, logprobs=True, top_logprobs=2)
    items = lp.choices[0].logprobs.content
    assert len(items) >= 1 and len(items[0].top_logprobs) == 2 and items[0].logprob <= 0


def test_image_files_only_from_the_media_folder(server, client, media):
    ok = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(media / "square.png")}},
                                     {"type": "text", "text": "What is this?"}]}])
    assert ok.usage.prompt_tokens > 20
    for url, status, fragment in [(str(media / "big.png"), 413, "larger"),
                                  (str(media / ".." / "secret.png"), 400, "local image paths"),
                                  (str(media / "link.png"), 400, "local image paths"),
                                  (str(IMAGE), 400, "local image paths")]:
        code, err = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]})
        assert code == status and fragment in err["error"]["message"], (url, code, err)


def test_an_image_message(client):
    import base64

    url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    out = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is this?"}]}])
    assert out.usage.prompt_tokens > 20  # the image's tokens are in the prompt


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "gpt-9"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 5},
     400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 99999},
     400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 5000, "max_tokens": 10}, 400, "context"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "decode an image"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400, "local image paths"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 50}, 400, "n"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 3}]}, 400, "too many images"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 800_000}}]}]}, 413, "larger"),
    ("/v1/completions", {"model": "tiny", "prompt": [5, 6, 99999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", 5]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a"] * 33}, 400, "at most 32"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "echo"),  # scores only with echo
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": 3}, 400,
     "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"99999": 5}}, 400, "outside the vocabulary"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400, "constrained decoding"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                              "tool_choice": "required"}, 400, "constrained decoding"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                              "tool_choice": "sometimes"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                              "tool_choice": {"type": "function", "function": {"name": "rm"}}}, 400, "'rm'"),
    ("/v1/completions", {"model": "tiny", "prompt": [5, 6, 996]}, 400, "image placeholder"),  # <|patch|>, no image
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, client, path, body, status, fragment):
    code, err = _post(server, path, body)
    assert code == status and fragment in err["error"]["message"] + str(err["error"]["param"])
    assert set(err["error"]) == {"message", "type", "param", "code"}
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ok?"}], max_tokens=2)
    assert ok.choices[0].message is not None


def test_a_short_request_is_not_held_up_by_a_long_one(client):
    """A request that arrives while another generates joins the running batch at the next step (it does not wait
    for the batch to finish): its whole answer comes back while the long stream is still going."""
    import threading

    long_done = threading.Event()
    first_chunk = threading.Event()
    reasons = []

    def long_stream():  # vLLM's ignore_eos: it surely runs all 1500 tokens
        for chunk in client.completions.create(model="tiny", prompt="a long one", max_tokens=1500, temperature=1.0,
                                               seed=1, stream=True, extra_body={"ignore_eos": True}):
            first_chunk.set()
            reasons.extend(c.finish_reason for c in chunk.choices if c.finish_reason)
        long_done.set()

    t = threading.Thread(target=long_stream)
    t.start()
    assert first_chunk.wait(60)
    short = client.completions.create(model="tiny", prompt="a short one", max_tokens=3, temperature=1.0, seed=2)
    assert short.choices[0].finish_reason in ("stop", "length") and not long_done.is_set()
    t.join(120)
    assert long_done.is_set() and reasons == ["length"]


def test_a_batch_of_prompts_gets_n_choices_each_in_order(client):
    prompts = ["The old king", "A ship in winter"]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0) for p in prompts]
    both = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=5, temperature=0)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone for _ in range(2)]
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    streamed = ["", "", "", ""]
    for chunk in client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=5, temperature=0,
                                           stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in both.choices]


def test_a_developer_message_is_the_system_prompt(client):
    kw = dict(model="tiny", max_tokens=6, temperature=0)
    as_system = client.chat.completions.create(messages=[{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Hi"}], **kw)
    as_developer = client.chat.completions.create(messages=[{"role": "developer", "content": "Be brief."},
                                                            {"role": "user", "content": "Hi"}], **kw)
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens


def test_echo_puts_the_prompt_first(client):
    kw = dict(model="tiny", max_tokens=4, temperature=0)
    plain = client.completions.create(prompt="The old king", **kw).choices[0].text
    assert client.completions.create(prompt="The old king", echo=True, **kw).choices[0].text == "The old king" + plain
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt="The old king", echo=True,
                                                                            stream=True, **kw) if c.choices)
    assert streamed == "The old king" + plain


def test_logit_bias_steers_the_tokens(client):
    """OpenAI's logit_bias reaches the sampler: +100 on one token makes greedy decoding pick it every time."""
    from herd.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    word = tok.encode(" river")[0]
    plain = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
    forced = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0,
                                       logit_bias={str(word): 100})
    assert forced.choices[0].text == tok.decode([word] * 4) != plain.choices[0].text


def test_metrics(server, client):
    client.completions.create(model="tiny", prompt="x", max_tokens=2)
    text = urllib.request.urlopen(f"{server}/metrics").read().decode()
    assert "herd_requests_total" in text and "herd_completion_tokens_total" in text and "quantile=" in text


def _in_engine(server) -> int:
    text = urllib.request.urlopen(f"{server}/metrics", timeout=10).read().decode()
    gauges = dict(line.split() for line in text.splitlines() if line.startswith(("herd_queue", "herd_running")))
    return int(gauges["herd_queue_length"]) + int(gauges["herd_running_requests"])


def test_a_client_that_leaves_mid_stream_cancels_its_generation(server):
    """3000 tokens would take many seconds; once the client closes the connection the engine lets go of it at once."""
    import http.client
    import time

    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "go on", "max_tokens": 3000,
                                                        "stream": True, "ignore_eos": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")  # it is generating
    assert _in_engine(server) == 1
    conn.close()  # the client leaves
    deadline = time.monotonic() + 10
    while _in_engine(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _in_engine(server) == 0, "the generation went on after its client left"


def test_a_storm_of_mixed_requests_leaves_the_server_healthy(server):
    """8 clients for a few seconds: chat and completions, streamed or not, n = 2, batches of prompts, stop strings,
    logprobs, images, bad values, and clients that leave mid-stream. No 5xx and no error event; afterwards nothing is
    left in the engine and a plain request is served."""
    import base64
    import http.client
    import random
    import threading
    import time

    host, port = server.removeprefix("http://").split(":")
    url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    problems, stop = [], threading.Event()

    def client(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            body = {"model": "tiny", "max_tokens": rng.randint(1, 40), "temperature": rng.choice([0, 0.8]),
                    "seed": rng.randint(0, 3), "n": rng.choice([1, 2]), "stream": rng.random() < 0.6}
            if rng.random() < 0.5:
                path = "/v1/chat/completions"
                text = {"type": "text", "text": "word " * rng.randint(1, 60)}
                body["messages"] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                  text] if rng.random() < 0.15 else text["text"]}]
                body["logprobs"] = rng.random() < 0.2
            else:
                path = "/v1/completions"
                body["prompt"] = rng.choice(["x " * rng.randint(1, 80), [5, 6, 7] * rng.randint(1, 20), ["a", "b c"]])
            if rng.random() < 0.2:
                body["stop"] = ["the", "a"]
            if rng.random() < 0.1:
                body["temperature"] = 9  # refused with 400
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            try:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                if resp.status not in (200, 400):
                    problems.append((resp.status, resp.read()[:200]))
                elif body["stream"] and resp.status == 200:
                    leave_after = rng.randint(1, 8) if rng.random() < 0.3 else None
                    for n, line in enumerate(resp):
                        if line.startswith(b'data: {"error'):
                            problems.append(line[:200])
                        if leave_after is not None and n >= leave_after:
                            break  # the client leaves
                else:
                    resp.read()
            finally:
                conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not problems, problems[:5]
    deadline = time.monotonic() + 10
    while _in_engine(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _in_engine(server) == 0
    code, out = _post(server, "/v1/completions", {"model": "tiny", "prompt": "still there?", "max_tokens": 3})
    assert code == 200 and out["choices"][0]["finish_reason"] in ("stop", "length")


def test_eight_concurrent_streams_equal_their_requests_alone(client):
    """Batching must not change results: each concurrent greedy stream equals the same request sent alone."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Question {i}: " + "why " * i for i in range(8)]
    kw = dict(model="tiny", max_tokens=24, temperature=0)

    def alone(p):
        out = client.chat.completions.create(messages=[{"role": "user", "content": p}], **kw)
        return out.choices[0].message.content

    def streamed(p):
        chunks = client.chat.completions.create(messages=[{"role": "user", "content": p}], stream=True, **kw)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    expected = [alone(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(streamed, prompts))
    assert got == expected


def test_api_key_request_size_and_concurrency_limits(tmp_path_factory):
    """A second server with a key, a 1 MB body limit and one generation at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import AuthenticationError, OpenAI, RateLimitError

    ckpt = init_checkpoint(tmp_path_factory.mktemp("tiny-key"))
    with ServerProcess(ckpt, "--name", "tiny", "--api-key", "s3cret", "--max-request-mb", "1", "--max-concurrent",
                       "1") as srv:
        base = srv.base
        good = OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        assert [m.id for m in good.models.list().data] == ["tiny"]
        for size in (2**21, 24 * 2**20):  # the large one is still being sent when the server knows it is too big:
            # the server reads it on (and drops it), so the client gets the 413 rather than a reset connection
            req = urllib.request.Request(base + "/v1/completions", data=json.dumps({"prompt": "x" * size}).encode(),
                                         headers={"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 413 and "larger than" in json.loads(e.value.read())["error"]["message"]
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)  # no Content-Length: chunked
        raw = json.dumps({"prompt": "x" * 2**21}).encode()
        conn.request("POST", "/v1/completions", body=(raw[i:i + 2**16] for i in range(0, len(raw), 2**16)),
                     encode_chunked=True,
                     headers={"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
        answer = conn.getresponse()
        assert answer.status == 413 and "larger than" in json.loads(answer.read())["error"]["message"]
        conn.close()
        kw = dict(model="tiny", prompt="hello", max_tokens=200, temperature=1.0)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(good.completions.create, **kw) for _ in range(4)]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result().choices[0].finish_reason)
                except RateLimitError:
                    outcomes.append(429)
        assert 429 in outcomes and any(o != 429 for o in outcomes)  # one at a time: the others were told to retry
        assert good.completions.create(model="tiny", prompt="again", max_tokens=2).choices  # still up
