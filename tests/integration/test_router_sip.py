"""The real router between SIPp instances: whole response sequences, records, RTP.

Each test starts the router on free loopback ports (``router`` fixture) and drives it
with the scenarios in ``sipp-scenarios/`` — the same files operators run against
their own deployment.
"""

from __future__ import annotations

import itertools
import re
import socket
import time

import httpx
import pytest

from tests.support.router import RouterProcess, media_env
from tests.support.sipp import RtpCounter, RtpHeader, Sipp, SippResult, scenario

pytestmark = pytest.mark.sip

NUMBER = "+31850835037"
CALLER = "+31201234567"


def uac(router: RouterProcess, name: str, dialled: str = NUMBER, caller: str = CALLER,
        **kw: object) -> Sipp:
    keys = {"dialled": dialled, "caller": caller}
    return Sipp(scenario(name), target=router.sip_address, keys=keys, **kw)  # type: ignore[arg-type]


def runtime(name: str, **kw: object) -> Sipp:
    return Sipp(scenario(name), role="uas", **kw).start()  # type: ignore[arg-type]


def assign(router: RouterProcess, rt: Sipp | None, number: str = NUMBER) -> tuple[str, str]:
    uri = f"sip:assistant@{rt.address}" if rt else None
    assistant = router.add_assistant(uri)
    return assistant, router.add_number(number, assistant)


def metric(router: RouterProcess, series: str) -> float:
    for line in httpx.get(f"{router.http_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no series {series}")


RELAYED_RTP = 'callrouter_media_relay_packets_total{kind="rtp"}'


@pytest.fixture
def media_router(router_factory: type[RouterProcess], media_path: str) -> RouterProcess:
    return router_factory(CALLROUTER_SIP_RING_TIMEOUT_SECONDS="3",  # type: ignore[call-arg]
                          **media_env(media_path))


def echo_call(router: RouterProcess, runtime_scenario: str, duration_ms: int
              ) -> tuple[SippResult, RtpCounter, Sipp, Sipp]:
    """A bridged call from ``uac-call-bridged`` (PCMA audio) to an echoing runtime, with
    the RTP towards both far ends recorded: (caller's result, packets, caller, runtime)."""
    rt = runtime(runtime_scenario, rtp_echo=True)
    assign(router, rt)
    caller = uac(router, "uac-call-bridged", duration_ms=duration_ms)
    with RtpCounter([caller.media_port, rt.media_port]) as rtp:
        result = caller.run()
    assert result.ok, result.explain()
    return result, rtp, caller, rt


def assert_path(router: RouterProcess, media_path: str) -> None:
    """The call's packets took ``media_path``: the relay moved packets, or none."""
    relayed = metric(router, RELAYED_RTP)
    by_thread = metric(router, "callrouter_media_relay_thread_packets_total")
    if media_path == "relay":
        assert relayed > 20, "the same-codec legs were not relayed"
        # Plain UDP on both legs: a relay thread moved them, not the media thread.
        assert by_thread > 20, by_thread
    else:
        assert relayed == 0, "sip.media_relay = false, yet packets were relayed"
        assert by_thread == 0, by_thread


def assert_one_stream(headers: list[RtpHeader], what: str) -> None:
    """What one far end received is one RTP stream (RFC 3550 s5.1): a single SSRC,
    sequence numbers that go up by one (a few lost at most) and timestamps that never
    go back, whichever leg or path the packets came from."""
    assert len(headers) > 20, f"{what}: only {len(headers)} packets"
    ssrcs = {h.ssrc for h in headers}
    assert len(ssrcs) == 1, f"{what}: {len(ssrcs)} SSRCs"
    for prev, cur in itertools.pairwise(headers):
        step = (cur.seq - prev.seq) & 0xFFFF
        assert 1 <= step <= 3, f"{what}: sequence {prev.seq} -> {cur.seq}"
        assert (cur.ts - prev.ts) & 0xFFFFFFFF < 0x80000000, (
            f"{what}: timestamp {prev.ts} -> {cur.ts} went back")


