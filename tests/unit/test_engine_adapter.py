"""The SIP adapter (pump, timers, leg lifecycle, the callback guard) without pjsua2.

The adapter runs against ``sip.fake.FakeStack``, which plays the caller, the runtimes and
the transfer targets, with the real ``CallService`` behind it and an injected clock:
whole calls in milliseconds. ``tick()`` is one pass of the SIP thread's loop after
``libHandleEvents`` (queued work, due timers, releasing ended legs).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from structlog.testing import capture_logs

from callrouter.domain import session as s
from callrouter.domain.models import Assistant, CallRecord, CallStatus, EndReason, PhoneNumber
from callrouter.domain.routing import Policy, RuntimePool
from callrouter.errors import EngineError
from callrouter.metrics import Metrics
from callrouter.service import CallService
from callrouter.sip.adapter import CallAdapter
from callrouter.sip.fake import FakeStack
from callrouter.sip.stack import Leg, LegKind
from callrouter.sip.trunks import TrunkAccounts
from callrouter.store.memory import MemoryStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ASSISTANT = uuid.UUID(int=7)
RUNTIME = f"sip:{ASSISTANT}@10.0.0.1"
FALLBACK = f"sip:{ASSISTANT}@10.0.0.9"
DESK = "sip:desk@pbx"
TIMING = s.Timing(ring_timeout=5, max_duration=600, transfer_ring_timeout=20)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    adapter: CallAdapter
    sip: FakeStack
    service: CallService
    records: list[CallRecord]
    clock: Clock
    metrics: Metrics

    def call(self) -> tuple[Leg, Leg]:
        """An inbound call answered by the runtime and ACKed: (caller, runtime)."""
        caller = self.sip.invite()
        runtime = self.sip.legs(LegKind.RUNTIME)[-1]
        self.sip.ring(runtime)
        self.sip.pick_up(runtime)
        self.sip.pick_up(caller)  # the caller's ACK
        return caller, runtime

    def submit(self, request: s.Request) -> Future[s.Refused | None]:
        future = self.adapter.submit(self.call_id(), request)
        self.adapter.tick()
        return future

    def call_id(self) -> uuid.UUID:
        (call_id,) = {r.id for r in self.records}
        return call_id

    def later(self, seconds: float) -> None:
        self.clock.now += seconds
        self.adapter.tick()

    def failures(self, where: str) -> float:
        series = f'callrouter_engine_callback_failures_total{{where="{where}"}} '
        for line in self.metrics.render()[0].decode().splitlines():
            if line.startswith(series):
                return float(line.split()[-1])
        raise AssertionError(f"no series {series}")


def harness(sip: FakeStack | None = None) -> Harness:
    clock, records, metrics = Clock(), list[CallRecord](), Metrics()
    service = CallService(
        policy=Policy(max_calls=10), timing=TIMING, pool=RuntimePool(("sip:pool@10.0.0.9",)),
        default_region="NL", metrics=metrics, record=records.append, wall=lambda: T0,
        clock=clock)
    store = MemoryStore()

    async def seed() -> None:
        await store.open()
        await store.create_assistant(Assistant(ASSISTANT, "A", "sip:rt@10.0.0.1", T0, T0))
        await store.create_number(PhoneNumber(uuid.UUID(int=1), "+31850835037", "", ASSISTANT,
                                              None, True, T0, T0))
        await service.reload_routes(store)

    asyncio.run(seed())
    sip = sip or FakeStack()
    adapter = CallAdapter(service, sip, clock)
    return Harness(adapter, sip, service, records, clock, metrics)


def test_a_bridged_call_rings_answers_bridges_and_ends_with_every_leg_released() -> None:
    h = harness()
    caller = h.sip.invite()
    (dialled,) = h.sip.dialled
    runtime = dialled.leg
    assert dialled.target == RUNTIME
    assert dict(dialled.headers)["X-Call-Id"] == str(h.call_id())
    assert dialled.like is caller  # the runtime is offered the caller's codec first
    h.sip.ring(runtime)
    h.sip.pick_up(runtime)
    h.sip.pick_up(caller)
    assert h.sip.asked("answer", caller) == [180, 200]
    assert h.sip.bridges == [(caller, runtime)]
    h.sip.hang_up(caller)
    assert h.sip.asked("hangup", runtime) == [None]
    assert h.adapter.legs_in_use == 0
    h.adapter.tick()
    assert set(h.sip.released) == {caller, runtime}
    assert [r.status for r in h.records] == [
        CallStatus.CONNECTING, CallStatus.IN_PROGRESS, CallStatus.ENDED]


def test_ring_timeout_cancels_the_runtime_and_fails_over_then_503() -> None:
    h = harness()
    caller = h.sip.invite()
    first = h.sip.legs(LegKind.RUNTIME)[0]
    h.sip.ring(first)
    h.later(4.9)
    assert h.sip.asked("hangup", first) == []
    h.later(0.1)
    assert h.sip.asked("hangup", first) == [None]  # CANCEL at the ring timeout
    second = h.sip.legs(LegKind.RUNTIME)[1]
    assert h.sip.dialled[1].target == FALLBACK
    h.sip.refuse(second, 486, "Busy Here")
    assert h.sip.asked("answer", caller) == [180, 503]
    assert h.records[-1].end_reason == EndReason.RUNTIME_UNAVAILABLE


def test_a_runtime_that_cannot_be_dialled_counts_as_a_refusal() -> None:
    h = harness(FakeStack(unreachable={RUNTIME, FALLBACK}))
    caller = h.sip.invite()
    assert h.sip.asked("answer", caller) == [503]
    assert "cannot reach" in (h.records[-1].error or "")
    h.adapter.tick()
    assert h.sip.released == [caller] and h.adapter.legs_in_use == 0


def test_max_duration_ends_both_legs() -> None:
    h = harness()
    caller, runtime = h.call()
    h.later(600)
    assert h.sip.asked("hangup", caller) == [None]
    assert h.sip.asked("hangup", runtime) == [None]
    assert h.records[-1].end_reason == EndReason.MAX_DURATION


def test_media_that_comes_late_is_bridged_then_and_dtmf_goes_to_the_runtime() -> None:
    h = harness(FakeStack(media_ready=False))
    caller, runtime = h.call()
    assert h.sip.bridges == []
    h.sip.media(caller)
    assert h.sip.bridges == [(caller, runtime)]
    h.sip.dtmf(caller, "5")  # reported on the media thread: forwarded on the next tick
    assert h.sip.asked("dtmf", runtime) == []
    h.adapter.tick()
    assert h.sip.asked("dtmf", runtime) == ["5"]


# ---- transfers ----------------------------------------------------------------------------


def test_a_transfer_is_accepted_then_answered_and_the_caller_moves() -> None:
    h = harness()
    caller, runtime = h.call()
    future = h.submit(s.TransferRequested(DESK, ("u", "p")))
    assert future.result(0) is None
    (target,) = h.sip.legs(LegKind.TARGET)
    assert (h.sip.dialled[-1].target, h.sip.dialled[-1].credentials) == (DESK, ("u", "p"))
    assert h.sip.dialled[-1].like is caller  # so is the transfer target
    h.sip.ring(target)
    h.sip.pick_up(target)
    assert h.sip.asked("hangup", runtime) == [None]
    assert h.sip.bridges[-1] == (caller, target)
    assert h.records[-1].end_reason == EndReason.TRANSFERRED
    with capture_logs() as logs:
        h.sip.hang_up(caller)
    assert h.sip.asked("hangup", target) == [None]
    assert [e["end_reason"] for e in logs if e["event"] == "call.ended"] == ["transferred"]
    h.adapter.tick()
    assert h.adapter.legs_in_use == 0 and not h.service.active


def test_a_second_transfer_while_the_first_rings_is_refused_with_the_reason() -> None:
    h = harness()
    h.call()
    assert h.submit(s.TransferRequested(DESK)).result(0) is None
    verdict = h.submit(s.TransferRequested("sip:other@pbx")).result(0)
    assert verdict == s.Refused(s.Refusal.BUSY, f"a transfer to {DESK} is still ringing")
    assert len(h.sip.legs(LegKind.TARGET)) == 1


def test_a_request_for_a_call_that_has_gone_is_refused_as_not_connected() -> None:
    h = harness()
    verdict = h.adapter.submit(uuid.uuid4(), s.EndRequested(EndReason.ENDED_BY_API))
    h.adapter.tick()
    refused = verdict.result(0)
    assert refused is not None and refused.refusal is s.Refusal.NOT_CONNECTED


def test_a_request_the_api_gave_up_on_is_never_acted_on() -> None:
    h = harness()
    h.call()
    future = h.adapter.submit(h.call_id(), s.TransferRequested(DESK))
    assert future.cancel()  # the API's wait timed out before the SIP thread took it up
    h.adapter.tick()
    assert h.sip.legs(LegKind.TARGET) == []


def test_a_target_that_rings_forever_is_cancelled_and_the_caller_stays() -> None:
    """Guards issue 9 item 4 in the adapter: the target's own ring timeout is armed as the
    call's deadline; the caller and the assistant stay up, and a new transfer works."""
    h = harness()
    caller, runtime = h.call()
    h.submit(s.TransferRequested(DESK))
    (target,) = h.sip.legs(LegKind.TARGET)
    h.sip.ring(target)
    h.later(19.9)
    assert h.sip.asked("hangup", target) == []
    h.later(0.1)
    assert h.sip.asked("hangup", target) == [None]
    assert h.sip.asked("hangup", runtime) == [] and h.sip.asked("hangup", caller) == []
    assert h.submit(s.TransferRequested("sip:other@pbx")).result(0) is None
    assert len(h.sip.legs(LegKind.TARGET)) == 2


