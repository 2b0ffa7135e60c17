"""`herd serve`'s limits as a hostile client meets them, against real server processes: large prompts and images
refused early and off the event loop with bounded memory, the API key (never empty, /v1 only), CORS off unless
origins are named, slow (slowloris) connections dropped and a connection cap.

Two servers, one per configuration: `guarded` (a key, one allowed origin, 1 s timeouts, 40 connections, a 4 MP image
budget) and `plain` (the defaults).

Run: .venv/bin/python -m pytest tests/serve/test_limits.py -v
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from herd.config import ConfigError
from herd.serve.serve_config import ServeConfig
from tests.serve.server_process import ServerProcess, init_checkpoint

KEY = "s3cret-key"
ORIGIN = "https://x.example"
IMAGE = Path(__file__).parents[1] / "data" / "images" / "square_h224_w224.png"
BIG = 10 * 2**20  # a 10 MB prompt: within the default 64 MB body limit


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_checkpoint(tmp_path_factory.mktemp("limits"), "--multimodal")


@pytest.fixture(scope="module")
def guarded(ckpt):
    with ServerProcess(ckpt, "--name", "tiny", "--api-key", KEY, "--allowed-origins", ORIGIN, "--header-timeout", "1",
                       "--body-timeout", "1", "--max-connections", "40", "--max-image-mp", "4") as srv:
        yield srv


@pytest.fixture(scope="module")
def plain(ckpt):
    with ServerProcess(ckpt, "--name", "tiny") as srv:
        yield srv


def _call(base: str, path: str, body: dict | None = None, headers: dict | None = None, method: str | None = None,
          key: str | None = KEY, timeout: float = 60) -> tuple[int, dict, bytes]:
    """(status, response headers lower-cased, body)."""
    data = None if body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    req = urllib.request.Request(base + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _rss_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _png_1bit(w: int, h: int) -> bytes:
    """A valid all-black 1-bit PNG of w x h: a few kB of file for w * h pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compress(bytes((1 + (w + 7) // 8) * h), 9)  # each row: filter byte 0, then w bits
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IDAT", raw)
            + chunk(b"IEND", b""))


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _chat(*parts) -> dict:
    return {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": list(parts)}]}


# ---- item 6: the API key ---------------------------------------------------------------------------------------------
def test_an_empty_api_key_is_refused():
    with pytest.raises(ConfigError, match="^api_key must not be empty"):
        ServeConfig(model="ckpt", api_key="")
    for args, env in ((["--api-key", ""], {}), ([], {"HERD_API_KEY": ""})):
        out = subprocess.run([sys.executable, "-m", "herd.cli", "serve", "--model", "none", *args],
                             capture_output=True, text=True, env={**os.environ, **env})
        assert out.returncode == 2 and "error: api_key must not be empty" in out.stderr, out.stderr


@pytest.mark.parametrize("field,value", [
    ("header_timeout", 0), ("body_timeout", -1.0), ("max_connections", 0), ("max_image_pixels", 0),
    ("allowed_origins", ()), ("allowed_origins", ("https://x.example/",)), ("allowed_origins", ("x.example",)),
])
def test_a_bad_limit_names_its_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field} must"):
        ServeConfig(**{"model": "ckpt", field: value})


def test_the_key_guards_every_v1_route_and_only_those(guarded):
    status, _, spec = _call(guarded.base, "/openapi.json", key=None)
    routes = [(path, m.upper()) for path, ops in json.loads(spec)["paths"].items() for m in ops]
    v1 = [r for r in routes if r[0].startswith("/v1/")]
    assert status == 200 and len(v1) >= 3
    for path, method in v1:
        body = None if method == "GET" else {"model": "tiny", "prompt": "hi", "max_tokens": 1}
        for key in (None, "s3cret-kez", KEY + "x", ""):  # none, one character off, longer, empty
            status, _, out = _call(guarded.base, path, body, method=method, key=key)
            assert status == 401 and json.loads(out)["error"]["code"] == "invalid_api_key", (path, key)
    assert _call(guarded.base, "/v1/models")[0] == 200
    for path in ("/health", "/metrics", "/openapi.json", "/"):  # open, as vLLM leaves them
        assert _call(guarded.base, path, key=None)[0] == 200, path


# ---- item 5 (CORS) ---------------------------------------------------------------------------------------------------
def _preflight(base: str, origin: str) -> tuple[int, dict]:
    status, headers, _ = _call(base, "/v1/chat/completions", method="OPTIONS", key=None, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    return status, headers


def test_no_cors_headers_without_allowed_origins(plain):
    status, headers = _preflight(plain.base, "https://evil.example")
    assert status != 200 and not any(h.startswith("access-control-") for h in headers)
    status, headers, _ = _call(plain.base, "/v1/models", headers={"Origin": "https://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_cors_allows_only_the_named_origins(guarded):
    status, headers = _preflight(guarded.base, ORIGIN)
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in headers["access-control-allow-headers"].lower()
    status, headers = _preflight(guarded.base, "https://evil.example")
    assert status != 200 and "access-control-allow-origin" not in headers
    assert _call(guarded.base, "/v1/models", headers={"Origin": ORIGIN})[1]["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in _call(guarded.base, "/v1/models",
                                                      headers={"Origin": "https://evil.example"})[1]


# ---- item 4: large inputs --------------------------------------------------------------------------------------------
def test_large_inputs_are_refused_early_with_health_answering_and_memory_bounded(guarded):
    big_prompt = {"model": "tiny", "prompt": "hello world " * (BIG // 12), "max_tokens": 2}
    big_chat = {"model": "tiny", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hello world " * (BIG // 12)}]}
    bomb = _chat({"type": "image_url", "image_url": {"url": _data_url(_png_1bit(11000, 11000))}})
    assert _call(guarded.base, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})[0] == 200
    before = _rss_mb(guarded.proc.pid)
    worst, done = 0.0, threading.Event()

    def poll_health():
        nonlocal worst
        while not done.is_set():
            t0 = time.monotonic()
            assert _call(guarded.base, "/health", key=None, timeout=30)[0] == 200
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.02)

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        for _ in range(3):
            for path, body, status, code in (("/v1/completions", big_prompt, 400, "context_length_exceeded"),
                                             ("/v1/chat/completions", big_chat, 400, "context_length_exceeded"),
                                             ("/v1/chat/completions", bomb, 413, None)):
                t0 = time.monotonic()
                got, _, out = _call(guarded.base, path, body)
                assert (got, json.loads(out)["error"]["code"]) == (status, code), out[:300]
                assert time.monotonic() - t0 < 5, path  # tokenizing 10 MB / decoding 121 MP would take far longer
    finally:
        done.set()
        poller.join()
    assert worst < 1.0, f"/health waited {worst:.2f} s"
    assert _rss_mb(guarded.proc.pid) - before < 200


def test_the_pixel_budget_counts_every_image_of_a_request(guarded):
    small = {"type": "image_url", "image_url": {"url": _data_url(IMAGE.read_bytes())}}
    assert _call(guarded.base, "/v1/chat/completions", _chat(small, {"type": "text", "text": "What is it?"}))[0] == 200
    half = {"type": "image_url", "image_url": {"url": _data_url(_png_1bit(2000, 1000))}}  # 2 MP each; budget 4 MP
    status, _, out = _call(guarded.base, "/v1/chat/completions", _chat(half, half, half))
    assert status == 413 and "--max-image-mp" in json.loads(out)["error"]["message"]


def _loop_stall(svc, req) -> tuple[float, object]:
    """(the longest the event loop waited for a 10 ms sleep, the result) while `svc.prompts(req)` runs."""

    async def run():
        ticks, stop = [], asyncio.Event()

        async def tick():
            while not stop.is_set():
                t0 = time.monotonic()
                await asyncio.sleep(0.01)
                ticks.append(time.monotonic() - t0)

        ticker = asyncio.create_task(tick())
        out = await svc.prompts(req)
        stop.set()
        await ticker
        return max(ticks), out

    return asyncio.run(run())


def _service(tok, cfg):
    from herd.serve.service import Service

    model = SimpleNamespace(text_config=cfg.text_config, vision_config=cfg.vision_config)
    return Service(ServeConfig(model="tiny", name="tiny"), SimpleNamespace(engine=SimpleNamespace(model=model)), tok)


def test_tokenizing_runs_off_the_event_loop():
    """A prompt under the length bound is tokenized on a prep thread: the loop keeps running meanwhile (a slow
    tokenizer stands in for a long prompt on a model with a long context)."""
    from herd.config import preset
    from herd.serve.schemas import CompletionRequest
    from herd.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    real = tok.encode
    tok.encode = lambda text, **kw: (time.sleep(0.6), real(text, **kw))[1]
    stall, (prompts, _, _) = _loop_stall(_service(tok, preset("tiny")),
                                         CompletionRequest(prompt="hello world", max_tokens=2))
    assert prompts == [[tok.bos_id] + real("hello world")]
    assert stall < 0.3


def test_images_are_read_and_decoded_off_the_event_loop(monkeypatch):
    """A chat request's images are measured, decoded and tiled on a prep thread too (a slow decoder stands in for a
    large image within the pixel budget)."""
    import io

    from PIL import Image

    import herd.image
    from herd.config import multimodal_preset
    from herd.serve.schemas import ChatCompletionRequest
    from herd.tokenizer import tiny_tokenizer

    real = herd.image._decode
    monkeypatch.setattr(herd.image, "_decode", lambda *a: (time.sleep(0.6), real(*a))[1])
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    req = ChatCompletionRequest.model_validate({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What colour?"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    stall, (prompts, pixels, _) = _loop_stall(_service(tiny_tokenizer(), multimodal_preset("tiny")), req)
    assert pixels is not None and pixels.shape[0] >= 1 and len(prompts[0]) > 10
    assert stall < 0.3


def test_the_tokenizer_lets_other_threads_run():
    """herd.tokenizer.Tokenizer.encode releases the GIL, so the event loop runs while a prep thread tokenizes."""
    from herd.tokenizer import tiny_tokenizer

    tok, text, gaps = tiny_tokenizer(), "hello world, some text. " * 80_000, []
    worker = threading.Thread(target=tok.encode, args=(text,))
    worker.start()
    while worker.is_alive():
        t0 = time.monotonic()
        time.sleep(0.005)
        gaps.append(time.monotonic() - t0)
    worker.join()
    assert len(gaps) > 3 and max(gaps) < 0.2
    assert tok.max_token_bytes >= 1 and len(tok.encode(text[:30_000])) >= 30_000 // tok.max_token_bytes


# ---- item 7: slow clients and the connection cap ---------------------------------------------------------------------
def _open(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    if data:
        s.sendall(data)
    return s


def _closed_after(s: socket.socket, t0: float) -> tuple[float, bytes]:
    """Seconds from t0 until the server closed `s`, and what it sent first."""
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except OSError:
        pass
    s.close()
    return time.monotonic() - t0, got


def test_slow_requests_are_dropped_while_others_are_served(guarded):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n")
    t0 = time.monotonic()
    socks = ([_open(guarded.port, head[:40]) for _ in range(10)]  # half a header
             + [_open(guarded.port, head + b"Content-Length: 1000\r\n\r\n{\"model\"") for _ in range(10)]  # part body
             + [_open(guarded.port, b"") for _ in range(4)])  # nothing at all
    trickle = _open(guarded.port, b"G")
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert _call(guarded.base, "/v1/completions", body)[0] == 200  # served meanwhile
    for c in b"ET /health":  # one byte every 0.2 s: a trickle does not move the deadline
        time.sleep(0.2)
        try:
            trickle.send(bytes([c]))
        except OSError:
            break
    results = [_closed_after(s, t0) for s in socks + [trickle]]
    assert max(t for t, _ in results) < 4, [round(t, 2) for t, _ in results]  # 1 s timeouts, plus a margin
    assert all(got.startswith(b"HTTP/1.1 408") for _, got in results[:20] + results[-1:])
    assert all(got == b"" for _, got in results[20:24])  # nothing sent, nothing answered
    assert _call(guarded.base, "/v1/completions", body)[0] == 200  # and after
    assert "Traceback" not in guarded.log_path.read_text()  # a dropped upload is no server error


def test_the_connection_cap_holds_and_frees(guarded):
    idle = [_open(guarded.port, b"") for _ in range(45)]  # over --max-connections 40
    time.sleep(0.3)
    assert _call(guarded.base, "/health", key=None)[0] == 503
    t0 = time.monotonic()
    assert max(_closed_after(s, t0)[0] for s in idle) < 3  # the header timeout frees them
    assert _call(guarded.base, "/health", key=None)[0] == 200


def test_the_key_is_compared_in_constant_time(monkeypatch):
    """Every key check goes through hmac.compare_digest (timing-safe: a wrong guess takes as long whatever its
    prefix), and only an exact `Bearer KEY` passes."""
    import hmac

    from herd.config import preset
    from herd.serve.service import APIError
    from herd.tokenizer import tiny_tokenizer

    svc = _service(tiny_tokenizer(), preset("tiny"))
    svc.config = ServeConfig(model="tiny", api_key="s3cret")
    calls, real = [], hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    svc.authorize({"authorization": "Bearer s3cret"})
    for bad in ({"authorization": "Bearer s3cre"}, {"authorization": "Bearer s3cret "}, {}):
        with pytest.raises(APIError) as e:
            svc.authorize(bad)
        assert e.value.status == 401
    assert len(calls) == 4
