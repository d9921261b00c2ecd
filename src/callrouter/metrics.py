"""The router's Prometheus metrics, behind one object with domain verbs.

How it works: ``Metrics`` owns a private ``CollectorRegistry`` (never the process-global
one, so tests and several routers in one process do not collide). Callers speak in domain
terms (``routing_decision(Outcome.BRIDGED, 0.004)``); this module alone knows metric names,
units and buckets. Every label value comes from a closed set: an enum (``Outcome``,
``EndReason``, ``StoreOperation``, ``GuardAction``, ``EngineEntry``) or a fixed table (SIP
codes, HTTP methods, the route templates the API registers). An unknown enum value raises
``ValueError``; an open-ended input (a SIP code, a request path) collapses to ``"other"``.
Never a phone number, a Call-ID or a raw URL path in a label: cardinality stays bounded.

Each verb does a dict lookup into label children created at start-up, then one
prometheus_client update (lock-protected, so safe from the SIP thread and the asyncio
loop alike). Engine counters that live in C (call slots, the guard module) are read at
scrape time through callbacks the composition root registers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_asgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from callrouter import __version__
from callrouter.domain.models import EndReason
from callrouter.domain.routing import Outcome
from callrouter.domain.webhooks import EVENTS, ReplyKind
from callrouter.ports import EngineEntry, RegistrationState, RegistrationStatus

__all__ = ["GuardAction", "Metrics", "Outcome", "StoreOperation"]

OTHER = "other"


class StoreOperation(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    BATCH_WRITE = "batch_write"
    PING = "ping"


class GuardAction(enum.StrEnum):
    """What the engine's guard module (scripts/engine/callrouter_guard.hpp) did to a request."""

    DROPPED_SOURCE = "dropped_source"
    REFUSED_METHOD = "refused_method"
    REFUSED_REPLACES = "refused_replaces"
    ENGINE_FULL = "engine_full"
    MALFORMED = "malformed"
    UNPARSABLE = "unparsable"
    TOO_LARGE = "too_large"  # 513, or a response dropped, above sip.max_message_bytes
    KEEPALIVE_PONG = "keepalive_pong"  # CRLF answered to a CRLFCRLF ping on TCP (RFC 5626)
    FLOOD_DROPPED = "flood_dropped"  # a new request from a source banned for flooding
    FLOOD_BAN = "flood_ban"  # a source banned (sip.inbound.flood_limit exceeded)
    TRUNK_ALLOWED = "trunk_allowed"  # an INVITE let in by a trunk, not the static list
    AUTH_CHALLENGED = "auth_challenged"  # 407 to an INVITE from an inbound_auth trunk
    AUTH_FAILED = "auth_failed"  # 403: its credentials were wrong
    AUTH_OK = "auth_ok"  # its credentials were right
    DRAINING_OPTIONS = "draining_options"  # OPTIONS answered 503 while draining (balancer probes)


# SIP codes the router sends on purpose get their own series; anything else is "other".
SIP_CODES = frozenset({100, 180, 183, 200, 403, 404, 405, 480, 486, 487, 488, 500, 503, 513,
                       603})
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# INVITE -> response on loopback is sub-millisecond; a slow runtime answers in seconds.
SIP_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
CALL_DURATION_BUCKETS = (
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
)  # fmt: skip
STORE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

EngineSlotsSource = Callable[[], tuple[int, int]]  # -> (max calls, calls in use)
EngineGuardSource = Callable[[], Mapping[str, int]]  # GuardAction value -> count so far
# "pairs" relayed now, "rtp"/"rtcp"/"dropped"/"dtmf_events" counted so far
EngineMediaSource = Callable[[], Mapping[str, int]]
RELAY_PACKET_KINDS = ("rtp", "rtcp", "dropped", "dtmf_events")
RegistrationsSource = Callable[[], Iterable[RegistrationStatus]]


