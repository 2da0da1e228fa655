"""Running the app under uvicorn with a graceful drain: the first SIGTERM (or SIGINT) stops admitting requests
(`/health` and new requests answer 503), lets the engine finish the ones in flight, then shuts uvicorn down so the
process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import socket
import threading

import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first exit signal drains the engine before uvicorn shuts down."""

    def __init__(self, config: uvicorn.Config, *, engine, drain_timeout: float | None = None):
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout
        self.drainer: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        # uvicorn's own handler would re-raise the signal after shutting down (exit status -15, not 0)
        if self.drainer is None:
            self.drainer = threading.Thread(target=self.drain, name="idefics-drain", daemon=True)
            self.drainer.start()
        else:
            self.should_exit = self.force_exit = True

    def drain(self) -> None:
        try:
            self.engine.shutdown(drain=True, timeout=self.drain_timeout)
        finally:
            self.should_exit = True


def serve(app, *, engine, sock: socket.socket, log_level: str = "info", drain_timeout: float | None = None) -> None:
    """Serve `app` on the listening socket `sock` until a signal drains it."""
    DrainingServer(uvicorn.Config(app, log_level=log_level), engine=engine, drain_timeout=drain_timeout).run(
        sockets=[sock]
    )
