"""The API's front door, as three small ASGI middlewares.

``Guard`` checks every request under ``/api/`` except the open paths (health, ready):
a missing or unknown bearer key is 401 (with ``WWW-Authenticate: Bearer``), a key over its
per-minute budget is 429, a read-only key on anything but GET/HEAD/OPTIONS is 403. It runs
before routing and body parsing, so an anonymous caller learns nothing about routes or
payloads. The ``X-RateLimit-*`` headers are added to every response to an authenticated
request, errors included; the key is left in ``scope["state"]["api_key"]``.

``BodyLimit`` refuses a request body over ``http.max_body_bytes`` with 413 (JSON naming the
limit): at once when its Content-Length says so, before a byte of it is read; otherwise (a
chunked body) as soon as the bytes read pass the limit, without reading on. The body is
read inside the app, so the second case is ``BodyTooLarge`` raised from ``receive``, which
FastAPI hands to the error handlers like any ``HTTPException``.

``Observe`` times each request and reports (route template, method, status, seconds) to a
callback; the template comes from matching the app's routes, so label values stay
bounded (an unknown path is ``"unmatched"``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from callrouter.domain.models import ApiKey
from callrouter.errors import StoreUnavailable
from callrouter.http.failures import BodyTooLarge, error_response, http_error_response
from callrouter.http.ratelimit import FixedWindowLimiter

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
Authenticate = Callable[[str], Awaitable[ApiKey | None]]


class Guard:
    def __init__(
        self, app: ASGIApp, *, authenticate: Authenticate, limiter: FixedWindowLimiter,
        open_paths: frozenset[str], prefix: str = "/api/",
    ) -> None:
        self._app = app
        self._authenticate = authenticate
        self._limiter = limiter
        self._open_paths = open_paths
        self._prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(self._prefix) or (
                path.rstrip("/") in self._open_paths):
            await self._app(scope, receive, send)
            return
        try:
            key = await self._key(scope)
        except StoreUnavailable as exc:  # no key can be checked while the database is away
            await _refuse(scope, receive, send, exc.status, exc.code, exc.message, {})
            return
        if key is None:
            await _refuse(scope, receive, send, 401, "unauthorized",
                          "a valid API key is required (Authorization: Bearer <key>)",
                          {"WWW-Authenticate": "Bearer"})
            return
        await self._admit(key, scope, receive, send)

    async def _admit(self, key: ApiKey, scope: Scope, receive: Receive, send: Send) -> None:
        verdict = self._limiter.hit(key.id)
        headers = verdict.headers()
        if not verdict.allowed:
            await _refuse(scope, receive, send, 429, "rate_limited",
                          f"more than {verdict.limit} requests per minute", headers)
        elif key.read_only and scope["method"] not in SAFE_METHODS:
            await _refuse(scope, receive, send, 403, "forbidden",
                          "this API key is read-only", headers)
        else:
            scope.setdefault("state", {})["api_key"] = key
            await self._app(scope, receive, _with_headers(send, headers))

    async def _key(self, scope: Scope) -> ApiKey | None:
        token = _bearer(scope)
        return None if token is None else await self._authenticate(token)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            header: str = value.decode("latin-1")
            scheme, _, token = header.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, code: str,
                  message: str, headers: Mapping[str, str]) -> None:
    await error_response(status, code, message, headers=headers)(scope, receive, send)


def _with_headers(send: Send, headers: Mapping[str, str]) -> Send:
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending


class BodyLimit:
    """``limit`` for every path but those in ``per_path``, which have their own (the bulk
    number import, ``numbers.import_max_bytes``)."""

    def __init__(self, app: ASGIApp, *, limit: int,
                 per_path: Mapping[str, int] | None = None) -> None:
        self._app = app
        self._limit = limit
        self._per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        limit = self._per_path.get(scope.get("path", ""), self._limit)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await http_error_response(BodyTooLarge(limit))(scope, receive, send)
            return
        await self._app(scope, self._counting(receive, limit), send)

    def _counting(self, receive: Receive, limit: int) -> Receive:
        received = 0

        async def receiving() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)  # and read no further
            return message

        return receiving


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class Observe:
    def __init__(
        self, app: ASGIApp, *, routes: Sequence[BaseRoute],
        on_request: Callable[[str, str, int, float], None],
    ) -> None:
        self._app = app
        self._routes = routes
        self._on_request = on_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, sending)
        finally:
            self._on_request(self._template(scope), scope["method"], status,
                             time.perf_counter() - started)

    def _template(self, scope: Scope) -> str:
        """The matched route's path template; a wrong method still names its path."""
        for route in self._routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return str(getattr(route, "path", "unmatched"))
        return "unmatched"
