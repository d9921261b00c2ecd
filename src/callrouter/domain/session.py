"""One bridged call, as an explicit state machine (sans-IO).

How it works: the SIP adapter turns pjsua2 callbacks on the call's legs into the frozen
events below and feeds them to ``CallSession.handle(event, now)``; the API's commands
arrive as requests through ``CallSession.request(request, now)``, which answers with
commands or a ``Refused`` verdict. The session looks the (state, input type) pair up in
``TRANSITIONS`` (or, for a request, ``REFUSALS``) and returns commands for the adapter to
carry out. It never reads a clock or touches a socket: ``now`` comes in, and
``next_deadline()`` tells the adapter when to deliver ``TimerFired``. Each timer has its
own deadline (ring timeout while dialling a runtime, the transfer target's ring timeout,
maximum duration once answered); ``TimerFired`` is turned into the timeout that is due
(``RingTimedOut``, ``TargetTimedOut``, ``MaxDurationReached``) before the table is read.

A call has three kinds of leg, each with its own events and commands: the caller's
inbound leg (``Caller*``), the outbound leg to the assistant's runtime, one per dialling
``attempt`` (``Runtime*``), and the leg to a transfer target, one per transfer ``leg``
number (``Target*``). An outbound call (API ``POST /calls/outbound``) starts in
``PLACING`` with the customer's leg (``DialCustomer``, ``Customer*`` until it answers),
which then takes the caller's place: the runtime is dialled (``CONNECTING``) and, once it
answers, bridged (``ACTIVE``) like an inbound call's. An event from a leg that is not
the current one of its kind (an abandoned runtime attempt, an earlier transfer target) is
stale and ignored, except a late answer: that leg is answered with its own hang-up, in
every state, or it would hold a call slot forever.

A (state, input) pair that is in neither table raises ``InvalidTransition``; pairs that
are benign in SIP (a second 180, a leg disconnecting after we hung it up) are listed
explicitly as ignored.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from callrouter.domain.models import CallStatus, EndReason


class State(enum.StrEnum):
    PLACING = "placing"      # an outbound call: INVITE sent to the customer, no answer yet
    CONNECTING = "connecting"  # an outbound call: the customer answered; dialling a runtime
    DIALLING = "dialling"    # INVITE sent to a runtime, no answer yet
    RINGING = "ringing"      # the runtime rings; the caller has heard 180
    ANSWERING = "answering"  # the runtime answered; 200 sent to the caller, awaiting ACK
    ACTIVE = "active"        # both legs confirmed, media bridged
    TRANSFERRING = "transferring"  # active, and a leg to the transfer target is ringing
    TRANSFERRED = "transferred"    # the caller talks to the transfer target
    ENDED = "ended"


# ---- events (adapter -> session) ------------------------------------------------


@dataclass(frozen=True)
class RuntimeRinging:
    attempt: int


@dataclass(frozen=True)
class RuntimeAnswered:
    attempt: int


@dataclass(frozen=True)
class RuntimeFailed:
    """The runtime leg ended before it answered (4xx-6xx, 408 timeout, unreachable)."""

    attempt: int
    code: int
    reason: str = ""


@dataclass(frozen=True)
class RuntimeHungUp:
    attempt: int


@dataclass(frozen=True)
class TargetRinging:
    """The transfer target's leg ``leg`` rings."""

    leg: int


@dataclass(frozen=True)
class TargetAnswered:
    leg: int


@dataclass(frozen=True)
class TargetFailed:
    """The transfer target's leg ended before it answered."""

    leg: int
    code: int
    reason: str = ""


@dataclass(frozen=True)
class TargetHungUp:
    leg: int


@dataclass(frozen=True)
class CustomerRinging:
    """An outbound call's customer leg rings (180/183)."""


@dataclass(frozen=True)
class CustomerAnswered:
    """An outbound call's customer leg answered (200)."""


@dataclass(frozen=True)
class CustomerFailed:
    """An outbound call's customer leg ended before it answered (busy, refused, ...)."""

    code: int
    reason: str = ""