def test_options_answered_200(router: RouterProcess) -> None:
    result = uac(router, "uac-options").run()
    assert result.ok, result.explain()
    assert result.sequence() == ["OPTIONS", 200]


def test_unknown_number_gets_100_then_404(router: RouterProcess) -> None:
    result = uac(router, "uac-invite-404", dialled="+31850000000").run()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 100, 404, "ACK"]
    call = router.wait_for_call(lambda c: c["end_reason"] == "rejected_unknown_number")
    assert call["status"] == "failed"
    assert call["assistant_phone"] == "+31850000000"


def test_not_a_number_gets_404(router: RouterProcess) -> None:
    result = uac(router, "uac-invite-404", dialled="alice").run()
    assert result.sequence() == ["INVITE", 100, 404, "ACK"], result.explain()


def test_bridged_call_rings_answers_and_carries_rtp_both_ways(media_router: RouterProcess,
                                                             media_path: str) -> None:
    router = media_router
    rt = runtime("uas-runtime-answer", rtp_echo=True)
    assistant, number_id = assign(router, rt)
    caller = uac(router, "uac-call-bridged", duration_ms=2000)
    with RtpCounter([caller.media_port, rt.media_port]) as rtp:
        result = caller.run()
    rt_result = rt.wait()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 100, 180, 200, "ACK", "BYE", 200]
    assert rt_result.sequence("received")[:2] == ["INVITE", "ACK"], rt_result.explain()
    # The caller's audio reached the runtime through the router, and the runtime's echo
    # came back to the caller through the router.
    assert rtp.count(rt.media_port) > 20, "no RTP reached the runtime"
    assert rtp.count(caller.media_port) > 20, "no RTP came back to the caller"
    assert_one_stream(rtp.headers(rt.media_port), "the runtime")
    assert_one_stream(rtp.headers(caller.media_port), "the caller")
    assert_path(router, media_path)
    call = router.wait_for_call(lambda c: c["status"] == "ended")
    assert call["end_reason"] == "caller_hangup"
    assert call["assistant_id"] == assistant and call["number_id"] == number_id
    assert call["caller_phone"] == CALLER and call["assistant_phone"] == NUMBER
    assert call["duration_seconds"] >= 1


def test_offer_with_more_media_lines_than_call_media_slots_is_bridged(
    router: RouterProcess,
) -> None:
    """Six m-lines (the engine keeps 4 call media per call, config_site.h): the audio line
    is answered and bridged, every other line answered with port 0 (the scenario checks
    the 200's SDP), and no engine assertion fires."""
    rt = runtime("uas-runtime-answer", rtp_echo=True)
    assign(router, rt)
    caller = uac(router, "uac-call-bridged-many-media", duration_ms=2000)
    with RtpCounter([caller.media_port, rt.media_port]) as rtp:
        result = caller.run()
    rt.wait()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 100, 180, 200, "ACK", "BYE", 200]
    assert rtp.count(rt.media_port) > 20, "no RTP reached the runtime"
    assert rtp.count(caller.media_port) > 20, "no RTP came back to the caller"
    assert metric(router, "callrouter_engine_assertions_total") == 0


def test_runtime_invite_carries_the_routing_headers(router: RouterProcess) -> None:
    rt = runtime("uas-runtime-answer")
    assistant, number_id = assign(router, rt)
    assert uac(router, "uac-call-bridged", duration_ms=200).run().ok
    invite = rt.wait().messages[0]
    headers = invite.headers
    assert invite.first_line.startswith(f"INVITE sip:{assistant}@")
    assert headers["x-assistant-id"] == assistant
    assert headers["x-number-id"] == number_id
    assert headers["x-caller-number"] == CALLER
    assert headers["x-dialled-number"] == NUMBER
    call = router.wait_for_call(lambda c: c["status"] == "ended")
    assert headers["x-call-id"] == call["id"]


