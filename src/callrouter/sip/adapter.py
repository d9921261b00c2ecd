"""The call adapter: the SIP engine's logic, without pjsua2.

How it works: the SIP thread's loop (``engine.SipEngine``) runs the stack's events
(``libHandleEvents``) and then ``CallAdapter.tick()``: work queued by other threads, due
timers, releasing ended legs. The stack (``stack.SipStack``) reports new INVITEs and leg
changes here; a leg change becomes a domain event for that kind of leg (``Caller*``,
``Runtime*``, ``Target*``), which goes to the ``CallHandler`` (the service). Its
``Reaction`` lists commands carried out here through the stack, and the call's next
deadline, kept in one heap: the one real timer. Events raised while a command runs (the
stack reports some state changes synchronously) are queued and handled after it, never
re-entrantly. API requests arrive through ``submit`` as values and are answered with the
session's verdict in a future.

Every entry from the engine runs inside ``guarded``: an exception there is logged
(``sip.callback_failed``), counted (the handler's ``on_engine_failure``), and the call it
belongs to is ended (every leg hung up, an unanswered caller answered 500, the record
closed ``failed``), so nothing escapes to SWIG and no call slot is leaked. Legs stay
referenced until they are disconnected and are released outside callbacks
(docs/engine.md pitfalls).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import itertools
import queue
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple, assert_never

import structlog

from callrouter.domain import session as s
from callrouter.domain.sipuri import user_part
from callrouter.domain.webhooks import AssistantReply
from callrouter.errors import EngineError
from callrouter.ports import (
    Accepted,
    CallHandler,
    EngineEntry,
    Held,
    InboundInvite,
    OutboundCall,
    Reaction,
    Rejected,
    ResponseSent,
)
from callrouter.sip.stack import (
    Confirmed,
    Credentials,
    Disconnected,
    Headers,
    Leg,
    LegKind,
    LegState,
    Progress,
    SipStack,
)

log = structlog.get_logger("callrouter.sip")


@dataclass(eq=False)
class BridgedCall:
    """The adapter's side of one routed call: its legs and which one the caller hears."""

    call_id: uuid.UUID
    caller: Leg
    headers: Headers
    runtimes: dict[int, Leg] = field(default_factory=dict)
    targets: dict[int, Leg] = field(default_factory=dict)
    deadline: float | None = None
    bridged: Leg | None = None  # the leg whose audio is joined to the caller's
    ended: bool = False

    def legs(self) -> list[Leg]:
        return [self.caller, *self.runtimes.values(), *self.targets.values()]