@dataclass(frozen=True)
class CallerConfirmed:
    """The caller ACKed our 200."""


@dataclass(frozen=True)
class CallerHungUp:
    """The caller's leg ended after our 200 (BYE, or no ACK)."""


@dataclass(frozen=True)
class CallerCancelled:
    """The caller's leg ended before we answered (CANCEL)."""


@dataclass(frozen=True)
class TimerFired:
    """``next_deadline()`` has passed."""


@dataclass(frozen=True)
class Aborted:
    """The adapter failed while handling this call (a bug, not a SIP outcome): end it."""

    error: str


RuntimeEvent = RuntimeRinging | RuntimeAnswered | RuntimeFailed | RuntimeHungUp
TargetEvent = TargetRinging | TargetAnswered | TargetFailed | TargetHungUp
CustomerEvent = CustomerRinging | CustomerAnswered | CustomerFailed
Event = (RuntimeEvent | TargetEvent | CustomerEvent | CallerConfirmed | CallerHungUp
         | CallerCancelled | TimerFired | Aborted)


# ---- timeouts (what a TimerFired turns into) -------------------------------------


@dataclass(frozen=True)
class RingTimedOut:
    """The runtime being dialled did not answer within ``Timing.ring_timeout``."""


@dataclass(frozen=True)
class TargetTimedOut:
    """The transfer target did not answer within ``Timing.transfer_ring_timeout``."""


@dataclass(frozen=True)
class MaxDurationReached:
    pass


@dataclass(frozen=True)
class CustomerTimedOut:
    """The customer of an outbound call did not answer within ``Timing.customer_ring_timeout``."""


Timeout = RingTimedOut | TargetTimedOut | MaxDurationReached | CustomerTimedOut


# ---- requests (the API -> session), answered with commands or a refusal -----------


@dataclass(frozen=True)
class TransferRequested:
    """Move the caller from the assistant to ``target`` (API ``transfer`` command)."""

    target: str
    credentials: tuple[str, str] | None = None  # digest (username, password) for a trunk


@dataclass(frozen=True)
class EndRequested:
    """The router ends the call: API end-call, drain timeout, shutdown."""

    reason: EndReason


Request = TransferRequested | EndRequested


class Refusal(enum.StrEnum):
    NOT_CONNECTED = "not_connected"  # not (or no longer) in progress: the API's 400
    BUSY = "busy"  # in progress, but its state refuses the request now: the API's 409


@dataclass(frozen=True)
class Refused:
    refusal: Refusal
    reason: str


# ---- commands (session -> adapter) ----------------------------------------------


@dataclass(frozen=True)
class DialRuntime:
    attempt: int
    target: str


@dataclass(frozen=True)
class HangupRuntime:
    """BYE, or CANCEL while the runtime has not answered."""

    attempt: int


@dataclass(frozen=True)
class DialTarget:
    leg: int
    target: str
    credentials: tuple[str, str] | None = None


@dataclass(frozen=True)
class HangupTarget:
    leg: int


@dataclass(frozen=True)
class DialCustomer:
    """An outbound call: INVITE the customer (through a trunk) as ``caller_id``."""

    target: str
    credentials: tuple[str, str] | None = None
    caller_id: str | None = None


@dataclass(frozen=True)
class RingCaller:
    pass


@dataclass(frozen=True)
class AnswerCaller:
    pass


@dataclass(frozen=True)
class RejectCaller:
    code: int
    retry_after: int | None = None


@dataclass(frozen=True)
class HangupCaller:
    pass


@dataclass(frozen=True)
class BridgeRuntime:
    """Connect the caller's audio with this runtime leg's, both ways."""

    attempt: int


@dataclass(frozen=True)
class BridgeTarget:
    """Connect the caller's audio with the transfer target's, both ways."""

    leg: int


@dataclass(frozen=True)
class MarkAnswered:
    """The call is in progress from ``at`` (the answer time of the record)."""

    at: float


