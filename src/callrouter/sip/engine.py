"""The SIP engine: one thread owns the pjsua2 endpoint and runs every pjsua2 call.

How it works: ``SipEngine.start()`` spawns the SIP thread, which creates the
endpoint (``threadCnt = 0``: no pjsua worker threads), the UDP and TCP transports,
one account, the router's guard module, and then loops::

    libHandleEvents(10 ms) -> CallAdapter.tick(): run work queued by other threads,
    fire due timers, drop released Call objects

This module and the modules it brings in (``pjstack``, ``legs``) are the part bound to
pjsua2: the endpoint, its thread and the Call objects. What calls do (the pump, timers,
leg lifecycle, the callback guard) is ``adapter.CallAdapter``, which reaches pjsua2 only
through the ``stack.SipStack`` seam (``pjstack.PjStack`` here) and is unit-tested on a
fake. Other threads reach the engine only through ``submit`` and ``call_soon``, which
queue work for the SIP thread. pjsua2 errors are translated in ``_translate`` only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pjsua2 as pj
import structlog

from callrouter.domain import session as s
from callrouter.domain.webhooks import AssistantReply
from callrouter.errors import EngineError
from callrouter.ports import (
    Accepted,
    CallHandler,
    EngineStatus,
    OutboundCall,
    RegistrationStatus,
    Rejected,
    TrunkPolicy,
)
from callrouter.sip.adapter import CallAdapter
from callrouter.sip.heap import HeapTrimmer, malloc_trim
from callrouter.sip.pjstack import PjStack
from callrouter.sip.registrations import Registrations

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
    max_message_bytes: int = 16384
    flood_limit: int = 0  # new requests per second per source; 0 = off
    flood_ban_seconds: int = 60
    log_level: int = 1
    register_retry_seconds: int = 30
    register_retry_max_seconds: int = 300
    keepalive_seconds: int = 15
    media_relay: bool = True
    media_relay_threads: int = 1  # relay threads moving relayed legs' packets


def _translate(exc: pj.Error, doing: str = "") -> EngineError:
    # str() of a pjsua2.Error (a SWIG proxy) is empty: its text is in title/reason/status.
    if doing:  # say what failed with pjlib's reason, e.g. "address already in use"
        reason = exc.reason or exc.title or f"status {exc.status}"
        return EngineError(f"{doing}: {reason[:1].lower()}{reason[1:]}")
    return EngineError(f"pjsua2: {exc.title or exc.reason} ({exc.status})")


def _start_failure(exc: BaseException) -> EngineError:
    """What ``start()`` raises for a failure on the SIP thread: as translated there, else
    with a reason that is never empty."""
    if isinstance(exc, EngineError):
        return exc
    reason = _translate(exc).message if isinstance(exc, pj.Error) else str(exc) or repr(exc)
    failure = EngineError(f"the SIP engine failed to start: {reason}")
    failure.__cause__ = exc
    return failure


class _Account(pj.Account):  # type: ignore[misc]
    def __init__(self, engine: SipEngine) -> None:
        super().__init__()
        self.engine = engine

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        self.engine._on_incoming(prm)


class _LogWriter(pj.LogWriter):  # type: ignore[misc]
    """pjlib's log lines, through the router's logger. pjlib is built with NDEBUG: a
    failed internal assertion is logged at level 1 ("Assert failed: ...") and the
    operation fails instead of aborting the process; those are counted and logged as
    errors (docs/engine.md, "Assertions"). Called on whichever thread logged."""

    def __init__(self) -> None:
        super().__init__()
        self.assertions = 0

    def write(self, entry: pj.LogEntry) -> None:
        msg = entry.msg.rstrip()
        if "Assert failed" in msg:
            self.assertions += 1
            log.error("engine.assertion", msg=msg)
        else:
            log.debug("engine.log", level=entry.level, msg=msg)


class SipEngine:
    """Implements ``ports.CallControl``; see the module docstring."""

    def __init__(self, settings: EngineSettings, handler: CallHandler,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.handler = handler
        self.clock = clock
        self.stack = PjStack(account=lambda: self.account, account_config=self._account_config,
                             new_account=lambda: _Account(self), translate=_translate,
                             preferring=self._preferring)
        self.adapter = CallAdapter(handler, self.stack, clock)
        self.registrations = Registrations(
            base_config=self._account_config, contact=self._contact,
            incoming=self.stack.incoming, retry_first=settings.register_retry_seconds,
            retry_max=settings.register_retry_max_seconds,
            keepalive=settings.keepalive_seconds, clock=clock)
        self._publishing = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._version = "unknown"
        self._max_calls = 0
        self.ep: Any = None
        self._codec_ids: list[tuple[str, str]] = []  # (pjsua codec id, encoding name)
        self._codec_order = [c.upper() for c in settings.codecs]  # sip.codecs, preferred first
        self.account: Any = None
        self._log_writer = _LogWriter()
        self._heap = HeapTrimmer(malloc_trim())  # memory back to the OS after a burst

    # ---- lifecycle (any thread) ----------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        self._thread = threading.Thread(target=self._run, name="sip-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise EngineError("the SIP engine did not start in time")
        if self._failure is not None:
            raise _start_failure(self._failure)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._ready.is_set() and self._failure is None and not self._stop.is_set()

    def set_draining(self, draining: bool, retry_after: int) -> None:
        """Out-of-dialog OPTIONS gets 503 + Retry-After while draining, so a balancer's
        OPTIONS probe (Kamailio's dispatcher) takes this router out. Safe from any thread:
        the guard keeps the flag in an atomic."""
        pj.crGuardSetDraining(draining, retry_after)

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.adapter.call_soon(fn)

    def submit(self, call_id: uuid.UUID, request: s.Request) -> Future[s.Refused | None]:
        return self.adapter.submit(call_id, request)

    def place(self, call: OutboundCall) -> Future[Accepted | Rejected]:
        return self.adapter.place(call)

    # ---- trunks (ports.ProviderControl; any thread) ------------------------------------

    def apply_trunks(self, policy: TrunkPolicy) -> None:
        """The guard's trunk table is swapped at once (the next INVITE sees it);
        registrations follow on the SIP thread."""
        with self._publishing:
            pj.crGuardTrunksBegin()
            for net in policy.networks:
                if pj.crGuardTrunksAddNetwork(net.address, net.prefix, str(net.trunk_id)) != 0:
                    log.warning("trunk.network_refused", trunk_id=str(net.trunk_id),
                                network=f"{net.address}/{net.prefix}")
            for auth in policy.inbound_auth:
                pj.crGuardTrunksAddAuth(str(auth.trunk_id), auth.username, auth.password)
            for reg in policy.registrations:
                pj.crGuardTrunksAddRegistrationUser(reg.contact_user, str(reg.trunk_id))
            pj.crGuardTrunksPublish()
        self.call_soon(lambda: self.registrations.apply(policy.registrations))

    def registration(self, trunk_id: uuid.UUID) -> RegistrationStatus | None:
        return self.registrations.status(trunk_id)

    def registration_statuses(self) -> list[RegistrationStatus]:
        return self.registrations.statuses()

    def unregister_all(self) -> None:
        """Drain: every registration is ended (expires 0) on the SIP thread."""
        self.call_soon(self.registrations.unregister_all)

    def resume(self, call_id: uuid.UUID, reply: AssistantReply) -> None:
        self.adapter.resume(call_id, reply)

    def status(self) -> EngineStatus:
        return EngineStatus(
            running=self.running,
            max_calls=self._max_calls,
            calls_in_use=self.adapter.legs_in_use,
            assertions=self._log_writer.assertions,
            guard={
                "dropped_source": int(pj.crGuardDroppedSources()),
                "refused_method": int(pj.crGuardRefusedMethods()),
                "refused_replaces": int(pj.crGuardRefusedReplaces()),
                "engine_full": int(pj.crGuardEngineFull()),
                "malformed": int(pj.crGuardMalformed()),
                "unparsable": int(pj.crGuardUnparsable()),
                "too_large": int(pj.crGuardTooLarge()),
                "keepalive_pong": int(pj.crGuardKeepalivePongs()),
                "flood_dropped": int(pj.crGuardFloodDropped()),
                "flood_ban": int(pj.crGuardFloodBans()),
                "trunk_allowed": int(pj.crGuardTrunkAllowed()),
                "auth_challenged": int(pj.crGuardAuthChallenged()),
                "auth_failed": int(pj.crGuardAuthFailed()),
                "auth_ok": int(pj.crGuardAuthOk()),
                "draining_options": int(pj.crGuardOptionsDraining()),
            },
            version=self._version,
            media={
                "pairs": int(pj.crRelayPairs()),
                "rtp": int(pj.crRelayRtp()),
                "rtcp": int(pj.crRelayRtcp()),
                "dropped": int(pj.crRelayDropped()),
                "dtmf_events": int(pj.crRelayDtmfEvents()),
                "thread_pairs": int(pj.crRelayThreadPairs()),
                "thread_packets": int(pj.crRelayThreadPackets()),
            },
        )

    # ---- the SIP thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._create_endpoint()
        except BaseException as exc:  # reported to start(), which raises EngineError
            self._failure = exc
            self._abandon_endpoint()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        while not self._stop.is_set():
            events = self.ep.libHandleEvents(POLL_MS)
            self.adapter.tick()  # queued work, due timers, Call objects dropped outside callbacks
            self.registrations.tick(self.clock())  # REGISTER retries whose back-off is over
            self._report_flood_bans()
            self._heap.after(max(events, 0), self.clock())  # trims once a burst is over

    def _report_flood_bans(self) -> None:
        """One log line per ban the guard started (it queues the source addresses)."""
        banned = pj.crGuardTakeNewBans()
        for source in banned.split():
            log.warning("sip.flood_ban", source=source,
                        limit_per_second=self.settings.flood_limit,
                        ban_seconds=self.settings.flood_ban_seconds)

    def _create_endpoint(self) -> None:
        self.ep = pj.Endpoint()
        with _stdout_silenced():
            self.ep.libCreate()
        self.ep.libInit(self._ep_config())
        self._create_transports()
        self.ep.libStart()
        self.ep.audDevManager().setNullDev()  # clocks the conference bridge
        self._codec_ids = [(c.codecId, c.codecId.split("/")[0].upper())
                           for c in self.ep.codecEnum2()]
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
        # Level 1 at least: assertion failures are logged there.
        cfg.logConfig.level = max(self.settings.log_level, 1)
        cfg.logConfig.consoleLevel = max(self.settings.log_level, 1)
        cfg.logConfig.msgLogging = 0
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
        host, port = self.settings.listen_host, self.settings.listen_port
        listen = f"[{host}]:{port}" if v6 else f"{host}:{port}"
        for kind, name in zip(kinds, ("udp", "tcp"), strict=True):
            tcfg = pj.TransportConfig()
            tcfg.port = port
            if host not in ("0.0.0.0", "::"):
                tcfg.boundAddress = host
            tcfg.publicAddress = self.settings.advertise
            try:
                self.ep.transportCreate(kind, tcfg)
            except pj.Error as exc:
                raise _translate(exc, f"cannot listen for SIP on {listen}/{name}") from exc

    def _set_codecs(self, first: str = "") -> None:
        """Priorities in the order of sip.codecs (``first`` moved to the front)."""
        wanted = list(self._codec_order)
        if first in wanted:
            wanted.remove(first)
            wanted.insert(0, first)
        for codec_id, name in self._codec_ids:
            prio = 255 - wanted.index(name) if name in wanted else 0
            self.ep.codecSetPriority(codec_id, prio)

    @contextlib.contextmanager
    def _preferring(self, codec: str) -> Iterator[None]:
        """Inside the block the offer lists ``codec`` first (when it is one of
        sip.codecs and not first already): the dialled leg then usually answers with the
        caller's codec and the two legs can be relayed (callrouter_relay.hpp)."""
        codec = codec.upper()
        if codec not in self._codec_order[1:]:
            yield
            return
        self._set_codecs(codec)
        try:
            yield
        finally:
            self._set_codecs()

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
        pj.crGuardSetMaxMessageBytes(self.settings.max_message_bytes)
        pj.crGuardSetFloodControl(self.settings.flood_limit, self.settings.flood_ban_seconds)
        # Every call's media transport is wrapped from now on (callrouter_relay.hpp).
        relay = 1 if self.settings.media_relay else 0
        if pj.crRelayInstall(relay, self.settings.media_relay_threads) != 0:
            raise EngineError("could not install the media relay")

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
            # IPv6 only: from 2.15, "enabled" means dual stack, and an IPv4 media socket
            # cannot bind the IPv6 listen address (PJ_EAFNOTSUP). 2.12.1 has no _ONLY.
            ipv6 = getattr(pj, "PJSUA_IPV6_ENABLED_USE_IPV6_ONLY", pj.PJSUA_IPV6_ENABLED)
            acfg.mediaConfig.ipv6Use = ipv6
            acfg.sipConfig.ipv6Use = ipv6
        # One codec per answer is enough; pjsua's "lock codec" re-INVITE is not wanted.
        acfg.mediaConfig.lockCodecEnabled = False
        acfg.natConfig.contactRewriteUse = 0
        acfg.natConfig.viaRewriteUse = 0
        acfg.natConfig.sdpNatRewriteUse = 0
        return acfg

    def _contact(self, user: str, transport: str) -> str:
        host = self.settings.advertise
        host = f"[{host}]" if ":" in host else host
        return f"<sip:{user}@{host}:{self.settings.listen_port};transport={transport}>"

    def _abandon_endpoint(self) -> None:
        """After a failed start: free what was created (transports, pjlib's threads), so
        nothing answers SIP and nothing keeps the process alive."""
        if self.ep is None:
            return
        with contextlib.suppress(pj.Error):
            if self.account is not None:
                self.account.shutdown()
            # Nothing is on the network to finish: skip pjsua's one-second wait for it.
            self.ep.libDestroy(pj.PJSUA_DESTROY_NO_NETWORK)

    def _shutdown(self) -> None:
        try:
            self.ep.hangupAllCalls()
            deadline = time.monotonic() + 1.0
            while self.adapter.legs_in_use and time.monotonic() < deadline:
                self.ep.libHandleEvents(POLL_MS)
            self.adapter.close()
            self.registrations.close()  # each unregisters (expires 0) as it goes
            for account in [self.account, *self.stack.trunk_accounts()]:
                account.shutdown()
            self.ep.libDestroy()
        except pj.Error as exc:
            log.warning("sip.shutdown_error", error=str(_translate(exc)))

    # ---- incoming INVITEs ----------------------------------------------------------

    def _on_incoming(self, prm: Any) -> None:
        self.stack.incoming(self.account, prm)


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