def test_assigning_and_unassigning_changes_the_very_next_invite(router: RouterProcess) -> None:
    rt = runtime("uas-runtime-answer", calls=1)
    assistant = router.add_assistant(f"sip:a@{rt.address}")
    number_id = router.add_number(NUMBER)  # registered, no assistant
    assert uac(router, "uac-invite-480").run().sequence() == ["INVITE", 100, 480, "ACK"]
    assert router.api("PATCH", f"/numbers/{number_id}",
                      json={"agent_id": assistant}).status_code == 200
    assert uac(router, "uac-call-bridged", duration_ms=200).run().ok
    assert router.api("PATCH", f"/numbers/{number_id}",
                      json={"assistant_id": None}).status_code == 200
    assert uac(router, "uac-invite-480").run().sequence() == ["INVITE", 100, 480, "ACK"]
    assert router.api("PATCH", f"/numbers/{number_id}",
                      json={"assistant_id": assistant, "is_active": False}).status_code == 200
    assert uac(router, "uac-invite-480").run().sequence() == ["INVITE", 100, 480, "ACK"]
    assert router.api("DELETE", f"/numbers/{number_id}").status_code == 200
    assert uac(router, "uac-invite-404").run().sequence() == ["INVITE", 100, 404, "ACK"]


def test_runtime_refusal_fails_over_then_503(router: RouterProcess) -> None:
    first = runtime("uas-runtime-refuse")
    assign(router, first)
    result = uac(router, "uac-invite-runtime-fail").run()
    assert result.ok, result.explain()
    assert result.sequence()[:2] == ["INVITE", 100]
    assert result.sequence()[-2:] == [503, "ACK"]
    call = router.wait_for_call(lambda c: c["status"] == "failed")
    assert call["end_reason"] == "runtime_unavailable"
    assert "503" in (call["error"] or "")


def test_runtime_not_answering_times_out_to_503(router: RouterProcess) -> None:
    rt = runtime("uas-runtime-noanswer")  # rings, never answers; ring timeout is 3 s here
    assign(router, rt)
    started = time.monotonic()
    result = uac(router, "uac-invite-runtime-fail", timeout_s=15).run()
    assert result.sequence() == ["INVITE", 100, 180, 503, "ACK"], result.explain()
    assert time.monotonic() - started >= 2.5
    assert "CANCEL" in rt.wait().sequence("received")


def test_unreachable_runtime_gets_503(router: RouterProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assistant = router.add_assistant(f"sip:a@127.0.0.1:{port};transport=tcp")
    router.add_number(NUMBER, assistant)
    result = uac(router, "uac-invite-runtime-fail").run()
    assert result.sequence() == ["INVITE", 100, 503, "ACK"], result.explain()


@pytest.mark.parametrize("caller", [CALLER, "+1" + "5" * 200], ids=["short", "long-caller"])
def test_a_udp_runtime_gets_its_invite_over_udp_not_tcp(router: RouterProcess,
                                                       caller: str) -> None:
    """A runtime URI without ;transport means UDP. pjsip's default sends a request of 1300
    bytes or more over TCP first (RFC 3261 s18.1.1), to whatever answers TCP on the
    runtime's port: in a CI run that was the router's own TCP client socket, whose
    ephemeral port happened to be the runtime's, connected to itself, so every later
    INVITE came back into the router (404 there, 503 to the caller). The engine is built
    without that switch (PJSIP_DONT_SWITCH_TO_TCP), and the offer is audio only; a TCP
    listener on the runtime's port stands in for that socket. A 200-digit caller number
    makes the runtime's INVITE longer than 1300 bytes."""
    rt = runtime("uas-runtime-answer")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", rt.port))  # SIPp holds the UDP port only
        squatter.listen(4)
        squatter.setblocking(False)
        assign(router, rt)
        result = uac(router, "uac-call-bridged", caller=caller, duration_ms=500).run()
        assert result.ok, result.explain()
        with pytest.raises(BlockingIOError):
            squatter.accept()  # the router never connected over TCP
    offer = (rt.wait().workdir / "uas-runtime-answer.msg.log").read_text()
    assert "m=audio" in offer and "m=text" not in offer  # no unused T.140 stream
    sizes = [int(n) for n in re.findall(r"UDP message received \[(\d+)\] bytes :\s+INVITE ", offer)]
    assert sizes, "the runtime got no INVITE over UDP"
    if caller != CALLER:
        assert sizes[0] > 1300, sizes  # over pjsip's switch to TCP, and still UDP


def test_caller_cancel_while_ringing_cancels_the_runtime_leg(router: RouterProcess) -> None:
    rt = runtime("uas-runtime-noanswer")
    assign(router, rt)
    result = uac(router, "uac-call-cancel").run()
    assert result.ok, result.explain()
    assert "CANCEL" in rt.wait().sequence("received")
    call = router.wait_for_call(lambda c: c["status"] in ("ended", "failed"))
    assert call["end_reason"] == "caller_cancelled"


def test_runtime_hangup_sends_bye_to_the_caller(router: RouterProcess) -> None:
    rt = runtime("uas-runtime-hangup")
    assign(router, rt)
    result = uac(router, "uac-call-remote-bye").run()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 100, 180, 200, "ACK", "BYE", 200]
    call = router.wait_for_call(lambda c: c["status"] == "ended")
    assert call["end_reason"] == "assistant_hangup"