@dataclass(frozen=True)
class MarkTransferred:
    """The assistant's part ended by transfer at ``at``; the call itself goes on."""

    at: float
    target: str


@dataclass(frozen=True)
class TransferFailed:
    target: str
    code: int
    reason: str


@dataclass(frozen=True)
class Finish:
    status: CallStatus
    reason: EndReason
    at: float
    error: str | None = None


SipCommand = (DialRuntime | HangupRuntime | DialTarget | HangupTarget | DialCustomer
              | RingCaller | AnswerCaller | RejectCaller | HangupCaller | BridgeRuntime
              | BridgeTarget)
Bookkeeping = MarkAnswered | MarkTransferred | TransferFailed | Finish
Command = SipCommand | Bookkeeping


class InvalidTransition(Exception):
    def __init__(self, state: State, event: Event | Timeout | Request) -> None:
        super().__init__(f"no transition from {state} on {type(event).__name__}")
        self.state = state
        self.event = event


@dataclass(frozen=True)
class Timing:
    ring_timeout: float
    max_duration: float
    failure_code: int = 503
    retry_after: int = 5
    transfer_ring_timeout: float = 30.0
    customer_ring_timeout: float = 60.0  # an outbound call's destination


class _Timer(enum.Enum):
    RING = "ring"
    TARGET_RING = "target_ring"
    MAX_DURATION = "max_duration"
    CUSTOMER_RING = "customer_ring"


_TIMEOUTS: dict[_Timer, Timeout] = {
    _Timer.RING: RingTimedOut(), _Timer.TARGET_RING: TargetTimedOut(),
    _Timer.MAX_DURATION: MaxDurationReached(), _Timer.CUSTOMER_RING: CustomerTimedOut(),
}

Input = Event | Timeout | Request
Handler = Callable[["CallSession", Input, float], list["Command"]]
Refuser = Callable[["CallSession", Request], Refused]


