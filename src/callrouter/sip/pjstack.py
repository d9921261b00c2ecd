"""``stack.SipStack`` over pjsua2: the adapter's requests as pjsua2 calls.

Every method runs on the SIP thread. A leg's ``handle`` is its ``legs.PjLeg`` from
``dial`` (or ``incoming``) until ``release``, which drops it outside its callbacks (the
Leg and the PjLeg refer to each other until then). pjsua2 errors become
``errors.EngineError`` through the engine's one translating function, passed in.
Trunk users get their own accounts (``trunks.TrunkAccounts``), whose password follows
the trunk's current one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pjsua2 as pj

from callrouter.errors import EngineError
from callrouter.ports import EngineEntry
from callrouter.sip.legs import PjLeg
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
from callrouter.sip.trunks import TrunkAccounts, trunk_host


class PjStack:
    def __init__(self, *, account: Callable[[], Any], account_config: Callable[[], Any],
                 new_account: Callable[[], Any],
                 translate: Callable[[Any], EngineError],
                 preferring: Callable[[str], AbstractContextManager[None]]) -> None:
        self._account = account  # the router's own account, once the endpoint runs
        self._preferring = preferring  # codec name -> offered first inside the block
        self._account_config = account_config
        self._new_account = new_account
        self._translate = translate
        self._owner: LegOwner | None = None
        self._trunks: TrunkAccounts[Any] = TrunkAccounts(self._create_trunk, self._update_trunk)

    @property
    def owner(self) -> LegOwner:
        assert self._owner is not None, "attach() the adapter first"
        return self._owner

    def attach(self, owner: LegOwner) -> None:
        self._owner = owner

    def incoming(self, account: Any, prm: Any) -> None:
        """``Account.onIncomingCall``: wrap the new call in a leg for the owner."""
        leg = Leg(LegKind.CALLER)
        with self.owner.guarded(EngineEntry.INCOMING_CALL, leg):
            leg.handle = PjLeg(account, leg, self.owner, prm.callId)
            rdata = prm.rdata
            self.owner.incoming(leg, rdata.wholeMsg, rdata.srcAddress)

    def trunk_accounts(self) -> list[Any]:
        return self._trunks.all()

    # ---- SipStack -------------------------------------------------------------------

    def status(self, leg: Leg) -> LegState | None:
        call = leg.handle
        if call is None:
            return None
        with self._translated():
            if leg.kind is LegKind.CALLER and leg.call_id is None:
                # Never routed: only its end matters, and isActive() is much cheaper than
                # getInfo() on the reject hot path.
                return None if call.isActive() else Disconnected(0)
            return _state(call.getInfo())

    def answer(self, leg: Leg, code: int, reason: str = "",
               retry_after: int | None = None, headers: Headers = ()) -> None:
        prm = _audio_only(pj.CallOpParam(True)) if code < 300 else pj.CallOpParam()
        prm.statusCode = code
        if reason:
            prm.reason = reason
        if retry_after is not None:
            _add_header(prm, "Retry-After", str(retry_after))
        for name, value in headers:
            _add_header(prm, name, value)
        with self._translated():
            leg.handle.answer(prm)

    def hangup(self, leg: Leg) -> None:
        with self._translated():
            leg.handle.hangup(pj.CallOpParam(True))

    def dial(self, leg: Leg, target: str, headers: Headers,
             credentials: Credentials | None, caller_id: str | None = None,
             like: Leg | None = None) -> None:
        prm = _audio_only(pj.CallOpParam(True))
        for name, value in headers:
            _add_header(prm, name, value)
        if caller_id:  # From (pjsua would put the account's own URI there)
            prm.txOption.localUri = f"sip:{caller_id}@{trunk_host(target)}"
        codec = str(pj.crRelayCodecOf(like.handle.getId())) if like and like.handle else ""
        # The offer is written inside makeCall, on this thread: the codec order of the
        # moment is the offer's.
        with self._translated(), self._preferring(codec):
            account = self._trunks.get(target, credentials) if credentials else self._account()
            leg.handle = PjLeg(account, leg, self.owner)
            try:
                leg.handle.makeCall(target, prm)
            except pj.Error:
                leg.handle = None  # never started: nothing to release
                raise

    def bridge(self, a: Leg, b: Leg) -> bool:
        """Same codec and ptime on both legs: the engine relays their packets
        (callrouter_relay.hpp); otherwise, or with sip.media_relay off, their conference
        ports are joined both ways on the audio switchboard. Called again on every media
        change of either leg (re-INVITE, hold), which may switch between the two."""
        with self._translated():
            media_a, media_b = _audio(a.handle), _audio(b.handle)
            if media_a is None or media_b is None:
                return False
            if pj.crRelayBridge(a.handle.getId(), b.handle.getId()):
                return True
            media_a.startTransmit(media_b)
            media_b.startTransmit(media_a)
        return True

    def send_dtmf(self, leg: Leg, digit: str) -> None:
        with self._translated():
            # RFC 4733 either way: events in the relayed packet stream, else the stream's
            if not pj.crRelayDtmf(leg.handle.getId(), digit):
                leg.handle.dialDtmf(digit)

    def release(self, leg: Leg) -> None:
        leg.handle = None

    def sip_call_id(self, leg: Leg) -> str:
        with self._translated():
            return str(leg.handle.getInfo().callIdString)

    def trunk_of(self, source: str, request_user: str) -> tuple[str, bool]:
        trunk = str(pj.crGuardTrunkFor(source, request_user))
        return trunk, bool(trunk) and bool(pj.crGuardIsRegistrationUser(request_user))

    # ---- helpers ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except pj.Error as exc:
            raise self._translate(exc) from exc

    def _create_trunk(self, host: str, username: str, password: str) -> Any:
        account = self._new_account()  # an INVITE matched to it is routed like any other
        account.create(self._trunk_config(host, username, password), False)
        return account

    def _update_trunk(self, account: Any, host: str, username: str, password: str) -> None:
        account.modify(self._trunk_config(host, username, password))

    def _trunk_config(self, host: str, username: str, password: str) -> Any:
        """The router's account settings, as this trunk user, answering digest
        challenges with its password (no registration)."""
        acfg = self._account_config()
        acfg.idUri = f"sip:{username}@{host}"
        acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", username, 0, password))
        return acfg


def _state(info: Any) -> LegState | None:
    if info.state == pj.PJSIP_INV_STATE_EARLY:
        return Progress(int(info.lastStatusCode))
    if info.state == pj.PJSIP_INV_STATE_CONFIRMED:
        return Confirmed()
    if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
        return Disconnected(int(info.lastStatusCode), str(info.lastReason))
    return None


def _audio_only(prm: Any) -> Any:
    """The call carries audio alone. pjsua 2.14+ also offers a T.140 text stream by
    default (an m=text line, and an RTP + RTCP socket pair per leg from sip.rtp_ports):
    none of the router's peers uses it, and the ~300 bytes it adds lift an INVITE over
    pjsip's 1300-byte UDP threshold, past which pjsip sends it over TCP first (RFC 3261
    s18.1.1) -- to a runtime or trunk that listens on UDP only. (2.12.1 has no text.)"""
    if hasattr(prm.opt, "textCount"):
        prm.opt.textCount = 0
    return prm


def _add_header(prm: Any, name: str, value: str) -> None:
    header = pj.SipHeader()
    header.hName = name
    header.hValue = value
    prm.txOption.headers.append(header)


def _audio(call: pj.Call) -> Any:
    """The call's active audio media, or None while it has none."""
    info = call.getInfo()
    for index, media in enumerate(info.media):
        if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status in (
            pj.PJSUA_CALL_MEDIA_ACTIVE, pj.PJSUA_CALL_MEDIA_REMOTE_HOLD
        ):
            return pj.AudioMedia.typecastFromMedia(call.getMedia(index))
    return None