def test_reinvite_hold_keeps_the_call(media_router: RouterProcess) -> None:
    router = media_router
    rt = runtime("uas-runtime-answer")
    assign(router, rt)
    result = uac(router, "uac-call-reinvite-hold").run()
    assert result.ok, result.explain()
    assert result.sequence().count(200) >= 3  # INVITE, re-INVITE and BYE all answered 200
    call = router.wait_for_call(lambda c: c["status"] == "ended")
    assert call["end_reason"] == "caller_hangup"


def test_a_codec_change_mid_call_keeps_one_stream_towards_the_caller(
        media_router: RouterProcess, media_path: str) -> None:
    """The runtime re-INVITEs to PCMU while the caller talks PCMA: a relayed call moves to
    the switchboard (transcoding) and the caller's stream goes on unbroken; the runtime
    gets PCMU from then on."""
    router = media_router
    _, rtp, caller, rt = echo_call(router, "uas-runtime-reinvite-pcmu", 3000)
    assert rt.wait().ok
    assert_one_stream(rtp.headers(caller.media_port), "the caller")
    assert rtp.count(rt.media_port, payload_type=0) > 20, "no PCMU after the re-INVITE"
    relayed = metric(router, RELAYED_RTP)
    assert (relayed > 20) == (media_path == "relay"), relayed  # relayed before the change


def test_rfc4733_dtmf_reaches_the_runtime(media_router: RouterProcess) -> None:
    router = media_router
    rt = runtime("uas-runtime-answer")
    assign(router, rt)
    caller = uac(router, "uac-call-dtmf")
    with RtpCounter([rt.media_port]) as rtp:
        result = caller.run()
    assert result.ok, result.explain()
    assert rtp.events(rt.media_port), "no RFC 4733 telephone-event reached the runtime"


def test_sip_info_dtmf_reaches_the_runtime_as_rfc4733(media_router: RouterProcess) -> None:
    router = media_router
    rt = runtime("uas-runtime-answer")
    assign(router, rt)
    caller = uac(router, "uac-call-dtmf-info", duration_ms=1000)  # talk time after the INFO
    with RtpCounter([rt.media_port]) as rtp:
        result = caller.run()
    assert result.ok, result.explain()
    assert rtp.events(rt.media_port), "SIP INFO DTMF was not relayed as RFC 4733"
    assert_one_stream(rtp.headers(rt.media_port), "the runtime")  # events in its stream


