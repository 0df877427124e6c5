"""Run the app under uvicorn in this process; SIGTERM drains (readiness 503, in-flight answered) and exits 0."""
from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tlearn.errors import InvalidParameter
from tlearn.serve.app import create_app
from tlearn.serve.limits import ServeSettings


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers, from the connection (or the end of the
    previous answer) on: a client that connects and sends nothing, or trickles its headers a byte at a time, is cut
    off instead of holding a connection forever (uvicorn has no such timeout; the body has read_body's)."""

    header_timeout = 10.0  # seconds; set per server by `with_header_deadline`
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # this request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request's headers

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._cut_off)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _cut_off(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def with_header_deadline(seconds: float) -> type[HeaderDeadline]:
    return type("HeaderDeadlineProtocol", (HeaderDeadline,), {"header_timeout": seconds})


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, before the model is loaded: a port that is taken or out of range is said in one
    line at once, not after a minute of loading."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError, TypeError) as exc:
        raise InvalidParameter(f"cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc}): choose "
                               "another --port (1-65535, not in use) or --host") from None
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the service it is draining as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)


def run(model_dir: Path, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
        engine: str = "auto", log_level: str = "info") -> None:
    """Load the model once and serve it until SIGTERM or Ctrl-C; returns after a graceful drain."""
    from tlearn.predict import Predictor

    sock = listen(host, port)
    try:
        predictor = Predictor.load(model_dir, engine=engine, batch_size=settings.max_batch)
    except BaseException:
        sock.close()
        raise
    app = create_app(predictor, settings)
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", log_level=log_level,
                            http=with_header_deadline(settings.timeout_s),
                            # in-flight requests end by their own timeout; the margin covers the last batch
                            timeout_graceful_shutdown=int(settings.timeout_s) + 5)
    # uvicorn re-raises the stop signal once it has drained; a SIGTERM we drained for is a clean exit (code 0)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        DrainingServer(config, app.state.service).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
