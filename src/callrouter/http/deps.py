"""What the API needs from the rest of the router, handed to ``create_app`` in one value."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp

from callrouter.management import Management
from callrouter.ports import Store


def _ignore_request(route: str, method: str, status: int, seconds: float) -> None:
    return None


@dataclass(frozen=True)
class ApiDeps:
    """The API's collaborators.

    ``health`` returns the checks dict (``{"database": {"status": "ok", ...}, ...}``);
    ``ready`` answers (ready?, reason); ``control`` performs a validated call-control
    command (``{"type": "transfer", "destination": ..., "message": ...}`` or
    ``{"type": "end-call"}``) and raises ``NotFound`` for an unknown call and
    ``ValidationError`` when the call cannot take it (answered 400); ``on_request`` receives
    (route template, method, status, seconds) for every request; ``metrics_app``, if
    given, is served at ``/metrics`` without auth. ``clock`` drives the rate limits.
    """

    management: Management
    store: Store
    version: str
    health: Callable[[], Awaitable[dict[str, dict[str, Any]]]]
    ready: Callable[[], tuple[bool, str]]
    control: Callable[[uuid.UUID, dict[str, Any]], Awaitable[dict[str, Any]]]
    on_request: Callable[[str, str, int, float], None] = _ignore_request
    rate_limit_per_minute: int = 100
    control_limit_per_minute: int = 10
    metrics_app: ASGIApp | None = None
    clock: Callable[[], float] = time.monotonic
