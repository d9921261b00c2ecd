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
hands them to the asyncio loop thread-safely and writes them in batches. Each
change to the number table is applied to the route table as a delta
(``apply_route_changes``) and swapped in with one assignment, so the very next INVITE
sees it; ``reload_routes`` rebuilds it whole at start (see docs/architecture.md, "The
route table").

A flood is survived, not absorbed: every rejected INVITE is counted in the metrics, but
only ``calls.rejected_records_per_second`` of each outcome per second become a record
and a ``call.routed`` line (the rest are summed up in one ``call.rejections_unrecorded``
line); bridged calls are always recorded. ``CallPruner`` deletes records older than
``calls.retention_days`` once a day, in small transactions on the asyncio loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import assert_never

import structlog

from callrouter.domain import session as s
from callrouter.domain.models import CallRecord, CallStatus, EndReason, Trunk, WebhookDelivery
from callrouter.domain.numbers import mask, normalise
from callrouter.domain.routetable import (
    COMPACT_AT,
    AssistantUpserted,
    Compaction,
    RouteTableBuilder,
)
from callrouter.domain.routing import (
    Bridge,
    CallContext,
    Outcome,
    Policy,
    Reject,
    Route,
    RouteChange,
    RouteTable,
    RuntimePool,
    bridge,
    decide,
)
from callrouter.domain.sampling import PerSecondSampler
from callrouter.domain.sipuri import dialled_user, runtime_request_uri, uri_of, user_part
from callrouter.domain.webhooks import (
    ASSISTANT_REQUEST,
    STATUS_UPDATE,
    AssistantAsk,
    AssistantHooks,
    AssistantReply,
    CallFacts,
    ReplyKind,
    StatusEvent,
    WebhookDirectory,
    WebhookTarget,
    new_delivery,
    reason_header,
    status_update_body,
)
from callrouter.errors import (
    CommandRefused,
    Conflict,
    EngineTimeout,
    EngineUnavailable,
    InvalidNumber,
    NotFound,
    StoreError,
    StoreUnavailable,
    ValidationError,
)
from callrouter.metrics import Metrics
from callrouter.ports import (
    Accepted,
    CallControl,
    ControlCommand,
    EndCall,
    EngineEntry,
    Held,
    InboundInvite,
    OutboundCall,
    Reaction,
    Rejected,
    ResponseSent,
    Ruling,
    Store,
    TransferCall,
)
from callrouter.store.spool import CallSpool, Entry

log = structlog.get_logger("callrouter.calls")

REASON_PHRASES = {
    404: "Not Found", 403: "Forbidden", 480: "Temporarily Unavailable",
    486: "Busy Here", 503: "Service Unavailable", 603: "Decline",
}
# A 503 that means "this router takes no new call, another may" says so in its phrase:
# a balancer in front (deploy/kamailio) fails over on these and passes any other 503 (a
# runtime's failure, which every router would meet) to the caller. The engine's guard
# answers with the same phrases (scripts/engine/callrouter_guard_impl.hpp).
NO_ROOM_PHRASES = {Outcome.DRAINING: "Draining", Outcome.OVER_CAPACITY: "Over Capacity"}


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
    hook: WebhookTarget | None = None  # where its status-update events go
    facts: CallFacts | None = None


@dataclass
class HeldInvite:
    """An INVITE ringing while its ``assistant-request`` is out (never on the SIP thread)."""

    invite: InboundInvite
    record: CallRecord
    caller: str
    route: Route


class CallRecorder:
    """Writes call records from any thread, in batches, on the asyncio loop.

    ``submit`` (SIP thread) appends to a locked deque and wakes the loop only when the
    deque goes from empty to non-empty; the writer then waits ``BATCH_WINDOW`` so a burst
    becomes one transaction. Writes are serialised, so a later state of a call never
    lands before an earlier one, and a failed write is retried, never dropped.

    With a ``spool`` (``store.spool.CallSpool``, on disk), a batch the database cannot
    take now (``StoreUnavailable``) is spooled instead of retried in memory, and so is
    every batch after it until the spool has been written (``flush_spool``, tried every
    ``SPOOL_RETRY`` seconds and before each batch): records survive an outage and a
    restart during it, in order, each with the outbox events it caused (their bodies
    carry the number names last read), written back in the same transaction as it.
    """

    BATCH_WINDOW = 0.1
    SPOOL_RETRY = 1.0
    SPOOL_BATCH = 500
    NAMES_KEPT = 10_000  # number names remembered for events built during an outage

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop,
                 spool: CallSpool | None = None, *, retry_hours: float = 24.0,
                 on_outbox: Callable[[], None] | None = None,
                 wall: Callable[[], datetime] = _utcnow) -> None:
        self._store = store
        self._loop = loop
        self.spool = spool
        self._retry_hours = retry_hours
        self._on_outbox = on_outbox
        self._wall = wall
        self._pending: collections.deque[tuple[CallRecord, StatusEvent | None]] = \
            collections.deque()
        self._names: dict[uuid.UUID, str] = {}  # number names last read (for an outage)
        self._lock = threading.Lock()
        self._scheduled = False
        self._wakeup = asyncio.Event()
        self._writing = asyncio.Lock()

    def submit(self, record: CallRecord) -> None:
        self.submit_event(record, None)

    def submit_event(self, record: CallRecord, event: StatusEvent | None) -> None:
        """``record``, and the ``status-update`` it causes, to be written in one transaction."""
        with self._lock:
            self._pending.append((record, event))
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._wakeup.set)

    @property
    def spooled(self) -> int:
        """Records waiting on disk for the database."""
        return 0 if self.spool is None else self.spool.backlog

    async def run(self) -> None:
        while True:
            if self.spooled:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.SPOOL_RETRY)
            else:
                await self._wakeup.wait()
            if not self._wakeup.is_set():  # the spool's retry, nothing new
                async with self._writing:
                    await self._flush_spool()
                continue
            self._wakeup.clear()
            await asyncio.sleep(self.BATCH_WINDOW)
            await self.flush()

    async def flush(self) -> None:
        """Write everything submitted so far (to the spool if the database is away)."""
        async with self._writing:
            with self._lock:
                batch = list(self._pending)
                self._pending.clear()
                self._scheduled = False
            if batch:
                records = list({r.id: r for r, _ in batch}.values())
                await self._write(records, [(r, e) for r, e in batch if e is not None])

    async def flush_spool(self) -> bool:
        """Write the spooled records (and their outbox events) to the database; True when
        none are left."""
        async with self._writing:
            return await self._flush_spool()

    async def _flush_spool(self) -> bool:
        spool = self.spool
        if spool is None or not spool.backlog:
            return True
        entries = await asyncio.to_thread(spool.read)
        written = 0
        try:
            for start in range(0, len(entries), self.SPOOL_BATCH):
                written += await self._replay(entries[start:start + self.SPOOL_BATCH])
        except StoreError as exc:
            log.debug("call.spool_flush_failed", error=str(exc), spooled=spool.backlog)
            return False
        await asyncio.to_thread(spool.clear)
        log.info("call.spool_written", records=len(entries), deliveries=written)
        if written and self._on_outbox is not None:
            self._on_outbox()
        return True

    async def _replay(self, chunk: Sequence[Entry]) -> int:
        """Spooled records and their outbox events in one transaction; how many events."""
        records = [r for r, _ in chunk]
        deliveries = [d for _, outbox in chunk for d in outbox]
        try:
            await self._store.upsert_calls(records, deliveries)
        except Conflict:
            # Written once already, by a run that crashed before emptying the spool: the
            # records are upserted again, the events already stored are not added twice.
            deliveries = [d for d in deliveries
                          if await self._store.get_delivery(d.id) is None]
            await self._store.upsert_calls(records, deliveries)
        return len(deliveries)

    async def _write(self, records: list[CallRecord],
                     events: list[tuple[CallRecord, StatusEvent]]) -> None:
        if self.spool is not None and (self.spool.backlog and not await self._flush_spool()):
            await self._spool(records, events)
            return
        delay = 0.05
        while True:
            try:
                deliveries = await self._deliveries(events)
                await self._store.upsert_calls(records, deliveries)
                if deliveries and self._on_outbox is not None:
                    self._on_outbox()
                return
            except StoreUnavailable as exc:
                if self.spool is None:
                    log.error("call.record_write_failed", error=str(exc), records=len(records))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                log.warning("call.records_spooled", error=str(exc), records=len(records),
                            path=str(self.spool.path))
                await self._spool(records, events)
                return
            except StoreError as exc:
                log.error("call.record_write_failed", error=str(exc), records=len(records))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _spool(self, records: list[CallRecord],
                     events: list[tuple[CallRecord, StatusEvent]]) -> None:
        """``records`` to the spool, each with the outbox events it causes (built with the
        number names last read: the database is away)."""
        assert self.spool is not None
        deliveries = await self._deliveries(events, offline=True)
        outbox: dict[uuid.UUID, list[WebhookDelivery]] = {}
        for delivery in deliveries:
            if delivery.call_id is not None:
                outbox.setdefault(delivery.call_id, []).append(delivery)
        await asyncio.to_thread(self.spool.append,
                                [(r, outbox.get(r.id, [])) for r in records])

    async def _deliveries(self, events: list[tuple[CallRecord, StatusEvent]], *,
                          offline: bool = False) -> list[WebhookDelivery]:
        """Each event's body, with the number's current name (the SIP thread does not know
        it), built here on the loop, never on the SIP thread. ``offline`` (the database is
        away): the name last read, if any."""
        names: dict[uuid.UUID, str] = {}
        deliveries = []
        for record, event in events:
            facts = event.facts
            if facts.number_id is not None and facts.number_id not in names:
                names[facts.number_id] = await self._number_name(facts.number_id, offline)
            if facts.number_id is not None:
                facts = dataclasses.replace(facts, number_name=names[facts.number_id])
            body = status_update_body(facts, record, event.at)
            deliveries.append(new_delivery(record.id, event.target.url,
                                           event.target.assistant_id, body, event.at,
                                           self._retry_hours))
        return deliveries

    async def _number_name(self, number_id: uuid.UUID, offline: bool) -> str:
        if offline:
            return self._names.get(number_id, "")
        number = await self._store.get_number(number_id)
        if len(self._names) >= self.NAMES_KEPT:
            self._names.clear()
        name = self._names[number_id] = number.name if number else ""
        return name


