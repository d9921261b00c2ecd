"""``stack.SipStack`` in memory, for tests: records what the adapter asks and plays the
far ends.

The test drives the far ends: ``invite()`` offers an inbound call; ``ring``, ``pick_up``,
``refuse`` and ``hang_up`` act as the runtime, the transfer target or the caller (for the
caller, ``pick_up`` is its ACK). Like pjsua, the fake reports some state changes while
the adapter's own request runs: a final refusal or a BYE ends the leg at once. A CANCEL
ends an outbound leg with 487 at once too, unless ``cancel_completes`` is False: then
the leg waits for the test to ``refuse`` it (487) or ``pick_up`` (a 200 crossing the
CANCEL).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from callrouter.errors import EngineError
from callrouter.sip.stack import (
    Confirmed,
    Credentials,
    Disconnected,
    Headers,
    Leg,
    LegKind,
    LegOwner,
    LegState,
    Progress,
)


@dataclass(frozen=True)
class Dialled:
    leg: Leg
    target: str
    headers: Headers
    credentials: Credentials | None
    caller_id: str | None = None
    like: Leg | None = None  # the leg whose codec the offer lists first


@dataclass
class FakeStack:
    cancel_completes: bool = True
    media_ready: bool = True
    unreachable: set[str] = field(default_factory=set)  # targets whose INVITE cannot be sent
    requests: list[tuple[str, Leg, object]] = field(default_factory=list)  # in order
    dialled: list[Dialled] = field(default_factory=list)
    bridges: list[tuple[Leg, Leg]] = field(default_factory=list)
    released: list[Leg] = field(default_factory=list)
    callers: list[Leg] = field(default_factory=list)
    trunk_sources: dict[str, str] = field(default_factory=dict)  # source ip -> trunk id
    registration_users: dict[str, str] = field(default_factory=dict)  # contact user -> trunk
    answer_headers: dict[Leg, Headers] = field(default_factory=dict)  # of final refusals
    _owner: LegOwner | None = None
    _states: dict[Leg, LegState] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def owner(self) -> LegOwner:
        assert self._owner is not None, "attach() the adapter first"
        return self._owner

    # ---- SipStack -------------------------------------------------------------------

    def attach(self, owner: LegOwner) -> None:
        self._owner = owner

    def status(self, leg: Leg) -> LegState | None:
        return self._states.get(leg)

    def answer(self, leg: Leg, code: int, reason: str = "",
               retry_after: int | None = None, headers: Headers = ()) -> None:
        self.requests.append(("answer", leg, code))
        if headers:
            self.answer_headers[leg] = headers
        if code >= 300:
            self._set(leg, Disconnected(code, reason))

    def hangup(self, leg: Leg) -> None:
        self.requests.append(("hangup", leg, None))
        answered = isinstance(self._states.get(leg), Confirmed)
        if leg.kind is LegKind.CALLER or answered:
            self._set(leg, Disconnected(200 if answered else 603))
        elif self.cancel_completes:
            self._set(leg, Disconnected(487, "Request Terminated"))

    def dial(self, leg: Leg, target: str, headers: Headers,
             credentials: Credentials | None, caller_id: str | None = None,
             like: Leg | None = None) -> None:
        if target in self.unreachable:
            raise EngineError(f"cannot reach {target}")
        leg.handle = next(self._ids)
        self.requests.append(("dial", leg, target))
        self.dialled.append(Dialled(leg, target, headers, credentials, caller_id, like))

    def bridge(self, a: Leg, b: Leg) -> bool:
        if not self.media_ready:
            return False
        self.bridges.append((a, b))
        return True

    def send_dtmf(self, leg: Leg, digit: str) -> None:
        self.requests.append(("dtmf", leg, digit))

    def release(self, leg: Leg) -> None:
        self.released.append(leg)
        leg.handle = None

    def sip_call_id(self, leg: Leg) -> str:
        return f"dialled-{leg.handle}@router"

    def trunk_of(self, source: str, request_user: str) -> tuple[str, bool]:
        by_address = self.trunk_sources.get(source.rsplit(":", 1)[0], "")
        if by_address:
            return by_address, False
        by_user = self.registration_users.get(request_user, "")
        return by_user, bool(by_user)

    # ---- the far ends ---------------------------------------------------------------

    def invite(self, dialled: str = "+31850835037", caller: str = "0201234567",
               source: str = "127.0.0.1:5062", request_user: str | None = None) -> Leg:
        """An INVITE to ``dialled``; with ``request_user`` the Request-URI names that user
        (a registration's Contact) and ``dialled`` is only in To."""
        leg = Leg(LegKind.CALLER, handle=next(self._ids))
        self.callers.append(leg)
        uri = f"sip:{dialled}@router"
        ruri = uri if request_user is None else f"sip:{request_user}@router"
        message = (f"INVITE {ruri} SIP/2.0\r\nCall-ID: call-{leg.handle}@provider\r\n"
                   f"From: <sip:{caller}@provider>;tag=1\r\nTo: <{uri}>\r\n\r\n")
        self.owner.incoming(leg, message, source)
        return leg

    def ring(self, leg: Leg, code: int = 180) -> None:
        self._set(leg, Progress(code))

    def pick_up(self, leg: Leg) -> None:
        self._set(leg, Confirmed())

    def refuse(self, leg: Leg, code: int, reason: str = "") -> None:
        self._set(leg, Disconnected(code, reason))

    def hang_up(self, leg: Leg) -> None:
        self._set(leg, Disconnected(200))

    def media(self, leg: Leg) -> None:
        self.media_ready = True
        self.owner.leg_media(leg)

    def dtmf(self, leg: Leg, digit: str) -> None:
        self.owner.leg_dtmf(leg, digit)

    # ---- what happened ----------------------------------------------------------------

    def legs(self, kind: LegKind) -> list[Leg]:
        return [d.leg for d in self.dialled if d.leg.kind is kind]

    def asked(self, verb: str, leg: Leg) -> list[object]:
        """What the adapter asked of ``leg`` with ``verb``, in order (codes for answer)."""
        return [arg for v, lg, arg in self.requests if v == verb and lg is leg]

    def _set(self, leg: Leg, state: LegState) -> None:
        self._states[leg] = state
        self.owner.leg_changed(leg)
