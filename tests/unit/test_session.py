"""The call session state machine: whole event sequences and the commands they give."""

from __future__ import annotations

import typing

import pytest

from callrouter.domain import session as s
from callrouter.domain.models import CallStatus, EndReason

TIMING = s.Timing(ring_timeout=30, max_duration=60, failure_code=503, retry_after=5,
                  transfer_ring_timeout=20)
DESK = "sip:desk@pbx"


def new(targets: tuple[str, ...] = ("sip:a", "sip:b")) -> tuple[s.CallSession, list[s.Command]]:
    session = s.CallSession(targets, TIMING)
    return session, session.start(0)


def test_happy_path_rings_answers_bridges_and_ends_on_caller_bye() -> None:
    session, cmds = new()
    assert cmds == [s.DialRuntime(0, "sip:a")]
    assert session.next_deadline() == 30
    assert session.handle(s.RuntimeRinging(0), 1) == [s.RingCaller()]
    assert session.handle(s.RuntimeAnswered(0), 2) == [s.AnswerCaller()]
    assert session.next_deadline() is None
    assert session.handle(s.CallerConfirmed(), 3) == [s.BridgeRuntime(0), s.MarkAnswered(3)]
    assert session.next_deadline() == 63  # max duration from the answer
    assert session.handle(s.CallerHungUp(), 10) == [
        s.HangupRuntime(0), s.Finish(CallStatus.ENDED, EndReason.CALLER_HANGUP, 10)]
    assert session.state is s.State.ENDED
    assert session.handle(s.RuntimeHungUp(0), 11) == []  # our own BYE's echo


def test_refusal_fails_over_then_rejects_with_the_reasons() -> None:
    session, _ = new()
    assert session.handle(s.RuntimeFailed(0, 486, "Busy Here"), 1) == [s.DialRuntime(1, "sip:b")]
    assert session.next_deadline() == 31
    cmds = session.handle(s.RuntimeFailed(1, 503, "Service Unavailable"), 2)
    assert cmds == [s.RejectCaller(503, 5), s.Finish(
        CallStatus.FAILED, EndReason.RUNTIME_UNAVAILABLE, 2,
        "sip:a: 486 Busy Here; sip:b: 503 Service Unavailable")]


def test_ring_timeout_cancels_and_moves_on() -> None:
    session, _ = new()
    session.handle(s.RuntimeRinging(0), 1)
    assert session.handle(s.TimerFired(), 30) == [s.HangupRuntime(0), s.DialRuntime(1, "sip:b")]
    # The abandoned runtime's own end is stale and ignored; a late answer is hung up.
    assert session.handle(s.RuntimeFailed(0, 487, "Request Terminated"), 31) == []
    assert session.handle(s.RuntimeAnswered(0), 31) == [s.HangupRuntime(0)]
    assert session.state is s.State.DIALLING


def test_caller_cancel_while_ringing_cancels_the_runtime() -> None:
    session, _ = new()
    session.handle(s.RuntimeRinging(0), 1)
    assert session.handle(s.CallerCancelled(), 2) == [
        s.HangupRuntime(0), s.Finish(CallStatus.ENDED, EndReason.CALLER_CANCELLED, 2)]
    # A 200 from the runtime that crossed the CANCEL is hung up.
    assert session.handle(s.RuntimeAnswered(0), 3) == [s.HangupRuntime(0)]


def test_runtime_hangup_and_max_duration() -> None:
    session, _ = new()
    session.handle(s.RuntimeAnswered(0), 1)
    session.handle(s.CallerConfirmed(), 1)
    assert session.handle(s.TimerFired(), 61) == [
        s.HangupCaller(), s.HangupRuntime(0),
        s.Finish(CallStatus.ENDED, EndReason.MAX_DURATION, 61)]
    other, _ = new()
    other.handle(s.RuntimeAnswered(0), 1)
    other.handle(s.CallerConfirmed(), 1)
    assert other.handle(s.RuntimeHungUp(0), 5) == [
        s.HangupCaller(), s.Finish(CallStatus.ENDED, EndReason.ASSISTANT_HANGUP, 5)]