class CallAdapter:
    """Implements ``stack.LegOwner``; see the module docstring."""

    def __init__(self, handler: CallHandler, stack: SipStack,
                 clock: Callable[[], float]) -> None:
        self.handler = handler
        self.stack = stack
        self.clock = clock
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._events: collections.deque[tuple[uuid.UUID, s.Event]] = collections.deque()
        self._timers: list[tuple[float, int, uuid.UUID]] = []
        self._seq = itertools.count()
        self._calls: dict[uuid.UUID, BridgedCall] = {}
        self._held: dict[uuid.UUID, Leg] = {}  # callers ringing while a webhook decides
        self._live: set[Leg] = set()  # every leg not yet disconnected
        self._released: list[Leg] = []
        self._recovering: set[uuid.UUID] = set()
        self._pumping = False
        stack.attach(self)

    # ---- any thread ----------------------------------------------------------------

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)

    def submit(self, call_id: uuid.UUID, request: s.Request) -> Future[s.Refused | None]:
        future: Future[s.Refused | None] = Future()
        self.call_soon(lambda: self._decide(call_id, request, future))
        return future

    def place(self, call: OutboundCall) -> Future[Accepted | Rejected]:
        future: Future[Accepted | Rejected] = Future()
        self.call_soon(lambda: self._place(call, future))
        return future

    def resume(self, call_id: uuid.UUID, reply: AssistantReply) -> None:
        """The ``assistant-request`` decision for a held INVITE, from the asyncio side."""
        self.call_soon(lambda: self._resume(call_id, reply))

    def leg_dtmf(self, leg: Leg, digit: str) -> None:
        # Reported on pjmedia's thread: hop to the SIP thread before touching the stack.
        self.call_soon(lambda: self._forward_dtmf(leg, digit))

    @property
    def legs_in_use(self) -> int:
        return len(self._live)

    # ---- the SIP thread's loop ---------------------------------------------------------

    def tick(self) -> None:
        self._run_inbox()
        self._fire_timers(self.clock())
        self._release()

    def close(self) -> None:
        """Let go of every leg (the engine is shutting down)."""
        for call in self._calls.values():
            self._released.extend(call.legs())
        self._released.extend(self._live)
        self._calls.clear()
        self._held.clear()
        self._live.clear()
        self._release()

    def _run_inbox(self) -> None:
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return
            with self.guarded(EngineEntry.TASK):
                fn()

    def _fire_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            deadline, _, call_id = heapq.heappop(self._timers)
            call = self._calls.get(call_id)
            if call is not None and call.deadline == deadline:
                self._queue_event(call_id, s.TimerFired())

    def _release(self) -> None:
        released, self._released = self._released, []
        for leg in released:
            self.stack.release(leg)

    # ---- the one guard for every entry from the engine -------------------------------

    @contextlib.contextmanager
    def guarded(self, where: EngineEntry,
                subject: Leg | uuid.UUID | None = None) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self._recover(where, subject, exc)

    def _recover(self, where: EngineEntry, subject: Leg | uuid.UUID | None,
                 exc: Exception) -> None:
        call_id = subject.call_id if isinstance(subject, Leg) else subject
        if call_id is not None:
            self._held.pop(call_id, None)
        error = f"{type(exc).__name__}: {exc}"
        log.error("sip.callback_failed", where=str(where), error=error,
                  call_id=str(call_id) if call_id else None, exc_info=exc)
        reaction = self._report(where, call_id, error)
        call = self._calls.get(call_id) if call_id else None
        if call is not None and call.call_id in self._recovering:
            return  # failed again while cleaning up: once is enough
        try:
            if call is not None:
                self._end_forcibly(call, reaction)
            elif isinstance(subject, Leg):
                self._drop(subject)  # an INVITE that never became a call: 500
        except Exception:
            log.exception("sip.recovery_failed", call_id=str(call_id) if call_id else None)

    def _report(self, where: EngineEntry, call_id: uuid.UUID | None, error: str) -> Reaction:
        try:
            return self.handler.on_engine_failure(where, call_id, error, self.clock())
        except Exception:
            log.exception("sip.recovery_failed", call_id=str(call_id) if call_id else None)
            return Reaction((), None)

    def _end_forcibly(self, call: BridgedCall, reaction: Reaction) -> None:
        self._recovering.add(call.call_id)
        try:
            self._apply(call, reaction)  # the session's own ending, when it could decide one
            call.ended = True
            for leg in call.legs():
                self._drop(leg)
            self._maybe_forget(call)
        finally:
            self._recovering.discard(call.call_id)

    def _drop(self, leg: Leg) -> None:
        """End a leg whatever its state: 500 to an unanswered caller, else hang up."""
        try:
            if leg.kind is LegKind.CALLER and not leg.final_sent:
                self._respond(leg, 500)
            else:
                self._hangup(leg)
        except EngineError as exc:
            log.warning("sip.hangup_failed", call_id=str(leg.call_id), error=exc.message)

    # ---- entries from the stack (the SIP thread) ----------------------------------------

    def incoming(self, leg: Leg, message: str, source: str) -> None:
        with self.guarded(EngineEntry.INCOMING_CALL, leg):
            self._live.add(leg)
            invite = self._invite(message, source)
            leg.invite_at = invite.received_at
            self._sent(leg, 100)  # pjsua sent 100 Trying before it reported the INVITE
            answer = self.handler.on_invite(invite)
            if isinstance(answer, Rejected):
                self._reject(leg, answer)
            elif isinstance(answer, Held):
                self._hold(leg, answer)
            else:
                self._accept(leg, answer)

    def _invite(self, message: str, source: str) -> InboundInvite:
        invite = _invite(message, source, self.clock())
        trunk, via_registration = self.stack.trunk_of(source, user_part(invite.request_uri))
        if not trunk:
            return invite
        return dataclasses.replace(invite, trunk_id=uuid.UUID(trunk),
                                   via_registration=via_registration)

    def leg_changed(self, leg: Leg) -> None:
        with self.guarded(EngineEntry.LEG_STATE, leg):
            state = self.stack.status(leg)
            if state is not None and _is_news(leg, state) and leg.call_id is not None:
                event = _event_for(leg, state)
                if event is not None:
                    self._queue_event(leg.call_id, event)
            if leg.ended and leg.call_id is not None and \
                    self._held.pop(leg.call_id, None) is not None:
                self.handler.on_held_ended(leg.call_id, self.clock())  # CANCEL while held
            if leg.ended and leg in self._live:
                self._disconnected(leg)

    def leg_media(self, leg: Leg) -> None:
        with self.guarded(EngineEntry.LEG_MEDIA, leg):
            call = self._calls.get(leg.call_id) if leg.call_id else None
            if call is not None:
                self._bridge(call)

    def _forward_dtmf(self, leg: Leg, digit: str) -> None:
        with self.guarded(EngineEntry.LEG_DTMF, leg):
            call = self._calls.get(leg.call_id) if leg.call_id else None
            other = call.bridged if call and leg is call.caller else None
            if other is not None and other.confirmed and not other.ended:
                try:
                    self.stack.send_dtmf(other, digit)  # RFC 4733 towards the other leg
                except EngineError as exc:
                    log.warning("sip.dtmf_failed", call_id=str(leg.call_id), error=exc.message)

    def _decide(self, call_id: uuid.UUID, request: s.Request,
                future: Future[s.Refused | None]) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the API stopped waiting: never act on a request it gave up on
        with self.guarded(EngineEntry.CONTROL, call_id):
            future.set_result(self._rule(call_id, request))
        if not future.done():
            future.set_exception(EngineError("the SIP engine failed on this request"))

    def _place(self, outbound: OutboundCall, future: Future[Accepted | Rejected]) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the API gave up before the SIP thread took it up: never dial
        with self.guarded(EngineEntry.CONTROL):
            answer = self.handler.on_outbound(outbound, self.clock())
            if isinstance(answer, Accepted):
                customer = Leg(LegKind.CUSTOMER, answer.call_id)
                call = BridgedCall(answer.call_id, customer, answer.runtime_headers)
                self._calls[call.call_id] = call
                self._apply(call, answer.reaction)
            future.set_result(answer)
        if not future.done():
            future.set_exception(EngineError("the SIP engine failed to place the call"))

    def _rule(self, call_id: uuid.UUID, request: s.Request) -> s.Refused | None:
        call = self._calls.get(call_id)
        if call is None or call.ended:
            return s.Refused(s.Refusal.NOT_CONNECTED, "the call has ended")
        ruling = self.handler.on_request(call_id, request, self.clock())
        self._apply(call, ruling.reaction)
        return ruling.refused

    def _hold(self, leg: Leg, held: Held) -> None:
        """Ring the caller while the asyncio side asks the webhook (never waited for here)."""
        leg.call_id = held.call_id
        self._held[held.call_id] = leg
        self.stack.answer(leg, 180)
        self._sent(leg, 180)

    def _resume(self, call_id: uuid.UUID, reply: AssistantReply) -> None:
        leg = self._held.pop(call_id, None)
        if leg is None:
            return  # the caller gave up meanwhile (the handler was told then)
        with self.guarded(EngineEntry.INCOMING_CALL, leg):
            answer = self.handler.on_decided(call_id, reply, self.clock())
            if isinstance(answer, Rejected):
                self._reject(leg, answer)
            elif isinstance(answer, Accepted):
                self._accept(leg, answer)
            else:
                self._drop(leg)

    # ---- events and commands -------------------------------------------------------

    def _reject(self, leg: Leg, rejected: Rejected) -> None:
        try:
            self._respond(leg, rejected.code, rejected.reason, rejected.retry_after,
                          rejected.headers)
        except EngineError as exc:  # logged, as a refused command is
            log.warning("sip.answer_failed", code=rejected.code, error=exc.message)

    def _accept(self, leg: Leg, accepted: Accepted) -> None:
        leg.call_id = accepted.call_id
        call = BridgedCall(accepted.call_id, leg, accepted.runtime_headers)
        self._calls[call.call_id] = call
        self._apply(call, accepted.reaction)

    def _queue_event(self, call_id: uuid.UUID, event: s.Event) -> None:
        self._events.append((call_id, event))
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return  # the outer _pump picks the event up
        self._pumping = True
        try:
            while self._events:
                call_id, event = self._events.popleft()
                with self.guarded(EngineEntry.CALL_EVENT, call_id):
                    self._handle(call_id, event)
        finally:
            self._pumping = False

    def _handle(self, call_id: uuid.UUID, event: s.Event) -> None:
        call = self._calls.get(call_id)
        if call is not None:
            self._apply(call, self.handler.on_event(call_id, event, self.clock()))

    def _apply(self, call: BridgedCall, reaction: Reaction) -> None:
        for command in reaction.commands:
            try:
                self._execute(call, command)
            except EngineError as exc:
                log.warning("sip.command_failed", call_id=str(call.call_id),
                            command=type(command).__name__, error=exc.message)
        if reaction.deadline is not None and reaction.deadline != call.deadline:
            heapq.heappush(self._timers, (reaction.deadline, next(self._seq), call.call_id))
        call.deadline = reaction.deadline
        self._maybe_forget(call)

    def _execute(self, call: BridgedCall, command: s.Command) -> None:
        match command:
            case s.DialRuntime(attempt, target):
                self._dial(call, Leg(LegKind.RUNTIME, call.call_id, attempt), target, None)
            case s.DialTarget(number, target, credentials):
                self._dial(call, Leg(LegKind.TARGET, call.call_id, number), target, credentials)
            case s.DialCustomer(target, credentials, caller_id):
                self._dial(call, call.caller, target, credentials, caller_id)
                if call.caller.handle is not None:
                    self.handler.on_dialled(call.call_id, self.stack.sip_call_id(call.caller))
            case s.HangupRuntime(attempt):
                self._hangup(call.runtimes.get(attempt))
            case s.HangupTarget(number):
                self._hangup(call.targets.get(number))
            case s.RingCaller():
                if not call.caller.ended and not call.caller.final_sent:
                    self.stack.answer(call.caller, 180)
                    self._sent(call.caller, 180)
            case s.AnswerCaller():
                self._respond(call.caller, 200)
            case s.RejectCaller(code, retry_after):
                self._respond(call.caller, code, "", retry_after)
            case s.HangupCaller():
                self._hangup(call.caller)
            case s.BridgeRuntime(attempt):
                self._join(call, call.runtimes.get(attempt))
            case s.BridgeTarget(number):
                self._join(call, call.targets.get(number))
            case s.Finish():
                call.ended = True
            case s.MarkAnswered() | s.MarkTransferred() | s.TransferFailed():
                pass  # the service's bookkeeping: nothing to do on the SIP side
            case _:
                assert_never(command)

    def _dial(self, call: BridgedCall, leg: Leg, target: str,
              credentials: Credentials | None, caller_id: str | None = None) -> None:
        if leg.kind is LegKind.RUNTIME:
            call.runtimes[leg.number] = leg
        elif leg.kind is LegKind.TARGET:
            call.targets[leg.number] = leg
        # An outbound call's customer is a provider's network: none of our X- headers.
        headers = () if leg.kind is LegKind.CUSTOMER else call.headers
        try:
            like = call.caller if call.caller is not leg else None  # its codec first
            self.stack.dial(leg, target, headers, credentials, caller_id, like)
        except EngineError as exc:
            leg.ended = True
            self._queue_event(call.call_id, _OUTBOUND[leg.kind].failed(leg.number, 500,
                                                                       exc.message))
            return
        self._live.add(leg)

    def _respond(self, leg: Leg, code: int, reason: str = "",
                 retry_after: int | None = None, headers: Headers = ()) -> None:
        """A final response to the caller's INVITE: 200, or a refusal."""
        if leg.ended or leg.final_sent:
            return
        leg.final_sent = True
        self.stack.answer(leg, code, reason, retry_after, headers)
        self._sent(leg, code)

    def _sent(self, leg: Leg, code: int) -> None:
        """Report a response the stack took (it raised nothing): pjsua2 cannot tell when a
        response leaves, so this is where the responses metric counts it."""
        first = code != 100 and not leg.responded
        leg.responded = leg.responded or code != 100
        since = self.clock() - leg.invite_at
        self.handler.on_response_sent(ResponseSent(code, first, since))

    def _hangup(self, leg: Leg | None) -> None:
        if leg is None or leg.ended or leg not in self._live:
            return
        self.stack.hangup(leg)

    def _join(self, call: BridgedCall, leg: Leg | None) -> None:
        call.bridged = leg
        self._bridge(call)

    def _bridge(self, call: BridgedCall) -> None:
        other = call.bridged
        if other is None or call.caller.ended or other.ended:
            return
        try:
            self.stack.bridge(call.caller, other)  # False: no media yet, leg_media retries
        except EngineError as exc:
            log.warning("sip.bridge_failed", call_id=str(call.call_id), error=exc.message)

    def _disconnected(self, leg: Leg) -> None:
        self._live.discard(leg)
        self._released.append(leg)
        call = self._calls.get(leg.call_id) if leg.call_id else None
        if call is not None:
            self._maybe_forget(call)

    def _maybe_forget(self, call: BridgedCall) -> None:
        if not call.ended or any(leg in self._live for leg in call.legs()):
            return
        if self._calls.pop(call.call_id, None) is not None:
            self.handler.on_released(call.call_id)


