"""One bridged call, as an explicit state machine (sans-IO).

How it works: the SIP adapter turns pjsua2 callbacks on the two legs (the caller's
inbound leg and the outbound leg to the assistant's runtime) into the frozen
events below and feeds them to ``CallSession.handle(event, now)``. The session
looks the (state, event type) pair up in ``TRANSITIONS`` and returns commands for
the adapter to carry out. It never reads a clock or touches a socket: ``now``
comes in, and ``next_deadline()`` tells the adapter when to deliver ``TimerFired``
(ring timeout while dialling, maximum duration while active).

Runtime events carry the ``attempt`` they belong to: after a ring timeout or a
refusal the session moves on to the next runtime, and late events from an
abandoned attempt are ignored (or, for a late answer, hung up).

A (state, event) pair that is not in the table raises ``InvalidTransition``;
pairs that are benign in SIP (a second 180, a leg disconnecting after we hung it
up) are listed explicitly as ignored.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from callrouter.domain.models import CallStatus, EndReason


class State(enum.StrEnum):
    DIALLING = "dialling"    # INVITE sent to a runtime, no answer yet
    RINGING = "ringing"      # the runtime rings; the caller has heard 180
    ANSWERING = "answering"  # the runtime answered; 200 sent to the caller, awaiting ACK
    ACTIVE = "active"        # both legs confirmed, media bridged
    TRANSFERRING = "transferring"  # active, and a leg to the transfer target is dialling
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
    pass


@dataclass(frozen=True)
class TransferRequested:
    """Move the caller from the assistant to ``target`` (API ``transfer`` command)."""

    target: str
    credentials: tuple[str, str] | None = None  # digest (username, password) for a trunk


@dataclass(frozen=True)
class EndRequested:
    """The router ends the call: API end-call, drain timeout, shutdown."""

    reason: EndReason


Event = (RuntimeRinging | RuntimeAnswered | RuntimeFailed | RuntimeHungUp | CallerConfirmed
         | CallerHungUp | CallerCancelled | TimerFired | TransferRequested | EndRequested)


# ---- commands (session -> adapter) ----------------------------------------------


@dataclass(frozen=True)
class DialRuntime:
    attempt: int
    target: str
    credentials: tuple[str, str] | None = None


@dataclass(frozen=True)
class HangupRuntime:
    """BYE, or CANCEL while the runtime has not answered."""

    attempt: int


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
class BridgeMedia:
    """Connect the caller's audio with this runtime leg's, both ways."""

    attempt: int


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


Command = (DialRuntime | HangupRuntime | RingCaller | AnswerCaller | RejectCaller | HangupCaller
           | BridgeMedia | MarkAnswered | MarkTransferred | TransferFailed | Finish)


class InvalidTransition(Exception):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"no transition from {state} on {type(event).__name__}")
        self.state = state
        self.event = event


@dataclass(frozen=True)
class Timing:
    ring_timeout: float
    max_duration: float
    failure_code: int = 503
    retry_after: int = 5


Handler = Callable[["CallSession", Event, float], list[Command]]


class CallSession:
    """The state of one bridged call; see the module docstring."""

    def __init__(self, targets: tuple[str, ...], timing: Timing, now: float) -> None:
        if not targets:
            raise ValueError("a bridged call needs at least one runtime target")
        self.targets = targets
        self.timing = timing
        self.state = State.DIALLING
        self.attempt = 0
        self.failures: list[str] = []
        self.transfer_attempt: int | None = None
        self.transfer_target = ""
        self.transfers = 0
        self.runtime_gone = False  # the assistant hung up while its transfer was dialling
        self._deadline: float | None = None
        self._started = now

    def start(self, now: float) -> list[Command]:
        return self._dial(0, now)

    def next_deadline(self) -> float | None:
        return self._deadline

    def handle(self, event: Event, now: float) -> list[Command]:
        if self._is_stale(event):
            return self._stale(event)
        handler = TRANSITIONS.get((self.state, type(event)))
        if handler is None:
            raise InvalidTransition(self.state, event)
        return handler(self, event, now)

    # ---- helpers used by the transition handlers --------------------------------

    def _is_stale(self, event: Event) -> bool:
        attempt = getattr(event, "attempt", None)
        return attempt is not None and attempt not in (self.attempt, self.transfer_attempt)

    def _is_transfer_leg(self, event: Event) -> bool:
        attempt = getattr(event, "attempt", None)
        return self.transfer_attempt is not None and attempt == self.transfer_attempt

    def _stale(self, event: Event) -> list[Command]:
        # A runtime we gave up on answered after all: hang that leg up.
        if isinstance(event, RuntimeAnswered):
            return [HangupRuntime(event.attempt)]
        return []

    def _dial(self, attempt: int, now: float) -> list[Command]:
        self.attempt = attempt
        self.state = State.DIALLING
        self._deadline = now + self.timing.ring_timeout
        return [DialRuntime(attempt, self.targets[attempt])]

    def _next_or_fail(self, failure: str, now: float) -> list[Command]:
        self.failures.append(f"{self.targets[self.attempt]}: {failure}")
        if self.attempt + 1 < len(self.targets):
            return self._dial(self.attempt + 1, now)
        return self._end(now, CallStatus.FAILED, EndReason.RUNTIME_UNAVAILABLE,
                         [RejectCaller(self.timing.failure_code, self.timing.retry_after)],
                         "; ".join(self.failures))

    def _end(self, now: float, status: CallStatus, reason: EndReason,
             commands: list[Command], error: str | None = None) -> list[Command]:
        self.state = State.ENDED
        self._deadline = None
        return [*commands, Finish(status, reason, now, error)]


# ---- transition handlers ----------------------------------------------------------


def _ignore(s: CallSession, e: Event, now: float) -> list[Command]:
    return []


def _ringing(s: CallSession, e: Event, now: float) -> list[Command]:
    s.state = State.RINGING
    return [RingCaller()]


def _runtime_answered(s: CallSession, e: Event, now: float) -> list[Command]:
    s.state = State.ANSWERING
    s._deadline = None
    return [AnswerCaller()]


def _runtime_failed(s: CallSession, e: Event, now: float) -> list[Command]:
    assert isinstance(e, RuntimeFailed)
    return s._next_or_fail(f"{e.code} {e.reason}".strip(), now)


def _ring_timeout(s: CallSession, e: Event, now: float) -> list[Command]:
    return [HangupRuntime(s.attempt), *s._next_or_fail("no answer (ring timeout)", now)]


def _cancelled(s: CallSession, e: Event, now: float) -> list[Command]:
    return s._end(now, CallStatus.ENDED, EndReason.CALLER_CANCELLED, [HangupRuntime(s.attempt)])


def _end_before_answer(s: CallSession, e: Event, now: float) -> list[Command]:
    assert isinstance(e, EndRequested)
    return s._end(now, CallStatus.FAILED, e.reason,
                  [HangupRuntime(s.attempt), RejectCaller(503, s.timing.retry_after)])


def _confirmed(s: CallSession, e: Event, now: float) -> list[Command]:
    s.state = State.ACTIVE
    s._deadline = now + s.timing.max_duration
    return [BridgeMedia(s.attempt), MarkAnswered(now)]


def _all_runtime_legs(s: CallSession) -> list[Command]:
    legs: list[Command] = [HangupRuntime(s.attempt)]
    if s.transfer_attempt is not None and s.transfer_attempt != s.attempt:
        legs.append(HangupRuntime(s.transfer_attempt))
    return legs


def _caller_hangup(s: CallSession, e: Event, now: float) -> list[Command]:
    return s._end(now, CallStatus.ENDED, EndReason.CALLER_HANGUP, _all_runtime_legs(s))


def _runtime_hangup(s: CallSession, e: Event, now: float) -> list[Command]:
    return s._end(now, CallStatus.ENDED, EndReason.ASSISTANT_HANGUP,
                  [HangupCaller(), *_all_runtime_legs(s)[1:]])


def _max_duration(s: CallSession, e: Event, now: float) -> list[Command]:
    return s._end(now, CallStatus.ENDED, EndReason.MAX_DURATION,
                  [HangupCaller(), *_all_runtime_legs(s)])


def _end_connected(s: CallSession, e: Event, now: float) -> list[Command]:
    assert isinstance(e, EndRequested)
    return s._end(now, CallStatus.ENDED, e.reason, [HangupCaller(), *_all_runtime_legs(s)])


TRANSFER_ATTEMPTS = 1000  # transfer legs are numbered from here, apart from runtime attempts


def _transfer(s: CallSession, e: Event, now: float) -> list[Command]:
    assert isinstance(e, TransferRequested)
    s.state = State.TRANSFERRING
    s.transfers += 1
    s.transfer_attempt = TRANSFER_ATTEMPTS + s.transfers
    s.transfer_target = e.target
    return [DialRuntime(s.transfer_attempt, e.target, e.credentials)]


def _transfer_leg(s: CallSession, e: Event, now: float) -> list[Command]:
    """An event on the assistant's leg or on the transfer leg while transferring."""
    if not s._is_transfer_leg(e):
        if isinstance(e, RuntimeHungUp | RuntimeFailed):
            s.runtime_gone = True  # the caller waits for the transfer target
        return []
    if isinstance(e, RuntimeAnswered):
        assert s.transfer_attempt is not None
        old, s.attempt = s.attempt, s.transfer_attempt
        s.state = State.ACTIVE
        hangup: list[Command] = [] if s.runtime_gone else [HangupRuntime(old)]
        return [*hangup, BridgeMedia(s.attempt), MarkTransferred(now, s.transfer_target)]
    if isinstance(e, RuntimeFailed | RuntimeHungUp):
        failed: list[Command] = [TransferFailed(
            s.transfer_target, getattr(e, "code", 487), getattr(e, "reason", "hung up"))]
        s.transfer_attempt = None
        if s.runtime_gone:
            return s._end(now, CallStatus.ENDED, EndReason.ASSISTANT_HANGUP,
                          [*failed, HangupCaller()])
        s.state = State.ACTIVE  # the caller stays with the assistant
        return failed
    return []  # ringing: the caller keeps talking to the assistant meanwhile