class CallSession:
    """The state of one bridged call; see the module docstring."""

    def __init__(self, targets: tuple[str, ...], timing: Timing,
                 customer: DialCustomer | None = None) -> None:
        if not targets:
            raise ValueError("a bridged call needs at least one runtime target")
        self.targets = targets
        self.timing = timing
        self.customer = customer  # set: an outbound call, which dials the customer first
        self.state = State.DIALLING
        self.attempt = 0
        self.failures: list[str] = []
        self.target_leg: int | None = None  # the transfer leg ringing or connected
        self.transfer_target = ""
        self.transfers = 0
        self.runtime_gone = False  # the assistant hung up while its transfer was dialling
        self._deadlines: dict[_Timer, float] = {}

    def start(self, now: float) -> list[Command]:
        if self.customer is None:
            return self._dial(0, now)
        self.state = State.PLACING
        self._deadlines = {_Timer.CUSTOMER_RING: now + self.timing.customer_ring_timeout}
        return [self.customer]

    def next_deadline(self) -> float | None:
        return min(self._deadlines.values(), default=None)

    def handle(self, event: Event, now: float) -> list[Command]:
        if isinstance(event, TimerFired):
            timeout = self._expired(now)
            return [] if timeout is None else self._dispatch(timeout, now)
        if self._is_stale(event):
            return _hangup_if_answered(event)
        return self._dispatch(event, now)

    def request(self, request: Request, now: float) -> Refused | list[Command]:
        refuse = REFUSALS.get((self.state, type(request)))
        if refuse is not None:
            return refuse(self, request)
        return self._dispatch(request, now)

    def _dispatch(self, event: Input, now: float) -> list[Command]:
        handler = TRANSITIONS.get((self.state, type(event)))
        if handler is None:
            raise InvalidTransition(self.state, event)
        return handler(self, event, now)

    # ---- helpers used by the transition handlers --------------------------------

    def _expired(self, now: float) -> Timeout | None:
        due = [timer for timer, at in self._deadlines.items() if at <= now]
        if not due:
            return None
        timer = min(due, key=self._deadlines.__getitem__)
        del self._deadlines[timer]
        return _TIMEOUTS[timer]

    def _is_stale(self, event: Event) -> bool:
        match event:
            case RuntimeRinging(n) | RuntimeAnswered(n) | RuntimeFailed(n) | RuntimeHungUp(n):
                return n != self.attempt
            case TargetRinging(n) | TargetAnswered(n) | TargetFailed(n) | TargetHungUp(n):
                return n != self.target_leg
            case _:
                return False

    def _dial(self, attempt: int, now: float) -> list[Command]:
        self.attempt = attempt
        # An outbound call's customer is already connected while its runtime is dialled.
        self.state = State.DIALLING if self.customer is None else State.CONNECTING
        self._deadlines = {_Timer.RING: now + self.timing.ring_timeout}
        return [DialRuntime(attempt, self.targets[attempt])]

    def _next_or_fail(self, failure: str, now: float) -> list[Command]:
        self.failures.append(f"{self.targets[self.attempt]}: {failure}")
        if self.attempt + 1 < len(self.targets):
            return self._dial(self.attempt + 1, now)
        give_up: Command = (HangupCaller() if self.customer is not None
                            else RejectCaller(self.timing.failure_code, self.timing.retry_after))
        return self._end(now, CallStatus.FAILED, EndReason.RUNTIME_UNAVAILABLE, [give_up],
                         "; ".join(self.failures))

    def _end(self, now: float, status: CallStatus, reason: EndReason,
             commands: list[Command], error: str | None = None) -> list[Command]:
        self.state = State.ENDED
        self._deadlines = {}
        return [*commands, Finish(status, reason, now, error)]

    def _other_legs(self) -> list[Command]:
        """Hang-ups for every outbound leg still up, in the current state."""
        if self.state is State.TRANSFERRED:
            return [HangupTarget(self.target_leg or 0)]
        legs: list[Command] = [] if self.runtime_gone else [HangupRuntime(self.attempt)]
        if self.state is State.TRANSFERRING:
            legs.append(HangupTarget(self.target_leg or 0))
        return legs

    def _back_to_the_assistant(self, now: float, failed: TransferFailed) -> list[Command]:
        self.target_leg = None
        self._deadlines.pop(_Timer.TARGET_RING, None)
        if self.runtime_gone:
            return self._end(now, CallStatus.ENDED, EndReason.ASSISTANT_HANGUP,
                             [failed, HangupCaller()])
        self.state = State.ACTIVE  # the caller stays with the assistant
        return [failed]


def _hangup_if_answered(event: Event) -> list[Command]:
    """A leg that is not the current one answered after all: hang *that* leg up."""
    match event:
        case RuntimeAnswered(attempt):
            return [HangupRuntime(attempt)]
        case TargetAnswered(leg):
            return [HangupTarget(leg)]
        case _:
            return []


# ---- transition handlers ----------------------------------------------------------


def _ignore(s: CallSession, e: Input, now: float) -> list[Command]:
    return []


def _hangup_answered(s: CallSession, e: Input, now: float) -> list[Command]:
    assert isinstance(e, RuntimeAnswered | TargetAnswered)
    return _hangup_if_answered(e)


def _ringing(s: CallSession, e: Input, now: float) -> list[Command]:
    s.state = State.RINGING
    return [RingCaller()]


def _runtime_answered(s: CallSession, e: Input, now: float) -> list[Command]:
    s.state = State.ANSWERING
    s._deadlines = {}
    return [AnswerCaller()]


def _runtime_failed(s: CallSession, e: Input, now: float) -> list[Command]:
    assert isinstance(e, RuntimeFailed)
    return s._next_or_fail(f"{e.code} {e.reason}".strip(), now)


def _ring_timeout(s: CallSession, e: Input, now: float) -> list[Command]:
    return [HangupRuntime(s.attempt), *s._next_or_fail("no answer (ring timeout)", now)]


def _cancelled(s: CallSession, e: Input, now: float) -> list[Command]:
    return s._end(now, CallStatus.ENDED, EndReason.CALLER_CANCELLED, [HangupRuntime(s.attempt)])


