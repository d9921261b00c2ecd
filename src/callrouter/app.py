"""The composition root: start in order, stop in reverse, signals, drain.

``serve`` starts config -> logging -> data directory -> store (migrations) -> the HTTP
socket, bound but not yet served -> closing calls a crash left open, the heartbeat,
the call-record writer and its daily prune -> routes -> SIP engine (its own thread)
-> serving HTTP on the bound socket, then waits for a signal. The first SIGTERM/SIGINT
starts a drain: readiness turns 503 and new INVITEs get 503 + Retry-After while active calls go on
until they end or ``drain.timeout_seconds`` passes; then the remaining calls get BYE
and their records are closed as ``router_shutdown``. A second signal skips the wait.

Every step registers its undoing on one ``AsyncExitStack``, so the stop after a drain
and the unwinding after a failed start are the same code: engine stopped (its thread
joined, records of its calls closed), records flushed, heartbeat ended, HTTP stopped,
store closed. A failed start raises a one-line ``CallrouterError`` naming the cause and
the address or path (``startup``, the SIP adapter, the store); the CLI prints it and
exits 1, and nothing is left running to keep the process alive.

The HTTP socket is bound before the SIP engine starts, rather than serving HTTP first
and holding readiness back: binding is the step that fails (a taken or foreign
address), it fails before any INVITE is taken (a SIP side with no HTTP behind it left
calls hanging at 100 Trying), and before ``close_open_calls`` could close the records
of another router still running on the same data directory and port. Requests that
arrive before serving starts wait in the socket's backlog.

The heartbeat (``store.heartbeat`` every ``HEARTBEAT_SECONDS``) lives in the database
beside the call records it bounds: after a crash, the next start closes the calls
left open at the last beat instead of at the restart, so downtime is not call time; a
file in the data directory could disagree with a restored or copied database.
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
from collections.abc import Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
import uvicorn

from callrouter import __version__
from callrouter.cli_client import ensure_first_key
from callrouter.config import ENGINE_SLOT_RESERVE, Config
from callrouter.crypto import KEY_FILE, SecretBox
from callrouter.domain import session as s
from callrouter.domain.models import EndReason
from callrouter.domain.routing import Policy, RouteChange, RuntimePool
from callrouter.errors import StartupError, StoreError
from callrouter.http.api import create_app
from callrouter.http.deps import ApiDeps
from callrouter.management import Management
from callrouter.metered import metered
from callrouter.metrics import Metrics
from callrouter.outbound import OutboundDialer
from callrouter.ports import ControlCommand
from callrouter.providers import Providers
from callrouter.service import CallController, CallPruner, CallRecorder, CallService
from callrouter.sip.engine import EngineSettings, SipEngine
from callrouter.sip.info import EngineInfo
from callrouter.startup import http_listener, reason, writable_dir
from callrouter.store.sqlite import SqliteStore

log = structlog.get_logger("callrouter.app")


HEARTBEAT_SECONDS = 1.0  # at most this much call time is lost to a crash


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _spawn(stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None],
           name: str) -> None:
    """Run ``work`` as a task until the stack unwinds."""
    task = asyncio.create_task(work, name=name)
    stack.push_async_callback(_cancel, task)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
        max_message_bytes=sip.max_message_bytes,
        flood_limit=sip.inbound.flood_limit,
        flood_ban_seconds=sip.inbound.flood_ban_seconds,
        log_level=cfg.log.engine_level,
        register_retry_seconds=cfg.trunks.register_retry_seconds,
        register_retry_max_seconds=cfg.trunks.register_retry_max_seconds,
        keepalive_seconds=cfg.trunks.keepalive_seconds,
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
                      retry_after=inbound.retry_after_seconds,
                      transfer_ring_timeout=cfg.sip.transfer_ring_timeout_seconds,
                      customer_ring_timeout=cfg.trunks.outbound_ring_timeout_seconds)
    service = CallService(policy=policy, timing=timing,
                          pool=RuntimePool(cfg.runtime.pool, cfg.runtime.strategy),
                          default_region=cfg.default_region, metrics=metrics,
                          record=recorder.submit,
                          rejected_records_per_second=cfg.calls.rejected_records_per_second)
    service.compact_routes_at = cfg.route_compaction_at
    return service


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
        async with contextlib.AsyncExitStack() as stack:  # also unwinds a failed start
            await self._start(stack)
            self._install_signals()
            await self.stopping.wait()
            await self._drain()
        log.info("router.stopped", uptime_seconds=round(time.monotonic() - self.started, 1))
        return 0

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        """Start in order; each step registers its undoing on ``stack`` (see the module
        docstring for why the HTTP socket is bound before the SIP engine starts)."""
        cfg = self.cfg
        _raise_open_files_limit(cfg.sip.max_calls)
        self._start_metrics()
        writable_dir(cfg.storage.data_dir)
        self.secrets = self._load_secrets()
        self.store = metered(SqliteStore(cfg.storage.database), self.metrics)
        await self.store.open()
        stack.push_async_callback(self.store.close)
        self._bind_http(stack)
        await self._start_records(stack)
        self.service = build_service(cfg, self.metrics, self.recorder)
        await self.service.reload_routes(self.store)
        self.providers = Providers(self.store, self.secrets.decrypt,
                                   refresh_seconds=cfg.trunks.resolve_interval_seconds)
        await self.providers.load()
        await self._start_engine(stack)
        await self._first_key()  # before the API answers, so the key is shown first
        await self._serve_http()
        self._log_started()

    def _start_metrics(self) -> None:
        info = self.engine_info
        self.metrics = Metrics(version=__version__, pjproject=info.version)
        self.metrics.set_engine_info(pjproject=info.version, source=info.source,
                                     source_version=info.source_version,
                                     source_sha256=info.source_sha256, fallback=info.fallback)
        if info.fallback:
            log.warning("engine.fallback", pjproject=info.version, source=info.source,
                        lacks_upstream_fixes=info.values.get("lacks_upstream_fixes", ""),
                        hint="rebuild on pjproject >= 2.15 (make engine without "
                             "CALLROUTER_ENGINE_SOURCE=debian-ring)")

    def _load_secrets(self) -> SecretBox:
        data_dir = self.cfg.storage.data_dir
        try:
            return SecretBox.load(data_dir, self.environ)
        except OSError as exc:
            raise StartupError(f"cannot read the trunk-password key {data_dir / KEY_FILE}: "
                               f"{reason(exc)}") from exc

    async def _start_records(self, stack: contextlib.AsyncExitStack) -> None:
        """Close what a crash left open (at the last heartbeat, so before this run's
        first), then keep the heartbeat and the call-record writer running."""
        closed = await self.store.close_open_calls(_utcnow())
        if closed:
            log.warning("calls.closed_after_restart", count=closed)
        _spawn(stack, self._beat(), "heartbeat")
        self.recorder = CallRecorder(self.store, asyncio.get_running_loop())
        _spawn(stack, self.recorder.run(), "call-records")
        stack.push_async_callback(self.recorder.flush)  # runs before the writer's cancel
        pruner = CallPruner(self.store, retention_days=self.cfg.calls.retention_days)
        _spawn(stack, pruner.run(), "call-prune")  # at start, then daily

    async def _beat(self) -> None:
        """The router's last sign of life, every ``HEARTBEAT_SECONDS``: after a crash the
        calls it left open end there, so the downtime is not counted as call time."""
        while True:
            try:
                await self.store.heartbeat(_utcnow())
            except StoreError as exc:
                log.warning("router.heartbeat_failed", error=exc.message)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _start_engine(self, stack: contextlib.AsyncExitStack) -> None:
        self.engine = SipEngine(engine_settings(self.cfg), self.service)
        stack.push_async_callback(self._stop_engine)  # a failed start has a thread to join
        await asyncio.to_thread(self.engine.start)
        self.service.control = self.engine
        self.providers.attach(self.engine)  # trunk allow-list, challenges, registrations
        _spawn(stack, self.providers.run(), "trunk-addresses")
        self._wire_metrics(stack)

    async def _stop_engine(self) -> None:
        self.service.draining = True
        await asyncio.to_thread(self.engine.stop)
        self.service.abandon_all(EndReason.ROUTER_SHUTDOWN)

    def _log_started(self) -> None:
        cfg = self.cfg
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
                 max_calls=cfg.sip.max_calls, routes=len(self.service.routes))

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

    def _wire_metrics(self, stack: contextlib.AsyncExitStack) -> None:
        def slots() -> tuple[int, int]:
            status = self.engine.status()
            return status.max_calls, status.calls_in_use

        self.metrics.set_engine_slots_source(slots)
        self.metrics.set_engine_guard_source(lambda: self.engine.status().guard)
        self.metrics.set_engine_assertions_source(lambda: self.engine.status().assertions)
        self.metrics.set_registrations_source(self.engine.registration_statuses)
        _spawn(stack, self._count_forbidden(), "guard-metrics")

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

    def _bind_http(self, stack: contextlib.AsyncExitStack) -> None:
        """Bind the API's socket (served from the end of the start); it stops and closes
        before the store does."""
        self.http_socket = http_listener(self.cfg.http.listen)
        self.http_task: asyncio.Task[None] | None = None
        stack.push_async_callback(self._stop_http)

    def _api_deps(self) -> ApiDeps:
        async def routing_changed(changes: Sequence[RouteChange]) -> None:
            await self.service.apply_route_changes(changes, self.store)

        management = Management(self.store, self.secrets, self.cfg.default_region,
                                routing_changed, _utcnow, self.providers.changed)
        return ApiDeps(
            management=management, store=self.store, version=__version__,
            health=self._health, ready=self._ready, control=self._control,
            on_request=self.metrics.http_request,
            rate_limit_per_minute=self.cfg.http.rate_limit_per_minute,
            max_body_bytes=self.cfg.http.max_body_bytes,
            import_max_bytes=self.cfg.import_max_bytes,
            metrics_app=self.metrics.asgi_app(),
            registration=self.providers.registration,
            place_call=OutboundDialer(self.service, self.store, self.secrets.decrypt,
                                      self.cfg.default_region).place,
        )

    async def _serve_http(self) -> None:
        api = create_app(self._api_deps())
        self.metrics.add_http_routes(getattr(r, "path", "") for r in api.routes)
        config = uvicorn.Config(api, log_config=None, access_log=False, lifespan="off")
        self.http = _Server(config)
        self.http_task = task = asyncio.create_task(self.http.serve([self.http_socket]),
                                                    name="http")
        while not self.http.started:  # uvicorn offers no event to await
            if task.done():
                await task  # raises what stopped it
                raise StartupError(f"the HTTP server on {self.cfg.http.listen} stopped "
                                   "during start-up")
            await asyncio.sleep(0.01)

    async def _stop_http(self) -> None:
        if self.http_task is not None:
            self.http.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self.http_task
        self.http_socket.close()

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
        self.engine.unregister_all()  # providers stop sending calls to a draining router
        await self._wait_for_calls(self.cfg.drain_timeout_seconds)
        if self.service.active:
            log.warning("router.ending_calls", count=len(self.service.active))
            self.service.end_all(EndReason.ROUTER_SHUTDOWN)
            await self._wait_for_calls(2.0)

    async def _wait_for_calls(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.service.active and time.monotonic() < deadline and not self.forced.is_set():
            await asyncio.sleep(0.05)

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

    async def _control(self, call_id: uuid.UUID, command: ControlCommand) -> str:
        controller = CallController(self.service, self.store, self.secrets.decrypt)
        return await controller.control(call_id, command)


def serve(cfg: Config, engine_info: EngineInfo, environ: Mapping[str, str] | None = None) -> int:
    router = Router(cfg, engine_info, environ if environ is not None else dict(os.environ))
    return asyncio.run(router.serve())
