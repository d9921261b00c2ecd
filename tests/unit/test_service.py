"""The call service with an in-memory store and no SIP engine: INVITE in, values out.

This is the middle test tier: the real routing, sessions, records and metrics, with
the SIP adapter replaced by direct calls to ``on_invite``/``on_event``.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import Future
from datetime import UTC, datetime

import pytest
from structlog.testing import capture_logs

from callrouter.domain import session as s
from callrouter.domain.models import (
    Assistant,
    CallRecord,
    CallStatus,
    EndReason,
    PhoneNumber,
    Trunk,
    TrunkTransport,
)
from callrouter.domain.routing import Policy, RuntimePool
from callrouter.errors import (
    Conflict,
    EngineTimeout,
    EngineUnavailable,
    NotFound,
    ValidationError,
)
from callrouter.metrics import Metrics
from callrouter.ports import (
    Accepted,
    EndCall,
    EngineEntry,
    EngineStatus,
    InboundInvite,
    Rejected,
    TransferCall,
)
from callrouter.service import CallController, CallService
from callrouter.store.memory import MemoryStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ASSISTANT = uuid.UUID(int=7)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_service() -> tuple[CallService, list[CallRecord], Clock, Metrics]:
    records: list[CallRecord] = []
    clock = Clock()
    metrics = Metrics()
    service = CallService(
        policy=Policy(max_calls=1), timing=s.Timing(ring_timeout=5, max_duration=60),
        pool=RuntimePool(("sip:pool@10.0.0.9",)), default_region="NL", metrics=metrics,
        record=records.append, wall=lambda: T0, clock=clock)
    store = MemoryStore()

    async def seed() -> None:
        await store.open()
        await store.create_assistant(Assistant(ASSISTANT, "A", "sip:rt@10.0.0.1", T0, T0))
        await store.create_number(PhoneNumber(uuid.UUID(int=1), "+31850835037", "", ASSISTANT,
                                              None, True, T0, T0))
        await store.create_number(PhoneNumber(uuid.UUID(int=2), "+31850835038", "", None,
                                              None, True, T0, T0))
        await service.reload_routes(store)

    asyncio.run(seed())
    return service, records, clock, metrics


def invite(ruri: str, caller: str = "0201234567") -> InboundInvite:
    return InboundInvite("abc@provider", ruri, f"<{ruri}>", f"<sip:{caller}@provider>;tag=1",
                         "127.0.0.1:5062", 100.0)


@pytest.mark.parametrize(("ruri", "code", "reason"), [
    ("sip:+31999999999@r", 404, EndReason.REJECTED_UNKNOWN_NUMBER),
    ("sip:alice@r", 404, EndReason.REJECTED_UNKNOWN_NUMBER),
    ("sip:085-083-5038@r", 480, EndReason.REJECTED_UNASSIGNED),  # national form, NL
])
def test_rejections_are_values_with_a_failed_record(ruri: str, code: int,
                                                    reason: EndReason) -> None:
    service, records, _, _ = make_service()
    answer = service.on_invite(invite(ruri))
    assert isinstance(answer, Rejected) and answer.code == code
    assert [(r.status, r.end_reason) for r in records] == [(CallStatus.FAILED, reason)]
    assert not service.active


def test_bridged_call_lifecycle_writes_connecting_in_progress_ended() -> None:
    service, records, clock, _ = make_service()
    answer = service.on_invite(invite("tel:+31-85-083-5037", caller="0201234567"))
    assert isinstance(answer, Accepted)
    headers = dict(answer.runtime_headers)
    assert headers["X-Assistant-Id"] == str(ASSISTANT)
    assert headers["X-Caller-Number"] == "+31201234567"
    assert headers["X-Call-Id"] == str(answer.call_id)
    assert answer.reaction.commands == (s.DialRuntime(0, f"sip:{ASSISTANT}@10.0.0.1"),)
    assert answer.reaction.deadline == 105.0
    call = answer.call_id
    for event in (s.RuntimeRinging(0), s.RuntimeAnswered(0), s.CallerConfirmed()):
        clock.now += 1
        service.on_event(call, event, clock.now)
    clock.now += 30
    reaction = service.on_event(call, s.RuntimeHungUp(0), clock.now)
    assert s.HangupCaller() in reaction.commands
    assert [r.status for r in records] == [
        CallStatus.CONNECTING, CallStatus.IN_PROGRESS, CallStatus.ENDED]
    assert records[-1].end_reason == EndReason.ASSISTANT_HANGUP
    assert records[-1].caller_phone == "+31201234567"
    assert not service.active


def test_capacity_and_draining_get_503_with_retry_after() -> None:
    service, _, _, _ = make_service()
    assert isinstance(service.on_invite(invite("sip:+31850835037@r")), Accepted)
    full = service.on_invite(invite("sip:+31850835037@r"))  # max_calls is 1
    assert isinstance(full, Rejected) and (full.code, full.retry_after) == (503, 5)
    # The phrase says "no room here": a balancer in front tries another router on it.
    assert full.reason == "Over Capacity"
    service.active.clear()
    service.draining = True
    drained = service.on_invite(invite("sip:+31850835037@r"))
    assert isinstance(drained, Rejected) and drained.code == 503
    assert drained.reason == "Draining"


def test_runtime_failures_fall_back_to_the_pool_then_503() -> None:
    service, records, _, metrics = make_service()
    answer = service.on_invite(invite("sip:+31850835037@r"))
    assert isinstance(answer, Accepted)
    reaction = service.on_event(answer.call_id, s.RuntimeFailed(0, 486, "Busy"), 101)
    assert reaction.commands == (s.DialRuntime(1, f"sip:{ASSISTANT}@10.0.0.9"),)
    reaction = service.on_event(answer.call_id, s.RuntimeFailed(1, 500, "Oops"), 102)
    assert s.RejectCaller(503, 5) in reaction.commands
    assert records[-1].end_reason == EndReason.RUNTIME_UNAVAILABLE
    assert "486 Busy" in (records[-1].error or "")
    body = metrics.render()[0].decode()  # decided once (bridged); the failure is how it ended
    assert 'callrouter_routing_decisions_total{outcome="bridged"} 1.0' in body
    assert 'callrouter_routing_decisions_total{outcome="runtime_unavailable"} 0.0' in body
    assert 'callrouter_calls_ended_total{reason="runtime_unavailable"} 1.0' in body


def test_events_for_unknown_calls_are_ignored() -> None:
    service, records, _, _ = make_service()
    reaction = service.on_event(uuid.uuid4(), s.CallerHungUp(), 1)
    assert reaction.commands == () and records == []


def test_a_rejected_call_logs_one_routed_line_that_says_how_it_ended() -> None:
    """Guards the README's log promise for rejected calls: a rejected call ends at once, so
    its one ``call.routed`` line carries the SIP status, the record's status and end
    reason, and no ``call.ended`` line follows; a bridged call gets one of each."""
    service, records, clock, _ = make_service()
    with capture_logs() as logs:
        service.on_invite(invite("sip:+31850835039@r"))  # a number nobody registered
        bridged = service.on_invite(invite("sip:+31850835037@r"))
        assert isinstance(bridged, Accepted)
        service.on_event(bridged.call_id, s.CallerHungUp(), clock.now)
    assert [e["event"] for e in logs] == [
        "call.routed", "call.routed", "call.ended"]
    rejected = logs[0]
    assert (rejected["outcome"], rejected["sip_status"], rejected["status"],
            rejected["end_reason"]) == ("unknown_number", 404, "failed",
                                        "rejected_unknown_number")
    assert rejected["call_id"] == str(records[0].id)
    assert "end_reason" not in logs[1]  # a bridged call's ending is its call.ended line


# ---- transfers, control and engine failures ------------------------------------------------

DESK = "sip:desk@pbx"


def connected(service: CallService, clock: Clock) -> uuid.UUID:
    answer = service.on_invite(invite("sip:+31850835037@r"))
    assert isinstance(answer, Accepted)
    for event in (s.RuntimeAnswered(0), s.CallerConfirmed()):
        service.on_event(answer.call_id, event, clock.now)
    return answer.call_id


def test_a_transferred_call_gets_its_call_ended_line_too() -> None:
    """Guards issue 9 item 4: a transferred call closed its record at the transfer and
    then ended without a ``call.ended`` log line, unlike every other call."""
    service, records, clock, _ = make_service()
    call_id = connected(service, clock)
    assert service.on_request(call_id, s.TransferRequested(DESK), clock.now).refused is None
    service.on_event(call_id, s.TargetAnswered(1), clock.now)
    with capture_logs() as logs:
        service.on_event(call_id, s.CallerHungUp(), clock.now + 30)
    (ended,) = [e for e in logs if e["event"] == "call.ended"]
    assert (ended["status"], ended["end_reason"]) == ("ended", "transferred")
    assert records[-1].end_reason == EndReason.TRANSFERRED and not service.active


def test_events_after_the_end_reach_the_session_until_the_engine_releases_the_call() -> None:
    """Guards issue 9 item 4: the service forgot a call at its end, so a transfer leg's
    late 200 was ignored and that leg stayed up."""
    service, _, clock, _ = make_service()
    call_id = connected(service, clock)
    service.on_request(call_id, s.TransferRequested(DESK), clock.now)
    service.on_event(call_id, s.CallerHungUp(), clock.now)
    assert not service.active
    late = service.on_event(call_id, s.TargetAnswered(1), clock.now)
    assert late.commands == (s.HangupTarget(1),)
    service.on_released(call_id)
    assert service.on_event(call_id, s.TargetAnswered(1), clock.now).commands == ()


def test_a_request_the_state_refuses_is_a_ruling_not_an_exception() -> None:
    service, _, clock, _ = make_service()
    call_id = connected(service, clock)
    service.on_request(call_id, s.TransferRequested(DESK), clock.now)
    ruling = service.on_request(call_id, s.TransferRequested("sip:x@pbx"), clock.now)
    assert ruling.refused is not None and ruling.refused.refusal is s.Refusal.BUSY
    assert ruling.reaction.commands == ()
    gone = service.on_request(uuid.uuid4(), s.EndRequested(EndReason.ENDED_BY_API), 1)
    assert gone.refused is not None and gone.refused.refusal is s.Refusal.NOT_CONNECTED


def test_an_engine_failure_is_counted_and_ends_the_call_failed() -> None:
    service, records, clock, metrics = make_service()
    call_id = connected(service, clock)
    reaction = service.on_engine_failure(EngineEntry.LEG_STATE, call_id, "KeyError: x", 1)
    assert s.HangupCaller() in reaction.commands and s.HangupRuntime(0) in reaction.commands
    assert (records[-1].status, records[-1].end_reason, records[-1].error) == (
        CallStatus.FAILED, EndReason.ERROR, "KeyError: x")
    service.on_engine_failure(EngineEntry.INCOMING_CALL, None, "bug", 1)
    body = metrics.render()[0].decode()
    for where in ("leg_state", "incoming_call"):
        assert f'callrouter_engine_callback_failures_total{{where="{where}"}} 1.0' in body


def test_a_call_the_engine_releases_before_its_end_is_closed_failed() -> None:
    service, records, clock, _ = make_service()
    call_id = connected(service, clock)
    service.on_released(call_id)  # every leg gone, but the session never finished
    assert records[-1].status == CallStatus.FAILED and not service.active


class FakeControl:
    """``ports.CallControl`` that answers every request with ``verdict`` (or never)."""

    def __init__(self, verdict: s.Refused | None = None, answers: bool = True) -> None:
        self.verdict, self.answers = verdict, answers
        self.requests: list[tuple[uuid.UUID, s.Request]] = []
        self.futures: list[Future[s.Refused | None]] = []

    def submit(self, call_id: uuid.UUID, request: s.Request) -> Future[s.Refused | None]:
        self.requests.append((call_id, request))
        future: Future[s.Refused | None] = Future()
        if self.answers:
            future.set_result(self.verdict)
        self.futures.append(future)
        return future

    def status(self) -> EngineStatus:
        raise NotImplementedError


TRUNK = uuid.UUID(int=9)


def controlled(control: FakeControl, trunk_active: bool = True,
               ) -> tuple[CallController, CallService, uuid.UUID]:
    service, _, clock, _ = make_service()
    store = MemoryStore()

    async def seed() -> None:
        await store.open()
        await store.create_assistant(Assistant(ASSISTANT, "A", "sip:rt@10.0.0.1", T0, T0))
        await store.create_trunk(Trunk(TRUNK, "carrier", "pbx.example", 5070,
                                       TrunkTransport.TCP, "", "user", True, trunk_active, T0,
                                       T0), b"secret")
        await store.create_number(PhoneNumber(uuid.UUID(int=1), "+31850835037", "",
                                              ASSISTANT, TRUNK, True, T0, T0))

    asyncio.run(seed())
    service.control = control
    controller = CallController(service, store, decrypt=lambda b: b.decode() + "!",
                                timeout=0.05)
    return controller, service, connected(service, clock)


def test_control_carries_typed_requests_and_resolves_transfer_targets() -> None:
    """Guards issue 9 item 3: the API's commands reach the SIP side as session requests,
    and a transfer target is resolved here (SIP URI as given; E.164 through the number's
    transfer trunk with its digest credentials), not in the composition root."""
    control = FakeControl()
    controller, _, call_id = controlled(control)

    async def run() -> None:
        assert "sip:desk@pbx" in await controller.control(call_id, TransferCall(DESK))
        await controller.control(call_id, TransferCall("+31201234567"))
        await controller.control(call_id, EndCall())
        assert [r for _, r in control.requests] == [
            s.TransferRequested(DESK),
            s.TransferRequested("sip:+31201234567@pbx.example:5070;transport=tcp",
                                ("user", "secret!")),
            s.EndRequested(EndReason.ENDED_BY_API)]
    asyncio.run(run())


@pytest.mark.parametrize(("verdict", "error"), [
    (s.Refused(s.Refusal.BUSY, "a transfer to x is still ringing"), Conflict),  # 409
    (s.Refused(s.Refusal.NOT_CONNECTED, "the call has ended"), ValidationError),  # 400
])
def test_control_answers_with_the_sessions_verdict(verdict: s.Refused,
                                                   error: type[Exception]) -> None:
    controller, _, call_id = controlled(FakeControl(verdict))

    async def run() -> None:
        with pytest.raises(error, match=verdict.reason):
            await controller.control(call_id, TransferCall(DESK))
    asyncio.run(run())


def test_control_times_out_504_and_the_request_is_withdrawn() -> None:
    control = FakeControl(answers=False)
    controller, _, call_id = controlled(control)

    async def run() -> None:
        with pytest.raises(EngineTimeout) as raised:
            await controller.control(call_id, EndCall())
        assert raised.value.status == 504
        assert control.futures[0].cancelled()  # the SIP thread will not act on it late
    asyncio.run(run())


def test_control_refuses_unknown_calls_calls_not_in_progress_and_trunkless_numbers() -> None:
    controller, service, call_id = controlled(FakeControl(), trunk_active=False)

    async def run() -> None:
        with pytest.raises(NotFound):
            await controller.control(uuid.uuid4(), EndCall())
        with pytest.raises(ValidationError, match="transfer trunk"):
            await controller.control(call_id, TransferCall("+31201234567"))
        service.control = None
        with pytest.raises(EngineUnavailable):
            await controller.control(call_id, EndCall())
    asyncio.run(run())