def test_shutdown_before_answer_rejects_the_caller() -> None:
    session, _ = new()
    assert session.request(s.EndRequested(EndReason.ROUTER_SHUTDOWN), 1) == [
        s.HangupRuntime(0), s.RejectCaller(503, 5),
        s.Finish(CallStatus.FAILED, EndReason.ROUTER_SHUTDOWN, 1)]


def test_transition_not_in_the_table_raises() -> None:
    session, _ = new()
    with pytest.raises(s.InvalidTransition, match="dialling on CallerConfirmed"):
        session.handle(s.CallerConfirmed(), 1)


def _types(union: object) -> set[type]:
    return set(typing.get_args(union))


def test_every_state_and_input_pair_is_decided_or_deliberately_absent() -> None:
    """Guards the tables against an event, timeout or request type being added without
    deciding its transitions: the lists come from the unions, never by hand."""
    inputs = (_types(s.Event) - {s.TimerFired}) | _types(s.Timeout) | _types(s.Request)
    decided = set(s.TRANSITIONS) | set(s.REFUSALS)
    absent = {(st, ev) for st in s.State for ev in inputs} - decided
    unanswered = (s.State.DIALLING, s.State.RINGING)
    target_events = _types(s.TargetEvent)
    assert absent == {
        *((st, s.RuntimeHungUp) for st in unanswered),  # not answered: it fails instead
        *((st, s.CallerConfirmed) for st in unanswered),  # no 200 sent yet
        (s.State.ACTIVE, s.CallerCancelled), (s.State.TRANSFERRING, s.CallerCancelled),
        (s.State.TRANSFERRED, s.CallerCancelled),  # the caller leg is confirmed by then
        (s.State.TRANSFERRING, s.TargetHungUp),  # an answered target is TRANSFERRED
        (s.State.TRANSFERRED, s.TargetFailed),  # it answered: it can only hang up
        *((st, s.RingTimedOut) for st in s.State
          if st not in (*unanswered, s.State.CONNECTING)),
        *((st, s.TargetTimedOut) for st in s.State if st is not s.State.TRANSFERRING),
        *((st, s.MaxDurationReached) for st in (*unanswered, s.State.ANSWERING, s.State.ENDED)),
        # No transfer leg exists before one is requested: its events are all stale.
        *((st, ev) for st in (*unanswered, s.State.ANSWERING, s.State.ACTIVE)
          for ev in target_events),
        # Outbound calls: the customer's leg exists only on them, and until it answers
        # it is the only leg; once answered its end is CallerHungUp.
        *((st, s.CustomerTimedOut) for st in s.State if st is not s.State.PLACING),
        *((st, s.CustomerFailed) for st in s.State
          if st not in (s.State.PLACING, s.State.ENDED)),
        *((st, ev) for st in (*unanswered, s.State.ANSWERING)
          for ev in (s.CustomerRinging, s.CustomerAnswered)),
        *((s.State.PLACING, ev) for ev in (
            *_types(s.RuntimeEvent), *target_events, s.CallerConfirmed, s.CallerHungUp,
            s.CallerCancelled, s.RingTimedOut, s.TargetTimedOut, s.MaxDurationReached)),
        *((s.State.CONNECTING, ev) for ev in (
            s.RuntimeHungUp, *target_events, s.CallerConfirmed, s.CallerCancelled,
            s.TargetTimedOut, s.MaxDurationReached)),
    }
    requests = _types(s.Request)
    assert not {(st, r) for st in s.State for r in requests} & set(s.REFUSALS) & set(
        s.TRANSITIONS), "a request is either refused or handled in a state, not both"