def _end_before_answer(s: CallSession, e: Input, now: float) -> list[Command]:
    assert isinstance(e, EndRequested)
    return s._end(now, CallStatus.FAILED, e.reason,
                  [HangupRuntime(s.attempt), RejectCaller(503, s.timing.retry_after)])


def _confirmed(s: CallSession, e: Input, now: float) -> list[Command]:
    s.state = State.ACTIVE
    s._deadlines = {_Timer.MAX_DURATION: now + s.timing.max_duration}
    return [BridgeRuntime(s.attempt), MarkAnswered(now)]


def _caller_hangup(s: CallSession, e: Input, now: float) -> list[Command]:
    return s._end(now, CallStatus.ENDED, EndReason.CALLER_HANGUP, s._other_legs())


def _runtime_hangup(s: CallSession, e: Input, now: float) -> list[Command]:
    return s._end(now, CallStatus.ENDED, EndReason.ASSISTANT_HANGUP, [HangupCaller()])


def _target_hangup(s: CallSession, e: Input, now: float) -> list[Command]:
    return s._end(now, CallStatus.ENDED, EndReason.TRANSFERRED, [HangupCaller()])


def _max_duration(s: CallSession, e: Input, now: float) -> list[Command]:
    return s._end(now, CallStatus.ENDED, EndReason.MAX_DURATION,
                  [HangupCaller(), *s._other_legs()])


def _end_connected(s: CallSession, e: Input, now: float) -> list[Command]:
    assert isinstance(e, EndRequested)
    return s._end(now, CallStatus.ENDED, e.reason, [HangupCaller(), *s._other_legs()])


def _abort_unanswered(s: CallSession, e: Input, now: float) -> list[Command]:
    assert isinstance(e, Aborted)
    return s._end(now, CallStatus.FAILED, EndReason.ERROR,
                  [HangupRuntime(s.attempt), RejectCaller(500)], e.error)


def _abort_connected(s: CallSession, e: Input, now: float) -> list[Command]:
    assert isinstance(e, Aborted)
    return s._end(now, CallStatus.FAILED, EndReason.ERROR,
                  [HangupCaller(), *s._other_legs()], e.error)


def _transfer(s: CallSession, e: Input, now: float) -> list[Command]:
    assert isinstance(e, TransferRequested)
    s.state = State.TRANSFERRING
    s.transfers += 1
    s.target_leg = s.transfers
    s.transfer_target = e.target
    s._deadlines[_Timer.TARGET_RING] = now + s.timing.transfer_ring_timeout
    return [DialTarget(s.target_leg, e.target, e.credentials)]


def _target_answered(s: CallSession, e: Input, now: float) -> list[Command]:
    assert isinstance(e, TargetAnswered)
    s.state = State.TRANSFERRED
    s._deadlines.pop(_Timer.TARGET_RING, None)
    hangup: list[Command] = [] if s.runtime_gone else [HangupRuntime(s.attempt)]
    return [*hangup, BridgeTarget(e.leg), MarkTransferred(now, s.transfer_target)]


def _target_failed(s: CallSession, e: Input, now: float) -> list[Command]:
    assert isinstance(e, TargetFailed)
    return s._back_to_the_assistant(now, TransferFailed(s.transfer_target, e.code, e.reason))


def _target_timeout(s: CallSession, e: Input, now: float) -> list[Command]:
    leg = s.target_leg or 0
    failed = TransferFailed(s.transfer_target, 408, "no answer (transfer ring timeout)")
    return [HangupTarget(leg), *s._back_to_the_assistant(now, failed)]


def _assistant_left(s: CallSession, e: Input, now: float) -> list[Command]:
    s.runtime_gone = True  # the caller waits for the transfer target
    return []


# ---- an outbound call: the customer first, then the runtime ---------------------------

_BUSY = frozenset({486, 600, 603})
_NO_ANSWER = frozenset({408, 480, 487})


