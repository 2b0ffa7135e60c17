"""uvicorn for `herd serve`, with a graceful shutdown that drains the engine.

On SIGTERM or SIGINT uvicorn stops listening, asks each open connection to close after its current response, and
waits for them (uvicorn.Server.shutdown, up to `timeout_graceful_shutdown`, then it cancels their tasks). A streamed
response ends only when its request does, so the engine has to be drained *while* uvicorn waits: a lifespan shutdown
hook runs only after the connections have closed, and would wait for streams that never end. `Server.shutdown` runs
EngineWorker.drain on a thread next to uvicorn's wait: in-flight requests get `shutdown_timeout` seconds to finish,
then they are cancelled, and their handlers end each stream with a final chunk (finish_reason "cancelled") and
`data: [DONE]`, and each non-streamed request with what it had generated. uvicorn's own deadline, GRACE seconds
later, is the backstop for a connection that still does not close; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import asyncio
import signal

import uvicorn

GRACE = 5.0  # seconds uvicorn still waits for connections once the engine has cancelled their requests


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


def serve(app, worker, host: str, port: int, log_level: str = "warning", shutdown_timeout: float = 30.0) -> None:
    """Serve `app` until SIGTERM or SIGINT, drain `worker` (see above), stop its thread."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
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