CUSTOMER = s.DialCustomer("sip:+31612345678@gw:5060;transport=udp", ("u", "pw"), "+3185")


def outbound() -> s.CallSession:
    return s.CallSession(("sip:rt@a",), s.Timing(ring_timeout=5, max_duration=60,
                                                 customer_ring_timeout=30), CUSTOMER)


def test_an_outbound_call_dials_the_customer_then_bridges_the_runtime() -> None:
    session = outbound()
    assert session.start(0) == [CUSTOMER] and session.next_deadline() == 30
    assert session.handle(s.CustomerRinging(), 1) == []
    assert session.request(s.TransferRequested(DESK), 1) == s.Refused(
        s.Refusal.NOT_CONNECTED, "the call is not connected yet")
    assert session.handle(s.CustomerAnswered(), 2) == [s.MarkAnswered(2),
                                                       s.DialRuntime(0, "sip:rt@a")]
    assert session.state is s.State.CONNECTING
    assert session.handle(s.RuntimeAnswered(0), 3) == [s.BridgeRuntime(0)]
    assert session.state is s.State.ACTIVE and session.next_deadline() == 63
    assert session.handle(s.CallerHungUp(), 9) == [
        s.HangupRuntime(0), s.Finish(CallStatus.ENDED, EndReason.CALLER_HANGUP, 9)]


@pytest.mark.parametrize(("code", "reason"), [
    (486, EndReason.CUSTOMER_BUSY), (603, EndReason.CUSTOMER_BUSY),
    (480, EndReason.CUSTOMER_DID_NOT_ANSWER), (404, EndReason.CUSTOMER_UNREACHABLE)])
def test_an_outbound_customer_that_refuses_ends_the_call(code: int, reason: EndReason) -> None:
    session = outbound()
    session.start(0)
    assert session.handle(s.CustomerFailed(code, "x"), 1) == [
        s.Finish(CallStatus.FAILED, reason, 1, f"{code} x")]


def test_an_outbound_customer_that_never_answers_is_cancelled() -> None:
    session = outbound()
    session.start(0)
    assert session.handle(s.TimerFired(), 31) == [
        s.HangupCaller(), s.Finish(CallStatus.FAILED, EndReason.CUSTOMER_DID_NOT_ANSWER, 31,
                                   "no answer (outbound ring timeout)")]


def test_an_outbound_call_whose_runtimes_fail_hangs_the_customer_up() -> None:
    session = outbound()
    session.start(0)
    session.handle(s.CustomerAnswered(), 1)
    assert session.handle(s.RuntimeFailed(0, 503), 2) == [
        s.HangupCaller(), s.Finish(CallStatus.FAILED, EndReason.RUNTIME_UNAVAILABLE, 2,
                                   "sip:rt@a: 503")]


def test_every_refusal_says_whether_the_call_is_connected() -> None:
    connected = {s.State.ACTIVE, s.State.TRANSFERRING}
    for (state, _), refuse in s.REFUSALS.items():
        session, _ = new()
        session.state = state
        verdict = refuse(session, s.TransferRequested(DESK))
        expected = s.Refusal.BUSY if state in connected else s.Refusal.NOT_CONNECTED
        assert verdict.refusal is expected and verdict.reason


def active() -> s.CallSession:
    session, _ = new()
    session.handle(s.RuntimeAnswered(0), 1)
    session.handle(s.CallerConfirmed(), 1)
    return session


def transferring(now: float = 5) -> s.CallSession:
    session = active()
    session.request(s.TransferRequested(DESK), now)
    return session


