"""One bad request never hurts another, against one real `herd serve` process (uvicorn, the tiny multimodal preset).

- Every malformed body a hostile client sent (issue #13, items 1, 2, 5 and 8) gets a 4xx in OpenAI's error shape,
  all over ONE keep-alive connection that stays open: a plain request on it right after each one is answered.
- Streams started before the bad requests all run to their normal end.
- An exception a route lets escape is an OpenAI-shaped 500 on a connection that stays open, and a stream that fails
  after its 200 ends with an error event and `data: [DONE]`, its generation cancelled and counted. Nothing in the
  server raises that way on its own any more, so the server process imports a `sitecustomize` (from PYTHONPATH)
  that makes two functions of herd.serve.completion raise for requests with a marker seed.
- /openapi.json describes the request bodies.

Run: .venv/bin/python -m pytest tests/serve/test_hardening.py -v
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.serve.server_process import ServerProcess, init_checkpoint

IMAGE = Path(__file__).parents[1] / "data" / "images" / "square_h224_w224.png"
FAIL_RESPONSE, FAIL_STREAM = 990001, 990002  # marker seeds: the patched server fails these requests (see INJECT)
INJECT = f"""
import herd.serve.completion as completion

_choice, _piece = completion._choice, completion._StreamedChoice.piece

def _failing_choice(svc, job, i, req):
    if req.params.seed == {FAIL_RESPONSE}:
        raise RuntimeError("injected: a response that cannot be built")
    return _choice(svc, job, i, req)

def _failing_piece(self, tok, delta, finished, chat):
    self.pieces = getattr(self, "pieces", 0) + 1
    if self.req.params.seed == {FAIL_STREAM} and self.pieces > 3:
        raise RuntimeError("injected: a stream that fails after its 200")
    return _piece(self, tok, delta, finished, chat)