def test_sip_info_dtmf_from_a_silent_caller_reaches_the_runtime(media_router: RouterProcess
                                                                ) -> None:
    """No caller packet to carry it: the digit still goes out as RFC 4733 (on the relay,
    from the engine's own DTMF clock), in one stream with what else the runtime gets."""
    router = media_router
    rt = runtime("uas-runtime-answer")
    assign(router, rt)
    caller = uac(router, "uac-call-dtmf-info-silent", duration_ms=1000)
    with RtpCounter([rt.media_port]) as rtp:
        result = caller.run()
    assert result.ok, result.explain()
    assert rtp.events(rt.media_port) == [5], rtp.events(rt.media_port)
    events = [h for h in rtp.headers(rt.media_port) if h.pt == 101]
    assert len({h.ssrc for h in events}) == 1 and events[0].marker, events[:3]


def test_max_duration_ends_both_legs(router_factory: type[RouterProcess]) -> None:
    router = router_factory(CALLROUTER_SIP_MAX_DURATION_SECONDS="1")  # type: ignore[call-arg]
    rt = runtime("uas-runtime-answer")
    assign(router, rt)
    result = uac(router, "uac-call-remote-bye").run()
    assert result.sequence()[-2:] == ["BYE", 200], result.explain()
    assert "BYE" in rt.wait().sequence("received")
    call = router.wait_for_call(lambda c: c["status"] == "ended")
    assert call["end_reason"] == "max_duration"


def test_refused_methods_get_405_and_replaces_403(router: RouterProcess) -> None:
    result = uac(router, "uac-invite-405-methods").run()
    assert result.ok, result.explain()
    assert result.sequence().count(405) >= 3
    replaces = uac(router, "uac-invite-403").run()
    assert replaces.sequence()[-2:] == [403, "ACK"], replaces.explain()


def test_no_header_names_the_stack(router: RouterProcess) -> None:
    result = uac(router, "uac-options").run()
    for msg in result.messages:
        if msg.direction == "received":
            assert "server" not in msg.headers and "user-agent" not in msg.headers
            assert "REFER" not in msg.headers.get("allow", "")


def test_over_capacity_gets_503_with_retry_after(router_factory: type[RouterProcess]) -> None:
    router = router_factory(CALLROUTER_SIP_MAX_CALLS="1")  # type: ignore[call-arg]
    rt = runtime("uas-runtime-answer")
    assign(router, rt)
    held = uac(router, "uac-call-bridged", duration_ms=3000).start()
    router.wait_for_call(lambda c: c["status"] == "in-progress")
    refused = uac(router, "uac-invite-503").run()  # the scenario demands Retry-After
    assert refused.ok, refused.explain()
    assert refused.sequence() == ["INVITE", 100, 503, "ACK"]
    assert held.wait().ok
    assert metric(router, 'callrouter_routing_decisions_total{outcome="over_capacity"}') == 1


@pytest.mark.parametrize(("action", "expected"), [("drop", []), ("reject", [403])])
def test_requests_from_outside_the_allowed_sources(
        router_factory: type[RouterProcess], action: str, expected: list[object]) -> None:
    router = router_factory(  # type: ignore[call-arg]
        CALLROUTER_SIP_INBOUND_ALLOWED_SOURCES="127.0.0.1/32",
        CALLROUTER_SIP_INBOUND_FORBIDDEN_ACTION=action)
    outsider = uac(router, "uac-options", host="127.0.0.2", timeout_s=3).run()
    assert outsider.sequence("received") == expected, outsider.explain()
    assert uac(router, "uac-options").run().sequence() == ["OPTIONS", 200]
    # SIPp answers an unexpected 403 with a BYE, from the same forbidden source: >= 1.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        decisions = metric(router, 'callrouter_routing_decisions_total{outcome="forbidden_source"}')
        if decisions >= 1:
            break
        time.sleep(0.2)
    assert metric(router, 'callrouter_engine_guard_total{action="dropped_source"}') >= 1
    assert decisions == metric(router, 'callrouter_engine_guard_total{action="dropped_source"}')


