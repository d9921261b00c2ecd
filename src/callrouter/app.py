"""The composition root: start in order, stop in reverse, signals, drain.

``serve`` starts config -> logging -> store (migrations, closing calls a crash
left open) -> routes -> SIP engine (its own thread) -> HTTP API, then waits for a
signal. The first SIGTERM/SIGINT starts a drain: readiness turns 503 and new
INVITEs get 503 + Retry-After while active calls go on until they end or
``drain.timeout_seconds`` passes; then the remaining calls get BYE and their
records are closed as ``router_shutdown``. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
import time
import uuid
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
import uvicorn

from callrouter import __version__
from callrouter.cli_client import ensure_first_key
from callrouter.config import ENGINE_SLOT_RESERVE, Config
from callrouter.crypto import SecretBox
from callrouter.domain import session as s
from callrouter.domain.models import CallRecord, CallStatus, EndReason
from callrouter.domain.routing import Policy, RuntimePool
from callrouter.errors import NotFound, ValidationError
from callrouter.http.api import create_app
from callrouter.http.deps import ApiDeps
from callrouter.management import Management
from callrouter.metered import metered
from callrouter.metrics import Metrics
from callrouter.service import CallRecorder, CallService
from callrouter.sip.engine import EngineSettings, SipEngine
from callrouter.sip.info import EngineInfo
from callrouter.store.sqlite import SqliteStore

log = structlog.get_logger("callrouter.app")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def engine_settings(cfg: Config) -> EngineSettings:
    sip = cfg.sip
    return EngineSettings(
        listen_host=sip.listen.host,
        listen_port=sip.listen.port,
        advertise=sip.advertise or _advertise_default(sip.listen.host),
        rtp_start=sip.rtp_ports.start,
        rtp_size=sip.rtp_ports.size,
        codecs=sip.codecs,
        allowed_networks=tuple((str(n.network_address), n.prefixlen)
                               for n in sip.inbound.allowed_sources),
        forbidden_reject_code=403 if sip.inbound.forbidden_action == "reject" else 0,
        slot_reserve=ENGINE_SLOT_RESERVE,
        log_level=cfg.log.engine_level,
    )


def _advertise_default(listen_host: str) -> str:
    if listen_host not in ("0.0.0.0", "::"):
        return listen_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def build_service(cfg: Config, metrics: Metrics, recorder: CallRecorder) -> CallService:
    inbound = cfg.sip.inbound
    policy = Policy(
        max_calls=cfg.sip.max_calls, unknown_number_code=inbound.unknown_number_code,
        not_a_number_code=inbound.not_a_number_code, unassigned_code=inbound.unassigned_code,
        inactive_code=inbound.inactive_code, retry_after_seconds=inbound.retry_after_seconds)
    timing = s.Timing(ring_timeout=cfg.sip.ring_timeout_seconds,
                      max_duration=cfg.sip.max_duration_seconds,
                      failure_code=inbound.runtime_failure_code,
                      retry_after=inbound.retry_after_seconds)
    return CallService(policy=policy, timing=timing,
                       pool=RuntimePool(cfg.runtime.pool, cfg.runtime.strategy),
                       default_region=cfg.default_region, metrics=metrics,
                       record=recorder.submit)


def _raise_open_files_limit(max_calls: int) -> None:
    """Each bridged call holds four media sockets; lift the soft descriptor limit to the
    hard one and say so when even that is too small for ``sip.max_calls``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = max_calls * 4 + 256
    if hard != resource.RLIM_INFINITY and hard < needed:
        log.warning("router.open_files_limit_low", limit=hard, needed=needed,
                    max_calls=max_calls)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the router drains first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class Router:
    cfg: Config
    engine_info: EngineInfo
    environ: Mapping[str, str]

    async def serve(self) -> int:
        self.stopping = asyncio.Event()
        self.forced = asyncio.Event()
        self.started = time.monotonic()
        await self._start()
        self._install_signals()
        try:
            await self.stopping.wait()
            await self._drain()
        finally:
            await self._stop()
        return 0

    async def _start(self) -> None:
        cfg = self.cfg
        _raise_open_files_limit(cfg.sip.max_calls)
        self.metrics = Metrics(version=__version__, pjproject=self.engine_info.version)
        cfg.storage.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = metered(SqliteStore(cfg.storage.database), self.metrics)
        await self.store.open()
        closed = await self.store.close_open_calls(_utcnow())
        if closed:
            log.warning("calls.closed_after_restart", count=closed)
        loop = asyncio.get_running_loop()
        self.recorder = CallRecorder(self.store, loop)
        self.writer = asyncio.create_task(self.recorder.run(), name="call-records")
        self.service = build_service(cfg, self.metrics, self.recorder)
        await self.service.reload_routes(self.store)
        self.engine = SipEngine(engine_settings(cfg), self.service)
        await asyncio.to_thread(self.engine.start)
        self.service.control = self.engine
        self._wire_metrics()
        await self._first_key()  # before the API answers, so the key is shown first
        await self._start_http()
        if cfg.sip.listen.host in ("0.0.0.0", "::") and not cfg.sip.advertise and \
                self.engine.settings.advertise.startswith(("127.", "::1")):
            log.warning("router.advertising_loopback", advertise=self.engine.settings.advertise,
                        hint="set CALLROUTER_SIP_ADVERTISE to the address providers reach")
        log.info("router.started", version=__version__, sip=str(cfg.sip.listen),
                 advertise=self.engine.settings.advertise, http=str(cfg.http.listen),
                 engine=self.engine_info.version,
                 engine_source=self.engine_info.values.get("source"),
                 engine_limits={k: v for k, v in self.engine_info.values.items()
                                if k.startswith("PJ")},
                 max_calls=cfg.sip.max_calls, routes=len(self.service.routes.by_e164))

    async def _first_key(self) -> None:
        """On a first start with no API key, make one and show it once, with the URL."""
        key = await ensure_first_key(self.store)
        if key is None:
            return
        url = f"http://{self.cfg.http.listen}/api/v1"
        print(f"\ncallrouter: created the first API key (shown once, keep it):\n\n"
              f"    export CALLROUTER_API_URL=http://{self.cfg.http.listen}\n"
              f"    export CALLROUTER_API_KEY={key}\n\n"
              f"    curl -H 'Authorization: Bearer {key}' {url}/numbers\n",
              file=sys.stderr, flush=True)  # stdout is the JSON log stream

    def _wire_metrics(self) -> None:
        def slots() -> tuple[int, int]:
            status = self.engine.status()
            return status.max_calls, status.calls_in_use

        self.metrics.set_engine_slots_source(slots)
        self.metrics.set_engine_guard_source(lambda: self.engine.status().guard)
        self.guard_task = asyncio.create_task(self._count_forbidden(), name="guard-metrics")

    async def _count_forbidden(self) -> None:
        """Requests from forbidden sources never reach the service (the guard drops them
        in C); carry the guard's count into the routing-decision metric once a second."""
        seen = 0
        while True:
            dropped = self.engine.status().guard["dropped_source"]
            if dropped > seen:
                self.metrics.forbidden_sources(dropped - seen)
            seen = dropped
            await asyncio.sleep(1.0)

    async def _start_http(self) -> None:
        self.secrets = secrets = SecretBox.load(self.cfg.storage.data_dir, self.environ)

        async def routing_changed() -> None:
            await self.service.reload_routes(self.store)

        management = Management(self.store, secrets, self.cfg.default_region,
                                routing_changed, _utcnow)
        deps = ApiDeps(
            management=management, store=self.store, version=__version__,
            health=self._health, ready=self._ready, control=self._control,
            on_request=self.metrics.http_request,
            rate_limit_per_minute=self.cfg.http.rate_limit_per_minute,
            metrics_app=self.metrics.asgi_app(),
        )
        listen = self.cfg.http.listen
        api = create_app(deps)
        self.metrics.add_http_routes(getattr(r, "path", "") for r in api.routes)
        config = uvicorn.Config(api, host=listen.host, port=listen.port,
                                log_config=None, access_log=False, lifespan="off")
        self.http = _Server(config)
        self.http_task = asyncio.create_task(self.http.serve(), name="http")
        while not self.http.started:
            if self.http_task.done():
                await self.http_task  # raises the bind error
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if self.stopping.is_set():
            log.warning("router.forced_stop", signal=signal.Signals(sig).name)
            self.forced.set()
        else:
            log.info("router.draining", signal=signal.Signals(sig).name,
                     active_calls=len(self.service.active),
                     timeout_seconds=self.cfg.drain_timeout_seconds)
            self.service.draining = True
            self.stopping.set()

    async def _drain(self) -> None:
        await self._wait_for_calls(self.cfg.drain_timeout_seconds)
        if self.service.active:
            log.warning("router.ending_calls", count=len(self.service.active))
            self.service.end_all(EndReason.ROUTER_SHUTDOWN)
            await self._wait_for_calls(2.0)

    async def _wait_for_calls(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.service.active and time.monotonic() < deadline and not self.forced.is_set():
            await asyncio.sleep(0.05)

    async def _stop(self) -> None:
        self.service.draining = True
        self.guard_task.cancel()
        await asyncio.to_thread(self.engine.stop)
        self.service.abandon_all(EndReason.ROUTER_SHUTDOWN)
        await self.recorder.flush()
        self.writer.cancel()
        self.http.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.http_task
        await self.store.close()
        log.info("router.stopped", uptime_seconds=round(time.monotonic() - self.started, 1))

    # ---- what the API asks of the router ---------------------------------------------

    async def _health(self) -> dict[str, dict[str, Any]]:
        latency = await self.store.ping()  # timed into the metrics by MeteredStore
        status = self.engine.status()
        return {
            "database": {"status": "ok", "latency_ms": round(latency * 1000, 3)},
            "sip": {"status": "ok" if status.running else "down",
                    "engine": status.version, "listen": str(self.cfg.sip.listen),
                    "active_calls": len(self.service.active),
                    "engine_call_slots": status.max_calls,
                    "engine_calls_in_use": status.calls_in_use},
        }

    def _ready(self) -> tuple[bool, str]:
        if self.service.draining:
            return False, "draining"
        if not self.engine.running:
            return False, "sip engine down"
        return True, "ready"

    async def _control(self, call_id: uuid.UUID, command: dict[str, Any]) -> dict[str, Any]:
        record = await self.store.get_call(call_id)
        if record is None and call_id not in self.service.active:
            raise NotFound(f"call {call_id} not found")
        active = self.service.active.get(call_id)
        if active is None or active.record.status != CallStatus.IN_PROGRESS:
            raise ValidationError("the call is not in progress")
        if command.get("type") == "end-call":
            self.service.end_call(call_id, EndReason.ENDED_BY_API)
            return {"success": True, "message": "call is being ended"}
        target, credentials = await self._transfer_target(active.record, command["destination"])
        self.service.transfer(call_id, target, credentials)
        return {"success": True, "message": f"transferring the call to {command['destination']}"}

    async def _transfer_target(self, record: CallRecord,
                               destination: str) -> tuple[str, tuple[str, str] | None]:
        """A SIP URI is dialled as it is; an E.164 number through the number's transfer
        trunk, with the trunk's digest credentials."""
        if destination.lower().startswith(("sip:", "sips:")):
            return destination, None
        number = await self.store.get_number(record.number_id) if record.number_id else None
        trunk_id = number.transfer_trunk_id if number else None
        trunk = await self.store.get_trunk(trunk_id) if trunk_id else None
        if trunk is None or not trunk.is_active:
            raise ValidationError("the number has no active transfer trunk "
                                  "(transfer_trunk_id) to reach a phone number through")
        uri = f"sip:{destination}@{trunk.address};transport={trunk.transport}"
        if not trunk.username:
            return uri, None
        secret = await self.store.get_trunk_password(trunk.id)
        password = self.secrets.decrypt(secret) if secret else ""
        return uri, (trunk.username, password)


def serve(cfg: Config, engine_info: EngineInfo, environ: Mapping[str, str] | None = None) -> int:
    router = Router(cfg, engine_info, environ if environ is not None else dict(os.environ))
    return asyncio.run(router.serve())