completion._choice, completion._StreamedChoice.piece = _failing_choice, _failing_piece
"""
USER = {"role": "user", "content": "hi"}


def chat(**kw) -> tuple[str, dict]:
    return "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "messages": [USER], **kw}


def text(**kw) -> tuple[str, dict]:
    return "/v1/completions", {"model": "tiny", "max_tokens": 2, "prompt": "hi", **kw}


def content(c) -> tuple[str, dict]:
    return chat(messages=[{"role": "user", "content": c}])


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
# (name, path, body (a dict, or raw bytes), Content-Type or None, status, a fragment of the error message)
BAD = [
    ("role-list", *chat(messages=[{"role": ["user"], "content": "x"}]), "application/json", 400, "messages[0].role"),
    ("content-5", *content(5), "application/json", 400, "messages[0].content must be a string"),
    ("content-1-2", *content([1, 2]), "application/json", 400, "messages[0].content[0] must be a JSON object"),
    ("content-dict", *content({"text": "x"}), "application/json", 400, "messages[0].content must be a string"),
    ("text-part-no-text", *content([{"type": "text"}]), "application/json", 400, "content[0].text is required"),
    ("part-video", *content([{"type": "video", "url": "v.mp4"}]), "application/json", 400, "got 'video'"),
    ("nested-garbage", *content([{"type": "text", "text": {"a": [{"b": [1, {"c": None}]}]}}]), "application/json",
     400, "content[0].text must be a valid string"),
    ("tools-1", *chat(tools=[1]), "application/json", 400, "tools[0] must be a JSON object"),
    ("stream-tools-1", *chat(tools=[1], stream=True), "application/json", 400, "tools[0]"),
    ("tool-no-name", *chat(tools=[{"type": "function", "function": {"parameters": {}}}]), "application/json", 400,
     "tools[0].function.name is required"),
    ("tool-choice-function-str", *chat(tools=[WEATHER], tool_choice={"type": "function", "function": "get_weather"}),
     "application/json", 400, "tool_choice.function must be a JSON object"),
    ("tool-calls-abc", *chat(messages=[USER, {"role": "assistant", "tool_calls": "abc"}, USER]), "application/json",
     400, "messages[1].tool_calls"),
    ("stream-options-x", *chat(stream=True, stream_options="x"), "application/json", 400, "stream_options"),
    ("nested-1001", "/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": ' + b"[" * 1001 + b"]" * 1001 + b"}]}",
     "application/json", 400, "nested too deeply"),
    ("echo-minus-1", *text(prompt=[-1], echo=True), "application/json", 400, "prompt must be"),
    ("echo-2-70", *text(prompt=[2**70], echo=True), "application/json", 400, "prompt must be"),
    ("echo-past-vocab", *text(prompt=[5, 99999], echo=True), "application/json", 400, "outside the vocabulary"),
    ("image-url-nul", *content([{"type": "image_url", "image_url": {"url": "/tmp/a\0.png"}}]), "application/json",
     400, "NUL"),
    ("image-outside-media-dir", *content([{"type": "image_url", "image_url": {"url": str(IMAGE)}}]),
     "application/json", 400, "inside the server's --media-dir"),
    ("top-k-2-63", *chat(top_k=2**63), "application/json", 400, "top_k"),
    ("seed-2-64", *chat(seed=2**64), "application/json", 400, "seed"),
    ("temperature-nan", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                                                b'"temperature": NaN}', "application/json", 400, "not valid JSON"),
    ("temperature-1e999", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                                                  b'"temperature": 1e999}', "application/json", 400, "finite"),
    ("top-p-0", *chat(top_p=0), "application/json", 400, "top_p"),
    ("stream-no", *chat(stream="no"), "application/json", 400, "stream must be a valid boolean"),
    ("top-logprobs-alone", *chat(top_logprobs=3), "application/json", 400, "top_logprobs needs"),
    ("text-plain", *chat(), "text/plain", 415, "application/json"),
    ("form", *text(), "application/x-www-form-urlencoded", 415, "application/json"),
    ("no-content-type", *text(), None, 415, "application/json"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = init_checkpoint(tmp_path_factory.mktemp("tinymm"), "--multimodal")
    media = tmp_path_factory.mktemp("media")
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(INJECT)
    with pytest.MonkeyPatch.context() as mp:  # only the server process sees it
        mp.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        srv = ServerProcess(ckpt, "--name", "tiny", "--media-dir", str(media))
    with srv:
        yield srv


def _request(conn: http.client.HTTPConnection, path: str, body, kind: str | None = "application/json",
             method: str = "POST") -> tuple[int, dict, http.client.HTTPResponse]:
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": kind} if kind else {})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read()), resp


def _stream(base: str, body: dict, out: list) -> None:
    """A streamed request on a connection of its own: appends every `data:` payload to `out`."""
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=120)
    conn.request("POST", body.pop("path"), json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out.append(resp.status)
    for line in resp:
        if line.startswith(b"data: "):
            out.append(line[6:].strip().decode())
    conn.close()


def _gauges(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    return {k: float(v) for k, v in (line.split() for line in text.splitlines()
                                     if line.startswith("herd_") and "{" not in line)}


def _idle(base: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        g = _gauges(base)
        if g["herd_queue_length"] + g["herd_running_requests"] == 0:
            return True
        time.sleep(0.05)
    return False


def _is_openai_error(err: dict) -> bool:
    return set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}


def test_bad_requests_on_one_connection_hurt_no_one(server):
    """Streams start, every bad body goes out on one keep-alive connection with a good request after each, the
    streams all end normally, the connection was never closed."""
    streams = [[] for _ in range(3)]
    threads = [threading.Thread(target=_stream, args=(server.base, {
        "path": "/v1/completions", "model": "tiny", "prompt": f"story {i}", "max_tokens": 800, "temperature": 0.8,
        "seed": i, "ignore_eos": True, "stream": True}, streams[i])) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not all(len(s) > 2 for s in streams) and time.monotonic() < deadline:
        time.sleep(0.02)  # each stream has sent a few chunks: they are generating
    conn = http.client.HTTPConnection(server.base.removeprefix("http://"), timeout=60)
    code, _, _ = _request(conn, *text())
    sock = conn.sock
    assert code == 200 and sock is not None
    for name, path, body, kind, status, fragment in BAD:
        code, err, resp = _request(conn, path, body, kind)
        assert (code, fragment in err.get("error", {}).get("message", "")) == (status, True), (name, code, err)
        assert _is_openai_error(err) and err["error"]["type"] == "invalid_request_error", (name, err)
        assert resp.getheader("connection") != "close" and conn.sock is sock, f"{name}: the connection was closed"
        code, ok, _ = _request(conn, *text())
        assert code == 200 and ok["choices"][0]["finish_reason"] in ("stop", "length"), (name, ok)
        assert conn.sock is sock
    for t in threads:
        t.join(120)
    for s in streams:
        chunks = [json.loads(d) for d in s[1:-1]]
        assert s[0] == 200 and s[-1] == "[DONE]" and not any("error" in c for c in chunks)
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    conn.close()


def test_404_405_and_charset_are_openai_shaped(server):
    conn = http.client.HTTPConnection(server.base.removeprefix("http://"), timeout=60)
    for method, path, status in [("GET", "/v1/nothing", 404), ("POST", "/v2/chat/completions", 404),
                                 ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405)]:
        code, err, _ = _request(conn, path, None, None, method)
        assert code == status and _is_openai_error(err) and path in err["error"]["message"], (path, err)
    code, out, _ = _request(conn, *chat(), "application/json; charset=utf-8")
    assert code == 200 and out["choices"][0]["message"]["role"] == "assistant"


def test_an_exception_in_a_route_is_an_openai_500_on_an_open_connection(server):
    conn = http.client.HTTPConnection(server.base.removeprefix("http://"), timeout=60)
    before = _gauges(server.base)["herd_request_errors_total"]
    code, err, resp = _request(conn, *text(seed=FAIL_RESPONSE))
    sock = conn.sock
    assert code == 500 and _is_openai_error(err) and err["error"]["type"] == "server_error", err
    assert "RuntimeError" in err["error"]["message"] and resp.getheader("connection") != "close"
    code, ok, _ = _request(conn, *text())
    assert code == 200 and ok["choices"] and conn.sock is sock
    assert _gauges(server.base)["herd_request_errors_total"] == before + 1


def test_a_stream_that_fails_after_its_200_ends_with_an_error_and_is_cancelled(server):
    """3000 tokens would keep the engine busy for many seconds: it is idle at once after the error event."""
    before = _gauges(server.base)
    assert _idle(server.base, 30)
    events = []
    _stream(server.base, {"path": "/v1/chat/completions", "model": "tiny", "messages": [USER], "max_tokens": 3000,
                          "ignore_eos": True, "stream": True, "seed": FAIL_STREAM}, events)
    assert events[0] == 200 and events[-1] == "[DONE]"
    err = json.loads(events[-2])
    assert _is_openai_error(err) and err["error"]["type"] == "server_error" and "RuntimeError" in err["error"][
        "message"]
    assert sum(1 for e in events[1:-2] if json.loads(e)["choices"]) >= 2  # it had streamed before it failed
    assert _idle(server.base, 2), "the failed stream's generation ran on"
    after = _gauges(server.base)
    assert after["herd_request_errors_total"] == before["herd_request_errors_total"] + 1
    assert after["herd_requests_total"] == before["herd_requests_total"] + 1


def test_openapi_shows_the_request_bodies(server):
    spec = json.loads(urllib.request.urlopen(f"{server.base}/openapi.json", timeout=10).read())
    for path, name in [("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")]:
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
    schemas = spec["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["top_k"]["anyOf"][0]["maximum"] == 2**31 - 1
    assert "messages" in schemas["ChatCompletionRequest"]["required"] and "Message" in schemas