class Metrics:
    """All of the router's metrics. One instance per router, shared by every component."""

    def __init__(
        self,
        *,
        version: str = __version__,
        pjproject: str = "unknown",
        http_routes: Iterable[str] = (),
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._http_routes = frozenset(http_routes) | {OTHER}
        self._engine = _EngineCollector()
        self.registry.register(self._engine)
        self._define_sip()
        self._define_calls()
        self._define_io()
        self._define_engine_failures()
        self._define_webhooks()
        self._build_info = Gauge(
            "callrouter_build_info",
            "Router build: version and the pjproject the engine was built from; always 1.",
            ["version", "pjproject"],
            registry=self.registry,
        )
        self._build_info.labels(version, pjproject).set(1)
        self._engine_info = Gauge(
            "callrouter_engine_info",
            "The engine's source as built (scripts/build-engine.sh ENGINE-INFO); always 1.",
            ["pjproject", "source", "source_version", "source_sha256", "fallback"],
            registry=self.registry,
        )

    def _define_sip(self) -> None:
        r = self.registry
        self._invites = Counter(
            "callrouter_sip_invites_received", "Initial INVITEs that reached the router.",
            registry=r,
        )  # fmt: skip
        decisions = Counter(
            "callrouter_routing_decisions",
            "Routing decisions, by outcome: one per INVITE, counted when decided (and requests "
            "the guard refused for their source). How a bridged call ends is calls_ended.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self._decisions = {o: decisions.labels(o.value) for o in Outcome}
        responses = Counter(
            "callrouter_sip_responses_sent",
            "Responses to callers' INVITEs, by status code, counted when the engine took them "
            "(pjsua2 accepted the send), with pjsua's automatic 100 Trying; not the 487 pjsip "
            "answers a CANCELled INVITE with itself.",
            ["code"], registry=r,
        )  # fmt: skip
        self._responses = {c: responses.labels(str(c)) for c in SIP_CODES}
        self._responses_other = responses.labels(OTHER)
        self._first_response = _latency(
            r, "first_response", "INVITE reaching the router to the router's first response "
            "after 100 Trying (a refusal, or 180/200/a failure of a bridged call), when the "
            "engine took it; once per INVITE.")
        self._decision_time = _latency(
            r, "decision", "INVITE reaching the router to the routing decision made; once per "
            "INVITE, never ring or answer time.")
        self._answer_time = _latency(
            r, "answer", "INVITE reaching the router to the bridged call in progress (the "
            "caller ACKed our 200); includes ring time.")

    def _define_calls(self) -> None:
        r = self.registry
        self._active = Gauge(
            "callrouter_calls_active", "Bridged calls the router holds, from the routing "
            "decision to their end.", registry=r,
        )  # fmt: skip
        ended = Counter(
            "callrouter_calls_ended", "Bridged calls ended, by end reason (rejected INVITEs are "
            "routing_decisions only).", ["reason"], registry=r,
        )  # fmt: skip
        self._ended = {e: ended.labels(e.value) for e in EndReason}
        self._runtime_answer = Histogram(
            "callrouter_runtime_answer_seconds",
            "The INVITE to the runtime attempt that answered, until its 200.",
            buckets=SIP_LATENCY_BUCKETS,
            registry=r,
        )
        self._duration = Histogram(
            "callrouter_call_duration_seconds",
            "Calls in progress: the caller's ACK of our 200 to the end of the call.",
            buckets=CALL_DURATION_BUCKETS,
            registry=r,
        )

    def _define_io(self) -> None:
        r = self.registry
        store = Histogram(
            "callrouter_store_query_seconds", "Database operations, by kind.", ["operation"],
            buckets=STORE_BUCKETS, registry=r,
        )  # fmt: skip
        self._store = {op: store.labels(op.value) for op in StoreOperation}
        self._spooled = Gauge(
            "callrouter_call_records_spooled", "Call records kept on local disk because the "
            "database is unreachable, waiting to be written.", registry=r,
        )  # fmt: skip
        self._route_reloads = Counter(
            "callrouter_route_reloads", "Full rebuilds of the route table from the database "
            "after start, by cause: feed (a bulk change, or the change feed (re)connected) or "
            "periodic (store.full_reload_seconds).", ["cause"],
            registry=r,
        )  # fmt: skip
        self._http_count = Counter(
            "callrouter_http_requests", "API requests, by route template, method and status.",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self._http_time = Histogram(
            "callrouter_http_request_duration_seconds", "API request handling time.",
            ["route", "method"], buckets=HTTP_BUCKETS, registry=r,
        )  # fmt: skip

    def _define_webhooks(self) -> None:
        r = self.registry
        answers = Counter(
            "callrouter_webhook_assistant_requests",
            "assistant-request replies, by how they decided the call (saved, assistant, "
            "refused) or why the saved assistant was used (timeout, http_error, invalid, "
            "unknown_assistant).", ["outcome"], registry=r,
        )  # fmt: skip
        self._answers = {k: answers.labels(k.value) for k in ReplyKind}
        delivered = Counter(
            "callrouter_webhook_deliveries", "Webhook requests answered 2xx, by event.",
            ["event"], registry=r)
        failed = Counter(
            "callrouter_webhook_delivery_failures",
            "Webhook attempts that failed (connection, timeout, non-2xx), by event.",
            ["event"], registry=r)
        given_up = Counter(
            "callrouter_webhook_given_up",
            "status-update events given up (a 4xx other than 429, or webhooks.retry_hours "
            "passed), by event.", ["event"], registry=r)
        backlog = Gauge(
            "callrouter_webhook_backlog", "Events waiting in the outbox, by event.",
            ["event"], registry=r)
        latency = Histogram(
            "callrouter_webhook_latency_seconds",
            "One webhook request, sent to reply read (or failure), by event.", ["event"],
            buckets=HTTP_BUCKETS, registry=r)
        self._hook = {e: (delivered.labels(e), failed.labels(e), given_up.labels(e),
                          backlog.labels(e), latency.labels(e)) for e in EVENTS}

    # --- webhooks ------------------------------------------------------------------------------

    def assistant_request(self, kind: ReplyKind | str) -> None:
        self._answers[ReplyKind(kind)].inc()

    def webhook_attempt(self, event: str, ok: bool, seconds: float) -> None:
        delivered, failed, _, _, latency = self._hook[event]
        (delivered if ok else failed).inc()
        latency.observe(seconds)

    def webhook_given_up(self, event: str) -> None:
        self._hook[event][2].inc()

    def webhook_backlog(self, event: str, count: int) -> None:
        self._hook[event][3].set(count)

    # --- SIP and routing -------------------------------------------------------------------

    def invite_received(self) -> None:
        self._invites.inc()

    def routing_decision(self, outcome: Outcome | str, seconds: float) -> None:
        """Count a decision and observe INVITE -> decision; once per INVITE, when decided
        (never again when the call ends). Unknown outcome: ValueError."""
        self._decisions[Outcome(outcome)].inc()
        self._decision_time.observe(seconds)

    def forbidden_sources(self, count: int) -> None:
        """Requests the engine's guard dropped or refused for their source (no timing:
        they never reach the routing decision)."""
        self._decisions[Outcome.FORBIDDEN_SOURCE].inc(count)

    def first_response(self, seconds: float) -> None:
        """INVITE -> the router's first response after 100 Trying, once the engine took it."""
        self._first_response.observe(seconds)

    def caller_answered(self, seconds: float) -> None:
        self._answer_time.observe(seconds)

    def runtime_answered(self, seconds: float) -> None:
        self._runtime_answer.observe(seconds)

    def response_sent(self, code: int) -> None:
        """A response the engine took for sending (never one only asked for)."""
        self._responses.get(code, self._responses_other).inc()

    # --- call lifecycle ----------------------------------------------------------------------

    def call_started(self) -> None:
        """The router took a call (a session exists). Pair with exactly one ``call_ended``."""
        self._active.inc()

    def call_ended(self, reason: EndReason | str, duration_seconds: float | None) -> None:
        """``duration_seconds`` is None for a call never answered (not observed then)."""
        counter = self._ended[EndReason(reason)]
        self._active.dec()
        counter.inc()
        if duration_seconds is not None:
            self._duration.observe(duration_seconds)

    # --- store and API -----------------------------------------------------------------------

    def store_query(self, operation: StoreOperation | str, seconds: float) -> None:
        self._store[StoreOperation(operation)].observe(seconds)

    def add_http_routes(self, templates: Iterable[str]) -> None:
        """Declare route templates (``/api/v1/numbers/{id}``) that get their own series."""
        self._http_routes = self._http_routes | frozenset(templates)

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """``route`` is the matched template; anything undeclared is counted as "other"."""
        route = route if route in self._http_routes else OTHER
        method = method.upper()
        method = method if method in HTTP_METHODS else OTHER
        code = str(status) if 100 <= status <= 599 else OTHER
        self._http_count.labels(route, method, code).inc()
        self._http_time.labels(route, method).observe(seconds)

    # --- engine callbacks ---------------------------------------------------------------------

    def _define_engine_failures(self) -> None:
        failures = Counter(
            "callrouter_engine_callback_failures",
            "Exceptions raised inside a call from the SIP engine (logged as "
            "sip.callback_failed; the call was ended), by where the engine called in.",
            ["where"], registry=self.registry,
        )  # fmt: skip
        self._callback_failures = {e: failures.labels(e.value) for e in EngineEntry}

    def engine_callback_failed(self, where: EngineEntry | str) -> None:
        """Unknown ``where``: ValueError."""
        self._callback_failures[EngineEntry(where)].inc()

    # --- engine (read at scrape time) --------------------------------------------------------

    def set_spooled_source(self, source: Callable[[], int]) -> None:
        """``source() -> count`` of call records spooled on disk, read on every scrape."""
        self._spooled.set_function(source)

    def route_reload(self, cause: str) -> None:
        self._route_reloads.labels(cause).inc()

    def set_engine_slots_source(self, source: EngineSlotsSource | None) -> None:
        """``source() -> (max_calls, in_use)``, called on every scrape; None to detach."""
        self._engine.slots = source

    def set_engine_guard_source(self, source: EngineGuardSource | None) -> None:
        """``source() -> {GuardAction value: count}``, called on every scrape."""
        self._engine.guard = source

    def set_engine_media_source(self, source: EngineMediaSource | None) -> None:
        """``source() -> {"pairs": n, "rtp": n, ...}`` of the packet relay, per scrape."""
        self._engine.media = source

    def set_engine_info(self, *, pjproject: str, source: str, source_version: str,
                        source_sha256: str, fallback: bool) -> None:
        self._engine_info.clear()
        self._engine_info.labels(pjproject, source, source_version, source_sha256,
                                 "true" if fallback else "false").set(1)

    def set_engine_assertions_source(self, source: Callable[[], int] | None) -> None:
        """``source() -> count`` of pjlib assertions the engine logged and survived."""
        self._engine.assertions = source

    def set_registrations_source(self, source: RegistrationsSource | None) -> None:
        """``source() -> [RegistrationStatus]`` of every registration trunk, per scrape."""
        self._engine.registrations = source

    def set_build_info(self, *, version: str, pjproject: str) -> None:
        self._build_info.clear()
        self._build_info.labels(version, pjproject).set(1)

    # --- exposition --------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type, for any HTTP framework."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def asgi_app(self) -> Callable[..., Any]:
        """An ASGI app serving this registry, to mount at ``/metrics``."""
        return make_asgi_app(registry=self.registry)


def _latency(registry: CollectorRegistry, name: str, doc: str) -> Histogram:
    return Histogram(
        f"callrouter_call_setup_{name}_seconds", doc,
        buckets=SIP_LATENCY_BUCKETS, registry=registry,
    )  # fmt: skip


class _EngineCollector(Collector):
    """Engine figures kept in C (pjsua's call table, the guard's atomics), read per scrape."""

    def __init__(self) -> None:
        self.slots: EngineSlotsSource | None = None
        self.guard: EngineGuardSource | None = None
        self.assertions: Callable[[], int] | None = None
        self.registrations: RegistrationsSource | None = None
        self.media: EngineMediaSource | None = None

    def describe(self) -> Iterable[Metric]:
        # Declares the names up front so the registry can check for clashes at register time.
        return [*_slot_families(), _guard_family(), _assertions_family(),
                *_registration_families(), *_media_families()]

    def collect(self) -> Iterator[Metric]:
        if self.slots is not None:
            max_calls, in_use = self.slots()
            yield from _slot_families(max_calls, max(max_calls - in_use, 0))
        if self.guard is not None:
            yield _guard_family(self.guard())
        if self.assertions is not None:
            yield _assertions_family(self.assertions())
        if self.registrations is not None:
            yield from _registration_families(list(self.registrations()))
        if self.media is not None:
            yield from _media_families(self.media())


def _media_families(counts: Mapping[str, int] | None = None) -> list[Metric]:
    """The engine's packet relay between same-codec bridged legs (docs/architecture.md,
    "Media"): calls relayed now and the packets it moved or dropped."""
    pairs = GaugeMetricFamily(
        "callrouter_media_relayed_calls",
        "Bridged calls whose RTP is relayed packet by packet (same codec on both legs).")
    packets = CounterMetricFamily(
        "callrouter_media_relay_packets",
        "Packets the relay sent (rtp, rtcp), dropped (direction on hold, no peer, "
        "malformed) and RFC 4733 events it sent for SIP INFO DTMF (dtmf_events).",
        labels=["kind"])
    thread_pairs = GaugeMetricFamily(
        "callrouter_media_relay_thread_calls",
        "Relayed calls whose packets a relay thread moves (sip.media_relay_threads); the "
        "rest are relayed on the engine's media thread.")
    thread_packets = CounterMetricFamily(
        "callrouter_media_relay_thread_packets",
        "RTP and RTCP packets the relay threads sent (part of "
        "callrouter_media_relay_packets_total).")
    if counts is not None:
        pairs.add_metric([], counts.get("pairs", 0))
        for kind in RELAY_PACKET_KINDS:
            packets.add_metric([kind], counts.get(kind, 0))
        thread_pairs.add_metric([], counts.get("thread_pairs", 0))
        thread_packets.add_metric([], counts.get("thread_packets", 0))
    return [pairs, packets, thread_pairs, thread_packets]


def _assertions_family(count: int | None = None) -> Metric:
    # pjlib is built with NDEBUG: a failed internal assertion is logged and the request
    # fails instead of aborting the process (docs/engine.md, "Assertions").
    family = CounterMetricFamily(
        "callrouter_engine_assertions",
        "pjlib assertions that failed inside the engine and were survived (NDEBUG build).",
    )  # fmt: skip
    if count is not None:
        family.add_metric([], count)
    return family


def _registration_families(found: list[RegistrationStatus] | None = None) -> list[Metric]:
    """Registration trunks by state, and the soonest expiry of a registered one (a value
    near zero means refreshes are failing). No trunk label: trunks come and go by API."""
    states = GaugeMetricFamily(
        "callrouter_trunk_registrations",
        "Registration trunks (register: true) by the state of their REGISTER.",
        labels=["state"])
    expiry = GaugeMetricFamily(
        "callrouter_trunk_registration_expiry_timestamp_seconds",
        "The soonest expiry (Unix time) among registered trunks' bindings.")
    if found is not None:
        for state in RegistrationState:
            states.add_metric([state.value], sum(r.state is state for r in found))
        times = [r.expires_at.timestamp() for r in found if r.expires_at is not None
                 and r.state is RegistrationState.REGISTERED]
        if times:
            expiry.add_metric([], min(times))
    return [states, expiry]


def _slot_families(max_calls: int | None = None, free: int | None = None) -> list[Metric]:
    families: list[Metric] = [
        GaugeMetricFamily("callrouter_engine_max_calls", "Engine call slots (PJSUA_MAX_CALLS).",
                          value=max_calls),
        GaugeMetricFamily("callrouter_engine_free_call_slots", "Engine call slots not in use.",
                          value=free),
    ]  # fmt: skip
    return families


def _guard_family(counts: Mapping[str, int] | None = None) -> Metric:
    family = CounterMetricFamily(
        "callrouter_engine_guard", "Requests the engine's guard module acted on, by action.",
        labels=["action"],
    )  # fmt: skip
    if counts is not None:
        unknown = set(counts) - set(GuardAction)
        if unknown:
            raise ValueError(f"unknown guard actions: {sorted(unknown)}")
        for action in GuardAction:
            family.add_metric([action.value], counts.get(action.value, 0))
    return family
