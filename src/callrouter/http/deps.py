"""What the API needs from the rest of the router, handed to ``create_app`` in one value."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp

from callrouter.domain.models import WebhookDelivery
from callrouter.errors import EngineUnavailable
from callrouter.management import Management
from callrouter.outbound import OutboundRequest
from callrouter.ports import ControlCommand, RegistrationStatus, Store


def _ignore_request(route: str, method: str, status: int, seconds: float) -> None:
    return None


def _no_registration(trunk_id: uuid.UUID) -> RegistrationStatus | None:
    return None


async def _no_webhook_worker(delivery_id: uuid.UUID) -> WebhookDelivery:
    raise EngineUnavailable("webhook delivery is not running")


@dataclass(frozen=True)
class ApiDeps:
    """The API's collaborators.

    ``health`` returns the checks dict (``{"database": {"status": "ok", ...}, ...}``);
    ``ready`` answers (ready?, reason); ``control`` carries a validated call-control
    command (``ports.EndCall`` or ``ports.TransferCall``) to the call and returns what was
    done once the call's session accepted it; it raises ``NotFound`` for an unknown call,
    ``ValidationError`` when the call is not in progress (answered 400), ``CommandRefused``
    when its state refuses the command now (409), ``EngineUnavailable`` (503) and
    ``EngineTimeout`` (504) when the SIP side gives no verdict; ``on_request`` receives
    (route template, method, status, seconds) for every request; ``metrics_app``, if
    given, is served at ``/metrics`` without auth. ``clock`` drives the rate limits;
    ``registration`` tells a trunk's registration state.
    ``max_body_bytes``: larger request bodies get 413 (``import_max_bytes`` for the bulk
    number import). ``retry_delivery`` makes a stuck webhook delivery due now (``NotFound``,
    ``Conflict`` when it was delivered already) and returns it.
    """

    management: Management
    store: Store
    version: str
    health: Callable[[], Awaitable[dict[str, dict[str, Any]]]]
    ready: Callable[[], tuple[bool, str]]
    control: Callable[[uuid.UUID, ControlCommand], Awaitable[str]]
    on_request: Callable[[str, str, int, float], None] = _ignore_request
    rate_limit_per_minute: int = 100
    control_limit_per_minute: int = 10
    max_body_bytes: int = 1024 * 1024
    import_max_bytes: int = 256 * 1024 * 1024  # the bulk import's own body limit
    metrics_app: ASGIApp | None = None
    clock: Callable[[], float] = time.monotonic
    # A registration trunk's state as the SIP side reports it (None: not registering).
    registration: Callable[[uuid.UUID], RegistrationStatus | None] = _no_registration
    # POST /calls/outbound: places the call, returns its id (None: 503)
    place_call: Callable[[OutboundRequest], Awaitable[uuid.UUID]] | None = None
    retry_delivery: Callable[[uuid.UUID], Awaitable[WebhookDelivery]] = _no_webhook_worker