_LEG_EVENTS = (RuntimeRinging, RuntimeAnswered, RuntimeFailed, RuntimeHungUp)

_UNANSWERED: dict[type, Handler] = {
    RuntimeRinging: _ringing,
    RuntimeAnswered: _runtime_answered,
    RuntimeFailed: _runtime_failed,
    TimerFired: _ring_timeout,
    CallerCancelled: _cancelled,
    CallerHungUp: _cancelled,
    EndRequested: _end_before_answer,
}

TRANSITIONS: dict[tuple[State, type], Handler] = {
    **{(State.DIALLING, t): h for t, h in _UNANSWERED.items()},
    **{(State.RINGING, t): h for t, h in _UNANSWERED.items()},
    (State.RINGING, RuntimeRinging): _ignore,  # 180 then 183, or a repeated 180
    (State.ANSWERING, CallerConfirmed): _confirmed,
    (State.ANSWERING, CallerHungUp): _caller_hangup,
    (State.ANSWERING, CallerCancelled): _caller_hangup,  # CANCEL crossing our 200
    (State.ANSWERING, RuntimeHungUp): _runtime_hangup,
    (State.ANSWERING, RuntimeFailed): _runtime_hangup,
    (State.ANSWERING, EndRequested): _end_connected,
    (State.ANSWERING, RuntimeRinging): _ignore,
    (State.ANSWERING, RuntimeAnswered): _ignore,
    (State.ACTIVE, CallerHungUp): _caller_hangup,
    (State.ACTIVE, RuntimeHungUp): _runtime_hangup,
    (State.ACTIVE, RuntimeFailed): _runtime_hangup,
    (State.ACTIVE, TimerFired): _max_duration,
    (State.ACTIVE, EndRequested): _end_connected,
    (State.ACTIVE, CallerConfirmed): _ignore,
    (State.ACTIVE, RuntimeRinging): _ignore,
    (State.ACTIVE, RuntimeAnswered): _ignore,
    (State.ACTIVE, TransferRequested): _transfer,
    **{(State.TRANSFERRING, t): _transfer_leg for t in _LEG_EVENTS},
    (State.TRANSFERRING, CallerHungUp): _caller_hangup,
    (State.TRANSFERRING, TimerFired): _max_duration,
    (State.TRANSFERRING, EndRequested): _end_connected,
    (State.TRANSFERRING, CallerConfirmed): _ignore,
    # Once ended, the legs we hung up report their own end: expected, ignored. A runtime
    # whose 200 crossed our CANCEL is answered, though, and must be hung up.
    (State.ENDED, RuntimeAnswered): lambda s, e, now: [HangupRuntime(s.attempt)],
    **{(State.ENDED, t): _ignore for t in (
        TransferRequested, RuntimeRinging, RuntimeFailed, RuntimeHungUp, CallerConfirmed,
        CallerHungUp, CallerCancelled, TimerFired, EndRequested)},
}
