"""The narrow seam between the call adapter and pjsua2.

How it works: ``adapter.CallAdapter`` (pump, timers, leg lifecycle, the callback guard)
never touches pjsua2. It asks a ``SipStack`` to answer, hang up, dial, bridge and send
DTMF on ``Leg`` values, and the stack reports back to its ``LegOwner`` (the adapter)
that a leg changed; the adapter then reads the leg's ``LegState`` from the stack. Two
stacks exist: ``pjstack.PjStack`` over pjsua2 and ``fake.FakeStack`` in memory, which
plays the far ends for tests.

Every ``SipStack`` method runs on the SIP thread and raises ``errors.EngineError`` (and
nothing else) when the engine refuses the operation. This module imports no pjsua2.
"""

from __future__ import annotations

import enum
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from callrouter.ports import EngineEntry

Headers = tuple[tuple[str, str], ...]
Credentials = tuple[str, str]  # digest (username, password)


class LegKind(enum.StrEnum):
    CALLER = "caller"  # the provider's inbound call
    RUNTIME = "runtime"  # an outbound call to the assistant's runtime (one per attempt)
    TARGET = "target"  # an outbound call to a transfer target (one per transfer)
    CUSTOMER = "customer"  # an outbound call's far end (API POST /calls/outbound)


@dataclass(eq=False)  # a leg is itself: compared and hashed by identity
class Leg:
    """One SIP call leg as the adapter sees it. ``call_id`` is None for an inbound call
    that was never routed; ``number`` is the runtime attempt or the transfer leg number;
    ``handle`` is the stack's own object (the pjsua2 ``Call``) until it is released."""

    kind: LegKind
    call_id: uuid.UUID | None = None
    number: int = 0
    handle: Any = None
    final_sent: bool = False  # a caller leg has had its final response (200 or a reject)
    invite_at: float = 0.0  # a caller leg: when its INVITE reached the router
    responded: bool = False  # a caller leg: the engine took a response of ours (not 100)
    rang: bool = False
    confirmed: bool = False
    ended: bool = False


# ---- what a leg's dialog is in (the stack's answer to ``status``) ----------------------


@dataclass(frozen=True)
class Progress:
    """Early: a provisional response (180, 183) was received."""

    code: int


@dataclass(frozen=True)
class Confirmed:
    """The dialog is confirmed: our INVITE was answered 200, or the caller ACKed ours."""


@dataclass(frozen=True)
class Disconnected:
    code: int  # the last status code (the refusal, 487 after CANCEL, 200 after BYE)
    reason: str = ""


LegState = Progress | Confirmed | Disconnected


class LegOwner(Protocol):
    """What a stack reports to (the adapter). Everything but ``leg_dtmf`` is called on
    the SIP thread; ``leg_dtmf`` may come from the media thread."""

    def guarded(self, where: EngineEntry,
                subject: Leg | uuid.UUID | None = None) -> AbstractContextManager[None]: ...
    def incoming(self, leg: Leg, message: str, source: str) -> None: ...
    def leg_changed(self, leg: Leg) -> None: ...
    def leg_media(self, leg: Leg) -> None: ...
    def leg_dtmf(self, leg: Leg, digit: str) -> None: ...


class SipStack(Protocol):
    """What the adapter needs of a SIP engine (see the module docstring)."""

    def attach(self, owner: LegOwner) -> None:
        """Report leg changes and new INVITEs to ``owner`` from now on."""
        ...

    def status(self, leg: Leg) -> LegState | None:
        """The leg's dialog state now (None: nothing the adapter acts on)."""
        ...

    def answer(self, leg: Leg, code: int, reason: str = "",
               retry_after: int | None = None, headers: Headers = ()) -> None:
        """Respond to an inbound leg: 180, 200, or a final refusal (with ``headers``)."""
        ...

    def hangup(self, leg: Leg) -> None:
        """BYE, or CANCEL while an outbound leg has not answered."""
        ...

    def dial(self, leg: Leg, target: str, headers: Headers,
             credentials: Credentials | None, caller_id: str | None = None,
             like: Leg | None = None) -> None:
        """Send an INVITE to ``target`` for ``leg``; with ``credentials`` digest
        challenges are answered as that trunk user; ``caller_id`` is the From user. The
        codec ``like`` uses (or was offered) is offered first, so that the two legs
        usually agree and their packets can be relayed without transcoding."""
        ...

    def bridge(self, a: Leg, b: Leg) -> bool:
        """Join the two legs' audio both ways; False while either has no media yet."""
        ...

    def send_dtmf(self, leg: Leg, digit: str) -> None: ...

    def sip_call_id(self, leg: Leg) -> str:
        """The Call-ID of a leg the router dialled."""
        ...

    def trunk_of(self, source: str, request_user: str) -> tuple[str, bool]:
        """The trunk an INVITE from ``source`` ("ip:port") to ``request_user`` came in on
        (its id, "" for none) and whether it matched as the Contact user of that trunk's
        registration rather than by address: the guard's answer, from its live table."""
        ...

    def release(self, leg: Leg) -> None:
        """Drop the stack's object for an ended leg (outside its callbacks)."""
        ...
