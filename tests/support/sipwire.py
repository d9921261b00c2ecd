"""Sending the fuzz generator's messages to a SIP server: an OPTIONS probe, one datagram,
or one TCP connection per message. The I/O half of ``sipfuzz`` (which only builds bytes),
shared by ``scripts/sip-fuzz.py`` and ``tests/integration/test_fuzz_survival.py``."""

from __future__ import annotations

import contextlib
import socket
import time
import uuid

from tests.support import sipfuzz


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def options(host: str, port: int, timeout: float, *, to_user: bool = True) -> int | None:
    """A fresh OPTIONS (new socket, branch, Call-ID) over UDP: its final status, or None.
    ``to_user=False`` addresses the server itself (no user part: a proxy answers it)."""
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))  # picks the source address the target will answer
        local_host, local_port = sock.getsockname()[:2]
        token = uuid.uuid4().hex
        ids = sipfuzz.Ids(f"z9hG4bK{token}", f"{token}@sip-fuzz", token[:10])
        bracketed = f"[{local_host}]" if ":" in local_host else local_host
        ctx = sipfuzz.Context(host=host, port=port, sent_by=f"{bracketed}:{local_port}")
        message = sipfuzz.request(ctx, "OPTIONS", ids=ids)
        if not to_user:
            message.start = f"OPTIONS sip:{ctx.hostport} SIP/2.0".encode()
        sock.send(message.render())
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                reply = sock.recv(65_535)
            except OSError:
                return None
            status = sipfuzz.status_of(reply)
            if status is not None and status >= 200 and ids.branch.encode() in reply:
                return status
    return None


def send_udp(host: str, port: int, data: bytes, options_wait: float) -> tuple[list[bytes],
                                                                             int | None]:
    """One datagram, then the OPTIONS probe; (replies to the datagram, OPTIONS status)."""
    replies = []
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        sock.sendto(data, (host, port))
        status = options(host, port, options_wait)
        sock.setblocking(False)  # answers to the message came before the OPTIONS answer
        with contextlib.suppress(OSError):
            while reply := sock.recv(65_535):
                replies.append(reply)
                if ack := sipfuzz.ack_for(data, reply):
                    sock.sendto(ack, (host, port))
    return replies, status


def send_tcp(host: str, port: int, data: bytes, wait: float) -> list[bytes]:
    """A connection of its own: send, read until a final answer, a close or ``wait`` s."""
    replies: list[bytes] = []
    try:
        sock = socket.create_connection((host, port), timeout=2.0)
    except OSError:
        return replies
    with sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        buffer = b""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65_535)
            except OSError:
                break
            if not chunk:
                break
            buffer += chunk
            reply, buffer = sipfuzz.split_stream(buffer)
            while reply is not None:
                replies.append(reply)
                if (sipfuzz.status_of(reply) or 0) >= 200:
                    if ack := sipfuzz.ack_for(data, reply):
                        with contextlib.suppress(OSError):
                            sock.sendall(ack)
                    return replies
                reply, buffer = sipfuzz.split_stream(buffer)
    return replies
