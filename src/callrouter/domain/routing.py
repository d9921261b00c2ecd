"""The routing decision: what happens to an INVITE, as a value.

``decide`` is pure and fast: it runs on the SIP thread for every INVITE, against an
immutable ``RouteTable`` snapshot that the service swaps in after every change to
the number table (``RouteTable.apply(change)``, so the very next INVITE sees it). The
answer is one of a closed set: ``Bridge`` (dial the assistant's runtime) or ``Reject`` (a final SIP
status). Requests from sources outside the allowed networks never get here: the
engine's guard module drops them before pjsua allocates anything (see
docs/architecture.md).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

from callrouter.domain.models import EndReason
from callrouter.domain.routetable import (
    AssistantRemoved,
    AssistantUpserted,
    NumberRemoved,
    NumberUpserted,
    Route,
    RouteChange,
    RouteTable,
)

__all__ = [  # the route table and its changes live in domain.routetable
    "AssistantRemoved", "AssistantUpserted", "NumberRemoved", "NumberUpserted", "Route",
    "RouteChange", "RouteTable",
]


class Outcome(enum.StrEnum):
    """Routing outcomes: the metric label set and the log field. Only what ``decide``
    (or the guard's source check) answers: how a bridged call ends later is an
    ``EndReason``, never a second outcome."""

    BRIDGED = "bridged"
    UNKNOWN_NUMBER = "unknown_number"
    NOT_A_NUMBER = "not_a_number"
    UNASSIGNED = "unassigned"
    INACTIVE = "inactive"
    FORBIDDEN_SOURCE = "forbidden_source"
    OVER_CAPACITY = "over_capacity"
    DRAINING = "draining"
    RUNTIME_UNAVAILABLE = "runtime_unavailable"  # the number's assistant has no runtime at all
    WEBHOOK_REFUSED = "webhook_refused"  # assistant-request answered {"error": ...}


@dataclass(frozen=True)
class Policy:
    """The configurable parts of the decision (config ``[sip.inbound]``)."""

    max_calls: int
    unknown_number_code: int = 404
    not_a_number_code: int = 404
    unassigned_code: int = 480
    inactive_code: int = 480
    retry_after_seconds: int = 5


@dataclass(frozen=True)
class CallContext:
    dialled: str | None  # E.164, or None when the dialled user part is not a phone number
    active_calls: int
    draining: bool


@dataclass(frozen=True)
class Bridge:
    route: Route
    targets: tuple[str, ...]  # runtime URIs to try in order
    outcome: Outcome = Outcome.BRIDGED


@dataclass(frozen=True)
class Reject:
    code: int
    outcome: Outcome
    end_reason: EndReason
    route: Route | None = None
    retry_after: int | None = None


Decision = Bridge | Reject


class RuntimePool:
    """The default runtimes (config ``[runtime]``), rotated per call for round-robin."""

    def __init__(self, uris: tuple[str, ...], strategy: str = "round-robin") -> None:
        self._uris = uris
        self._rotate = strategy == "round-robin"
        self._next = itertools.count()

    @property
    def uris(self) -> tuple[str, ...]:
        return self._uris

    def order(self) -> tuple[str, ...]:
        if not self._uris or not self._rotate:
            return self._uris
        start = next(self._next) % len(self._uris)
        return self._uris[start:] + self._uris[:start]


def decide(ctx: CallContext, table: RouteTable, policy: Policy, pool: RuntimePool) -> Decision:
    """Route one INVITE. Order matters: load shedding first, then the number."""
    if ctx.draining:
        return Reject(503, Outcome.DRAINING, EndReason.REJECTED_DRAINING,
                      retry_after=policy.retry_after_seconds)
    if ctx.active_calls >= policy.max_calls:
        return Reject(503, Outcome.OVER_CAPACITY, EndReason.REJECTED_OVER_CAPACITY,
                      retry_after=policy.retry_after_seconds)
    if ctx.dialled is None:
        return Reject(policy.not_a_number_code, Outcome.NOT_A_NUMBER,
                      EndReason.REJECTED_UNKNOWN_NUMBER)
    route = table.get(ctx.dialled)
    if route is None:
        return Reject(policy.unknown_number_code, Outcome.UNKNOWN_NUMBER,
                      EndReason.REJECTED_UNKNOWN_NUMBER)
    if not route.is_active:
        return Reject(policy.inactive_code, Outcome.INACTIVE, EndReason.REJECTED_UNASSIGNED, route)
    if route.assistant_id is None:
        return Reject(policy.unassigned_code, Outcome.UNASSIGNED,
                      EndReason.REJECTED_UNASSIGNED, route)
    return bridge(route, policy, pool)


def bridge(route: Route, policy: Policy, pool: RuntimePool) -> Decision:
    """Bridge to the route's assistant (its own runtime first, then the pool), or 503
    when it has no runtime at all."""
    targets = _targets(route, pool)
    if not targets:
        return Reject(503, Outcome.RUNTIME_UNAVAILABLE, EndReason.RUNTIME_UNAVAILABLE, route,
                      retry_after=policy.retry_after_seconds)
    return Bridge(route, targets)


def _targets(route: Route, pool: RuntimePool) -> tuple[str, ...]:
    own = (route.runtime_uri,) if route.runtime_uri else ()
    return own + tuple(uri for uri in pool.order() if uri not in own)
