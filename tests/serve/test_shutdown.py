"""Graceful shutdown of a real `herd serve` process: on SIGTERM or SIGINT it refuses new connections, lets in-flight
requests (a stream and a plain one) finish for up to --shutdown-timeout seconds, then cancels the rest, ending each
stream with a final chunk and `data: [DONE]`, and exits 0.

The model is the tiny text preset (random weights); requests set vLLM's `ignore_eos`, so a request of 800 tokens ends
on "length" and one of 2,400 tokens runs for seconds, far past a 1 s shutdown timeout. Every wait is on an observable
event (the first chunk, both requests in the engine per /metrics, the refused connection), never on a fixed sleep.

Run: .venv/bin/python -m pytest tests/serve/test_shutdown.py -v
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
import urllib.request

import pytest

from tests.serve.server_process import ServerProcess, init_checkpoint

STREAM_PROMPT, PLAIN_PROMPT = "1 2 3 4 5 6 7 8 9", "The end is near"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_checkpoint(tmp_path_factory.mktemp("tiny"))


def _in_flight(port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    gauges = dict(line.split() for line in text.splitlines() if line.startswith(("herd_queue", "herd_running")))
    return int(gauges["herd_queue_length"]) + int(gauges["herd_running_requests"])


def _post(port: int, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"temperature": 0, "ignore_eos": True, **body}),
                 {"Content-Type": "application/json"})
    return conn.getresponse()


def _events(resp: http.client.HTTPResponse):
    """The `data:` payloads of a server-sent event stream, as they arrive."""
    for line in resp:
        if line.startswith(b"data: "):
            yield line[len(b"data: "):].strip().decode()


def _shutdown_during_requests(ckpt, tmp_path, max_tokens: int, sig: int, *flags):
    """Start a server, put a stream and a plain request in flight, send `sig`. Returns the stream's events after the
    first, seconds from the signal to the stream's end, the plain response, whether a new connection was refused
    while the process still ran, the exit code and the log."""
    srv = ServerProcess(ckpt, *flags, log_path=tmp_path / "server.log")
    proc, port, log = srv.proc, srv.port, srv.log_path
    try:
        plain = {}
        thread = threading.Thread(target=lambda: plain.update(json.loads(_post(port, {
            "prompt": PLAIN_PROMPT, "max_tokens": max_tokens}).read())))
        thread.start()
        events = _events(_post(port, {"prompt": STREAM_PROMPT, "max_tokens": max_tokens, "stream": True,
                                      "stream_options": {"include_usage": True}}))
        assert json.loads(next(events))["choices"][0]["finish_reason"] is None  # the stream has begun
        while _in_flight(port) < 2:  # the plain request is in the engine too
            time.sleep(0.02)
        proc.send_signal(sig)
        t0 = time.monotonic()
        while True:  # the listening socket closes at once, while the requests still run
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                refused_while_running = proc.poll() is None
                break
            assert time.monotonic() - t0 < 10, "the server still accepts connections 10 s after the signal"
            time.sleep(0.02)  # paced: a flood of connections would fill the listen backlog
        rest = list(events)
        stream_s = time.monotonic() - t0
        thread.join(timeout=60)
        code = proc.wait(timeout=60)
        return rest, stream_s, plain, refused_while_running, code, log.read_text()
    finally:
        proc.kill()


def _stream_end(rest: list[str]) -> tuple[str, dict]:
    """The finish_reason of the stream's last choice chunk, and its usage; checks it ends with [DONE]."""
    assert rest[-1] == "[DONE]", rest[-3:]
    chunks = [json.loads(e) for e in rest[:-1]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert all(r is None for r in reasons[:-1]) and reasons[-1] is not None
    return reasons[-1], chunks[-1]["usage"]


def test_sigterm_lets_in_flight_requests_finish(ckpt, tmp_path):
    rest, _, plain, refused_while_running, code, log = _shutdown_during_requests(ckpt, tmp_path, 800, signal.SIGTERM)
    reason, usage = _stream_end(rest)
    assert (reason, usage["completion_tokens"]) == ("length", 800), "the stream was cut short"
    assert plain["choices"][0]["finish_reason"] == "length" and plain["usage"]["completion_tokens"] == 800
    assert refused_while_running
    assert code == 0, log
    assert "shutdown: 2 in-flight request(s) finished, 0 cancelled" in log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_timeout_cancels_and_ends_streams_cleanly(ckpt, tmp_path, sig):
    rest, stream_s, plain, _, code, log = _shutdown_during_requests(ckpt, tmp_path, 2400, sig,
                                                                    "--shutdown-timeout", "1")
    reason, usage = _stream_end(rest)
    assert reason == "cancelled" and 0 < usage["completion_tokens"] < 2400
    assert stream_s < 6, f"the stream ended {stream_s:.1f} s after the signal (timeout 1 s)"
    choice = plain["choices"][0]  # the plain request gets what it had generated
    assert choice["finish_reason"] == "cancelled" and 0 < plain["usage"]["completion_tokens"] < 2400
    assert choice["text"]
    assert code == 0, log
    assert "shutdown: 0 in-flight request(s) finished, 2 cancelled" in log