def test_garbage_and_unknown_requests_do_not_stop_the_router(router: RouterProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(1.0)
        for junk in (b"\x00\xff" * 600, b"INVITE\r\n\r\n", b"SIP/2.0 200 OK\r\n\r\n",
                     b"\r\n\r\n", b"A" * 60000):
            sock.sendto(junk, ("127.0.0.1", router.sip_port))
        port = sock.getsockname()[1]
        unknown = (f"FOO sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch="
                   f"z9hG4bKfoo1;rport\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:x@127.0.0.1>"
                   f"\r\nCall-ID: foo1\r\nCSeq: 1 FOO\r\nMax-Forwards: 70\r\nContent-Length: 0"
                   f"\r\n\r\n").encode()
        sock.sendto(unknown, ("127.0.0.1", router.sip_port))
        reply = sock.recv(65535).decode()
    assert reply.startswith("SIP/2.0 501 "), reply  # RFC 3261 s8.2.1
    assert "Allow: INVITE" in reply
    assert uac(router, "uac-options").run().sequence() == ["OPTIONS", 200]


def test_transfer_moves_the_caller_to_the_target(media_router: RouterProcess,
                                                 media_path: str) -> None:
    router = media_router
    rt = runtime("uas-runtime-answer", rtp_echo=True)
    desk = runtime("uas-runtime-answer", rtp_echo=True)
    assign(router, rt)
    caller = uac(router, "uac-call-bridged", duration_ms=4000, timeout_s=20)
    with RtpCounter([desk.media_port, caller.media_port]) as rtp:
        caller.start()
        call = router.wait_for_call(lambda c: c["status"] == "in-progress")
        response = router.api("POST", f"/calls/{call['id']}/control",
                              json={"type": "transfer", "destination": f"sip:desk@{desk.address}"})
        assert response.status_code == 200, response.text
        assert response.json()["success"] is True
        result = caller.wait()
    assert result.ok, result.explain()  # the caller's call went on to its own BYE
    assert result.sequence() == ["INVITE", 100, 180, 200, "ACK", "BYE", 200]
    assert "BYE" in rt.wait().sequence("received")  # the assistant was hung up
    assert desk.wait().sequence("received")[:2] == ["INVITE", "ACK"]
    assert rtp.count(desk.media_port) > 20, "the caller's audio did not reach the target"
    # The caller heard the assistant, then the target: one stream all along (a new far
    # leg changes neither SSRC nor the run of sequence numbers and timestamps).
    assert_one_stream(rtp.headers(caller.media_port), "the transferred caller")
    assert_path(router, media_path)
    record = router.wait_for_call(lambda c: c["id"] == call["id"] and c["status"] == "ended")
    assert record["end_reason"] == "transferred"


def test_control_rejects_calls_not_in_progress(router: RouterProcess) -> None:
    assert uac(router, "uac-invite-404").run().ok
    call = router.wait_for_call(lambda c: c["status"] == "failed")
    response = router.api("POST", f"/calls/{call['id']}/control", json={"type": "end-call"})
    assert response.status_code == 400, response.text
    unknown = router.api("POST", "/calls/00000000-0000-4000-8000-000000000000/control",
                         json={"type": "end-call"})
    assert unknown.status_code == 404


def test_end_call_over_the_api_hangs_up_both_legs(router: RouterProcess) -> None:
    rt = runtime("uas-runtime-answer")
    assign(router, rt)
    caller = uac(router, "uac-call-remote-bye", timeout_s=15).start()
    call = router.wait_for_call(lambda c: c["status"] == "in-progress")
    response = router.api("POST", f"/calls/{call['id']}/control", json={"type": "end-call"})
    assert response.status_code == 200, response.text
    assert caller.wait().sequence()[-2:] == ["BYE", 200]
    assert "BYE" in rt.wait().sequence("received")
    record = router.wait_for_call(lambda c: c["status"] == "ended")
    assert record["end_reason"] == "ended_by_api"


def test_ipv6_listener_routes_and_bridges(router_factory: type[RouterProcess],
                                         media_path: str) -> None:
    """RFC 5118 territory: SIP and media over ::1, signalling and RTP both ways."""
    router = router_factory(sip_host="::1",  # type: ignore[call-arg]
                            **media_env(media_path))
    assert uac(router, "uac-options", host="::1").run().sequence() == ["OPTIONS", 200]
    rejected = uac(router, "uac-invite-404", dialled="+31850000000", host="::1").run()
    assert rejected.sequence() == ["INVITE", 100, 404, "ACK"], rejected.explain()
    rt = runtime("uas-runtime-answer", host="::1", rtp_echo=True)
    assistant = router.add_assistant(f"sip:a@[::1]:{rt.port}")
    router.add_number(NUMBER, assistant)
    result = uac(router, "uac-call-bridged", host="::1", duration_ms=1000).run()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 100, 180, 200, "ACK", "BYE", 200]
    assert_path(router, media_path)