def _customer_answered(s: CallSession, e: Input, now: float) -> list[Command]:
    return [MarkAnswered(now), *s._dial(0, now)]


def _customer_failed(s: CallSession, e: Input, now: float) -> list[Command]:
    assert isinstance(e, CustomerFailed)
    reason = (EndReason.CUSTOMER_BUSY if e.code in _BUSY else EndReason.CUSTOMER_DID_NOT_ANSWER
              if e.code in _NO_ANSWER else EndReason.CUSTOMER_UNREACHABLE)
    return s._end(now, CallStatus.FAILED, reason, [], f"{e.code} {e.reason}".strip())


def _customer_timeout(s: CallSession, e: Input, now: float) -> list[Command]:
    return s._end(now, CallStatus.FAILED, EndReason.CUSTOMER_DID_NOT_ANSWER, [HangupCaller()],
                  "no answer (outbound ring timeout)")


def _end_placing(s: CallSession, e: Input, now: float) -> list[Command]:
    assert isinstance(e, EndRequested)
    return s._end(now, CallStatus.FAILED, e.reason, [HangupCaller()])


def _abort_placing(s: CallSession, e: Input, now: float) -> list[Command]:
    assert isinstance(e, Aborted)
    return s._end(now, CallStatus.FAILED, EndReason.ERROR, [HangupCaller()], e.error)


def _runtime_answered_outbound(s: CallSession, e: Input, now: float) -> list[Command]:
    """The customer is up already: bridge at once (no 200 to send, no ACK to wait for)."""
    s.state = State.ACTIVE
    s._deadlines = {_Timer.MAX_DURATION: now + s.timing.max_duration}
    return [BridgeRuntime(s.attempt)]


# ---- refusals (requests a state does not take) -------------------------------------


def _not_answered(s: CallSession, r: Request) -> Refused:
    return Refused(Refusal.NOT_CONNECTED, "the call is not connected yet")


def _transfer_ringing(s: CallSession, r: Request) -> Refused:
    return Refused(Refusal.BUSY, f"a transfer to {s.transfer_target} is still ringing")


def _already_transferred(s: CallSession, r: Request) -> Refused:
    return Refused(Refusal.NOT_CONNECTED, "the call was transferred")


def _over(s: CallSession, r: Request) -> Refused:
    return Refused(Refusal.NOT_CONNECTED, "the call has ended")


REFUSALS: dict[tuple[State, type], Refuser] = {
    (State.PLACING, TransferRequested): _not_answered,
    (State.CONNECTING, TransferRequested): _not_answered,
    (State.DIALLING, TransferRequested): _not_answered,
    (State.RINGING, TransferRequested): _not_answered,
    (State.ANSWERING, TransferRequested): _not_answered,
    (State.TRANSFERRING, TransferRequested): _transfer_ringing,
    (State.TRANSFERRED, TransferRequested): _already_transferred,
    (State.ENDED, TransferRequested): _over,
    (State.ENDED, EndRequested): _over,
}

# ---- the table ------------------------------------------------------------------------

_UNANSWERED: dict[type, Handler] = {
    RuntimeRinging: _ringing,
    RuntimeAnswered: _runtime_answered,
    RuntimeFailed: _runtime_failed,
    RingTimedOut: _ring_timeout,
    CallerCancelled: _cancelled,
    CallerHungUp: _cancelled,
    EndRequested: _end_before_answer,
    Aborted: _abort_unanswered,
}

# While the caller is connected, to the assistant or (transferring) still to it.
_CONNECTED: dict[type, Handler] = {
    CallerHungUp: _caller_hangup,
    CallerConfirmed: _ignore,
    MaxDurationReached: _max_duration,
    EndRequested: _end_connected,
    Aborted: _abort_connected,
    RuntimeRinging: _ignore,
    RuntimeAnswered: _ignore,
    CustomerRinging: _ignore,  # an outbound call's customer leg reports nothing new here
    CustomerAnswered: _ignore,
}

