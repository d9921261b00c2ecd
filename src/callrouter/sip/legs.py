"""pjsua2 Call subclasses: one per call leg, turning callbacks into domain events.

Each leg forwards what happened to its ``LegOwner`` (the engine) and never acts on
its own: the session state machine decides. Callbacks arrive on the SIP thread,
except DTMF, which pjmedia reports on its media thread; the owner re-queues that
onto the SIP thread (only one thread may call pjsua2, see docs/engine.md).
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

import pjsua2 as pj

from callrouter.domain import session as s


class LegOwner(Protocol):
    def leg_event(self, call_id: uuid.UUID, event: s.Event) -> None: ...
    def leg_disconnected(self, leg: Any) -> None: ...
    def leg_media(self, call_id: uuid.UUID) -> None: ...
    def leg_dtmf(self, call_id: uuid.UUID, digit: str) -> None: ...


class CallerLeg(pj.Call):  # type: ignore[misc]
    """The provider's inbound call. ``call_id`` is None for a call we rejected."""

    def __init__(self, account: pj.Account, pj_call_id: int, owner: LegOwner) -> None:
        super().__init__(account, pj_call_id)
        self.owner = owner
        self.call_id: uuid.UUID | None = None
        self.confirmed = False
        self.ended = False

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        if self.call_id is None:
            # Rejected: nothing to route, only the Call object to release once it is
            # over. isActive() is much cheaper than getInfo() on the reject hot path.
            if not self.ended and not self.isActive():
                self.ended = True
                self.owner.leg_disconnected(self)
            return
        state = self.getInfo().state
        if state == pj.PJSIP_INV_STATE_CONFIRMED and not self.confirmed:
            self.confirmed = True
            self._event(s.CallerConfirmed())
        elif state == pj.PJSIP_INV_STATE_DISCONNECTED and not self.ended:
            self.ended = True
            self._event(s.CallerHungUp() if self.confirmed else s.CallerCancelled())
            self.owner.leg_disconnected(self)

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        if self.call_id is not None:
            self.owner.leg_media(self.call_id)

    def onDtmfEvent(self, prm: pj.OnDtmfEventParam) -> None:
        # RFC 4733 events and SIP INFO application/dtmf-relay both arrive here.
        if self.call_id is not None:
            self.owner.leg_dtmf(self.call_id, prm.digit)

    def onCallTransferRequest(self, prm: pj.OnCallTransferRequestParam) -> None:
        prm.statusCode = 603  # never dial a Refer-To target (the guard refuses REFER first)

    def onCallReplaceRequest(self, prm: pj.OnCallReplaceRequestParam) -> None:
        prm.statusCode = 403

    def _event(self, event: s.Event) -> None:
        if self.call_id is not None:
            self.owner.leg_event(self.call_id, event)


class RuntimeLeg(pj.Call):  # type: ignore[misc]
    """The outbound call to an assistant's runtime, for one dialling attempt."""

    def __init__(self, account: pj.Account, call_id: uuid.UUID, attempt: int,
                 owner: LegOwner) -> None:
        super().__init__(account)
        self.owner = owner
        self.call_id = call_id
        self.attempt = attempt
        self.confirmed = False
        self.ended = False
        self.rang = False

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        info = self.getInfo()
        if info.state == pj.PJSIP_INV_STATE_EARLY and info.lastStatusCode in (180, 183):
            if not self.rang:
                self.rang = True
                self.owner.leg_event(self.call_id, s.RuntimeRinging(self.attempt))
        elif info.state == pj.PJSIP_INV_STATE_CONFIRMED and not self.confirmed:
            self.confirmed = True
            self.owner.leg_event(self.call_id, s.RuntimeAnswered(self.attempt))
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED and not self.ended:
            self.ended = True
            self.owner.leg_event(self.call_id, self._end_event(info))
            self.owner.leg_disconnected(self)

    def _end_event(self, info: Any) -> s.Event:
        if self.confirmed:
            return s.RuntimeHungUp(self.attempt)
        return s.RuntimeFailed(self.attempt, int(info.lastStatusCode), str(info.lastReason))

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        self.owner.leg_media(self.call_id)

    def onCallTransferRequest(self, prm: pj.OnCallTransferRequestParam) -> None:
        prm.statusCode = 603

    def onCallReplaceRequest(self, prm: pj.OnCallReplaceRequestParam) -> None:
        prm.statusCode = 403
