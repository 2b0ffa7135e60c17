"""The engine on a thread of its own, and the bridge from its callbacks to asyncio.

herd.infer.engine.Engine is synchronous and single-threaded: `step()` runs one scheduler iteration. The server runs
it in a background thread that owns it: HTTP handlers (asyncio) never touch the engine's state; they build a request
(`Engine.request` only checks and constructs) and post it, or a cancellation, to an inbox the engine thread empties
before every step. A lock around `step()` would not do: Python's locks are not fair, so a thread that takes the lock
again right after each step starves the handlers waiting for it, and a new request (or a client's cancel) would wait
until the whole batch finished. Every new token's text reaches its handler through an asyncio queue filled with
`loop.call_soon_threadsafe`, so the event loop never blocks on the model.

Anything else that must not happen during a step (a weight swap: herd.serve.weights) is posted as a function
(`call`) that the engine thread runs between two steps; its caller waits on a future.

If a step raises (a bug, or memory running out), the engine thread logs it, ends every request in flight with
finish_reason "error" (their handlers answer 500 / an error event) and keeps serving.

Shutdown is in two steps because the HTTP server waits for open connections and a stream ends only when its request
does: `drain` (run while the server waits) lets in-flight requests finish for a while, then cancels the rest, and
cancels every later submission at once; `stop` then ends the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time

from herd.infer.engine import Engine, Request

log = logging.getLogger("herd.serve")


class EngineWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        # ("add" | "cancel", Request) or ("call", (function, Future)), applied between steps
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = False
        self.closing = False  # set by drain: a new request is cancelled as soon as it is submitted
        self.hurry = threading.Event()  # set to cut drain's wait short (cancel now)
        self.live: set[Request] = set()  # submitted and not yet seen finished (for drain's counts)
        self.live_lock = threading.Lock()  # guards `live` only, never held during a step
        self.thread = threading.Thread(target=self._run, name="herd-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt_ids, params, pixel_values=None, generate: bool = True) -> tuple[Request, asyncio.Queue]:
        """Queue a request (ValueError for a bad one, at once); its queue receives (text delta, finished) after every
        token. generate=False (the completions API's max_tokens 0: only the prompt is scored, herd.serve.scoring):
        the request is checked and built, finished at once with "length", and never queued."""
        loop, out = asyncio.get_running_loop(), asyncio.Queue()

        def on_delta(req: Request, delta: str) -> None:
            loop.call_soon_threadsafe(out.put_nowait, (delta, req.finished))

        req = self.engine.request(prompt_ids, params, pixel_values, on_delta)
        if not generate:
            req.finish_reason = "length"
            return req, out
        if self.closing:
            req.finish_reason = "cancelled"  # shutting down: nothing new starts
            return req, out
        with self.live_lock:
            self.live = {r for r in self.live if not r.finished} | {req}
        self._post("add", req)
        return req, out

    def cancel(self, req: Request) -> None:
        self._post("cancel", req)

    def call(self, fn) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between two steps; the future gets its result or its exception."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._post("call", (fn, done))
        return done

    def _post(self, op: str, req) -> None:
        self.inbox.put((op, req))
        self.wake.set()

    @property
    def queue_length(self) -> int:
        return len(self.engine.waiting) + self.inbox.qsize()

    @property
    def running(self) -> int:
        return len(self.engine.running)

    def in_flight(self) -> list[Request]:
        with self.live_lock:
            self.live = {r for r in self.live if not r.finished}
            return list(self.live)

    def drain(self, timeout: float) -> tuple[int, int]:
        """Let in-flight requests finish for up to `timeout` seconds (or until `hurry` is set), then cancel the rest.
        Returns (finished, cancelled) among the requests in flight when it was called (one whose client left meanwhile
        was cancelled by its handler: it counts in neither)."""
        self.closing = True
        started = self.in_flight()
        deadline = time.monotonic() + timeout
        while self.in_flight() and time.monotonic() < deadline and not self.hurry.is_set():
            self.hurry.wait(0.01)
        left = self.in_flight()
        for req in left:
            self.cancel(req)
        limit = time.monotonic() + 30  # the engine thread applies them after its current step
        while any(not r.finished for r in left) and self.thread.is_alive() and time.monotonic() < limit:
            time.sleep(0.01)
        finished = sum(req not in left and req.finish_reason not in ("cancelled", "error") for req in started)
        return finished, len(left)

    def stop(self, timeout: float = 30.0) -> tuple[int, int]:
        """`drain(timeout)`, then end the thread; returns drain's counts."""
        counts = self.drain(timeout)
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=5)
        if not self.thread.is_alive():  # a call posted after the last iteration would wait for ever
            self._apply()
        return counts

    def _apply(self) -> None:
        while True:
            try:
                op, req = self.inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                self.engine.add(req)
            elif op == "cancel":
                self.engine.cancel(req)
            else:
                fn, done = req
                try:
                    done.set_result(fn())
                except Exception as e:  # the caller's to report; the engine goes on
                    done.set_exception(e)

    def _run(self) -> None:
        while not self.stopping:
            self._apply()
            if not self.engine.busy:
                self.wake.wait(0.05)
                self.wake.clear()  # a post after this is still applied: the inbox is read every iteration
                continue
            try:
                self.engine.step()
            except Exception as e:  # keep serving: fail what was in flight, start clean
                log.exception("engine step failed; ending the requests in flight")
                self.engine.fail_all(f"the engine failed: {type(e).__name__}: {e}")
