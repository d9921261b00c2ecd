"""The test tooling checks itself, without the router.

Provider-side (uac) scenarios run against the matching runtime-side (uas) scenarios directly
on loopback, so a failure in a router test means the router, not the scenario. Reject-path
scenarios and the torture replay run against the tiny stateless StubServer. Each call is a
second or two; RTP is counted on the loopback interface when the process may (root, as in CI).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support import torture
from tests.support.sipp import RtpCounter, Sipp, SippResult, scenario

pytestmark = [
    pytest.mark.sip,
    pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp is not installed"),
]

KEYS = {"dialled": "+31850835037", "caller": "+31201234567"}
CALL = ["INVITE", 100, 180, 200, "ACK"]
HANGUP = ["BYE", 200]
PCMA, TELEPHONE_EVENT = 8, 101
needs_rtp_counter = pytest.mark.skipif(not RtpCounter.available(),
                                       reason="counting RTP needs CAP_NET_RAW")
# Test-only peers (not deployment scenarios), e.g. a far end that offers SDP in its 200.
PEERS = Path(__file__).resolve().parents[1] / "support" / "sipp-peers"


Pair = tuple[SippResult, SippResult, RtpCounter | None, Sipp, Sipp]


def call_pair(uac: str, uas: str | Path, duration_ms: int = 1000, transport: str = "u1") -> Pair:
    uas_path = uas if isinstance(uas, Path) else scenario(uas)
    runtime = Sipp(uas_path, role="uas", rtp_echo=True, duration_ms=duration_ms,
                   transport=transport, timeout_s=10).start()
    caller = Sipp(scenario(uac), target=runtime.address, keys=KEYS, duration_ms=duration_ms,
                  transport=transport, timeout_s=10)
    try:
        if RtpCounter.available():
            with RtpCounter([caller.media_port, runtime.media_port]) as rtp:
                caller_result = caller.run()
                runtime_result = runtime.wait()
            return caller_result, runtime_result, rtp, caller, runtime
        return caller.run(), runtime.wait(), None, caller, runtime
    finally:
        runtime.stop()
        caller.stop()


def assert_both(caller: SippResult, runtime: SippResult, sequence: list[str | int]) -> None:
    for result in (caller, runtime):
        assert result.ok and result.successful == 1, result.explain()
        assert result.sequence() == sequence, result.explain()


@needs_rtp_counter
def test_bridged_call_carries_rtp_both_ways() -> None:
    caller, runtime, rtp, uac, uas = call_pair("uac-call-bridged", "uas-runtime-answer")
    assert_both(caller, runtime, CALL + HANGUP)
    assert rtp is not None
    assert rtp.count(uas.media_port, PCMA) > 20, rtp.payload_types(uas.media_port)
    assert rtp.count(uac.media_port, PCMA) > 20, rtp.payload_types(uac.media_port)


@pytest.mark.parametrize(("peer", "ok"), [("uas-ring-603-reason", True),
                                          ("uas-ring-603-bare", False)])
def test_webhook_refusal_scenario_checks_ringing_and_the_reason_header(peer: str,
                                                                      ok: bool) -> None:
    far_end = Sipp(PEERS / f"{peer}.xml", role="uas", timeout_s=5).start()
    try:
        result = Sipp(scenario("uac-invite-603-reason"), target=far_end.address, keys=KEYS,
                      timeout_s=5).run()
    finally:
        far_end.stop()
    assert result.ok is ok, result.explain()
    if ok:
        assert result.sequence() == ["INVITE", 100, 180, 603, "ACK"], result.explain()


def test_many_media_scenario_fails_on_an_answer_without_every_line() -> None:
    # The runtime scenario answers with its one audio line: the six-line check must fail.
    caller, _, _, _, _ = call_pair("uac-call-bridged-many-media", "uas-runtime-answer")
    assert not caller.ok, caller.explain()
    assert "Failed regexp match" in caller.errors, caller.explain()


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_bridged_call_accepts_a_reinvite_from_its_peer(transport: str) -> None:
    caller, runtime, _, _, _ = call_pair("uac-call-bridged", "uas-runtime-reinvite",
                                         transport=transport)
    assert_both(caller, runtime, [*CALL, "INVITE", 200, "ACK", *HANGUP])


def test_answer_without_ringing_echo_runtime() -> None:
    caller, runtime, _, _, _ = call_pair("uac-call-bridged", "uas-runtime-echo")
    assert_both(caller, runtime, ["INVITE", 100, 200, "ACK", *HANGUP])


def test_cancel_while_ringing() -> None:
    caller, runtime, _, _, _ = call_pair("uac-call-cancel", "uas-runtime-noanswer")
    assert_both(caller, runtime, ["INVITE", 100, 180, "CANCEL", 200, 487, "ACK"])


def test_remote_bye_from_the_runtime() -> None:
    caller, runtime, _, _, _ = call_pair("uac-call-remote-bye", "uas-runtime-hangup")
    assert_both(caller, runtime, CALL + HANGUP)


def test_runtime_fail_scenario_expects_100_then_503() -> None:
    caller, runtime, _, _, _ = call_pair("uac-invite-runtime-fail", "uas-runtime-refuse")
    assert_both(caller, runtime, ["INVITE", 100, 503, "ACK"])


def test_busy_runtime_is_not_taken_for_a_503() -> None:
    caller, runtime, _, _, _ = call_pair("uac-invite-runtime-fail", "uas-runtime-busy")
    assert runtime.sequence()[:3] == ["INVITE", 100, 486], runtime.explain()
    assert not caller.ok and caller.failed == 1, caller.explain()


@needs_rtp_counter
def test_rfc4733_dtmf_reaches_the_runtime() -> None:
    caller, runtime, rtp, _, uas = call_pair("uac-call-dtmf", "uas-runtime-answer", 500)
    assert_both(caller, runtime, CALL + HANGUP)
    assert rtp is not None
    assert rtp.events(uas.media_port, TELEPHONE_EVENT) == [1, 5, 11]


def test_sip_info_dtmf() -> None:
    caller, runtime, _, _, _ = call_pair("uac-call-dtmf-info", "uas-runtime-answer", 500)
    assert_both(caller, runtime, [*CALL, "INFO", 200, *HANGUP])


def test_hold_reinvite_keeps_the_call() -> None:
    caller, runtime, _, _, _ = call_pair("uac-call-reinvite-hold", "uas-runtime-answer", 500)
    assert_both(caller, runtime, [*CALL, "INVITE", 200, "ACK", *HANGUP])


@pytest.mark.parametrize(("name", "status", "sequence"), [
    ("uac-options", 404, ["OPTIONS", 200]),
    ("uac-invite-404", 404, ["INVITE", 100, 404, "ACK"]),
    ("uac-invite-480", 480, ["INVITE", 100, 480, "ACK"]),
    ("uac-invite-403", 403, ["INVITE", 100, 403, "ACK"]),
    ("uac-invite-503", 503, ["INVITE", 100, 503, "ACK"]),
    ("uac-invite-405-methods", 404,
     ["MESSAGE", 405, "REFER", 405, "SUBSCRIBE", 405, "NOTIFY", 405, "PUBLISH", 405,
      "REGISTER", 405]),
])
def test_reject_scenarios_against_a_stub(name: str, status: int, sequence: list[str | int]) -> None:
    with torture.StubServer(invite_status=status) as stub:
        result = Sipp(scenario(name), target=f"127.0.0.1:{stub.port}", keys=KEYS,
                      timeout_s=5).run()
    assert result.ok, result.explain()
    assert result.sequence() == sequence, result.explain()


@pytest.mark.parametrize(("options_status", "passes"), [(503, True), (200, False)])
def test_draining_options_scenario_wants_503(options_status: int, passes: bool) -> None:
    with torture.StubServer(options_status=options_status) as stub:
        result = Sipp(scenario("uac-options-503-draining"), target=f"127.0.0.1:{stub.port}",
                      keys=KEYS, timeout_s=3).run()
    assert result.ok is passes, result.explain()
    assert result.sequence()[:2] == ["OPTIONS", options_status], result.explain()


def test_reject_scenario_fails_on_the_wrong_code() -> None:
    with torture.StubServer(invite_status=480) as stub:
        result = Sipp(scenario("uac-invite-404"), target=f"127.0.0.1:{stub.port}", keys=KEYS,
                      timeout_s=3).run()
    assert not result.ok and result.failed == 1, result.explain()


@pytest.mark.parametrize("transport", ["u1", "t1"])
@pytest.mark.parametrize("status", [404, 480, 503])
def test_late_offer_reject_scenario_against_a_stub(status: int, transport: str) -> None:
    with torture.StubServer(invite_status=status) as stub:
        result = Sipp(scenario("uac-invite-late-offer-reject"), target=f"127.0.0.1:{stub.port}",
                      keys={**KEYS, "expected": str(status)}, transport=transport,
                      timeout_s=5).run()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 100, status, "ACK"], result.explain()
    invite = result.messages[0].headers
    assert invite["content-length"] == "0" and "content-type" not in invite, invite


@pytest.mark.parametrize(("status", "expected"), [(404, 480), (503, 404), (486, 404)])
def test_late_offer_reject_scenario_fails_on_another_code(status: int, expected: int) -> None:
    with torture.StubServer(invite_status=status) as stub:
        result = Sipp(scenario("uac-invite-late-offer-reject"), target=f"127.0.0.1:{stub.port}",
                      keys={**KEYS, "expected": str(expected)}, timeout_s=3).run()
    assert not result.ok and result.failed == 1, result.explain()
    assert result.sequence()[-1] == "ACK", result.explain()  # still ACKed


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_late_offer_call_takes_the_offer_from_the_200(transport: str) -> None:
    caller, peer, rtp, uac, uas = call_pair("uac-call-bridged-late-offer",
                                            PEERS / "uas-offer-in-200.xml", transport=transport)
    assert_both(caller, peer, CALL + HANGUP)  # the peer checks: no SDP in INVITE, SDP in ACK
    if rtp is not None:
        assert rtp.count(uas.media_port, PCMA) > 20, rtp.payload_types(uas.media_port)
        assert rtp.count(uac.media_port, PCMA) > 20, rtp.payload_types(uac.media_port)


def test_late_offer_call_fails_without_an_offer_in_the_200() -> None:
    with torture.StubServer(invite_status=200) as stub:  # 200 with Content-Length 0
        result = Sipp(scenario("uac-call-bridged-late-offer"), target=f"127.0.0.1:{stub.port}",
                      keys=KEYS, timeout_s=3).run()
    assert not result.ok and result.failed == 1, result.explain()
    assert "m=audio" in result.errors, result.explain()


def test_offer_in_200_peer_refuses_an_early_offer() -> None:
    """The test double itself can fail: an INVITE with SDP is not a delayed offer."""
    _, peer, _, _, _ = call_pair("uac-call-bridged", PEERS / "uas-offer-in-200.xml", 200)
    assert not peer.ok and peer.failed == 1, peer.explain()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_torture_replay_keeps_a_stub_serving(transport: str) -> None:
    cases = torture.load_cases()
    with torture.StubServer() as stub:
        outcomes = torture.replay("127.0.0.1", stub.port, transport, cases, wait_s=0.3)
    assert [o.case.file for o in outcomes] == [c.file for c in cases]
    sent = [o for o in outcomes if not o.skipped]
    assert all(o.options_status == 200 for o in sent)
    by_name = {o.case.name: o for o in outcomes}
    assert by_name["badvers.dat"].status == 505
    assert by_name["unreason.dat"].status is None  # a stray response gets no answer
    if transport == "tcp":
        assert {o.case.name for o in outcomes if o.skipped} == torture.UDP_FRAMING
    else:  # the Via's own port (or rport) brought the answer back to the sender
        assert by_name["transports.dat"].status == 200


def _case(klass: str, expected: str) -> torture.Case:
    return torture.Case("x.dat", "0", "t", klass, expected, torture.corpus_dir() / "x.dat")


@pytest.mark.parametrize(("klass", "expected", "status", "options", "passed"), [
    ("valid", "parse OK", 404, 200, True),
    ("valid", "parse OK", 400, 200, False),
    ("valid", "parse OK", None, 200, False),
    ("valid", "405/501 (or silent drop by pjsua2)", None, 200, True),
    ("valid", "parse OK", 404, None, False),
    ("invalid", "400", None, 200, True),
    ("invalid", "400", 400, 200, True),
    ("invalid", "505 Version Not Supported", 200, 200, False),
    ("invalid", "400 acceptable; liberal accept allowed", 200, 200, True),
    ("valid response", "stray -> dropped", None, 200, True),
    ("valid response", "stray -> dropped", 481, 200, False),
    ("application", "400", 404, 200, True),
    ("application", "415 Unsupported Media Type", 400, 200, False),
    ("application", "406 (Warning 399) or 400", 400, 200, True),
    ("transaction", "must not break", 400, 200, True),
])
def test_torture_verdict(klass: str, expected: str, status: int | None, options: int | None,
                         passed: bool) -> None:
    assert torture.verdict(_case(klass, expected), status, options).passed is passed
