"""`herd serve` as a real subprocess on 127.0.0.1, for the server tests: start it, wait for /health, stop it.

The server's output goes to a log file, never to a pipe nobody reads (a full pipe blocks the server); a server that
dies or never answers raises with its log. OMP_NUM_THREADS=1: tiny models, and the test process shares the cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(base: str, path: str, body: bytes | dict) -> tuple[int, dict]:
    """(status, parsed JSON body) of a POST to a server under test; HTTP errors are returned, not raised."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def init_checkpoint(out: Path, *flags: str) -> Path:
    """`herd init --preset tiny [flags] --out out`: random weights with the shipped tokenizer."""
    subprocess.run([sys.executable, "-m", "herd.cli", "init", "--preset", "tiny", *flags, "--out", str(out)],
                   check=True, capture_output=True)
    return out


class ServerProcess:
    """`with ServerProcess(ckpt, "--name", "tiny") as srv:` ... srv.base, srv.port, srv.proc, srv.log_path.
    ckpt None: no --model (herd's default model), with log_path given."""

    def __init__(self, ckpt: Path | None, *flags: str, log_path: Path | None = None, timeout: float = 60.0):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(ckpt) / f"server-{self.port}.log"
        model = ["--model", str(ckpt)] if ckpt is not None else []
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", *model, "--port",
                                          str(self.port), *flags], stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.base}/health", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError(f"herd serve did not come up:\n{self.log_path.read_text()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
