"""The SIP engine: one thread owns the pjsua2 endpoint and runs every pjsua2 call.

How it works: ``SipEngine.start()`` spawns the SIP thread, which creates the
endpoint (``threadCnt = 0``: no pjsua worker threads), the UDP and TCP transports,
one account, the router's guard module, and then loops::

    libHandleEvents(10 ms) -> run work queued by other threads -> fire due timers
    -> drop released Call objects

pjsua2 callbacks become domain events (``legs``); each event goes to the
``CallHandler`` (the service), whose ``Reaction`` lists SIP commands that this
module carries out, and the call's next deadline, kept in a heap here: the one
real timer. Events raised while a command runs (pjsua reports some state changes
synchronously) are queued and handled after it, never re-entrantly.

Other threads reach the engine only through ``deliver`` and ``call_soon``, which
queue work for the SIP thread. Call objects stay referenced until their leg is
DISCONNECTED and are dropped outside the callback (docs/engine.md pitfalls).
pjsua2 errors are translated in ``_translate`` only.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import heapq
import itertools
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pjsua2 as pj
import structlog

from callrouter.domain import session as s
from callrouter.errors import EngineError
from callrouter.ports import (
    Accepted,
    CallHandler,
    EngineStatus,
    InboundInvite,
    Reaction,
    Rejected,
)
from callrouter.sip.legs import CallerLeg, RuntimeLeg

log = structlog.get_logger("callrouter.sip")

POLL_MS = 10


@dataclass(frozen=True)
class EngineSettings:
    listen_host: str
    listen_port: int
    advertise: str
    rtp_start: int
    rtp_size: int
    codecs: tuple[str, ...]
    allowed_networks: tuple[tuple[str, int], ...]  # (address, prefix length)
    forbidden_reject_code: int  # 0: drop silently
    slot_reserve: int
    log_level: int = 1


@dataclass
class BridgedCall:
    """The engine's side of one routed call: its legs and media wiring."""

    call_id: uuid.UUID
    caller: CallerLeg
    headers: tuple[tuple[str, str], ...]
    runtimes: dict[int, RuntimeLeg] = field(default_factory=dict)
    deadline: float | None = None
    bridged: int | None = None  # the runtime attempt whose audio is joined to the caller's
    ended: bool = False


def _translate(exc: pj.Error) -> EngineError:
    return EngineError(f"pjsua2: {exc.title or exc.reason} ({exc.status})")


class _Account(pj.Account):  # type: ignore[misc]
    def __init__(self, engine: SipEngine) -> None:
        super().__init__()
        self.engine = engine

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        self.engine._on_incoming(prm)


class _LogWriter(pj.LogWriter):  # type: ignore[misc]
    def write(self, entry: pj.LogEntry) -> None:
        log.debug("engine.log", level=entry.level, msg=entry.msg.rstrip())


