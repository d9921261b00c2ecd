"""The composition root: start in order, stop in reverse, signals, drain.

``serve`` starts config -> logging -> data directory -> store (migrations) -> the HTTP
socket, bound but not yet served -> closing calls a crash left open, the heartbeat,
the call-record writer and its daily prune -> routes -> SIP engine (its own thread)
-> serving HTTP on the bound socket, then waits for a signal. The first SIGTERM/SIGINT
starts a drain: readiness turns 503, new INVITEs and out-of-dialog OPTIONS (a balancer's probe)
get 503 + Retry-After while active calls go on
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
from callrouter.crypto import KEY_ENV, SecretBox
from callrouter.domain import session as s
from callrouter.domain.models import CallRecord, EndReason, WebhookDelivery
from callrouter.domain.routetable import (
    AssistantRemoved,
    AssistantUpserted,
    FeedChange,
    TrunkChanged,
)
from callrouter.domain.routing import Policy, RouteChange, RuntimePool
from callrouter.domain.webhooks import (
    WebhookDirectory,
    WebhookTarget,
    hooks_of,
    restart_ended,
)
from callrouter.errors import StartupError, StoreError
from callrouter.http.api import create_app
from callrouter.http.deps import ApiDeps
from callrouter.management import Management
from callrouter.metered import metered
from callrouter.metrics import Metrics
from callrouter.outbound import OutboundDialer
from callrouter.ports import ControlCommand, RouteFeed, Store
from callrouter.providers import Providers
from callrouter.service import CallController, CallPruner, CallRecorder, CallService
from callrouter.sip.engine import EngineSettings, SipEngine
from callrouter.sip.info import EngineInfo
from callrouter.startup import http_listener, reason, writable_dir
from callrouter.store import make_store
from callrouter.store.spool import SPOOL_FILE, CallSpool
from callrouter.store.sql import safe_url
from callrouter.webhooks import AssistantRequester, DeliveryWorker, WebhookSender, new_client

log = structlog.get_logger("callrouter.app")


HEARTBEAT_SECONDS = 1.0  # at most this much call time is lost to a crash
MAX_AUTO_RELAY_THREADS = 4


def auto_relay_threads() -> int:
    """sip.media_relay_threads = 0: one relay thread per two CPU cores the process may
    run on, at least one and at most MAX_AUTO_RELAY_THREADS. A relay thread moves about
    1,000 relayed calls' packets on one core (docs/benchmarks.md); the other core of
    each pair is left to SIP signalling, the API and the engine's own threads."""
    return max(1, min(len(os.sched_getaffinity(0)) // 2, MAX_AUTO_RELAY_THREADS))


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
        media_relay=sip.media_relay,
        media_relay_threads=sip.media_relay_threads or auto_relay_threads(),
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
                          record=recorder.submit, notify=recorder.submit_event,
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
        raw_store = make_store(cfg.store.database_url, cfg.storage.database,
                               timeout=cfg.store.timeout_seconds,
                               pool_size=cfg.store.pool_size)
        self.store = metered(raw_store, self.metrics)
        await self.store.open()
        stack.push_async_callback(self.store.close)
        await self._check_key()
        self._bind_http(stack)
        await self._start_webhooks(stack)
        await self._start_records(stack)
        self.service = build_service(cfg, self.metrics, self.recorder)
        self.service.router_name = cfg.node_name
        self.providers = Providers(self.store, self.secrets.decrypt,
                                   refresh_seconds=cfg.trunks.resolve_interval_seconds)
        await self._load_routes(stack, raw_store)
        await self._start_engine(stack)
        await self._ask_assistants(stack)
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
        key_file = self.cfg.key_file
        try:
            return SecretBox.load(key_file, self.environ)
        except OSError as exc:
            raise StartupError(f"cannot read the trunk-password key {key_file}: "
                               f"{reason(exc)}") from exc

    async def _check_key(self) -> None:
        """Refuse to start with a key other than the one the database's secrets were
        written with: its passwords would be unreadable, and new ones unreadable to the
        other routers."""
        if not self.secrets.verify(await self.store.key_check(self.secrets.check_value())):
            where = (KEY_ENV if self.environ.get(KEY_ENV, "").strip()
                     else str(self.cfg.key_file))
            raise StartupError(
                f"the trunk-password key ({where}) is not the one this database was written "
                f"with: give every router sharing {self._database_name()} the same key file "
                "(secrets.key_file / CALLROUTER_SECRETS_KEY_FILE)")

    def _database_name(self) -> str:
        url = self.cfg.store.database_url
        return safe_url(url) if url else str(self.cfg.storage.database)

    async def _start_webhooks(self, stack: contextlib.AsyncExitStack) -> None:
        """One HTTP client for every webhook (closed last), and the outbox worker, which
        resumes what a previous run left pending."""
        hooks = self.cfg.webhooks
        client = new_client(hooks.delivery_timeout_seconds)
        stack.push_async_callback(client.aclose)
        self.sender = WebhookSender(client, allow_private=hooks.allow_private)
        self.deliveries = DeliveryWorker(
            self.store, self.sender, self.metrics, lambda: self.service.webhooks,
            per_destination=hooks.max_concurrency_per_destination,
            retry_hours=hooks.retry_hours, attempt_timeout=hooks.delivery_timeout_seconds)

    async def _webhook_directory(self) -> WebhookDirectory:
        """The account's webhook (config) and every assistant's, secrets decrypted."""
        hooks = self.cfg.webhooks
        account = WebhookTarget(hooks.url, hooks.secret or None, frozenset(hooks.events)) \
            if hooks.url else None
        assistants = {}
        for a in await self.store.list_assistants():
            enc = await self.store.get_assistant_webhook_secret(a.id) \
                if a.has_webhook_secret else None
            secret = self.secrets.decrypt(enc) if enc else None
            assistants[a.id] = hooks_of(a.id, a.runtime_uri, a.webhook_url, a.webhook_events,
                                        secret)
        return WebhookDirectory(account, assistants)

    async def _ask_assistants(self, stack: contextlib.AsyncExitStack) -> None:
        """assistant-request for held INVITEs (the engine resumes them), and the outbox
        worker (from now on: its events were already written before a restart)."""
        requester = AssistantRequester(
            self.sender, self.store, self.metrics, asyncio.get_running_loop(),
            self.engine.resume, self.cfg.webhooks.assistant_request_timeout_seconds)
        stack.push_async_callback(requester.close)
        self.service.ask = requester.ask
        _spawn(stack, self.deliveries.run(), "webhook-deliveries")

    async def _start_records(self, stack: contextlib.AsyncExitStack) -> None:
        """Write what an outage left spooled (each record with its outbox events), close
        what a crash left open (this router's calls only, at its last heartbeat, so before
        this run's first; each closed call with webhook events gets its ``ended`` event in
        the same transaction), then keep the heartbeat and the call-record writer
        running."""
        retry_hours = self.cfg.webhooks.retry_hours
        spool = await asyncio.to_thread(CallSpool, self.cfg.storage.data_dir / SPOOL_FILE)
        self.recorder = CallRecorder(self.store, asyncio.get_running_loop(), spool,
                                     retry_hours=retry_hours, on_outbox=self.deliveries.wake)
        self.metrics.set_spooled_source(lambda: self.recorder.spooled)
        if spool.backlog and not await self.recorder.flush_spool():
            log.warning("call.spool_kept", records=spool.backlog, path=str(spool.path))
        now = _utcnow()

        def ended(record: CallRecord, last: WebhookDelivery) -> WebhookDelivery | None:
            return restart_ended(record, last, now, retry_hours)

        closed = await self.store.close_open_calls(now, self.cfg.node_name, ended)
        if closed:
            log.warning("calls.closed_after_restart", count=closed, router=self.cfg.node_name)
        _spawn(stack, self._beat(), "heartbeat")
        _spawn(stack, self.recorder.run(), "call-records")
        stack.push_async_callback(self.recorder.flush)  # runs before the writer's cancel
        pruner = CallPruner(self.store, retention_days=self.cfg.calls.retention_days)
        _spawn(stack, pruner.run(), "call-prune")  # at start, then daily

    async def _beat(self) -> None:
        """The router's last sign of life, every ``HEARTBEAT_SECONDS``: after a crash the
        calls it left open end there, so the downtime is not counted as call time."""
        lost_at: float | None = None  # the database has not answered since (monotonic)
        while True:
            try:
                await self.store.heartbeat(_utcnow(), self.cfg.node_name)
                if lost_at is not None:
                    log.info("database.back", after_seconds=round(time.monotonic() - lost_at, 1),
                             spooled_call_records=self.recorder.spooled)
                    lost_at = None
            except StoreError as exc:  # said once per outage, not every beat
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.warning("database.lost", error=exc.message,
                                hint="routing goes on from memory; call records are spooled")
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _load_routes(self, stack: contextlib.AsyncExitStack, store: Store) -> None:
        """The route table's first load; on a shared database the change feed listens
        first (waiting up to ``store.timeout_seconds``), so no change committed around the
        load is missed, and its "reload" on connecting is this load."""
        self._reloading = asyncio.Lock()
        self._feed_listening = asyncio.Event()
        if isinstance(store, RouteFeed):  # several routers share this database
            _spawn(stack, store.watch_routes(self._remote_changes), "route-feed")
            with contextlib.suppress(TimeoutError):  # it reloads when it does connect
                await asyncio.wait_for(self._feed_listening.wait(),
                                       self.cfg.store.timeout_seconds)
            _spawn(stack, self._reload_periodically(), "route-reload")
        self._feed_listening.set()  # from now on a feed's "reload" is a real one
        await self.service.reload_routes(self.store)
        self.service.webhooks = await self._webhook_directory()
        await self.providers.load()

    async def _remote_changes(self, feed: Sequence[FeedChange] | None) -> None:
        """What other routers (or this one) committed, from the store's route feed."""
        if feed is None:
            if not self._feed_listening.is_set():  # connected before the first load
                self._feed_listening.set()
                return
            await self._reload("feed")
            return
        changes = [c for c in feed if not isinstance(c, TrunkChanged)]
        try:
            trunks = [c.trunk_id for c in feed if isinstance(c, TrunkChanged)]
            if trunks:  # a trunk written through another router: its allow-list entry,
                await self.providers.refresh(trunks)  # challenge and registration here too
            if not changes:
                return
            await self.service.apply_route_changes(changes, self.store)
            if any(isinstance(c, AssistantUpserted | AssistantRemoved) for c in changes):
                # another router may have changed an assistant's webhook
                self.service.webhooks = await self._webhook_directory()
        except StoreError as exc:  # a big batch rebuilds from the database, which can fail
            log.warning("routes.change_failed", error=exc.message, changes=len(changes))

    async def _reload_periodically(self) -> None:
        """The safety net under the notifications: a full rebuild every
        ``store.full_reload_seconds``."""
        while True:
            await asyncio.sleep(self.cfg.store.full_reload_seconds)
            await self._reload("periodic")

    async def _reload(self, cause: str) -> None:
        async with self._reloading:
            try:
                await self.service.reload_routes(self.store)
                self.service.webhooks = await self._webhook_directory()
                await self.providers.load()
            except StoreError as exc:
                log.warning("routes.reload_failed", cause=cause, error=exc.message)
                return
        self.metrics.route_reload(cause)
        log.info("routes.reloaded", cause=cause, routes=len(self.service.routes))

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
        self.metrics.set_engine_media_source(lambda: self.engine.status().media)
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
                                routing_changed, _utcnow,
                                on_trunk_change=self.providers.changed,
                                on_webhook_change=self.service.set_assistant_hooks,
                                allow_private_webhooks=self.cfg.webhooks.allow_private)
        management.import_workers = self.cfg.import_workers
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
            retry_delivery=self.deliveries.retry,
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
            # OPTIONS turn 503 too: a balancer probing with them stops sending calls here.
            self.engine.set_draining(True, self.cfg.sip.inbound.retry_after_seconds)
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
        database: dict[str, Any]
        try:
            latency = await self.store.ping()  # timed into the metrics by MeteredStore
            database = {"status": "ok", "latency_ms": round(latency * 1000, 3)}
        except StoreError as exc:  # routing goes on from memory; records are spooled
            database = {"status": "down", "error": exc.message}
        database["spooled_call_records"] = self.recorder.spooled
        status = self.engine.status()
        return {
            "database": database,
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
