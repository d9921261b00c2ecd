"""The call session state machine: whole event sequences and the commands they give."""

from __future__ import annotations

import pytest

from callrouter.domain import session as s
from callrouter.domain.models import CallStatus, EndReason

TIMING = s.Timing(ring_timeout=30, max_duration=60, failure_code=503, retry_after=5)


def new(targets: tuple[str, ...] = ("sip:a", "sip:b")) -> tuple[s.CallSession, list[s.Command]]:
    session = s.CallSession(targets, TIMING, now=0)
    return session, session.start(0)


def test_happy_path_rings_answers_bridges_and_ends_on_caller_bye() -> None:
    session, cmds = new()
    assert cmds == [s.DialRuntime(0, "sip:a")]
    assert session.next_deadline() == 30
    assert session.handle(s.RuntimeRinging(0), 1) == [s.RingCaller()]
    assert session.handle(s.RuntimeAnswered(0), 2) == [s.AnswerCaller()]
    assert session.next_deadline() is None
    assert session.handle(s.CallerConfirmed(), 3) == [s.BridgeMedia(0), s.MarkAnswered(3)]
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
    assert session.handle(s.EndRequested(EndReason.ROUTER_SHUTDOWN), 1) == [
        s.HangupRuntime(0), s.RejectCaller(503, 5),
        s.Finish(CallStatus.FAILED, EndReason.ROUTER_SHUTDOWN, 1)]


def test_transition_not_in_the_table_raises() -> None:
    session, _ = new()
    with pytest.raises(s.InvalidTransition, match="dialling on CallerConfirmed"):
        session.handle(s.CallerConfirmed(), 1)


def test_every_state_and_event_pair_is_decided_or_deliberately_absent() -> None:
    # Guards the table against an event type being added without deciding its transitions.
    events = {s.RuntimeRinging, s.RuntimeAnswered, s.RuntimeFailed, s.RuntimeHungUp,
              s.CallerConfirmed, s.CallerHungUp, s.CallerCancelled, s.TimerFired, s.EndRequested,
              s.TransferRequested}
    absent = {(st, ev) for st in s.State for ev in events} - set(s.TRANSITIONS)
    assert absent == {
        (s.State.DIALLING, s.RuntimeHungUp), (s.State.RINGING, s.RuntimeHungUp),
        (s.State.DIALLING, s.CallerConfirmed), (s.State.RINGING, s.CallerConfirmed),
        (s.State.ANSWERING, s.TimerFired),
        (s.State.ACTIVE, s.CallerCancelled),  # the caller leg is confirmed by then
        # A transfer is requested only while active; a second one waits for the first.
        *((st, s.TransferRequested) for st in (
            s.State.DIALLING, s.State.RINGING, s.State.ANSWERING, s.State.TRANSFERRING)),
        (s.State.TRANSFERRING, s.CallerCancelled),
    }


def active() -> s.CallSession:
    session, _ = new()
    session.handle(s.RuntimeAnswered(0), 1)
    session.handle(s.CallerConfirmed(), 1)
    return session


def test_transfer_answered_moves_the_caller_and_hangs_up_the_assistant() -> None:
    session = active()
    assert session.handle(s.TransferRequested("sip:desk@pbx", ("u", "p")), 5) == [
        s.DialRuntime(1001, "sip:desk@pbx", ("u", "p"))]
    assert session.state is s.State.TRANSFERRING
    assert session.handle(s.RuntimeRinging(1001), 6) == []  # still talking to the assistant
    assert session.handle(s.RuntimeAnswered(1001), 7) == [
        s.HangupRuntime(0), s.BridgeMedia(1001), s.MarkTransferred(7, "sip:desk@pbx")]
    assert session.handle(s.RuntimeHungUp(0), 8) == []  # the assistant's leg we hung up
    assert session.handle(s.CallerHungUp(), 9) == [
        s.HangupRuntime(1001), s.Finish(CallStatus.ENDED, EndReason.CALLER_HANGUP, 9)]


def test_failed_transfer_keeps_the_caller_with_the_assistant() -> None:
    session = active()
    session.handle(s.TransferRequested("sip:desk@pbx"), 5)
    assert session.handle(s.RuntimeFailed(1001, 486, "Busy Here"), 6) == [
        s.TransferFailed("sip:desk@pbx", 486, "Busy Here")]
    assert session.state is s.State.ACTIVE
    assert session.handle(s.RuntimeHungUp(0), 7) == [
        s.HangupCaller(), s.Finish(CallStatus.ENDED, EndReason.ASSISTANT_HANGUP, 7)]


def test_assistant_leaving_during_transfer_leaves_the_caller_waiting() -> None:
    session = active()
    session.handle(s.TransferRequested("sip:desk@pbx"), 5)
    assert session.handle(s.RuntimeHungUp(0), 6) == []
    assert session.handle(s.RuntimeAnswered(1001), 7) == [
        s.BridgeMedia(1001), s.MarkTransferred(7, "sip:desk@pbx")]
    other = active()
    other.handle(s.TransferRequested("sip:desk@pbx"), 5)
    other.handle(s.RuntimeHungUp(0), 6)
    assert other.handle(s.RuntimeFailed(1001, 408, "Timeout"), 7) == [
        s.TransferFailed("sip:desk@pbx", 408, "Timeout"), s.HangupCaller(),
        s.Finish(CallStatus.ENDED, EndReason.ASSISTANT_HANGUP, 7)]


def test_caller_hangup_while_transferring_ends_both_runtime_legs() -> None:
    session = active()
    session.handle(s.TransferRequested("sip:desk@pbx"), 5)
    assert session.handle(s.CallerHungUp(), 6) == [
        s.HangupRuntime(0), s.HangupRuntime(1001),
        s.Finish(CallStatus.ENDED, EndReason.CALLER_HANGUP, 6)]