def test_different_codecs_are_transcoded_on_the_switchboard(media_router: RouterProcess) -> None:
    """A PCMA caller and a PCMU-only runtime cannot share packets: the legs are joined on
    the audio switchboard (decode, re-encode) whether or not the relay is on, and audio
    flows both ways, each far end in its own codec."""
    router = media_router
    _, rtp, caller, rt = echo_call(router, "uas-runtime-answer-pcmu", 2000)
    assert rtp.count(rt.media_port, payload_type=0) > 20, "no PCMU reached the runtime"
    assert rtp.count(caller.media_port, payload_type=8) > 20, "no PCMA came back to the caller"
    assert_one_stream(rtp.headers(caller.media_port), "the caller")
    assert metric(router, RELAYED_RTP) == 0


def test_transfer_control_tells_the_truth_and_a_ringing_target_times_out(
        router_factory: type[RouterProcess]) -> None:
    """Guards issue 9 items 3 and 4: a second transfer while the first target still rings is
    answered 409 (not 200 and silently dropped); a target that rings forever is cancelled
    after ``sip.transfer_ring_timeout_seconds``, the caller stays with the assistant, and a
    new transfer is accepted and completes."""
    router = router_factory(CALLROUTER_SIP_TRANSFER_RING_TIMEOUT_SECONDS="2")  # type: ignore[call-arg]
    rt = runtime("uas-runtime-answer")
    ringing = runtime("uas-runtime-noanswer", timeout_s=15)
    desk = runtime("uas-runtime-answer")
    assign(router, rt)
    caller = uac(router, "uac-call-bridged", duration_ms=6000, timeout_s=20).start()
    call = router.wait_for_call(lambda c: c["status"] == "in-progress")
    control = f"/calls/{call['id']}/control"
    first = router.api("POST", control, json={"type": "transfer",
                                              "destination": f"sip:desk@{ringing.address}"})
    assert first.status_code == 200, first.text
    second = router.api("POST", control, json={"type": "transfer",
                                               "destination": f"sip:desk@{desk.address}"})
    assert second.status_code == 409, second.text
    assert second.json()["error"] and "transfer" in second.json()["message"]
    started = time.monotonic()
    assert "CANCEL" in ringing.wait().sequence("received")  # the transfer ring timeout
    assert time.monotonic() - started < 5
    third = router.api("POST", control, json={"type": "transfer",
                                              "destination": f"sip:desk@{desk.address}"})
    assert third.status_code == 200, third.text
    result = caller.wait()
    assert result.ok, result.explain()  # the caller stayed up throughout
    assert result.sequence() == ["INVITE", 100, 180, 200, "ACK", "BYE", 200]
    assert "BYE" in rt.wait().sequence("received")
    assert desk.wait().sequence("received")[:2] == ["INVITE", "ACK"]
    record = router.wait_for_call(lambda c: c["id"] == call["id"] and c["status"] == "ended")
    assert record["end_reason"] == "transferred"
    ended = [e for e in router.events("call.ended") if e["call_id"] == call["id"]]
    assert [e["end_reason"] for e in ended] == ["transferred"]
