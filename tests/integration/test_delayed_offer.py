"""Delayed offer (RFC 3261 s13.2.1, RFC 3264): INVITEs without SDP, over UDP and TCP.

A provider may send an INVITE with no body. The router must then reject it cleanly when the
number is unknown (404), unassigned (480) or the router is over capacity (503) — and keep
serving: every reject test ends with an OPTIONS that must get 200 — or, for an assigned
number, offer SDP in its 200, take the caller's answer from the ACK and carry RTP both ways.

Driven by ``sipp-scenarios/uac-invite-late-offer-reject.xml`` (``-key expected`` names the
final response) and ``uac-call-bridged-late-offer.xml`` (fails unless the 200 carries an
offer), the same files operators run against a deployment; both are checked without the
router in ``test_sipp_scenarios_selfcheck.py``.
"""

from __future__ import annotations

import httpx
import pytest

from tests.support.router import RouterProcess, media_env
from tests.support.sipp import RtpCounter, Sipp, SippResult, scenario

pytestmark = pytest.mark.sip

NUMBER = "+31850835037"
UNKNOWN = "+31850000000"
CALLER = "+31201234567"
REJECT = "uac-invite-late-offer-reject"
BRIDGED = "uac-call-bridged-late-offer"

transports = pytest.mark.parametrize("transport", ["u1", "t1"], ids=["udp", "tcp"])


def uac(router: RouterProcess, name: str, transport: str, dialled: str = NUMBER,
        expected: int | None = None, **kw: object) -> Sipp:
    keys = {"dialled": dialled, "caller": CALLER}
    if expected is not None:
        keys["expected"] = str(expected)
    return Sipp(scenario(name), target=router.sip_address, keys=keys,  # type: ignore[arg-type]
                transport=transport, **kw)


def runtime(name: str, **kw: object) -> Sipp:
    return Sipp(scenario(name), role="uas", **kw).start()  # type: ignore[arg-type]


def assign(router: RouterProcess, rt: Sipp) -> tuple[str, str]:
    assistant = router.add_assistant(f"sip:assistant@{rt.address}")
    return assistant, router.add_number(NUMBER, assistant)


def metric(router: RouterProcess, series: str) -> float:
    for line in httpx.get(f"{router.http_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no series {series}")


def explain(result: SippResult, router: RouterProcess) -> str:
    """SIPp's side, plus the router's exit code and last log lines if it is gone."""
    text = result.explain()
    if router.proc is not None and router.proc.poll() is not None:
        tail = "\n".join(router.logs().splitlines()[-6:])
        text += f"\nTHE ROUTER EXITED with {router.proc.returncode}; its log ends:\n{tail}"
    return text


def assert_no_offer(result: SippResult) -> None:
    invite = result.messages[0]
    assert invite.kind == "INVITE" and invite.direction == "sent", result.explain()
    assert invite.headers.get("content-length") == "0", invite.headers
    assert "content-type" not in invite.headers, invite.headers


def reject(router: RouterProcess, transport: str, expected: int,
           dialled: str = NUMBER) -> SippResult:
    """Send a body-less INVITE that must get ``expected``; assert the whole exchange."""
    result = uac(router, REJECT, transport, dialled, expected).run()
    assert_no_offer(result)
    assert result.ok, explain(result, router)
    assert result.sequence() == ["INVITE", 100, expected, "ACK"], explain(result, router)
    return result


def assert_still_serving(router: RouterProcess, transport: str) -> None:
    options = uac(router, "uac-options", transport, timeout_s=5).run()
    assert options.sequence() == ["OPTIONS", 200], (
        "the router stopped serving after a rejected INVITE without SDP: "
        + explain(options, router))
    assert router.proc is not None and router.proc.poll() is None, explain(options, router)


@transports
def test_unknown_number_without_sdp_gets_404(router: RouterProcess, transport: str) -> None:
    reject(router, transport, 404, dialled=UNKNOWN)
    assert_still_serving(router, transport)
    call = router.wait_for_call(lambda c: c["end_reason"] == "rejected_unknown_number")
    assert call["status"] == "failed"
    assert call["assistant_phone"] == UNKNOWN


@transports
def test_unassigned_number_without_sdp_gets_480(router: RouterProcess, transport: str) -> None:
    router.add_number(NUMBER)  # registered, no assistant
    reject(router, transport, 480)
    assert_still_serving(router, transport)
    call = router.wait_for_call(lambda c: c["end_reason"] == "rejected_unassigned")
    assert call["status"] == "failed"


@transports
def test_over_capacity_without_sdp_gets_503(router_factory: type[RouterProcess],
                                            transport: str) -> None:
    router = router_factory(CALLROUTER_SIP_MAX_CALLS="1")  # type: ignore[call-arg]
    rt = runtime("uas-runtime-answer")
    assign(router, rt)
    held = uac(router, "uac-call-bridged", transport, duration_ms=3000).start()
    router.wait_for_call(lambda c: c["status"] == "in-progress")
    reject(router, transport, 503)  # the scenario demands Retry-After on a 503
    assert_still_serving(router, transport)
    assert held.wait().ok, "the call in progress did not survive the rejected INVITE"
    assert metric(router, 'callrouter_routing_decisions_total{outcome="over_capacity"}') == 1


@transports
def test_assigned_number_without_sdp_is_bridged_with_rtp_both_ways(
        router_factory: type[RouterProcess], transport: str, media_path: str) -> None:
    router = router_factory(CALLROUTER_SIP_RING_TIMEOUT_SECONDS="3",  # type: ignore[call-arg]
                            **media_env(media_path))
    rt = runtime("uas-runtime-answer", rtp_echo=True)
    assistant, number_id = assign(router, rt)
    caller = uac(router, BRIDGED, transport, duration_ms=2000, timeout_s=20)
    with RtpCounter([caller.media_port, rt.media_port]) as rtp:
        result = caller.run()
    rt_result = rt.wait()
    assert_no_offer(result)
    # The scenario fails unless the router's 200 carries an SDP offer with PCMA.
    assert result.ok, explain(result, router)
    assert result.sequence() == ["INVITE", 100, 180, 200, "ACK", "BYE", 200], result.explain()
    ok = next(m for m in result.messages if m.direction == "received" and m.kind == 200)
    assert ok.headers.get("content-type") == "application/sdp", ok.headers
    ack = next(m for m in result.messages if m.kind == "ACK")
    assert ack.headers.get("content-type") == "application/sdp", ack.headers  # the answer
    assert rt_result.sequence("received")[:2] == ["INVITE", "ACK"], rt_result.explain()
    # The caller's audio (answered in the ACK) reached the runtime through the router, and
    # the runtime's echo came back to the port the caller gave in its answer.
    assert rtp.count(rt.media_port) > 20, "no RTP reached the runtime"
    assert rtp.count(caller.media_port) > 20, "no RTP came back to the caller"
    relayed = metric(router, 'callrouter_media_relay_packets_total{kind="rtp"}')
    assert (relayed > 20) == (media_path == "relay"), relayed  # relayed once answered in ACK
    call = router.wait_for_call(lambda c: c["status"] == "ended")
    assert call["end_reason"] == "caller_hangup"
    assert call["assistant_id"] == assistant and call["number_id"] == number_id
    assert call["caller_phone"] == CALLER and call["assistant_phone"] == NUMBER
    assert call["duration_seconds"] >= 1
