"""The engine on a thread of its own, and the bridge from its callbacks to asyncio.

herd.infer.engine.Engine is synchronous: `step()` runs one scheduler iteration. The server runs it in a background
thread that steps while there is work and sleeps on an event otherwise; HTTP handlers (asyncio) submit and cancel
requests under a lock, and every new token's text reaches the handler through an asyncio queue filled with
`loop.call_soon_threadsafe`, so the event loop never blocks on the model.
"""

from __future__ import annotations

import asyncio
import threading
import time

from herd.infer.engine import Engine, Request


class EngineWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="herd-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt_ids, params, pixel_values=None) -> tuple[Request, asyncio.Queue]:
        """Queue a request; its queue receives (text delta, finished) after every token."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def on_delta(req: Request, delta: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (delta, req.finished))

        with self.lock:
            req = self.engine.submit(prompt_ids, params, pixel_values, on_delta)
        self.wake.set()
        return req, queue

    def cancel(self, req: Request) -> None:
        with self.lock:
            self.engine.cancel(req)

    @property
    def queue_length(self) -> int:
        return len(self.engine.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.running)

    def stop(self, timeout: float = 30.0) -> None:
        """Let in-flight requests finish (up to `timeout` seconds), then cancel what is left and end the thread."""
        deadline = time.monotonic() + timeout
        while self.engine.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        with self.lock:
            for req in list(self.engine.waiting) + list(self.engine.running):
                self.engine.cancel(req)
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self.stopping:
            if not self.engine.busy:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            with self.lock:
                self.engine.step()