_PLACING: dict[type, Handler] = {
    CustomerRinging: _ignore,
    CustomerAnswered: _customer_answered,
    CustomerFailed: _customer_failed,
    CustomerTimedOut: _customer_timeout,
    EndRequested: _end_placing,
    Aborted: _abort_placing,
}

# An outbound call whose customer answered, while its runtime is dialled.
_OUTBOUND_CONNECTING: dict[type, Handler] = {
    RuntimeRinging: _ignore,
    RuntimeAnswered: _runtime_answered_outbound,
    RuntimeFailed: _runtime_failed,
    RingTimedOut: _ring_timeout,
    CallerHungUp: _caller_hangup,
    EndRequested: _end_connected,
    Aborted: _abort_connected,
    CustomerRinging: _ignore,
    CustomerAnswered: _ignore,
}

TRANSITIONS: dict[tuple[State, type], Handler] = {
    **{(State.PLACING, t): h for t, h in _PLACING.items()},
    **{(State.CONNECTING, t): h for t, h in _OUTBOUND_CONNECTING.items()},
    **{(State.DIALLING, t): h for t, h in _UNANSWERED.items()},
    **{(State.RINGING, t): h for t, h in _UNANSWERED.items()},
    (State.RINGING, RuntimeRinging): _ignore,  # 180 then 183, or a repeated 180
    (State.ANSWERING, CallerConfirmed): _confirmed,
    (State.ANSWERING, CallerHungUp): _caller_hangup,
    (State.ANSWERING, CallerCancelled): _caller_hangup,  # CANCEL crossing our 200
    (State.ANSWERING, RuntimeHungUp): _runtime_hangup,
    (State.ANSWERING, RuntimeFailed): _runtime_hangup,
    (State.ANSWERING, EndRequested): _end_connected,
    (State.ANSWERING, Aborted): _abort_connected,
    (State.ANSWERING, RuntimeRinging): _ignore,
    (State.ANSWERING, RuntimeAnswered): _ignore,
    **{(State.ACTIVE, t): h for t, h in _CONNECTED.items()},
    (State.ACTIVE, RuntimeHungUp): _runtime_hangup,
    (State.ACTIVE, RuntimeFailed): _runtime_hangup,
    (State.ACTIVE, TransferRequested): _transfer,
    **{(State.TRANSFERRING, t): h for t, h in _CONNECTED.items()},
    (State.TRANSFERRING, RuntimeHungUp): _assistant_left,
    (State.TRANSFERRING, RuntimeFailed): _assistant_left,
    (State.TRANSFERRING, TargetRinging): _ignore,  # the caller talks to the assistant meanwhile
    (State.TRANSFERRING, TargetAnswered): _target_answered,
    (State.TRANSFERRING, TargetFailed): _target_failed,
    (State.TRANSFERRING, TargetTimedOut): _target_timeout,
    **{(State.TRANSFERRED, t): h for t, h in _CONNECTED.items()},
    # The assistant's leg was hung up at the transfer: its own end is expected.
    (State.TRANSFERRED, RuntimeHungUp): _ignore,
    (State.TRANSFERRED, RuntimeFailed): _ignore,
    (State.TRANSFERRED, RuntimeAnswered): _hangup_answered,
    (State.TRANSFERRED, TargetHungUp): _target_hangup,
    (State.TRANSFERRED, TargetRinging): _ignore,
    (State.TRANSFERRED, TargetAnswered): _ignore,
    # Once ended, the legs we hung up report their own end: expected, ignored. A leg whose
    # 200 crossed our CANCEL is answered, though, and must be hung up.
    (State.ENDED, RuntimeAnswered): _hangup_answered,
    (State.ENDED, TargetAnswered): _hangup_answered,
    **{(State.ENDED, t): _ignore for t in (
        RuntimeRinging, RuntimeFailed, RuntimeHungUp, TargetRinging, TargetFailed,
        TargetHungUp, CallerConfirmed, CallerHungUp, CallerCancelled, Aborted,
        CustomerRinging, CustomerAnswered, CustomerFailed)},
}