class CallPruner:
    """Deletes call records older than the retention, at start and then once a day.

    Each batch (``batch`` rows) is one short store transaction and the loop yields between
    batches, so the record writer and the API interleave with a long prune; the SIP thread
    never touches the store, so routing never waits for it. ``retention_days`` 0 keeps
    every record.
    """

    INTERVAL = 24 * 3600.0

    def __init__(self, store: Store, *, retention_days: int,
                 wall: Callable[[], datetime] = _utcnow, batch: int = 1000) -> None:
        self._store = store
        self._retention = timedelta(days=retention_days)
        self._wall = wall
        self._batch = batch

    async def run(self) -> None:
        while True:
            try:
                pruned = await self.prune_once()
                if pruned:
                    log.info("calls.pruned", count=pruned, retention_days=self._retention.days)
            except StoreError as exc:
                log.error("calls.prune_failed", error=str(exc))  # tried again tomorrow
            await asyncio.sleep(self.INTERVAL)

    async def prune_once(self) -> int:
        """Calls, then the webhook events (delivered or given up) of the same age."""
        if not self._retention:
            return 0
        before = self._wall() - self._retention
        pruned = await self._prune(self._store.delete_calls_before, before)
        await self._prune(self._store.delete_deliveries_before, before)
        return pruned

    async def _prune(self, delete: Callable[[datetime, int], Awaitable[int]],
                     before: datetime) -> int:
        pruned = 0
        while True:
            deleted = await delete(before, self._batch)
            pruned += deleted
            if deleted < self._batch:
                return pruned
            await asyncio.sleep(0)  # let the record writer and the API in between batches


