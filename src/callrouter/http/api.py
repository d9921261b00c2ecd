"""``create_app``: the FastAPI application serving the management API.

Layers, outermost first: ``Observe`` (timing per route template) -> ``Guard`` (bearer
key, per-key rate limit, read-only keys) -> ``BodyLimit`` (413 over
``http.max_body_bytes``; after the key check, so an anonymous caller learns no limit)
-> FastAPI's exception handlers
(``http.failures``) -> the routes (``http.routes``). ``/api/v1/health``,
``/api/v1/ready``, ``/metrics`` and the OpenAPI document (``/openapi.json``, ``/docs``)
need no key.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from callrouter.http import failures, routes
from callrouter.http.deps import ApiDeps
from callrouter.http.guard import BodyLimit, Guard, Observe
from callrouter.http.ratelimit import FixedWindowLimiter


class _Mounted:
    """Wraps an ASGI callable so Starlette's ``Route`` serves it as-is (not as a handler)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def create_app(deps: ApiDeps) -> FastAPI:
    app = FastAPI(title="callrouter management API", version=deps.version)
    app.state.deps = deps
    app.state.control_limiter = FixedWindowLimiter(
        deps.control_limit_per_minute, clock=deps.clock)
    app.include_router(routes.router)
    app.include_router(routes.open_router)
    extra = [] if deps.metrics_app is None else [
        Route("/metrics", _Mounted(deps.metrics_app), include_in_schema=False)]
    app.router.routes.extend(extra)
    failures.install(app)
    app.add_middleware(BodyLimit, limit=deps.max_body_bytes,
                       per_path={routes.IMPORT_PATH: deps.import_max_bytes})
    app.add_middleware(
        Guard, authenticate=deps.management.authenticate, open_paths=routes.OPEN_PATHS,
        limiter=FixedWindowLimiter(deps.rate_limit_per_minute, clock=deps.clock))
    served = [*routes.router.routes, *routes.open_router.routes, *extra]
    app.add_middleware(Observe, routes=served, on_request=deps.on_request)
    return app