class SipEngine:
    """Implements ``ports.CallControl``; see the module docstring."""

    def __init__(self, settings: EngineSettings, handler: CallHandler,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.handler = handler
        self.clock = clock
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._events: collections.deque[tuple[uuid.UUID, s.Event]] = collections.deque()
        self._timers: list[tuple[float, int, uuid.UUID]] = []
        self._seq = itertools.count()
        self._calls: dict[uuid.UUID, BridgedCall] = {}
        self._legs: set[pj.Call] = set()  # every live leg: keeps Call objects referenced
        self._released: list[pj.Call] = []
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._pumping = False
        self._version = "unknown"
        self._max_calls = 0
        self.ep: Any = None
        self.account: Any = None
        self._trunk_accounts: dict[tuple[str, str], Any] = {}

    # ---- lifecycle (any thread) ----------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        self._thread = threading.Thread(target=self._run, name="sip-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise EngineError("the SIP engine did not start in time")
        if self._failure is not None:
            raise EngineError(f"the SIP engine failed to start: {self._failure}") from self._failure

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._ready.is_set() and self._failure is None and not self._stop.is_set()

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)

    def deliver(self, call_id: uuid.UUID, event: s.Event) -> None:
        self.call_soon(lambda: self._queue_event(call_id, event))

    def status(self) -> EngineStatus:
        return EngineStatus(
            running=self.running,
            max_calls=self._max_calls,
            calls_in_use=len(self._legs),
            guard={
                "dropped_source": int(pj.crGuardDroppedSources()),
                "refused_method": int(pj.crGuardRefusedMethods()),
                "refused_replaces": int(pj.crGuardRefusedReplaces()),
                "engine_full": int(pj.crGuardEngineFull()),
                "malformed": int(pj.crGuardMalformed()),
                "unparsable": int(pj.crGuardUnparsable()),
            },
            version=self._version,
        )

    # ---- the SIP thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._create_endpoint()
        except BaseException as exc:  # reported to start(), which raises EngineError
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.ep.libHandleEvents(POLL_MS)
            self._run_inbox()
            self._fire_timers(self.clock())
            self._released.clear()  # drop Call objects outside their callbacks

    def _run_inbox(self) -> None:
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except Exception:
                log.exception("sip.task_failed")

    def _create_endpoint(self) -> None:
        self.ep = pj.Endpoint()
        with _stdout_silenced():
            self.ep.libCreate()
        self.ep.libInit(self._ep_config())
        self._create_transports()
        self.ep.libStart()
        self.ep.audDevManager().setNullDev()  # clocks the conference bridge
        self._set_codecs()
        self._install_guard()
        self.account = _Account(self)
        self.account.create(self._account_config(), True)
        self._version = self.ep.libVersion().full
        self._max_calls = pj.UaConfig().maxCalls

    def _ep_config(self) -> Any:
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = False
        cfg.uaConfig.userAgent = ""  # no User-Agent/Server header naming the stack
        cfg.logConfig.level = self.settings.log_level
        cfg.logConfig.consoleLevel = self.settings.log_level
        cfg.logConfig.msgLogging = 0
        self._log_writer = _LogWriter()
        cfg.logConfig.writer = self._log_writer
        cfg.medConfig.clockRate = 8000
        cfg.medConfig.sndClockRate = 8000
        cfg.medConfig.channelCount = 1
        cfg.medConfig.noVad = True
        cfg.medConfig.ecTailLen = 0  # the runtime does its own audio processing
        return cfg

    def _create_transports(self) -> None:
        v6 = ":" in self.settings.listen_host
        kinds = ((pj.PJSIP_TRANSPORT_UDP6, pj.PJSIP_TRANSPORT_TCP6) if v6
                 else (pj.PJSIP_TRANSPORT_UDP, pj.PJSIP_TRANSPORT_TCP))
        for kind in kinds:
            tcfg = pj.TransportConfig()
            tcfg.port = self.settings.listen_port
            if self.settings.listen_host not in ("0.0.0.0", "::"):
                tcfg.boundAddress = self.settings.listen_host
            tcfg.publicAddress = self.settings.advertise
            self.ep.transportCreate(kind, tcfg)

    def _set_codecs(self) -> None:
        wanted = [c.upper() for c in self.settings.codecs]
        for codec in self.ep.codecEnum2():
            name = codec.codecId.split("/")[0].upper()
            prio = 255 - wanted.index(name) if name in wanted else 0
            self.ep.codecSetPriority(codec.codecId, prio)

    def _install_guard(self) -> None:
        status = pj.crGuardInstall()
        if status != 0:
            raise EngineError(f"could not install the guard module (status {status})")
        pj.crGuardClearNetworks()
        for address, prefix in self.settings.allowed_networks:
            if pj.crGuardAllowNetwork(address, prefix) != 0:
                raise EngineError(f"guard rejected network {address}/{prefix}")
        pj.crGuardSetSourceRejectCode(self.settings.forbidden_reject_code)
        pj.crGuardSetSlotReserve(self.settings.slot_reserve)

    def _account_config(self) -> Any:
        acfg = pj.AccountConfig()
        host = self.settings.advertise
        host = f"[{host}]" if ":" in host else host
        acfg.idUri = f"sip:callrouter@{host}:{self.settings.listen_port}"
        media = acfg.mediaConfig.transportConfig
        media.port = self.settings.rtp_start
        media.portRange = self.settings.rtp_size
        media.publicAddress = self.settings.advertise
        if self.settings.listen_host not in ("0.0.0.0", "::"):
            media.boundAddress = self.settings.listen_host
        if ":" in self.settings.listen_host:  # an IPv6 listener gets IPv6 media (RFC 5118)
            acfg.mediaConfig.ipv6Use = pj.PJSUA_IPV6_ENABLED
        # One codec per answer is enough; pjsua's "lock codec" re-INVITE is not wanted.
        acfg.mediaConfig.lockCodecEnabled = False
        acfg.natConfig.contactRewriteUse = 0
        acfg.natConfig.viaRewriteUse = 0
        acfg.natConfig.sdpNatRewriteUse = 0
        return acfg

    def _shutdown(self) -> None:
        try:
            self.ep.hangupAllCalls()
            deadline = time.monotonic() + 1.0
            while self._legs and time.monotonic() < deadline:
                self.ep.libHandleEvents(POLL_MS)
            self._calls.clear()
            self._legs.clear()
            self._released.clear()
            for account in [self.account, *self._trunk_accounts.values()]:
                account.shutdown()
            self.ep.libDestroy()
        except pj.Error as exc:
            log.warning("sip.shutdown_error", error=str(_translate(exc)))

    # ---- incoming INVITEs ----------------------------------------------------------

    def _on_incoming(self, prm: Any) -> None:
        received = self.clock()
        leg = CallerLeg(self.account, prm.callId, self)
        self._legs.add(leg)
        rdata = prm.rdata
        request_uri, headers = _request_line_and_headers(rdata.wholeMsg)
        invite = InboundInvite(
            sip_call_id=headers.get("call-id", ""),
            request_uri=request_uri,
            to_header=headers.get("to", ""),
            from_header=headers.get("from", ""),
            source=rdata.srcAddress,
            received_at=received,
        )
        answer = self.handler.on_invite(invite)
        if isinstance(answer, Rejected):
            self._reject(leg, answer.code, answer.reason, answer.retry_after)
        else:
            self._accept(leg, answer)
        self._pump()

    def _reject(self, leg: CallerLeg, code: int, reason: str, retry_after: int | None) -> None:
        prm = pj.CallOpParam()
        prm.statusCode = code
        if reason:
            prm.reason = reason
        if retry_after is not None:
            _add_header(prm, "Retry-After", str(retry_after))
        try:
            leg.answer(prm)
        except pj.Error as exc:
            log.warning("sip.answer_failed", code=code, error=str(_translate(exc)))

    def _accept(self, leg: CallerLeg, accepted: Accepted) -> None:
        leg.call_id = accepted.call_id
        call = BridgedCall(accepted.call_id, leg, accepted.runtime_headers)
        self._calls[accepted.call_id] = call
        self._apply(call, accepted.reaction)

    # ---- events and commands -------------------------------------------------------

    def leg_event(self, call_id: uuid.UUID, event: s.Event) -> None:
        self._queue_event(call_id, event)

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
                call = self._calls.get(call_id)
                if call is not None:
                    self._apply(call, self.handler.on_event(call_id, event, self.clock()))
        finally:
            self._pumping = False

    def _apply(self, call: BridgedCall, reaction: Reaction) -> None:
        for command in reaction.commands:
            try:
                self._execute(call, command)
            except pj.Error as exc:
                log.warning("sip.command_failed", call_id=str(call.call_id),
                            command=type(command).__name__, error=str(_translate(exc)))
        if reaction.deadline is not None and reaction.deadline != call.deadline:
            heapq.heappush(self._timers, (reaction.deadline, next(self._seq), call.call_id))
        call.deadline = reaction.deadline
        self._maybe_forget(call)

    def _execute(self, call: BridgedCall, command: s.Command) -> None:
        match command:
            case s.DialRuntime(attempt, target, credentials):
                self._dial(call, attempt, target, credentials)
            case s.HangupRuntime(attempt):
                self._hangup(call.runtimes.get(attempt))
            case s.RingCaller():
                self._answer(call.caller, 180)
            case s.AnswerCaller():
                self._answer(call.caller, 200)
            case s.RejectCaller(code, retry_after):
                if not call.caller.ended:
                    self._reject(call.caller, code, "", retry_after)
            case s.HangupCaller():
                self._hangup(call.caller)
            case s.BridgeMedia(attempt):
                call.bridged = attempt
                self._bridge(call)
            case s.Finish():
                call.ended = True

    def _dial(self, call: BridgedCall, attempt: int, target: str,
              credentials: tuple[str, str] | None = None) -> None:
        account = self._trunk_account(target, credentials) if credentials else self.account
        leg = RuntimeLeg(account, call.call_id, attempt, self)
        call.runtimes[attempt] = leg
        prm = pj.CallOpParam(True)
        for name, value in call.headers:
            _add_header(prm, name, value)
        try:
            leg.makeCall(target, prm)
        except pj.Error as exc:
            error = _translate(exc)
            self._queue_event(call.call_id, s.RuntimeFailed(attempt, 500, error.message))
            return
        self._legs.add(leg)

    def _answer(self, leg: CallerLeg, code: int) -> None:
        if leg.ended:
            return
        prm = pj.CallOpParam(True)
        prm.statusCode = code
        leg.answer(prm)

    def _hangup(self, leg: CallerLeg | RuntimeLeg | None) -> None:
        if leg is None or leg.ended or leg not in self._legs:
            return
        leg.hangup(pj.CallOpParam(True))

    def _trunk_account(self, target: str, credentials: tuple[str, str]) -> Any:
        """A pjsua account that answers digest challenges for one trunk user (no
        registration); created on first use and kept for the engine's lifetime."""
        username, password = credentials
        host = target.split("@")[-1].split(";")[0]
        key = (host, username)
        if key not in self._trunk_accounts:
            acfg = self._account_config()
            acfg.idUri = f"sip:{username}@{host}"
            cred = pj.AuthCredInfo("digest", "*", username, 0, password)
            acfg.sipConfig.authCreds.append(cred)
            account = _Account(self)  # an INVITE matched to it is routed like any other
            account.create(acfg, False)
            self._trunk_accounts[key] = account
        return self._trunk_accounts[key]

    def _bridge(self, call: BridgedCall) -> None:
        runtime = call.runtimes.get(call.bridged) if call.bridged is not None else None
        if runtime is None or call.caller.ended or runtime.ended:
            return
        a, b = _audio(call.caller), _audio(runtime)
        if a is not None and b is not None:
            a.startTransmit(b)
            b.startTransmit(a)

    def _fire_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            deadline, _, call_id = heapq.heappop(self._timers)
            call = self._calls.get(call_id)
            if call is not None and call.deadline == deadline:
                self._queue_event(call_id, s.TimerFired())

    def _maybe_forget(self, call: BridgedCall) -> None:
        legs: list[CallerLeg | RuntimeLeg] = [call.caller, *call.runtimes.values()]
        if call.ended and all(leg.ended or leg not in self._legs for leg in legs):
            self._calls.pop(call.call_id, None)

    # ---- callbacks from legs (LegOwner) ---------------------------------------------

    def leg_disconnected(self, leg: Any) -> None:
        self._legs.discard(leg)
        self._released.append(leg)
        call = self._calls.get(leg.call_id) if leg.call_id is not None else None
        if call is not None:
            self._maybe_forget(call)

    def leg_media(self, call_id: uuid.UUID) -> None:
        call = self._calls.get(call_id)
        if call is not None:
            try:
                self._bridge(call)
            except pj.Error as exc:
                log.warning("sip.bridge_failed", call_id=str(call_id), error=str(_translate(exc)))

    def leg_dtmf(self, call_id: uuid.UUID, digit: str) -> None:
        # Called on pjmedia's thread: hop to the SIP thread before touching pjsua2.
        self.call_soon(lambda: self._forward_dtmf(call_id, digit))

    def _forward_dtmf(self, call_id: uuid.UUID, digit: str) -> None:
        call = self._calls.get(call_id)
        runtime = call.runtimes.get(call.bridged) if call and call.bridged is not None else None
        if runtime is not None and runtime.confirmed and not runtime.ended:
            try:
                runtime.dialDtmf(digit)  # RFC 4733 towards the runtime
            except pj.Error as exc:
                log.warning("sip.dtmf_failed", call_id=str(call_id), error=str(_translate(exc)))


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """pjlib prints its start-up lines on stdout inside ``libCreate``, before any log
    configuration can apply; they would break the JSON log stream. Nothing else writes
    to stdout then (the API starts later)."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # C stdio buffers go to /dev/null, not the log
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


_COMPACT = {"i": "call-id", "f": "from", "t": "to"}
_WANTED = frozenset({"call-id", "from", "to"})


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


def _add_header(prm: Any, name: str, value: str) -> None:
    header = pj.SipHeader()
    header.hName = name
    header.hValue = value
    prm.txOption.headers.append(header)


def _audio(leg: pj.Call) -> Any:
    """The leg's active audio media, or None while it has none."""
    info = leg.getInfo()
    for index, media in enumerate(info.media):
        if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status in (
            pj.PJSUA_CALL_MEDIA_ACTIVE, pj.PJSUA_CALL_MEDIA_REMOTE_HOLD
        ):
            return pj.AudioMedia.typecastFromMedia(leg.getMedia(index))
    return None
