"""The API's listening socket."""

from __future__ import annotations

import socket

from callrouter.config import HostPort
from callrouter.startup import http_listener


def test_accepted_connections_send_without_nagle() -> None:
    """Guards the 40 ms per keep-alive request: asyncio does not set TCP_NODELAY on
    sockets accepted from a listener whose proto is 0, so the listener carries it."""
    listener = http_listener(HostPort("127.0.0.1", 0))
    try:
        client = socket.create_connection(listener.getsockname()[:2])
        accepted, _ = listener.accept()
        with client, accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listener.close()