# ---- leg states -> domain events --------------------------------------------------------


def _is_news(leg: Leg, state: LegState) -> bool:
    """Whether ``state`` is new for the leg (pjsua reports some states more than once);
    records it on the leg."""
    match state:
        case Progress(code):
            news = leg.kind is not LegKind.CALLER and not leg.rang and code in (180, 183)
            leg.rang = leg.rang or news
        case Confirmed():
            news, leg.confirmed = not leg.confirmed, True
        case Disconnected():
            news, leg.ended = not leg.ended, True
        case _:
            assert_never(state)
    return news


class _Outbound(NamedTuple):
    """The events of one kind of outbound leg."""

    ringing: Callable[[int], s.Event]
    answered: Callable[[int], s.Event]
    hung_up: Callable[[int], s.Event]
    failed: Callable[[int, int, str], s.Event]


_OUTBOUND = {
    LegKind.RUNTIME: _Outbound(s.RuntimeRinging, s.RuntimeAnswered, s.RuntimeHungUp,
                               s.RuntimeFailed),
    LegKind.TARGET: _Outbound(s.TargetRinging, s.TargetAnswered, s.TargetHungUp,
                              s.TargetFailed),
    # An outbound call's customer: once answered it stands where an inbound caller does.
    LegKind.CUSTOMER: _Outbound(lambda n: s.CustomerRinging(), lambda n: s.CustomerAnswered(),
                                lambda n: s.CallerHungUp(),
                                lambda n, code, reason: s.CustomerFailed(code, reason)),
}


