"""The router's HTTP servers (the web console, STOW-RS intake): an ASGI application served by uvicorn in a thread of
the router process, on a socket bound before the thread starts (a taken port fails the node's start, not a thread).

    server = ServerThread("stow-http", host, port, tls=(cert, key)).serve(app)
    server.port       # the port listened on (useful with port 0)
    server.close()    # stop accepting; requests in progress get ``grace_s``

The listening socket is made with ``IPPROTO_TCP``: asyncio sets ``TCP_NODELAY`` on accepted connections only then,
and without it each answer waits for the client's delayed ACK (about 40 ms per request; bench/RESULTS.md, "DICOMweb").
TLS offers TLS 1.2 at the oldest, as the DICOM port does. uvicorn is imported when a server starts.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def tls_context(config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's context from the cert and key, offering TLS 1.2 at the oldest (as the DICOM port)."""
    context = default()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening; OSError when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only then
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """One uvicorn server in a daemon thread. ``options``: more ``uvicorn.Config`` settings (proxy headers...)."""

    def __init__(self, name: str, host: str, port: int, *, tls: tuple[Path, Path] | None = None,
                 grace_s: float = 2.0, **options: Any) -> None:
        self.name, self.host, self.requested_port, self.tls, self.grace_s = name, host, port, tls, grace_s
        self.options = options
        self.server = None
        self.socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    def serve(self, app, timeout: float = 10.0) -> ServerThread:
        """Bind (OSError when the port is taken), then serve ``app`` in a thread; returns once it accepts."""
        import uvicorn

        self.socket = listening_socket(self.host, self.requested_port)
        tls = {"ssl_certfile": str(self.tls[0]), "ssl_keyfile": str(self.tls[1]),
               "ssl_context_factory": tls_context} if self.tls else {}
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", server_header=False,
                                timeout_graceful_shutdown=max(1, round(self.grace_s)), **tls, **self.options)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name=self.name,
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def close(self) -> None:
        """Stop serving: requests in progress get ``grace_s``, then the thread is waited for (a few seconds more)."""
        if self.server is None:
            return
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.grace_s + 5)
        if self.socket is not None:
            self.socket.close()
        self.server = None