BULK_REBUILD_AT = 10_000  # route changes in one batch from which a full rebuild is cheaper


class CallService:
    """Implements ``ports.CallHandler``; see the module docstring."""

    def __init__(self, *, policy: Policy, timing: s.Timing, pool: RuntimePool,
                 default_region: str, metrics: Metrics, record: Callable[[CallRecord], None],
                 wall: Callable[[], datetime] = _utcnow,
                 clock: Callable[[], float] = time.monotonic,
                 rejected_records_per_second: int = 10,
                 notify: Callable[[CallRecord, StatusEvent], None] | None = None) -> None:
        self.policy = policy
        self.timing = timing
        self.pool = pool
        self.region = default_region
        self.metrics = metrics
        self.record = record
        # A record change that comes with a status-update (written together).
        self.notify = notify or (lambda changed, _event: record(changed))
        self.webhooks = WebhookDirectory()  # swapped whole on every change, like routes
        # Sends an assistant-request on the asyncio side (app wires it); None: never asks.
        self.ask: Callable[[AssistantAsk], None] | None = None
        self._held: dict[uuid.UUID, HeldInvite] = {}
        self.wall = wall
        self.clock = clock
        self.routes = RouteTable()
        self._rebuilding: list[list[RouteChange]] = []  # changes to replay after a rebuild
        self._compacting: asyncio.Task[None] | None = None
        self.compact_routes_at = COMPACT_AT  # config numbers.route_compaction_at
        self.router_name = ""  # config node.name, in every call record
        self.draining = False
        self.active: dict[uuid.UUID, ActiveCall] = {}
        # Ended calls whose legs the engine still holds: a late answer must reach the session.
        self._ended: dict[uuid.UUID, ActiveCall] = {}
        self.control: CallControl | None = None
        # A flood of rejected INVITEs is counted in full but recorded and logged sampled.
        self._rejections = PerSecondSampler[Outcome](rejected_records_per_second)

    # ---- routes -------------------------------------------------------------------

    async def apply_route_changes(self, changes: Sequence[RouteChange], store: Store) -> None:
        """Changes (an API write, a bulk import, later a cluster notification), applied as
        a delta and swapped in with one assignment: the SIP thread's next INVITE sees them.
        A bulk import of more than ``BULK_REBUILD_AT`` is a full rebuild from ``store``
        (already holding them) instead: cheaper than that many deltas, read in batches
        that let the loop breathe, and never on the SIP thread."""
        if len(changes) > BULK_REBUILD_AT:
            await self.reload_routes(store)
            return
        if len(changes) == 1:
            self.apply_route_change(changes[0])
        else:
            self._apply_all(changes)

    def apply_route_change(self, change: RouteChange) -> None:
        self.routes = self.routes.apply(change)
        self._after_change([change])

    def _apply_all(self, changes: Sequence[RouteChange]) -> None:
        self.routes = self.routes.apply_all(changes)
        self._after_change(changes)

    def _after_change(self, changes: Sequence[RouteChange]) -> None:
        for replay in self._rebuilding:
            replay.extend(changes)
        if self.routes.pending >= self.compact_routes_at and self._compacting is None:
            self._compacting = asyncio.get_running_loop().create_task(
                self._compact_routes(), name="route-compaction")

    async def _compact_routes(self) -> None:
        """Merge the route table's overlay of recent changes into its arrays, a slice per
        loop iteration, so neither the API nor the SIP thread waits for all of it."""
        try:
            compaction = Compaction(self.routes)
            while not compaction.step(16_384):
                await asyncio.sleep(0)
            self.routes = compaction.finish(self.routes)
        finally:
            self._compacting = None

    async def reload_routes(self, store: Store, batch: int = 20_000) -> None:
        """The full rebuild (start, safety net): read in short batches on the asyncio loop,
        never on the SIP thread, which keeps routing on the old table until the swap.
        Changes applied meanwhile are applied again to the new table (they are idempotent),
        so a change made during a rebuild is never lost."""
        replay: list[RouteChange] = []
        self._rebuilding.append(replay)
        try:
            builder = RouteTableBuilder(
                AssistantUpserted(a.id, a.runtime_uri) for a in await store.list_assistants())
            after = ""
            while rows := await store.route_rows(after, batch):
                builder.add_rows(rows)
                after = rows[-1][0]
            table = builder.table()
            for change in replay:
                table = table.apply(change)
            self.routes = table
        finally:
            self._rebuilding.remove(replay)

    def set_assistant_hooks(self, assistant_id: uuid.UUID, hooks: AssistantHooks | None) -> None:
        """An assistant's webhook (and runtime) changed, or it was deleted (None)."""
        self.webhooks = self.webhooks.with_assistant(assistant_id, hooks)

    # ---- CallHandler: the SIP thread -------------------------------------------------

    def on_invite(self, invite: InboundInvite) -> Accepted | Rejected | Held:
        self.metrics.invite_received()
        # An INVITE to a registration's Contact names our Contact user in the Request-URI;
        # the number the caller dialled is in To then.
        request_uri = "" if invite.via_registration else invite.request_uri
        dialled_raw = dialled_user(request_uri, invite.to_header)
        dialled = self._e164(dialled_raw)
        ctx = CallContext(dialled, len(self.active) + len(self._held), self.draining)
        decision = decide(ctx, self.routes, self.policy, self.pool)
        caller = self._caller(invite.from_header)
        record = self._new_record(invite, dialled or dialled_raw, caller, decision)
        target = self._asked(decision)
        if target is not None and decision.route is not None:
            return self._hold(invite, record, caller, decision.route, target)
        # Counted once, here: what later becomes of a bridged call goes to calls_ended.
        self.metrics.routing_decision(decision.outcome, self.clock() - invite.received_at)
        if isinstance(decision, Reject):
            return self._reject(invite, record, decision)
        return self._bridge(invite, record, decision, caller)

    def on_outbound(self, call: OutboundCall, now: float) -> Accepted | Rejected:
        """An outbound call (API): refused like an INVITE while draining or at capacity,
        else recorded (direction outbound) and its session started: dial the customer."""
        if self.draining or len(self.active) >= self.policy.max_calls:
            return Rejected(503, "draining" if self.draining else "at capacity (sip.max_calls)",
                            self.policy.retry_after_seconds)
        wall = self.wall()
        record = CallRecord(
            id=uuid.uuid4(), status=CallStatus.CONNECTING, caller_phone=call.destination,
            assistant_phone=call.number, number_id=call.number_id,
            assistant_id=call.assistant_id, sip_call_id="", started_at=None, ended_at=None,
            end_reason=None, error=None, created_at=wall, updated_at=wall,
            direction="outbound", trunk_id=call.trunk_id, router=self.router_name)
        session = s.CallSession(call.targets, self.timing, call.customer)
        hook = self.webhooks.subscriber(call.assistant_id, STATUS_UPDATE)
        facts = None if hook is None else _call_facts(record, call.number_id, call.number,
                                                      call.destination)
        self.active[record.id] = ActiveCall(record, session, now, now, call.number,
                                            call.destination, hook, facts)
        self.record(record)
        self.metrics.call_started()
        log.info("call.placed", call_id=str(record.id), number=call.number,
                 destination=mask(call.destination), assistant_id=str(call.assistant_id),
                 trunk_id=str(call.trunk_id), direction="outbound")
        headers = (
            ("X-Assistant-Id", str(call.assistant_id)),
            ("X-Number-Id", str(call.number_id)),
            ("X-Call-Id", str(record.id)),
            ("X-Caller-Number", call.number),
            ("X-Dialled-Number", call.destination),
            ("X-Direction", "outbound"),
        )
        commands = session.start(now)
        return Accepted(record.id, headers, Reaction(tuple(commands), session.next_deadline()))

    def on_dialled(self, call_id: uuid.UUID, sip_call_id: str) -> None:
        call = self.active.get(call_id)
        if call is not None:
            call.record = dataclasses.replace(call.record, sip_call_id=sip_call_id)
            self.record(call.record)

    def on_decided(self, call_id: uuid.UUID, reply: AssistantReply,
                   now: float) -> Accepted | Rejected | None:
        held = self._held.pop(call_id, None)
        if held is None:
            return None  # the caller gave up, or the engine failed on it, meanwhile
        route, kind = self._replied_route(held, reply)
        self.metrics.assistant_request(kind)
        if kind is not ReplyKind.SAVED and kind is not ReplyKind.ASSISTANT:
            log.info("call.assistant_request", call_id=str(call_id), outcome=str(kind),
                     detail=reply.detail or None)
        decision: Bridge | Reject
        if reply.kind is ReplyKind.REFUSED:
            decision = Reject(603, Outcome.WEBHOOK_REFUSED, EndReason.REJECTED_BY_WEBHOOK,
                              held.route)
        elif self.draining:
            decision = Reject(503, Outcome.DRAINING, EndReason.REJECTED_DRAINING, held.route,
                              self.policy.retry_after_seconds)
        elif route is None:
            decision = Reject(self.policy.unassigned_code, Outcome.UNASSIGNED,
                              EndReason.REJECTED_UNASSIGNED, held.route)
        else:
            decision = bridge(route, self.policy, self.pool)
        self.metrics.routing_decision(decision.outcome, now - held.invite.received_at)
        record = held.record
        if route is not None:
            record = dataclasses.replace(record, assistant_id=route.assistant_id)
        if isinstance(decision, Reject):
            return self._refuse_held(held, record, decision, reply)
        timing = self.timing if reply.max_duration_seconds is None else dataclasses.replace(
            self.timing, max_duration=float(reply.max_duration_seconds))
        facts = dataclasses.replace(_facts(record, decision.route, held.caller),
                                    extras=reply.extras)
        return self._bridge(held.invite, record, decision, held.caller, timing, facts)

    def on_held_ended(self, call_id: uuid.UUID, now: float) -> None:
        held = self._held.pop(call_id, None)
        if held is not None:
            self._close_held(held, CallStatus.ENDED, EndReason.CALLER_CANCELLED, None)

    def on_event(self, call_id: uuid.UUID, event: s.Event, now: float) -> Reaction:
        call = self.active.get(call_id)
        if call is None:
            return self._after_end(call_id, event, now)
        if isinstance(event, s.RuntimeAnswered) and event.attempt == call.session.attempt:
            self.metrics.runtime_answered(now - call.dial_at)
        if isinstance(event, s.RuntimeFailed):
            self._note_runtime_failure(call, event)
        return self._react(call, call.session.handle(event, now), now)

    def on_request(self, call_id: uuid.UUID, request: s.Request, now: float) -> Ruling:
        call = self.active.get(call_id) or self._ended.get(call_id)
        if call is None:
            gone = s.Refused(s.Refusal.NOT_CONNECTED, "the call has ended")
            return Ruling(gone, Reaction((), None))
        outcome = call.session.request(request, now)
        if isinstance(outcome, s.Refused):
            return Ruling(outcome, Reaction((), call.session.next_deadline()))
        return Ruling(None, self._react(call, outcome, now))

    def on_engine_failure(self, where: EngineEntry, call_id: uuid.UUID | None, error: str,
                          now: float) -> Reaction:
        self.metrics.engine_callback_failed(where)
        held = self._held.pop(call_id, None) if call_id else None
        if held is not None:
            self._close_held(held, CallStatus.FAILED, EndReason.ERROR, error)
        call = self.active.get(call_id) if call_id else None
        if call is None:
            return Reaction((), None)
        return self._react(call, call.session.handle(s.Aborted(error), now), now)

    def on_released(self, call_id: uuid.UUID) -> None:
        call = self.active.get(call_id)
        if call is not None:  # every leg is gone, yet the session never finished
            now = self.clock()
            self._finished(call, s.Finish(CallStatus.FAILED, EndReason.ERROR, now,
                                          "the engine released the call before it ended"), now)
        self._ended.pop(call_id, None)

    def on_response_sent(self, sent: ResponseSent) -> None:
        self.metrics.response_sent(sent.code)
        if sent.first:
            self.metrics.first_response(sent.since_invite)

    def _after_end(self, call_id: uuid.UUID, event: s.Event, now: float) -> Reaction:
        """A leg of an ended call reports: its own end, or a late answer to hang up."""
        call = self._ended.get(call_id)
        if call is None:
            return Reaction((), None)
        return self._react(call, call.session.handle(event, now), now)

    def _react(self, call: ActiveCall, commands: list[s.Command], now: float) -> Reaction:
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
            trunk_id=invite.trunk_id,
            router=self.router_name,
        )

    def _reject(self, invite: InboundInvite, record: CallRecord, decision: Reject) -> Rejected:
        sample = self._rejections.sample(decision.outcome, self.clock())
        if sample.skipped_before:
            log.info("call.rejections_unrecorded", outcome=str(decision.outcome),
                     count=sample.skipped_before)  # the previous second's, beyond the limit
        if sample.admitted:
            self._record_rejection(invite, record, decision)
        phrase = NO_ROOM_PHRASES.get(decision.outcome) or REASON_PHRASES.get(decision.code, "")
        return Rejected(decision.code, phrase, decision.retry_after)

    def _record_rejection(self, invite: InboundInvite, record: CallRecord,
                          decision: Reject) -> None:
        now = self.wall()
        closed = dataclasses.replace(
            record, status=CallStatus.FAILED, end_reason=decision.end_reason,
            ended_at=now, updated_at=now)
        self.record(closed)
        self._log_decision(invite, closed, decision.outcome, decision.code)

    # ---- assistant-request: the INVITE held while the asyncio side asks ---------------

    def _asked(self, decision: Bridge | Reject) -> WebhookTarget | None:
        """Who is asked before this INVITE is answered: a number with an assistant, by
        that assistant's webhook (or the account's); an unassigned one, by the account's."""
        if self.ask is None:
            return None
        if isinstance(decision, Bridge):
            return self.webhooks.subscriber(decision.route.assistant_id, ASSISTANT_REQUEST)
        if decision.outcome is Outcome.UNASSIGNED:
            return self.webhooks.subscriber(None, ASSISTANT_REQUEST)
        return None

    def _hold(self, invite: InboundInvite, record: CallRecord, caller: str, route: Route,
              target: WebhookTarget) -> Held:
        assert self.ask is not None
        self._held[record.id] = HeldInvite(invite, record, caller, route)
        self.record(record)
        facts = _facts(record, route, caller)
        self.ask(AssistantAsk(record.id, target, facts, self.wall()))
        return Held(record.id)

    def _replied_route(self, held: HeldInvite, reply: AssistantReply
                       ) -> tuple[Route | None, ReplyKind]:
        """The route the reply picks: another assistant (one the router has), else the
        number's saved assistant as the route table says now (None: unassigned)."""
        kind = reply.kind
        if kind is ReplyKind.ASSISTANT and reply.assistant_id is not None:
            hooks = self.webhooks.assistants.get(reply.assistant_id)
            if hooks is not None:
                return dataclasses.replace(held.route, assistant_id=reply.assistant_id,
                                           runtime_uri=hooks.runtime_uri, is_active=True), kind
            kind = ReplyKind.UNKNOWN_ASSISTANT
        saved = self.routes.get(held.route.e164)
        if saved is None or not saved.is_active or saved.assistant_id is None:
            return None, kind
        return saved, kind

    def _refuse_held(self, held: HeldInvite, record: CallRecord, decision: Reject,
                     reply: AssistantReply) -> Rejected:
        """A held INVITE refused: always recorded (the webhook already rate-limits it)."""
        error = reply.error if decision.outcome is Outcome.WEBHOOK_REFUSED else None
        now = self.wall()
        closed = dataclasses.replace(
            record, status=CallStatus.FAILED, end_reason=decision.end_reason, ended_at=now,
            updated_at=now, error=error)
        self.record(closed)
        self._log_decision(held.invite, closed, decision.outcome, decision.code)
        phrase = REASON_PHRASES.get(decision.code, "")
        headers = (("Reason", reason_header(error)),) if error else ()
        return Rejected(decision.code, phrase, decision.retry_after, headers)

    def _close_held(self, held: HeldInvite, status: CallStatus, reason: EndReason,
                    error: str | None) -> None:
        now = self.wall()
        closed = dataclasses.replace(held.record, status=status, end_reason=reason,
                                     ended_at=now, updated_at=now, error=error)
        target = self.webhooks.subscriber(closed.assistant_id, STATUS_UPDATE)
        if target is None:
            self.record(closed)
        else:
            facts = _facts(closed, held.route, held.caller)
            self.notify(closed, StatusEvent(facts, target, now))
        log.info("call.ended", call_id=str(closed.id), sip_call_id=closed.sip_call_id,
                 dialled=closed.assistant_phone, caller=mask(held.caller),
                 status=str(status), end_reason=str(reason), error=error,
                 held_for_assistant_request=True)

    # ---- bridged calls ------------------------------------------------------------------

    def _bridge(self, invite: InboundInvite, record: CallRecord, decision: Bridge,
                caller: str, timing: s.Timing | None = None,
                facts: CallFacts | None = None) -> Accepted:
        assistant = str(decision.route.assistant_id)
        targets = tuple(runtime_request_uri(t, assistant) for t in decision.targets)
        now = self.clock()
        session = s.CallSession(targets, timing or self.timing)
        hook = self.webhooks.subscriber(decision.route.assistant_id, STATUS_UPDATE)
        if hook is not None and facts is None:
            facts = _facts(record, decision.route, caller)
        call = ActiveCall(record, session, invite.received_at, now,
                          record.assistant_phone, caller, hook, facts)
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
        # Only the runtime being dialled counts, not an attempt already abandoned.
        if event.attempt == call.session.attempt:
            log.info("call.runtime_failed", call_id=str(call.record.id),
                     target=call.session.targets[event.attempt], code=event.code,
                     reason=event.reason)

    def _book(self, call: ActiveCall, command: s.Command, now: float) -> None:
        match command:
            case s.MarkAnswered():
                self._answered(call, now)
            case s.MarkTransferred(_, target):
                self._transferred(call, target)
            case s.TransferFailed(target, code, reason):
                log.warning("call.transfer_failed", call_id=str(call.record.id), target=target,
                            code=code, reason=reason)
            case s.Finish():
                self._finished(call, command, now)
            case (s.DialRuntime() | s.HangupRuntime() | s.DialTarget() | s.HangupTarget()
                  | s.HangupCaller() | s.BridgeRuntime() | s.BridgeTarget() | s.RingCaller()
                  | s.AnswerCaller() | s.RejectCaller() | s.DialCustomer()):
                pass  # carried out by the SIP adapter (which reports responses it sent)
            case _:
                assert_never(command)

    def _answered(self, call: ActiveCall, now: float) -> None:
        wall = self.wall()
        call.record = dataclasses.replace(
            call.record, status=CallStatus.IN_PROGRESS, started_at=wall, updated_at=wall)
        self._write_with_event(call)
        self.metrics.caller_answered(now - call.invite_at)

    def _transferred(self, call: ActiveCall, target: str) -> None:
        """The assistant's call ends here (end_reason transferred); the caller's goes on
        with the transfer target, still counted as active until it hangs up."""
        wall = self.wall()
        call.record = dataclasses.replace(
            call.record, status=CallStatus.ENDED, end_reason=EndReason.TRANSFERRED,
            ended_at=wall, updated_at=wall)
        self._write_with_event(call)
        log.info("call.transferred", call_id=str(call.record.id), target=target,
                 duration_seconds=call.record.duration_seconds)

    def _finished(self, call: ActiveCall, finish: s.Finish, now: float) -> None:
        self.active.pop(call.record.id, None)
        self._ended[call.record.id] = call
        if call.record.end_reason == EndReason.TRANSFERRED:
            self.metrics.call_ended(EndReason.TRANSFERRED, float(call.record.duration_seconds or 0))
            if log.is_enabled_for(logging.INFO):  # the record was closed at the transfer
                self._log_end(call, now, call.record.duration_seconds)
            return
        wall = self.wall()
        call.record = dataclasses.replace(
            call.record, status=finish.status, end_reason=finish.reason, ended_at=wall,
            updated_at=wall, error=finish.error)
        self._write_with_event(call)
        duration = call.record.duration_seconds
        self.metrics.call_ended(finish.reason, None if call.record.started_at is None
                                else float(duration or 0))
        if log.is_enabled_for(logging.INFO):
            self._log_end(call, now, duration)

    def _write_with_event(self, call: ActiveCall) -> None:
        """The call's record, with its status-update when someone subscribes."""
        if call.hook is None or call.facts is None:
            self.record(call.record)
        else:
            self.notify(call.record, StatusEvent(call.facts, call.hook, call.record.updated_at))

    def _log_end(self, call: ActiveCall, now: float, duration: int | None) -> None:
        record = call.record
        log.info("call.ended", call_id=str(record.id), sip_call_id=record.sip_call_id,
                 dialled=call.dialled, caller=mask(call.caller),
                 assistant_id=str(record.assistant_id), status=str(record.status),
                 end_reason=str(record.end_reason), duration_seconds=duration,
                 since_invite_ms=round((now - call.invite_at) * 1000, 1), error=record.error)

    def _log_decision(self, invite: InboundInvite, record: CallRecord, outcome: Outcome,
                      code: int) -> None:
        if not log.is_enabled_for(logging.INFO):
            return  # building the fields is most of the cost: skip it when dropped
        # A rejected call ends here, so its one line also says how (no call.ended follows).
        ended = {} if record.end_reason is None else {
            "status": str(record.status), "end_reason": str(record.end_reason)}
        log.info("call.routed", call_id=str(record.id), sip_call_id=invite.sip_call_id,
                 dialled=record.assistant_phone, caller=mask(record.caller_phone),
                 assistant_id=str(record.assistant_id) if record.assistant_id else None,
                 trunk_id=str(record.trunk_id) if record.trunk_id else None,
                 direction=record.direction, outcome=str(outcome), sip_status=code,
                 decision_ms=round((self.clock() - invite.received_at) * 1000, 3), **ended)

    # ---- drain and shutdown (the asyncio side) ---------------------------------------

    def end_all(self, reason: EndReason) -> None:
        """Ask the engine to end every call (drain, shutdown); nobody waits for verdicts."""
        if self.control is None:
            return
        for call_id in list(self.active):
            self.control.submit(call_id, s.EndRequested(reason))

    def abandon_all(self, reason: EndReason) -> None:
        """Close the records of calls the engine can no longer end (it has stopped)."""
        for held in list(self._held.values()):
            self._held.pop(held.record.id, None)
            self._close_held(held, CallStatus.ENDED, reason, None)
        for call in list(self.active.values()):
            self._finished(call, s.Finish(CallStatus.ENDED, reason, self.clock()), self.clock())
        self._ended.clear()


