"""What the engine's guard module answers at the edges of the protocol: what OPTIONS
advertises, RFC 5626 keep-alives, and messages too large to handle (RFC 3261 s21.5.14)."""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from tests.integration.test_router_sip import CALLER, NUMBER
from tests.support.router import RouterProcess
from tests.support.sipp import Sipp, scenario

pytestmark = pytest.mark.sip


def request(router: RouterProcess, method: str, proto: str, local: tuple[str, int],
            pad: int = 0) -> bytes:
    tag = uuid.uuid4().hex[:12]
    host, port = local[:2]
    extra = f"X-Pad: {'p' * pad}\r\n" if pad else ""
    return (f"{method} sip:{NUMBER}@{router.sip_address} SIP/2.0\r\n"
            f"Via: SIP/2.0/{proto} {host}:{port};branch=z9hG4bK{tag};rport\r\n"
            f"From: <sip:{CALLER}@{host}>;tag={tag}\r\nTo: <sip:{NUMBER}@{router.sip_address}>\r\n"
            f"Call-ID: {tag}@{host}\r\nCSeq: 1 {method}\r\nMax-Forwards: 70\r\n"
            f"Contact: <sip:{CALLER}@{host}:{port}>\r\n{extra}Content-Length: 0\r\n\r\n").encode()


def udp_exchange(router: RouterProcess, build: object) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(3)
        sock.sendto(build(sock.getsockname()), (router.sip_host, router.sip_port))  # type: ignore[operator]
        return sock.recv(65535).decode()


def tcp_read(sock: socket.socket, until: bytes, timeout: float = 3.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while until not in data and time.monotonic() < deadline:
        chunk = sock.recv(65535)
        if not chunk:
            break
        data += chunk
    return data


def headers(response: str) -> dict[str, str]:
    lines = response.split("\r\n\r\n", 1)[0].split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_options_advertises_only_what_the_router_does(router: RouterProcess) -> None:
    response = udp_exchange(router, lambda local: request(router, "OPTIONS", "UDP", local))
    assert response.startswith("SIP/2.0 200")
    h = headers(response)
    allow = {m.strip() for m in h["allow"].split(",")}
    assert allow == {"INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "INFO", "UPDATE", "PRACK"}
    assert "allow-events" not in h, "SUBSCRIBE and REFER are refused: no event packages"
    assert {s.strip() for s in h["supported"].split(",")} <= {"100rel", "timer"}
    assert {a.strip() for a in h["accept"].split(",")} == {"application/sdp",
                                                           "application/dtmf-relay"}


def test_a_crlf_keepalive_ping_on_tcp_gets_its_pong(router: RouterProcess) -> None:
    with socket.create_connection((router.sip_host, router.sip_port), timeout=3) as sock:
        sock.sendall(b"\r\n\r\n")
        assert tcp_read(sock, b"\r\n") == b"\r\n"  # RFC 5626 s3.5.1: one CRLF back
        sock.sendall(request(router, "OPTIONS", "TCP", sock.getsockname()))
        assert tcp_read(sock, b"\r\n\r\n").startswith(b"SIP/2.0 200"), "connection still usable"


def test_a_request_after_leading_crlfs_in_a_datagram_is_answered(router: RouterProcess) -> None:
    response = udp_exchange(
        router, lambda local: b"\r\n\r\n" + request(router, "OPTIONS", "UDP", local))
    assert response.startswith("SIP/2.0 200")


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_an_invite_above_the_size_limit_gets_513(router: RouterProcess, transport: str) -> None:
    sipp = Sipp(scenario("uac-invite-513-too-large"), target=router.sip_address,
                keys={"dialled": NUMBER, "caller": CALLER}, transport=transport)
    result = sipp.run()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 513, "ACK"]


def test_a_tcp_message_beyond_the_transport_buffer_gets_513(router: RouterProcess) -> None:
    with socket.create_connection((router.sip_host, router.sip_port), timeout=3) as sock:
        message = request(router, "INVITE", "TCP", sock.getsockname(), pad=100_000)
        sock.sendall(message)
        assert tcp_read(sock, b"\r\n\r\n").startswith(b"SIP/2.0 513")
    options = udp_exchange(router, lambda local: request(router, "OPTIONS", "UDP", local))
    assert options.startswith("SIP/2.0 200")


def test_the_size_limit_is_a_setting(router_factory: type[RouterProcess]) -> None:
    router = router_factory(CALLROUTER_SIP_MAX_MESSAGE_BYTES="2000")  # type: ignore[call-arg]
    small = udp_exchange(router, lambda local: request(router, "OPTIONS", "UDP", local))
    assert small.startswith("SIP/2.0 200")
    large = udp_exchange(router, lambda local: request(router, "OPTIONS", "UDP", local, 2500))
    assert large.startswith("SIP/2.0 513")
