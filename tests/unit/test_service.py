"""The call service with an in-memory store and no SIP engine: INVITE in, values out.

This is the middle test tier: the real routing, sessions, records and metrics, with
the SIP adapter replaced by direct calls to ``on_invite``/``on_event``.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from callrouter.domain import session as s
from callrouter.domain.models import Assistant, CallRecord, CallStatus, EndReason, PhoneNumber
from callrouter.domain.routing import Policy, RuntimePool
from callrouter.metrics import Metrics
from callrouter.ports import Accepted, InboundInvite, Rejected
from callrouter.service import CallService
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
    service.active.clear()
    service.draining = True
    drained = service.on_invite(invite("sip:+31850835037@r"))
    assert isinstance(drained, Rejected) and drained.code == 503


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
    body = metrics.render()[0].decode()
    assert 'callrouter_routing_decisions_total{outcome="runtime_unavailable"} 1.0' in body


def test_events_for_unknown_calls_are_ignored() -> None:
    service, records, _, _ = make_service()
    reaction = service.on_event(uuid.uuid4(), s.CallerHungUp(), 1)
    assert reaction.commands == () and records == []