def test_transfer_answered_moves_the_caller_and_hangs_up_the_assistant() -> None:
    session = active()
    assert session.request(s.TransferRequested(DESK, ("u", "p")), 5) == [
        s.DialTarget(1, DESK, ("u", "p"))]
    assert session.state is s.State.TRANSFERRING
    assert session.handle(s.TargetRinging(1), 6) == []  # still talking to the assistant
    assert session.handle(s.TargetAnswered(1), 7) == [
        s.HangupRuntime(0), s.BridgeTarget(1), s.MarkTransferred(7, DESK)]
    assert session.state is s.State.TRANSFERRED
    assert session.handle(s.RuntimeHungUp(0), 8) == []  # the assistant's leg we hung up
    assert session.handle(s.CallerHungUp(), 9) == [
        s.HangupTarget(1), s.Finish(CallStatus.ENDED, EndReason.CALLER_HANGUP, 9)]


def test_the_transferred_target_hanging_up_ends_the_call() -> None:
    session = transferring()
    session.handle(s.TargetAnswered(1), 7)
    assert session.next_deadline() == 61  # the call's maximum duration still holds
    assert session.handle(s.TargetHungUp(1), 9) == [
        s.HangupCaller(), s.Finish(CallStatus.ENDED, EndReason.TRANSFERRED, 9)]


def test_failed_transfer_keeps_the_caller_with_the_assistant() -> None:
    session = transferring()
    assert session.handle(s.TargetFailed(1, 486, "Busy Here"), 6) == [
        s.TransferFailed(DESK, 486, "Busy Here")]
    assert session.state is s.State.ACTIVE
    assert session.handle(s.RuntimeHungUp(0), 7) == [
        s.HangupCaller(), s.Finish(CallStatus.ENDED, EndReason.ASSISTANT_HANGUP, 7)]


def test_assistant_leaving_during_transfer_leaves_the_caller_waiting() -> None:
    session = transferring()
    assert session.handle(s.RuntimeHungUp(0), 6) == []
    assert session.handle(s.TargetAnswered(1), 7) == [
        s.BridgeTarget(1), s.MarkTransferred(7, DESK)]
    other = transferring()
    other.handle(s.RuntimeHungUp(0), 6)
    assert other.handle(s.TargetFailed(1, 408, "Timeout"), 7) == [
        s.TransferFailed(DESK, 408, "Timeout"), s.HangupCaller(),
        s.Finish(CallStatus.ENDED, EndReason.ASSISTANT_HANGUP, 7)]


def test_caller_hangup_while_transferring_ends_the_assistant_and_the_target() -> None:
    session = transferring()
    assert session.handle(s.CallerHungUp(), 6) == [
        s.HangupRuntime(0), s.HangupTarget(1),
        s.Finish(CallStatus.ENDED, EndReason.CALLER_HANGUP, 6)]


def test_a_second_transfer_while_the_first_rings_is_refused_as_busy() -> None:
    """Guards issue 9 item 3: the refusal is a value the API answers 409 with, not an
    exception swallowed on the SIP thread after a 200."""
    session = transferring()
    verdict = session.request(s.TransferRequested("sip:other@pbx"), 6)
    assert verdict == s.Refused(s.Refusal.BUSY, f"a transfer to {DESK} is still ringing")
    assert session.state is s.State.TRANSFERRING


def test_requests_before_the_answer_or_after_the_end_are_refused_as_not_connected() -> None:
    session, _ = new()
    assert isinstance(refused := session.request(s.TransferRequested(DESK), 1), s.Refused)
    assert refused.refusal is s.Refusal.NOT_CONNECTED
    session.handle(s.CallerCancelled(), 2)
    for request in (s.TransferRequested(DESK), s.EndRequested(EndReason.ENDED_BY_API)):
        verdict = session.request(request, 3)
        assert isinstance(verdict, s.Refused) and verdict.refusal is s.Refusal.NOT_CONNECTED


