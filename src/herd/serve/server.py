"""uvicorn for `herd serve`, with a graceful shutdown that drains the engine.

On SIGTERM or SIGINT uvicorn stops listening, asks each open connection to close after its current response, and
waits for them (uvicorn.Server.shutdown, up to `timeout_graceful_shutdown`, then it cancels their tasks). A streamed
response ends only when its request does, so the engine has to be drained *while* uvicorn waits: a lifespan shutdown
hook runs only after the connections have closed, and would wait for streams that never end. `Server.shutdown` runs
EngineWorker.drain on a thread next to uvicorn's wait: in-flight requests get `shutdown_timeout` seconds to finish,
then they are cancelled, and their handlers end each stream with a final chunk (finish_reason "cancelled") and
`data: [DONE]`, and each non-streamed request with what it had generated. uvicorn's own deadline, GRACE seconds
later, is the backstop for a connection that still does not close; a second Ctrl-C exits at once.

Slow clients (slowloris): uvicorn closes a connection that sits idle *between* requests (`timeout_keep_alive`), but
has no deadline for a request that has begun: a client that sends half a header line, or headers and then part of a
body, holds its connection (and, at the cap, everyone's) for ever. `TimedH11Protocol` adds the two deadlines that
nginx (`client_header_timeout`, `client_body_timeout`) and Apache (mod_reqtimeout) have, to uvicorn's own h11
protocol. `max_connections` is uvicorn's `limit_concurrency`: beyond it a new request gets 503.
"""

from __future__ import annotations

import asyncio
import functools
import signal

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

GRACE = 5.0  # seconds uvicorn still waits for connections once the engine has cancelled their requests
KEEP_ALIVE = 5  # seconds an idle connection is kept between requests (uvicorn's default, made explicit)
MIN_BODY_RATE = 64 * 1024  # bytes/s: a body's deadline moves 1 s later per 64 KiB received (mod_reqtimeout MinRate)
TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and one for its body.

    The phase follows h11's view of the client (`conn.their_state`), checked after every read: IDLE with bytes
    received means the headers are still arriving, SEND_BODY that the body is, anything else that the request is
    complete (the app's time to answer is not limited here) or that the connection is idle between requests (uvicorn's
    keep-alive timer covers that). The headers deadline also starts when a connection opens, so one that never sends
    a byte is closed too. A deadline is set once per phase and never pushed back by a trickle of bytes; only a body's
    moves, by the time MIN_BODY_RATE needs for what arrived, so a large upload on a modest link is not cut. At the
    deadline the client gets 408 if it had sent something and no response has started, and the connection closes (the
    app, if it was reading the body, sees a disconnect).
    """

    def __init__(self, *args, header_timeout: float, body_timeout: float, **kw):
        super().__init__(*args, **kw)
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.phase: str | None = None  # "headers" | "body" | None
        self.deadline = 0.0  # in loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.got_bytes = False  # of the current request

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._enter("headers")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.phase == "body":
            self.deadline += len(data) / MIN_BODY_RATE
        self.got_bytes = True
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request that is already buffered
        self.got_bytes = bool(self.conn.trailing_data[0])
        self._follow()

    def connection_lost(self, exc) -> None:
        self._enter(None)
        super().connection_lost(exc)

    def _follow(self) -> None:
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._enter("body")
        elif state is h11.IDLE:
            if self.got_bytes:
                self._enter("headers")
        else:
            self._enter(None)  # the request is complete (or the connection is closing)

    def _enter(self, phase: str | None) -> None:
        if phase == self.phase:
            return  # keep the deadline: bytes that trickle in do not extend it
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.phase = phase
        if phase is not None:
            self.deadline = self.loop.time() + (self.header_timeout if phase == "headers" else self.body_timeout)
            self.timer = self.loop.call_at(self.deadline, self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.loop.time() < self.deadline:  # a body arriving at the minimum rate moved its deadline
            self.timer = self.loop.call_at(self.deadline, self._expire)
            return
        self.phase = None
        if self.transport.is_closing():
            return
        if self.got_bytes and (self.cycle is None or self.cycle.response_complete or not self.cycle.response_started):
            self.transport.write(TIMEOUT_408)
        self.transport.close()


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, worker, shutdown_timeout: float):
        super().__init__(config)
        self.worker, self.shutdown_timeout = worker, shutdown_timeout

    async def shutdown(self, sockets=None) -> None:
        drain = asyncio.create_task(asyncio.to_thread(self.worker.drain, self.shutdown_timeout))
        await super().shutdown(sockets)
        self.worker.hurry.set()  # every connection is closed, or a second Ctrl-C forced the exit: cancel now
        finished, cancelled = await drain
        print(f"shutdown: {finished} in-flight request(s) finished, {cancelled} cancelled", flush=True)


def serve(app, worker, cfg) -> None:
    """Serve `app` on cfg.host:cfg.port (a herd.serve.serve_config.ServeConfig) until SIGTERM or SIGINT, drain
    `worker` (see above), stop its thread. A request whose headers / body take longer than cfg.header_timeout /
    cfg.body_timeout seconds is dropped; at most cfg.max_connections are served at once."""
    header_timeout, body_timeout, shutdown_timeout = cfg.header_timeout, cfg.body_timeout, cfg.shutdown_timeout
    http = functools.partial(TimedH11Protocol, header_timeout=header_timeout, body_timeout=body_timeout)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, http=http,
                            timeout_keep_alive=KEEP_ALIVE, limit_concurrency=cfg.max_connections,
                            timeout_graceful_shutdown=shutdown_timeout + GRACE)
    # uvicorn re-raises the signal that stopped it to the handler it found (Server.capture_signals): the default
    # SIGTERM handler would kill the process and SIGINT's would raise KeyboardInterrupt. A requested shutdown exits 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        Server(config, worker, shutdown_timeout).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        worker.stop(0)  # nothing is left in flight after a shutdown; this ends the engine thread