def test_a_late_200_from_the_transfer_leg_after_the_end_hangs_up_that_leg() -> None:
    """Guards issue 9 item 4: the call ended while the target rang; its 200 crossed our
    CANCEL. Before, the ended session hung up the runtime attempt (the wrong leg) and the
    service had already forgotten the call: the target leg stayed up, holding a slot."""
    h = harness(FakeStack(cancel_completes=False))
    caller, runtime = h.call()
    h.submit(s.TransferRequested(DESK))
    (target,) = h.sip.legs(LegKind.TARGET)
    h.sip.hang_up(caller)
    assert h.sip.asked("hangup", target) == [None]  # CANCEL
    h.sip.pick_up(target)  # ... crossed by its 200
    assert h.sip.asked("hangup", target) == [None, None]  # BYE to that leg
    assert h.sip.asked("hangup", runtime) == [None]  # the runtime only once
    h.sip.refuse(target, 200)
    h.adapter.tick()
    assert h.adapter.legs_in_use == 0 and set(h.sip.released) == {caller, runtime, target}


# ---- the callback guard -------------------------------------------------------------------


def _raising(original: Callable[..., Any], when: Callable[..., bool]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        if when(*args):
            raise RuntimeError("bug")
        return original(*args)
    return call


def test_an_invite_whose_handling_raises_is_answered_500_and_released() -> None:
    """Guards issue 9 item 2: the exception is logged and counted, not printed by SWIG,
    and the call slot is not leaked."""
    h = harness()
    h.service.on_invite = _raising(h.service.on_invite, lambda _: True)  # type: ignore[method-assign]
    with capture_logs() as logs:
        caller = h.sip.invite()
    assert h.sip.asked("answer", caller) == [500]
    h.adapter.tick()
    assert h.sip.released == [caller] and h.adapter.legs_in_use == 0
    (failed,) = [e for e in logs if e["event"] == "sip.callback_failed"]
    assert failed["where"] == "incoming_call" and failed["log_level"] == "error"
    assert h.failures("incoming_call") == 1


def test_a_handler_failure_on_a_ringing_call_rejects_the_caller_and_closes_it_failed() -> None:
    h = harness()
    h.service.on_event = _raising(  # type: ignore[method-assign]
        h.service.on_event, lambda _, event, __: isinstance(event, s.RuntimeRinging))
    with capture_logs() as logs:
        caller = h.sip.invite()
        runtime = h.sip.legs(LegKind.RUNTIME)[0]
        h.sip.ring(runtime)
    assert h.sip.asked("answer", caller) == [500]
    assert h.sip.asked("hangup", runtime) == [None]
    record = h.records[-1]
    assert (record.status, record.end_reason) == (CallStatus.FAILED, EndReason.ERROR)
    assert "RuntimeError: bug" in (record.error or "")
    (failed,) = [e for e in logs if e["event"] == "sip.callback_failed"]
    assert (failed["where"], failed["call_id"]) == ("call_event", str(record.id))
    assert h.failures("call_event") == 1
    h.adapter.tick()
    assert h.adapter.legs_in_use == 0 and not h.service.active


def test_a_failing_leg_callback_hangs_up_both_legs_of_a_connected_call() -> None:
    h = harness()
    caller, runtime = h.call()
    failing = [runtime]  # reading the runtime leg's state fails, once

    def once(leg: Leg) -> bool:
        if leg in failing:
            failing.remove(leg)
            return True
        return False

    h.sip.status = _raising(h.sip.status, once)  # type: ignore[method-assign]
    h.sip.hang_up(runtime)  # the BYE's callback fails before its event is known
    assert h.sip.asked("hangup", caller) == [None]
    assert h.records[-1].status == CallStatus.FAILED
    assert h.failures("leg_state") == 1
    assert not h.service.active


def test_a_failing_control_request_answers_an_error_and_ends_the_call() -> None:
    h = harness()
    caller, runtime = h.call()
    h.service.on_request = _raising(h.service.on_request, lambda *_: True)  # type: ignore[method-assign]
    future = h.submit(s.TransferRequested(DESK))
    with pytest.raises(EngineError):
        future.result(0)
    assert h.sip.asked("hangup", caller) == [None]
    assert h.sip.asked("hangup", runtime) == [None]
    assert h.failures("control") == 1


def test_queued_work_that_raises_is_logged_and_the_loop_goes_on() -> None:
    h = harness()
    done: list[int] = []

    def broken() -> None:
        raise RuntimeError("bug")

    h.adapter.call_soon(broken)
    h.adapter.call_soon(lambda: done.append(1))
    h.adapter.tick()
    assert done == [1] and h.failures("task") == 1


# ---- trunk accounts ----------------------------------------------------------------------


def test_a_trunk_password_change_applies_to_the_next_dial() -> None:
    """Guards issue 9 item 4: the account for (host, user) was cached forever, so a
    changed trunk password was ignored until a restart."""
    created: list[tuple[str, str, str]] = []
    updated: list[tuple[str, str, str]] = []

    def create(host: str, user: str, password: str) -> list[str]:
        created.append((host, user, password))
        return [password]

    def update(account: list[str], host: str, user: str, password: str) -> None:
        updated.append((host, user, password))
        account[0] = password

    accounts = TrunkAccounts(create, update)
    target = "sip:+31201234567@pbx.example:5060;transport=udp"
    first = accounts.get(target, ("u", "old"))
    assert accounts.get(target, ("u", "old")) is first and len(created) == 1
    assert accounts.get(target, ("u", "new")) is first
    assert first == ["new"] and updated == [("pbx.example:5060", "u", "new")]
    assert accounts.get("sip:1@other:5060", ("u", "new")) is not first
    assert accounts.all() == [first, ["new"]]


def test_the_adapter_runs_without_pjsua2() -> None:
    """Guards issue 9 item 8: the adapter, the seam and the fake import no pjsua2, so these
    tests run (in milliseconds) where the engine is not built."""
    code = ("import sys, callrouter.sip.adapter, callrouter.sip.fake, callrouter.sip.trunks; "
            "assert 'pjsua2' not in sys.modules, 'pjsua2 imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