def _event_for(leg: Leg, state: LegState) -> s.Event | None:
    if leg.kind is LegKind.CALLER:
        match state:
            case Confirmed():
                return s.CallerConfirmed()
            case Disconnected():
                return s.CallerHungUp() if leg.confirmed else s.CallerCancelled()
            case _:
                return None  # the caller's early state is our own 180
    events = _OUTBOUND[leg.kind]
    match state:
        case Progress():
            return events.ringing(leg.number)
        case Confirmed():
            return events.answered(leg.number)
        case Disconnected(code, reason):
            if leg.confirmed:
                return events.hung_up(leg.number)
            return events.failed(leg.number, code, reason)
        case _:
            assert_never(state)


# ---- parsing the INVITE pjsip has already validated ---------------------------------------

_COMPACT = {"i": "call-id", "f": "from", "t": "to"}
_WANTED = frozenset({"call-id", "from", "to"})


def _invite(message: str, source: str, received_at: float) -> InboundInvite:
    request_uri, headers = _request_line_and_headers(message)
    return InboundInvite(
        sip_call_id=headers.get("call-id", ""), request_uri=request_uri,
        to_header=headers.get("to", ""), from_header=headers.get("from", ""),
        source=source, received_at=received_at)


def _request_line_and_headers(message: str) -> tuple[str, dict[str, str]]:
    """The Request-URI and the Call-ID/From/To values of a raw request (pjsip has
    already parsed and validated it; this is only cheaper than ``Call.getInfo()``)."""
    head = message.split("\r\n\r\n", 1)[0]
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    found: dict[str, str] = {}
    last = ""
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):  # a folded continuation (RFC 3261 s7.3.1)
            if last in found:
                found[last] += " " + line.strip()
            continue
        name, _, value = line.partition(":")
        last = _COMPACT.get(name.strip().lower(), name.strip().lower())
        if last in _WANTED and last not in found:
            found[last] = value.strip()
    return (parts[1] if len(parts) > 2 else ""), found
