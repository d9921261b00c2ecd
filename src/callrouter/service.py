"""The call service: the one place where routing, sessions, records, metrics and
logs meet.

How it works: the SIP adapter calls ``CallService.on_invite`` and ``on_event`` on
the SIP thread (``ports.CallHandler``). ``on_invite`` normalises the dialled
number, asks ``domain.routing.decide`` against the current ``RouteTable``
snapshot, and either rejects (a value) or starts a ``CallSession`` for a bridged
call. ``on_event`` feeds the session and turns its bookkeeping commands
(``MarkAnswered``, ``Finish``) into call-record updates, metrics and one log line;
the SIP commands go back to the adapter.

Nothing here blocks the SIP thread: call records go to ``CallRecorder``, which
hands them to the asyncio loop thread-safely and writes them in batches. The
route table is rebuilt from the store after every change (``reload_routes``) and
swapped in with one assignment, so the very next INVITE sees it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from callrouter.domain import session as s
from callrouter.domain.models import CallRecord, CallStatus, EndReason
from callrouter.domain.numbers import mask, normalise
from callrouter.domain.routing import (
    Bridge,
    CallContext,
    Outcome,
    Policy,
    Reject,
    RouteTable,
    RuntimePool,
    decide,
)
from callrouter.domain.sipuri import dialled_user, runtime_request_uri, uri_of, user_part
from callrouter.errors import InvalidNumber, StoreError
from callrouter.metrics import Metrics
from callrouter.ports import (
    Accepted,
    CallControl,
    InboundInvite,
    Reaction,
    Rejected,
    Store,
)

log = structlog.get_logger("callrouter.calls")

REASON_PHRASES = {
    404: "Not Found", 403: "Forbidden", 480: "Temporarily Unavailable",
    486: "Busy Here", 503: "Service Unavailable", 603: "Decline",
}


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class ActiveCall:
    record: CallRecord
    session: s.CallSession
    invite_at: float
    dial_at: float
    dialled: str
    caller: str


class CallRecorder:
    """Writes call records from any thread, in batches, on the asyncio loop.

    ``submit`` (SIP thread) appends to a locked deque and wakes the loop only when the
    deque goes from empty to non-empty; the writer then waits ``BATCH_WINDOW`` so a burst
    becomes one transaction. Writes are serialised, so a later state of a call never
    lands before an earlier one, and a failed write is retried, never dropped.
    """

    BATCH_WINDOW = 0.1

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop
        self._pending: collections.deque[CallRecord] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._wakeup = asyncio.Event()
        self._writing = asyncio.Lock()

    def submit(self, record: CallRecord) -> None:
        with self._lock:
            self._pending.append(record)
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._wakeup.set)

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(self.BATCH_WINDOW)
            await self.flush()

    async def flush(self) -> None:
        """Write everything submitted so far."""
        async with self._writing:
            with self._lock:
                batch = list(self._pending)
                self._pending.clear()
                self._scheduled = False
            if batch:
                await self._write(list({r.id: r for r in batch}.values()))

    async def _write(self, records: list[CallRecord]) -> None:
        delay = 0.05
        while True:
            try:
                await self._store.upsert_calls(records)
                return
            except StoreError as exc:
                log.error("call.record_write_failed", error=str(exc), records=len(records))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


class CallService:
    """Implements ``ports.CallHandler``; see the module docstring."""

    def __init__(self, *, policy: Policy, timing: s.Timing, pool: RuntimePool,
                 default_region: str, metrics: Metrics, record: Callable[[CallRecord], None],
                 wall: Callable[[], datetime] = _utcnow,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.timing = timing
        self.pool = pool
        self.region = default_region
        self.metrics = metrics
        self.record = record
        self.wall = wall
        self.clock = clock
        self.routes = RouteTable()
        self.draining = False
        self.active: dict[uuid.UUID, ActiveCall] = {}
        self.control: CallControl | None = None

    # ---- routes -------------------------------------------------------------------

    async def reload_routes(self, store: Store) -> None:
        numbers, assistants = await store.list_numbers(), await store.list_assistants()
        self.routes = RouteTable.build(list(numbers), list(assistants))

    # ---- CallHandler: the SIP thread -------------------------------------------------

    def on_invite(self, invite: InboundInvite) -> Accepted | Rejected:
        self.metrics.invite_received()
        self.metrics.response_sent(100)  # pjsua sent 100 Trying before handing us the INVITE
        self.metrics.first_response(max(0.0, self.clock() - invite.received_at))
        dialled_raw = dialled_user(invite.request_uri, invite.to_header)
        dialled = self._e164(dialled_raw)
        ctx = CallContext(dialled, len(self.active), self.draining)
        decision = decide(ctx, self.routes, self.policy, self.pool)
        caller = self._caller(invite.from_header)
        record = self._new_record(invite, dialled or dialled_raw, caller, decision)
        self.metrics.routing_decision(decision.outcome, self.clock() - invite.received_at)
        if isinstance(decision, Reject):
            return self._reject(invite, record, decision)
        return self._bridge(invite, record, decision, caller)

    def on_event(self, call_id: uuid.UUID, event: s.Event, now: float) -> Reaction:
        call = self.active.get(call_id)
        if call is None:
            return Reaction((), None)
        if isinstance(event, s.RuntimeAnswered) and event.attempt == call.session.attempt:
            self.metrics.runtime_answered(now - call.dial_at)
        if isinstance(event, s.RuntimeFailed):
            self._note_runtime_failure(call, event)
        commands = call.session.handle(event, now)
        for command in commands:
            self._book(call, command, now)
        if any(isinstance(c, s.DialRuntime) for c in commands):
            call.dial_at = now
        return Reaction(tuple(commands), call.session.next_deadline())

    # ---- helpers ----------------------------------------------------------------------

    def _e164(self, raw: str) -> str | None:
        try:
            return normalise(raw, self.region)
        except InvalidNumber:
            return None

    def _caller(self, from_header: str) -> str:
        raw = user_part(uri_of(from_header)) or "anonymous"
        return self._e164(raw) or raw

    def _new_record(self, invite: InboundInvite, dialled: str, caller: str,
                    decision: Bridge | Reject) -> CallRecord:
        now = self.wall()
        route = decision.route
        return CallRecord(
            id=uuid.uuid4(), status=CallStatus.CONNECTING, caller_phone=caller,
            assistant_phone=dialled, number_id=route.number_id if route else None,
            assistant_id=route.assistant_id if route else None,
            sip_call_id=invite.sip_call_id, started_at=None, ended_at=None,
            end_reason=None, error=None, created_at=now, updated_at=now,
        )

    def _reject(self, invite: InboundInvite, record: CallRecord, decision: Reject) -> Rejected:
        now = self.wall()
        self.record(dataclasses.replace(
            record, status=CallStatus.FAILED, end_reason=decision.end_reason,
            ended_at=now, updated_at=now))
        self.metrics.response_sent(decision.code)
        self._log_decision(invite, record, decision.outcome, decision.code)
        phrase = REASON_PHRASES.get(decision.code, "")
        return Rejected(decision.code, phrase, decision.retry_after)

    def _bridge(self, invite: InboundInvite, record: CallRecord, decision: Bridge,
                caller: str) -> Accepted:
        assistant = str(decision.route.assistant_id)
        targets = tuple(runtime_request_uri(t, assistant) for t in decision.targets)
        now = self.clock()
        session = s.CallSession(targets, self.timing, now)
        call = ActiveCall(record, session, invite.received_at, now,
                          record.assistant_phone, caller)
        self.active[record.id] = call
        self.record(record)
        self.metrics.call_started()
        self._log_decision(invite, record, decision.outcome, 100)
        headers = (
            ("X-Assistant-Id", assistant),
            ("X-Number-Id", str(decision.route.number_id)),
            ("X-Call-Id", str(record.id)),
            ("X-Caller-Number", caller),
            ("X-Dialled-Number", record.assistant_phone),
        )
        commands = session.start(now)
        return Accepted(record.id, headers, Reaction(tuple(commands), session.next_deadline()))

    def _note_runtime_failure(self, call: ActiveCall, event: s.RuntimeFailed) -> None:
        # Only the runtime being dialled counts (transfer legs have their own log line).
        if event.attempt == call.session.attempt and event.attempt < len(call.session.targets):
            log.info("call.runtime_failed", call_id=str(call.record.id),
                     target=call.session.targets[event.attempt], code=event.code,
                     reason=event.reason)

    def _book(self, call: ActiveCall, command: s.Command, now: float) -> None:
        match command:
            case s.AnswerCaller():
                self.metrics.response_sent(200)
            case s.RingCaller():
                self.metrics.response_sent(180)
            case s.RejectCaller(code):
                self.metrics.response_sent(code)
            case s.MarkAnswered():
                self._answered(call, now)
            case s.MarkTransferred(_, target):
                self._transferred(call, target)
            case s.TransferFailed(target, code, reason):
                log.warning("call.transfer_failed", call_id=str(call.record.id), target=target,
                            code=code, reason=reason)
            case s.Finish():
                self._finished(call, command, now)

    def _answered(self, call: ActiveCall, now: float) -> None:
        wall = self.wall()
        call.record = dataclasses.replace(
            call.record, status=CallStatus.IN_PROGRESS, started_at=wall, updated_at=wall)
        self.record(call.record)
        self.metrics.caller_answered(now - call.invite_at)

    def _transferred(self, call: ActiveCall, target: str) -> None:
        """The assistant's call ends here (end_reason transferred); the caller's goes on
        with the transfer target, still counted as active until it hangs up."""
        wall = self.wall()
        call.record = dataclasses.replace(
            call.record, status=CallStatus.ENDED, end_reason=EndReason.TRANSFERRED,
            ended_at=wall, updated_at=wall)
        self.record(call.record)
        log.info("call.transferred", call_id=str(call.record.id), target=target,
                 duration_seconds=call.record.duration_seconds)

    def _finished(self, call: ActiveCall, finish: s.Finish, now: float) -> None:
        self.active.pop(call.record.id, None)
        if call.record.end_reason == EndReason.TRANSFERRED:
            self.metrics.call_ended(EndReason.TRANSFERRED, float(call.record.duration_seconds or 0))
            return  # the record was closed at the transfer
        wall = self.wall()
        call.record = dataclasses.replace(
            call.record, status=finish.status, end_reason=finish.reason, ended_at=wall,
            updated_at=wall, error=finish.error)
        self.record(call.record)
        duration = call.record.duration_seconds
        self.metrics.call_ended(finish.reason, None if call.record.started_at is None
                                else float(duration or 0))
        if finish.reason == EndReason.RUNTIME_UNAVAILABLE:
            self.metrics.routing_decision(Outcome.RUNTIME_UNAVAILABLE, now - call.invite_at)
        elif finish.reason == EndReason.CALLER_CANCELLED:
            self.metrics.routing_decision(Outcome.CALLER_CANCELLED, now - call.invite_at)
        if log.is_enabled_for(logging.INFO):
            self._log_end(call, finish, now, duration)

    def _log_end(self, call: ActiveCall, finish: s.Finish, now: float,
                 duration: int | None) -> None:
        log.info("call.ended", call_id=str(call.record.id), sip_call_id=call.record.sip_call_id,
                 dialled=call.dialled, caller=mask(call.caller),
                 assistant_id=str(call.record.assistant_id), status=str(finish.status),
                 end_reason=str(finish.reason), duration_seconds=duration,
                 since_invite_ms=round((now - call.invite_at) * 1000, 1), error=finish.error)

    def _log_decision(self, invite: InboundInvite, record: CallRecord, outcome: Outcome,
                      code: int) -> None:
        if not log.is_enabled_for(logging.INFO):
            return  # building the fields is most of the cost: skip it when dropped
        log.info("call.routed", call_id=str(record.id), sip_call_id=invite.sip_call_id,
                 dialled=record.assistant_phone, caller=mask(record.caller_phone),
                 assistant_id=str(record.assistant_id) if record.assistant_id else None,
                 outcome=str(outcome), sip_status=code,
                 decision_ms=round((self.clock() - invite.received_at) * 1000, 3))

    # ---- drain and shutdown (the asyncio side) ---------------------------------------

    def end_call(self, call_id: uuid.UUID, reason: EndReason) -> bool:
        if call_id not in self.active or self.control is None:
            return False
        self.control.deliver(call_id, s.EndRequested(reason))
        return True

    def transfer(self, call_id: uuid.UUID, target: str,
                 credentials: tuple[str, str] | None) -> bool:
        if call_id not in self.active or self.control is None:
            return False
        self.control.deliver(call_id, s.TransferRequested(target, credentials))
        return True

    def end_all(self, reason: EndReason) -> None:
        for call_id in list(self.active):
            self.end_call(call_id, reason)

    def abandon_all(self, reason: EndReason) -> None:
        """Close the records of calls the engine can no longer end (it has stopped)."""
        for call in list(self.active.values()):
            self._finished(call, s.Finish(CallStatus.ENDED, reason, self.clock()), self.clock())