def test_a_target_that_rings_forever_is_cancelled_and_a_new_transfer_may_follow() -> None:
    """Guards issue 9 item 4: transfer legs have their own ring timeout; before, a target
    that never answered held the call until its maximum duration and blocked transfers."""
    session = transferring(now=5)
    assert session.next_deadline() == 25  # 5 + transfer_ring_timeout, before max duration (61)
    assert session.handle(s.TimerFired(), 25) == [
        s.HangupTarget(1), s.TransferFailed(DESK, 408, "no answer (transfer ring timeout)")]
    assert session.state is s.State.ACTIVE
    assert session.next_deadline() == 61
    assert session.request(s.TransferRequested("sip:other@pbx"), 26) == [
        s.DialTarget(2, "sip:other@pbx", None)]
    # The first target's 200 crossed our CANCEL: that leg is hung up, not the new one.
    assert session.handle(s.TargetAnswered(1), 27) == [s.HangupTarget(1)]
    assert session.handle(s.TargetFailed(1, 487, "Request Terminated"), 27) == []


def test_the_target_ring_timeout_when_the_assistant_has_gone_ends_the_call() -> None:
    session = transferring(now=5)
    session.handle(s.RuntimeHungUp(0), 6)
    assert session.handle(s.TimerFired(), 25) == [
        s.HangupTarget(1), s.TransferFailed(DESK, 408, "no answer (transfer ring timeout)"),
        s.HangupCaller(), s.Finish(CallStatus.ENDED, EndReason.ASSISTANT_HANGUP, 25)]


def test_max_duration_while_transferring_ends_every_leg() -> None:
    session = active()  # max duration at 61
    session.request(s.TransferRequested(DESK), 50)  # target ring timeout would be at 70
    assert session.next_deadline() == 61
    assert session.handle(s.TimerFired(), 61) == [
        s.HangupCaller(), s.HangupRuntime(0), s.HangupTarget(1),
        s.Finish(CallStatus.ENDED, EndReason.MAX_DURATION, 61)]


def test_a_late_200_from_any_leg_not_the_current_one_hangs_up_that_leg() -> None:
    """Guards issue 9 item 4 / design.md: a 200 from a leg that is not the current one is
    answered with a hang-up of *that* leg in every state. Before, a transfer leg's late
    200 after the call ended hung up the runtime attempt instead (the wrong leg)."""
    ended = transferring()
    ended.handle(s.CallerHungUp(), 6)
    assert ended.handle(s.TargetAnswered(1), 7) == [s.HangupTarget(1)]
    assert ended.handle(s.RuntimeAnswered(0), 7) == [s.HangupRuntime(0)]
    failed_over, _ = new()
    failed_over.handle(s.TimerFired(), 30)  # attempt 0 abandoned, attempt 1 dialling
    failed_over.handle(s.CallerCancelled(), 31)
    assert failed_over.handle(s.RuntimeAnswered(0), 32) == [s.HangupRuntime(0)]
    assert failed_over.handle(s.RuntimeAnswered(1), 32) == [s.HangupRuntime(1)]
    for state_of in (active, transferring):
        session = state_of()
        assert session.handle(s.TargetAnswered(7), 8) == [s.HangupTarget(7)]
        assert session.handle(s.RuntimeAnswered(3), 8) == [s.HangupRuntime(3)]


def test_an_engine_failure_ends_the_call_as_failed_with_every_leg_hung_up() -> None:
    """Guards issue 9 item 2: the SIP adapter's callback guard feeds ``Aborted``; the call
    ends ``failed``/``error`` and no leg is left up (an unanswered caller gets 500)."""
    ringing, _ = new()
    assert ringing.handle(s.Aborted("boom"), 1) == [
        s.HangupRuntime(0), s.RejectCaller(500),
        s.Finish(CallStatus.FAILED, EndReason.ERROR, 1, "boom")]
    session = transferring()
    assert session.handle(s.Aborted("boom"), 6) == [
        s.HangupCaller(), s.HangupRuntime(0), s.HangupTarget(1),
        s.Finish(CallStatus.FAILED, EndReason.ERROR, 6, "boom")]
    assert session.handle(s.Aborted("again"), 7) == []
