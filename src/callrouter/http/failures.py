"""Every error the API answers, in one shape: ``{"error", "message", "details"}``.

How it works: the router's own exceptions (``errors.CallrouterError`` and its subclasses)
carry their HTTP status and code and are translated by one handler. FastAPI's request
validation errors become 422 with one ``details`` entry per bad field — or 400 when the
body is not JSON at all, and 404 when a path id is not even a UUID (no such object can
exist). Starlette's own HTTP errors (unknown route, wrong method) and anything unexpected
(500, no internals in the body) are reshaped the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from callrouter.errors import CallrouterError, FieldProblem
from callrouter.http.views import ErrorBody


class TooManyRequests(CallrouterError):
    """A per-call budget (control commands) is spent; carries ``Retry-After``."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, headers: Mapping[str, str]) -> None:
        super().__init__(message)
        self.headers = dict(headers)


class CallNotControllable(CallrouterError):
    """The call exists but is not in a state that takes this command (api.md: 400)."""

    status = 400
    code = "invalid_call_state"


def error_response(
    status: int, code: str, message: str, details: list[FieldProblem] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody.of(code, message, details).model_dump(mode="json")
    return JSONResponse(body, status_code=status, headers=headers)


def _code(status: int) -> str:
    return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


async def on_router_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CallrouterError)
    if exc.status >= 500 and not exc.public:
        return error_response(exc.status, exc.code, "the router could not complete the request")
    headers = exc.headers if isinstance(exc, TooManyRequests) else None
    return error_response(exc.status, exc.code, exc.message, exc.details, headers)


async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors: Sequence[Mapping[str, Any]] = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        return error_response(400, "malformed_json", "the request body is not valid JSON",
                              [FieldProblem("body", "not valid JSON")])
    if any(e["loc"][:1] == ("path",) for e in errors):
        return error_response(404, "not_found", "no object with this id")
    problems = [FieldProblem(_field(e["loc"]), str(e["msg"])) for e in errors]
    summary = "; ".join(f"{p.field}: {p.message}" for p in problems)
    return error_response(422, "validation_error", f"invalid request: {summary}", problems)


def _field(loc: Sequence[object]) -> str:
    return ".".join(str(part) for part in (loc[1:] or loc))


class BodyTooLarge(HTTPException):
    """The request body passed ``http.max_body_bytes`` (``guard.BodyLimit``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes "
                              "(http.max_body_bytes)")


def http_error_response(exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, _code(exc.status_code), str(exc.detail),
                          headers=exc.headers)


async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return http_error_response(exc)


async def on_unexpected(_: Request, __: Exception) -> JSONResponse:
    return error_response(500, "internal_error", "the router could not complete the request")


def install(app: FastAPI) -> None:
    app.add_exception_handler(CallrouterError, on_router_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
