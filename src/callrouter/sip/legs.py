"""The pjsua2 Call subclass: one per call leg, forwarding its callbacks and nothing else.

A ``PjLeg`` tells its ``LegOwner`` (the adapter) that its leg changed; the owner reads
the new state through the stack (``pjstack.PjStack.status``) inside its callback guard,
and the session decides what to do. Callbacks arrive on the SIP thread, except DTMF,
which pjmedia reports on its media thread; the owner re-queues that onto the SIP thread
(only one thread may call pjsua2, see docs/engine.md).
"""

from __future__ import annotations

import pjsua2 as pj

from callrouter.sip.stack import Leg, LegOwner


class PjLeg(pj.Call):  # type: ignore[misc]
    def __init__(self, account: pj.Account, leg: Leg, owner: LegOwner,
                 pj_call_id: int = pj.PJSUA_INVALID_ID) -> None:
        super().__init__(account, pj_call_id)
        self.leg = leg
        self.owner = owner

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        self.owner.leg_changed(self.leg)

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        self.owner.leg_media(self.leg)

    def onDtmfEvent(self, prm: pj.OnDtmfEventParam) -> None:
        # RFC 4733 events and SIP INFO application/dtmf-relay both arrive here.
        self.owner.leg_dtmf(self.leg, prm.digit)

    def onCallTransferRequest(self, prm: pj.OnCallTransferRequestParam) -> None:
        prm.statusCode = 603  # never dial a Refer-To target (the guard refuses REFER first)

    def onCallReplaceRequest(self, prm: pj.OnCallReplaceRequestParam) -> None:
        prm.statusCode = 403
