"""Every generated fuzz message to the real router, over UDP and over TCP: it must stay up.

``tests/support/sipfuzz.py`` builds the messages, family by family (sizes around buffer
limits, long values, deep SDP and multipart, bad Content-Length, truncation, NUL bytes, line
ends, body-less INVITEs, unsolicited responses, odd methods, seeded mutations). After every
message the router process must still run and answer a fresh OPTIONS (new UDP socket, new
branch and Call-ID) with 200 within 2 s. What the router answers to the fuzz message itself
is not judged, except by ``test_udp_invite_over_the_size_limit_gets_513``.
``scripts/sip-fuzz.py`` sends the same messages to any deployment.

UDP: one datagram per message (messages over 65,507 bytes cannot be sent and are skipped),
from a socket of its own; a final non-2xx answer to an INVITE is ACKed. TCP: a connection per
message, closed once a final answer came, the router closed, or ``TCP_WAIT_S`` passed.
"""

from __future__ import annotations

import collections

import pytest

from tests.support import sipfuzz, sipwire
from tests.support.router import RouterProcess

pytestmark = pytest.mark.sip

HOST = "127.0.0.1"
OPTIONS_WAIT_S = 2.0
TCP_WAIT_S = 0.05  # for an answer or a close; most messages get their final answer sooner


def _log_tail(router: RouterProcess, lines: int = 30) -> str:
    text = router.logs().splitlines()[-lines:]
    return "\n".join(line[:400] for line in text)


def _failure(router: RouterProcess, message: sipfuzz.FuzzMessage, transport: str,
             status: int | None) -> str:
    assert router.proc is not None
    code = router.proc.poll()
    what = (f"killed the router (exit code {code})" if code is not None
            else f"left the router running but the follow-up OPTIONS got {status}, not 200")
    return (f"family={message.family} message={message.name} ({len(message.data)} bytes over "
            f"{transport}) {what}\nfirst bytes: {message.data[:160]!r}\n"
            f"--- tail of {router.log_path} ---\n{_log_tail(router)}")


def _survives_everything(router: RouterProcess, transport: str) -> collections.Counter[str]:
    assert router.proc is not None
    assert sipwire.options(HOST, router.sip_port, OPTIONS_WAIT_S) == 200
    ctx = sipfuzz.Context(host=HOST, port=router.sip_port, transport=transport)
    sent: collections.Counter[str] = collections.Counter()
    for message in sipfuzz.generate(ctx):
        if transport == "udp" and len(message.data) > sipfuzz.UDP_MAX_PAYLOAD:
            continue  # cannot be one datagram
        if transport == "udp":
            status = sipwire.send_udp(HOST, router.sip_port, message.data, OPTIONS_WAIT_S)[1]
        else:
            sipwire.send_tcp(HOST, router.sip_port, message.data, TCP_WAIT_S)
            status = sipwire.options(HOST, router.sip_port, OPTIONS_WAIT_S)
        alive = router.proc.poll() is None
        assert alive and status == 200, _failure(router, message, transport, status)
        sent[message.family] += 1
    return sent


def test_router_survives_every_fuzz_message_over_udp(router: RouterProcess) -> None:
    sent = _survives_everything(router, "udp")
    assert set(sent) == set(sipfuzz.FAMILIES)
    assert sum(sent.values()) >= 500


def test_router_survives_every_fuzz_message_over_tcp(router: RouterProcess) -> None:
    sent = _survives_everything(router, "tcp")
    assert set(sent) == set(sipfuzz.FAMILIES)
    assert sum(sent.values()) >= 500


def test_generator_is_deterministic_exact_and_fits() -> None:
    for transport in ("udp", "tcp"):
        ctx = sipfuzz.Context(port=5060, transport=transport)
        messages = list(sipfuzz.generate(ctx))
        again = list(sipfuzz.generate(sipfuzz.Context(port=5060, transport=transport)))
        assert messages == again
        labels = [m.label for m in messages]
        assert len(labels) == len(set(labels)), "message names must be unique"
        assert {m.family for m in messages} == set(sipfuzz.FAMILIES)
        # A family's bytes do not depend on the families generated before it.
        assert list(sipfuzz.generate(ctx, ["mutations"])) == [
            m for m in messages if m.family == "mutations"]
        for m in messages:
            if m.family == "sizes" and not m.name.startswith("cut"):
                assert len(m.data) == int(m.name.rsplit("-", 1)[1]), m.label
        too_big = {m.label for m in messages if len(m.data) > sipfuzz.UDP_MAX_PAYLOAD}
        if transport == "udp":  # only the sizes beyond a datagram; counts shrink to fit
            assert too_big == {f"sizes/{kind}-{size}" for size in (70_000, 200_000)
                               for kind in ("invite-header", "invite-sdp", "options-header")}
