"""Per-source flood control at the SIP edge (sip.inbound.flood_limit / flood_ban_seconds).

One loopback address floods the router with new requests; the guard bans it after the
limit, counts what it drops, logs the ban once, and keeps answering every other source.
Each source is its own 127.0.0.x address (all of 127.0.0.0/8 is loopback on Linux).
"""

from __future__ import annotations

import json
import socket
import time
import uuid

import httpx
import pytest

from tests.support.router import RouterProcess

pytestmark = pytest.mark.sip

FLOODER, BYSTANDER = "127.0.0.2", "127.0.0.3"


def options(router: RouterProcess, sock: socket.socket) -> bytes:
    host, port = sock.getsockname()[:2]
    tag = uuid.uuid4().hex[:12]
    return (f"OPTIONS sip:{router.sip_address} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{tag};rport\r\n"
            f"From: <sip:probe@{host}>;tag={tag}\r\nTo: <sip:{router.sip_address}>\r\n"
            f"Call-ID: {tag}@{host}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def udp_from(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 0))
    return sock


def answered(router: RouterProcess, sock: socket.socket, timeout: float = 1.0) -> bool:
    sock.settimeout(timeout)
    sock.sendto(options(router, sock), (router.sip_host, router.sip_port))
    try:
        return sock.recv(65535).startswith(b"SIP/2.0 200")
    except OSError:
        return False


def guard_count(router: RouterProcess, action: str) -> float:
    text = httpx.get(f"{router.http_url}/metrics", timeout=5).text
    series = f'callrouter_engine_guard_total{{action="{action}"}} '
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series))


def test_a_flooding_source_is_banned_and_others_keep_being_answered(
        router_factory: type[RouterProcess]) -> None:
    router = router_factory(CALLROUTER_SIP_INBOUND_FLOOD_LIMIT="50",  # type: ignore[call-arg]
                            CALLROUTER_SIP_INBOUND_FLOOD_BAN_SECONDS="3")
    with udp_from(FLOODER) as flooder, udp_from(BYSTANDER) as bystander:
        flood_and_check(router, flooder, bystander)


def flood_and_check(router: RouterProcess, flooder: socket.socket,
                    bystander: socket.socket) -> None:
    flooder.settimeout(0.2)
    for _ in range(200):  # well within one second: 4x the limit
        flooder.sendto(options(router, flooder), (router.sip_host, router.sip_port))
    replies = 0
    with_timeout = time.monotonic() + 2.0
    while time.monotonic() < with_timeout:
        try:
            flooder.recv(65535)
            replies += 1
        except OSError:
            break
    assert 1 <= replies <= 60, f"{replies} of 200 flood requests answered"
    assert answered(router, bystander), "another source was not answered during the ban"
    assert not answered(router, flooder, timeout=0.5), "the banned source was answered"
    assert guard_count(router, "flood_ban") == 1
    assert guard_count(router, "flood_dropped") >= 140
    bans = [json.loads(line) for line in router.logs().splitlines()
            if '"sip.flood_ban"' in line]
    assert [b["source"] for b in bans] == [FLOODER], "one log line per ban"
    deadline = time.monotonic() + 6.0  # the 3 s ban runs out
    while not answered(router, flooder, timeout=0.3):
        assert time.monotonic() < deadline, "the ban did not end"
        time.sleep(0.2)


def test_flood_control_off_answers_everything(router: RouterProcess) -> None:
    with udp_from(FLOODER) as flooder:  # the default fixture turns flood control off
        flooder.settimeout(2.0)
        for _ in range(120):
            flooder.sendto(options(router, flooder), (router.sip_host, router.sip_port))
        replies = sum(1 for _ in range(120) if flooder.recv(65535).startswith(b"SIP/2.0 200"))
    assert replies == 120
    assert guard_count(router, "flood_ban") == 0
