"""Start-up checks that turn the OS's refusal into one line naming what and where.

The composition root (``app``) runs these before it starts what they guard, so a taken
port or an unusable data directory ends the start with ``StartupError`` ("cannot listen
for HTTP on 127.0.0.1:8080/tcp: address already in use") instead of a traceback, or a
half-started router. The SIP listener's equivalent is raised by the SIP adapter, which
owns those sockets; the database's by the store.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from callrouter.config import HostPort
from callrouter.errors import StartupError

BACKLOG = 2048  # uvicorn's default


def reason(exc: OSError) -> str:
    """The OS's words for ``exc`` ("address already in use"), without errno or path."""
    # os.strerror: socket.create_server appends "(while attempting to bind ...)" to strerror
    text = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def http_listener(listen: HostPort) -> socket.socket:
    """The API's listening socket, bound now; uvicorn serves on it once the rest is up."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        sock = socket.create_server((listen.host, listen.port), family=family,
                                    backlog=BACKLOG)
    except OSError as exc:
        raise StartupError(f"cannot listen for HTTP on {listen}/tcp: {reason(exc)}") from exc
    # Accepted sockets inherit this. asyncio sets it only when the socket's proto is
    # IPPROTO_TCP, which create_server's is not (0): without it a response written in two
    # parts waits for the client's delayed ACK, 40 ms on every keep-alive request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def writable_dir(path: Path) -> None:
    """Create ``path`` if need be and prove a file can be made in it. Mode bits alone do
    not tell (root ignores them); a read-only mount or a file in the way do."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise StartupError(f"cannot write to the data directory {path}: {reason(exc)}") from exc
