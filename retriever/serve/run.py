"""Running the app under uvicorn with limits on slow and numerous connections.

uvicorn waits forever for a request's headers and body: a client trickling one byte a second
(slow loris) holds its connection, and its `--max-pending` slot, indefinitely. The protocol
below gives each request `read_timeout_s` from its first byte (or from the connection's
opening) to arrive whole, then closes the connection.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from retriever.errors import MissingExtraError, RetrieverError

if TYPE_CHECKING:
    from retriever.serve.app import ServerSettings


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` (not yet listening), so a taken port fails before models load.

    Raises:
        RetrieverError: the address cannot be bound (in use, or not this machine's).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise RetrieverError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def timed_protocol(read_timeout_s: float):
    """uvicorn's h11 protocol, closing connections whose request takes over `read_timeout_s` to arrive."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _read_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def connection_lost(self, exc) -> None:
            self._stop_watch()
            super().connection_lost(exc)

        def _watch(self) -> None:
            # Waiting for (more of) a request: IDLE before the headers end, SEND_BODY during the body.
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                if self._read_timer is None:
                    self._read_timer = self.loop.call_later(read_timeout_s, self._too_slow)
            else:
                self._stop_watch()

        def _stop_watch(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _too_slow(self) -> None:
            self._read_timer = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol


def serve(app, sock: socket.socket, settings: ServerSettings) -> None:
    """Serve `app` on the bound `sock` until interrupted (Ctrl-C, SIGTERM)."""
    try:
        import uvicorn
    except ImportError:
        raise MissingExtraError("the server needs its extra: pip install 'retriever[serve]'") from None
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=timed_protocol(settings.read_timeout_s),
        # Connections beyond this get uvicorn's 503 at once: pending queries plus room for
        # the page, /healthz and refusals, but not unbounded.
        limit_concurrency=settings.max_pending + settings.spare_connections,
        timeout_keep_alive=int(settings.keep_alive_s),
        h11_max_incomplete_event_size=16 * 1024,  # headers larger than this get 400
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    uvicorn.Server(config).run(sockets=[sock])