def _facts(record: CallRecord, route: Route, caller: str) -> CallFacts:
    return _call_facts(record, route.number_id, route.e164, caller)


def _call_facts(record: CallRecord, number_id: uuid.UUID | None, number: str,
                customer: str) -> CallFacts:
    """What the call's webhook events say about it (the number's name is added on the
    asyncio side, where the store is); ``customer``: the caller, or an outbound call's
    destination."""
    call_type = "outbound_phone_call" if record.direction == "outbound" else "inbound_phone_call"
    return CallFacts(record.id, number_id, number, "", customer, record.assistant_id,
                     call_type=call_type)


CONTROL_TIMEOUT = 2.0  # seconds the API waits for the SIP thread's verdict


class CallController:
    """The API's call-control commands (the asyncio side).

    A command is checked against the call (404 unknown, 400 not in progress), turned into
    a session request (a transfer destination into the URI to dial and its credentials),
    carried to the SIP thread as a value, and answered with the session's verdict: the
    API's 200 means the session accepted it. No verdict within ``timeout`` is a 504, and
    the request is withdrawn if the SIP thread has not taken it up yet.
    """

    def __init__(self, service: CallService, store: Store, decrypt: Callable[[bytes], str],
                 timeout: float = CONTROL_TIMEOUT) -> None:
        self._service = service
        self._store = store
        self._decrypt = decrypt
        self._timeout = timeout

    async def control(self, call_id: uuid.UUID, command: ControlCommand) -> str:
        """What was done, in words. Raises ``NotFound``, ``ValidationError`` (not in
        progress), ``CommandRefused``, ``EngineUnavailable`` or ``EngineTimeout``."""
        call = await self._in_progress(call_id)
        match command:
            case EndCall():
                await self._submit(call_id, s.EndRequested(EndReason.ENDED_BY_API))
                return "the call is being ended"
            case TransferCall(destination):
                await self._submit(call_id, await self._transfer(call.record, destination))
                return f"transferring the call to {destination}"
            case _:
                assert_never(command)

    async def _in_progress(self, call_id: uuid.UUID) -> ActiveCall:
        active = self._service.active.get(call_id)
        if active is None and await self._store.get_call(call_id) is None:
            raise NotFound(f"call {call_id} not found")
        if active is None or active.record.status != CallStatus.IN_PROGRESS:
            raise ValidationError("the call is not in progress")
        return active

    async def _transfer(self, record: CallRecord, destination: str) -> s.TransferRequested:
        """A SIP URI is dialled as it is; an E.164 number through the number's transfer
        trunk, with the trunk's digest credentials (read on every transfer, so a changed
        password applies to the next one)."""
        if destination.lower().startswith(("sip:", "sips:")):
            return s.TransferRequested(destination)
        trunk = await self._transfer_trunk(record)
        uri = f"sip:{destination}@{trunk.address};transport={trunk.transport}"
        if not trunk.username:
            return s.TransferRequested(uri)
        secret = await self._store.get_trunk_password(trunk.id)
        password = self._decrypt(secret) if secret else ""
        return s.TransferRequested(uri, (trunk.username, password))

    async def _transfer_trunk(self, record: CallRecord) -> Trunk:
        number = await self._store.get_number(record.number_id) if record.number_id else None
        trunk_id = number.transfer_trunk_id if number else None
        trunk = await self._store.get_trunk(trunk_id) if trunk_id else None
        if trunk is None or not trunk.is_active or not trunk.host:  # "": inbound-only
            raise ValidationError("the number has no active transfer trunk "
                                  "(transfer_trunk_id) to reach a phone number through")
        return trunk

    async def _submit(self, call_id: uuid.UUID, request: s.Request) -> None:
        control = self._service.control
        if control is None:
            raise EngineUnavailable("the SIP engine is not running")
        verdict = asyncio.wrap_future(control.submit(call_id, request))
        try:
            refused = await asyncio.wait_for(verdict, self._timeout)
        except TimeoutError as exc:
            raise EngineTimeout(
                f"the SIP engine did not answer within {self._timeout:g} s") from exc
        if refused is not None:
            raise _refusal_error(refused)


def _refusal_error(refused: s.Refused) -> CommandRefused | ValidationError:
    match refused.refusal:
        case s.Refusal.BUSY:
            return CommandRefused(refused.reason)
        case s.Refusal.NOT_CONNECTED:
            return ValidationError(refused.reason)
        case _:
            assert_never(refused.refusal)
