#!/usr/bin/env python3
"""Send generated parser-breaking SIP messages to a SIP server; check it answers after each.

    python scripts/sip-fuzz.py --target 127.0.0.1:5060 [--transport udp|tcp] [--family NAME]...
    python scripts/sip-fuzz.py --list [--family NAME]...

The messages come from tests/support/sipfuzz.py (the generator the integration test
tests/integration/test_fuzz_survival.py uses). After each message a fresh OPTIONS goes to the
target over UDP; one line per message says what the message got back and whether the OPTIONS
got 200. Over UDP, messages larger than one datagram (65,507 bytes) are skipped; over TCP each
message has a connection of its own, closed after its final answer, the server's close or
--wait seconds. Exit status 0 when the target answered after every message, 1 when it stopped
answering (the run stops there unless --keep-going). Send it only to a server you run.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import sipfuzz


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _answer(replies: list[bytes]) -> int | None:
    """The final status among the replies, else the last provisional one."""
    statuses = [s for s in map(sipfuzz.status_of, replies) if s is not None]
    finals = [s for s in statuses if s >= 200]
    return finals[0] if finals else (statuses[-1] if statuses else None)


def options(host: str, port: int, timeout: float) -> int | None:
    """A fresh OPTIONS (new socket, branch, Call-ID) over UDP: its final status, or None."""
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))  # picks the source address the target will answer
        local_host, local_port = sock.getsockname()[:2]
        token = uuid.uuid4().hex
        ids = sipfuzz.Ids(f"z9hG4bK{token}", f"{token}@sip-fuzz", token[:10])
        bracketed = f"[{local_host}]" if ":" in local_host else local_host
        ctx = sipfuzz.Context(host=host, port=port, sent_by=f"{bracketed}:{local_port}")
        sock.send(sipfuzz.request(ctx, "OPTIONS", ids=ids).render())
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


def list_families(ctx: sipfuzz.Context, families: list[str] | None) -> None:
    chosen = families or list(sipfuzz.FAMILIES)
    for name in chosen:
        messages = list(sipfuzz.generate(ctx, [name]))
        doc = (sipfuzz.FAMILIES[name].__doc__ or "").strip().split("\n")[0]
        print(f"{name:15} {len(messages):4} messages  {doc}")
        if families:
            for message in messages:
                print(f"    {message.name}  ({len(message.data)} bytes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--target", type=parse_target, help="host:port of the SIP server")
    parser.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    parser.add_argument("--family", action="append", choices=list(sipfuzz.FAMILIES),
                        help="a message family (repeatable; default: all)")
    parser.add_argument("--list", action="store_true", help="list the families and exit")
    parser.add_argument("--wait", type=float, default=0.2,
                        help="TCP: seconds to wait for an answer or a close (default 0.2)")
    parser.add_argument("--options-timeout", type=float, default=2.0,
                        help="seconds the OPTIONS after each message may take (default 2)")
    parser.add_argument("--salt", default=None,
                        help="salt of branches and Call-IDs (default: random; give one to "
                             "repeat a run byte for byte)")
    parser.add_argument("--keep-going", action="store_true",
                        help="go on after the target stopped answering")
    args = parser.parse_args(argv)
    host, port = args.target or ("127.0.0.1", 5060)
    salt = args.salt or uuid.uuid4().hex[:12]
    ctx = sipfuzz.Context(host=host, port=port, transport=args.transport, salt=salt)
    if args.list:
        list_families(ctx, args.family)
        return 0
    if args.target is None:
        parser.error("--target is required (or --list)")

    print(f"# sip-fuzz {args.transport} -> {host}:{port}  salt={salt}", flush=True)
    if options(host, port, args.options_timeout) != 200:
        print("target does not answer OPTIONS with 200 before the first message")
        return 1
    sent = skipped = failed = 0
    for message in sipfuzz.generate(ctx, args.family):
        size = len(message.data)
        if args.transport == "udp" and size > sipfuzz.UDP_MAX_PAYLOAD:
            skipped += 1
            print(f"SKIP {message.label}  {size} B  larger than one UDP datagram", flush=True)
            continue
        if args.transport == "udp":
            replies, status = send_udp(host, port, message.data, args.options_timeout)
        else:
            replies = send_tcp(host, port, message.data, args.wait)
            status = options(host, port, args.options_timeout)
        sent += 1
        answer = _answer(replies)
        verdict = "ok  " if status == 200 else "FAIL"
        print(f"{verdict} {message.label}  {size} B  answer {answer or '-'}  "
              f"OPTIONS {status or 'none'}", flush=True)
        if status != 200:
            failed += 1
            if not args.keep_going:
                print(f"# the target stopped answering after {message.label}")
                break
    print(f"# {sent} sent, {skipped} skipped, {failed} followed by no OPTIONS 200")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
