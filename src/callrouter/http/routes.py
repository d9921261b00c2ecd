"""The endpoints of ``../shared/api.md``: thin handlers, parse -> management/store -> view.

Reads go straight to the store; every change goes through ``Management``, which validates
and refreshes the routing snapshot. Errors are raised as ``errors.CallrouterError`` and
shaped in ``http.failures``; authentication and the per-key rate limit happen before
any of this, in ``http.guard``.
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar, cast

from fastapi import APIRouter, Depends, Query, Request, Response, Security
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPBearer

from callrouter.domain.models import CallStatus, DeliveryStatus, PhoneNumber
from callrouter.errors import EngineUnavailable, NotFound, ValidationError
from callrouter.http import schemas
from callrouter.http import views as v
from callrouter.http.deps import ApiDeps
from callrouter.http.failures import CallNotControllable, TooManyRequests
from callrouter.http.ratelimit import FixedWindowLimiter
from callrouter.ports import CallQuery, ControlCommand, EndCall, NumberQuery, TransferCall

IMPORT_PATH = "/api/v1/numbers/import"  # its own body limit (http.guard.BodyLimit)
IMPORT_SPOOL_BYTES = 8 * 1024 * 1024  # an import body beyond this goes to a temporary file
MAX_NUMBER_PAGE = 10_000
NUMBER_BATCH = 2_000  # numbers per store read while streaming the list
OPEN_PATHS = frozenset({"/api/v1/health", "/api/v1/ready"})
_T = TypeVar("_T")
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": v.ErrorBody} for status in (400, 401, 403, 404, 409, 422, 429)}


def _deps(request: Request) -> ApiDeps:
    return cast(ApiDeps, request.app.state.deps)


def _control_limiter(request: Request) -> FixedWindowLimiter:
    return cast(FixedWindowLimiter, request.app.state.control_limiter)


Deps = Annotated[ApiDeps, Depends(_deps)]
ControlLimiter = Annotated[FixedWindowLimiter, Depends(_control_limiter)]
# Documents the bearer scheme in OpenAPI; the check itself is http.guard.Guard.
router = APIRouter(prefix="/api/v1", responses=_ERRORS,
                   dependencies=[Security(HTTPBearer(auto_error=False))])
open_router = APIRouter(prefix="/api/v1")


def _found(obj: _T | None, what: str) -> _T:
    if obj is None:
        raise NotFound(f"{what} not found")
    return obj


# -- numbers ---------------------------------------------------------------------------

@router.get("/numbers", tags=["numbers"], response_class=StreamingResponse,
            responses={200: {"model": v.NumberList}})
async def list_numbers(
    deps: Deps,
    limit: Annotated[int | None, Query(ge=1, le=MAX_NUMBER_PAGE)] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    phone_number: Annotated[str | None, Query(max_length=16)] = None,
) -> StreamingResponse:
    """Every number (what the SDK expects) without parameters, or a page: ``limit`` and
    ``offset``, numbers starting with ``phone_number``; in ``phone_number`` order. Streamed
    a batch at a time, so a million numbers are never one response in memory. The first
    batch is read before the response starts, so an unreachable database is a 503."""
    query = NumberQuery(limit=limit or NUMBER_BATCH, offset=offset,
                        prefix=_number_prefix(phone_number))
    first = await deps.store.page_numbers(query)
    return StreamingResponse(
        v.number_list_stream(_number_pages(deps, query, first, limit is None)),
        media_type="application/json")


async def _number_pages(deps: ApiDeps, query: NumberQuery, page: Sequence[PhoneNumber],
                        every: bool) -> AsyncIterator[Sequence[PhoneNumber]]:
    yield page
    # Without a limit: every number from the offset on, by keyset (never OFFSET again).
    while every and len(page) == query.limit:
        query = dataclasses.replace(query, offset=0, after=page[-1].phone_number)
        page = await deps.store.page_numbers(query)
        yield page


def _number_prefix(raw: str | None) -> str:
    """``+3185``, ``3185`` (a ``+`` left unencoded in a query string arrives as a space)."""
    digits = (raw or "").strip().lstrip("+")
    if digits and not digits.isdigit():
        raise schemas.invalid("phone_number", "must be the digits an E.164 number starts with")
    return "+" + digits if digits else ""


@router.post("/numbers", status_code=201, tags=["numbers"])
async def create_number(body: schemas.NumberCreate, deps: Deps) -> v.NumberEnvelope:
    number = await deps.management.create_number(body.to_input())
    return v.NumberEnvelope(number=v.NumberView.of(number))


@router.post("/numbers/import", tags=["numbers"])
async def import_numbers(request: Request, deps: Deps,
                         skip_invalid: bool = False) -> v.ImportResult:
    """A CSV body (header: phone_number, optional name, assistant_id, transfer_trunk_id,
    is_active). All or nothing: any bad row is 422 naming every bad line; with
    ``skip_invalid`` the good rows are registered and the bad ones listed. The body is
    streamed to a spooled temporary file, within ``numbers.import_max_bytes``."""
    with tempfile.SpooledTemporaryFile(max_size=IMPORT_SPOOL_BYTES) as body:
        async for chunk in request.stream():
            body.write(chunk)
        body.seek(0)
        lines = io.TextIOWrapper(body, encoding="utf-8-sig", newline="")
        report = await deps.management.import_numbers(lines, skip_invalid=skip_invalid)
    return v.ImportResult(imported=report.imported, skipped=[
        v.SkippedRow(line=p.line, message=p.reason) for p in report.problems])


@router.get("/numbers/{number_id}", tags=["numbers"])
async def get_number(number_id: uuid.UUID, deps: Deps) -> v.NumberEnvelope:
    number = _found(await deps.store.get_number(number_id), "number")
    return v.NumberEnvelope(number=v.NumberView.of(number))


@router.patch("/numbers/{number_id}", tags=["numbers"])
async def update_number(
    number_id: uuid.UUID, body: schemas.NumberPatch, deps: Deps
) -> v.NumberEnvelope:
    number = await deps.management.update_number(number_id, body.to_changes())
    return v.NumberEnvelope(number=v.NumberView.of(number))


@router.delete("/numbers/{number_id}", tags=["numbers"])
async def delete_number(number_id: uuid.UUID, deps: Deps) -> v.Success:
    await deps.management.delete_number(number_id)
    return v.Success()


# -- SIP trunks ------------------------------------------------------------------------

@router.get("/sip-trunks", tags=["sip-trunks"])
async def list_trunks(deps: Deps) -> v.TrunkList:
    return v.TrunkList(trunks=[v.TrunkView.of(t, deps.registration(t.id))
                               for t in await deps.store.list_trunks()])


@router.post("/sip-trunks", status_code=201, tags=["sip-trunks"])
async def create_trunk(body: schemas.TrunkCreate, deps: Deps) -> v.TrunkEnvelope:
    trunk = await deps.management.create_trunk(body.to_input())
    return v.TrunkEnvelope.of(trunk, deps.registration(trunk.id))


@router.get("/sip-trunks/{trunk_id}", tags=["sip-trunks"])
async def get_trunk(trunk_id: uuid.UUID, deps: Deps) -> v.TrunkEnvelope:
    trunk = _found(await deps.store.get_trunk(trunk_id), "SIP trunk")
    return v.TrunkEnvelope.of(trunk, deps.registration(trunk.id))


@router.patch("/sip-trunks/{trunk_id}", tags=["sip-trunks"])
async def update_trunk(
    trunk_id: uuid.UUID, body: schemas.TrunkPatch, deps: Deps
) -> v.TrunkEnvelope:
    trunk = await deps.management.update_trunk(trunk_id, body.to_changes())
    return v.TrunkEnvelope.of(trunk, deps.registration(trunk.id))


@router.delete("/sip-trunks/{trunk_id}", tags=["sip-trunks"])
async def delete_trunk(trunk_id: uuid.UUID, deps: Deps) -> v.Success:
    await deps.management.delete_trunk(trunk_id)
    return v.Success()


# -- assistants ------------------------------------------------------------------------

@router.get("/assistants", tags=["assistants"])
async def list_assistants(deps: Deps) -> v.AssistantList:
    found = await deps.store.list_assistants()
    return v.AssistantList(assistants=[v.AssistantView.of(a) for a in found])


@router.post("/assistants", status_code=201, tags=["assistants"])
async def create_assistant(body: schemas.AssistantCreate, deps: Deps) -> v.AssistantEnvelope:
    assistant = await deps.management.create_assistant(body.to_input())
    return v.AssistantEnvelope(assistant=v.AssistantView.of(assistant))


@router.get("/assistants/{assistant_id}", tags=["assistants"])
async def get_assistant(assistant_id: uuid.UUID, deps: Deps) -> v.AssistantEnvelope:
    assistant = _found(await deps.store.get_assistant(assistant_id), "assistant")
    return v.AssistantEnvelope(assistant=v.AssistantView.of(assistant))


@router.patch("/assistants/{assistant_id}", tags=["assistants"])
async def update_assistant(
    assistant_id: uuid.UUID, body: schemas.AssistantPatch, deps: Deps
) -> v.AssistantEnvelope:
    assistant = await deps.management.update_assistant(assistant_id, body.to_changes())
    return v.AssistantEnvelope(assistant=v.AssistantView.of(assistant))


@router.delete("/assistants/{assistant_id}", tags=["assistants"])
async def delete_assistant(assistant_id: uuid.UUID, deps: Deps) -> v.Success:
    await deps.management.delete_assistant(assistant_id)
    return v.Success()


# -- calls -----------------------------------------------------------------------------

@router.get("/calls", tags=["calls"])
async def list_calls(
    deps: Deps,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    status: CallStatus | None = None,
    start_date: datetime | None = None,
    end_date: datetime | None = None,
) -> v.CallList:
    query = CallQuery(limit=limit, offset=offset, status=status,
                      start_date=_utc(start_date), end_date=_utc(end_date))
    if query.start_date and query.end_date and query.start_date > query.end_date:
        raise schemas.invalid("end_date", "must not be before start_date")
    calls, total = await deps.store.list_calls(query)
    return v.CallList(calls=[v.CallView.of(c) for c in calls],
                      pagination=v.Pagination(total=total, limit=limit, offset=offset))


def _utc(moment: datetime | None) -> datetime | None:
    """Query times without a zone are taken as UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


@router.post("/calls/outbound", tags=["calls"],
             responses={status: {"model": v.ErrorBody} for status in (503, 504)})
async def place_call(body: schemas.OutboundCallBody, deps: Deps) -> v.OutboundResult:
    """Dial ``destination`` through the number's trunk; once it answers, bridge it to the
    assistant's runtime like an inbound call (``X-Direction: outbound``)."""
    if deps.place_call is None:
        raise EngineUnavailable("outbound calls are not available")
    call_id = await deps.place_call(body.to_request())
    return v.OutboundResult(success=True, call_id=call_id, status="dialing")


@router.get("/calls/{call_id}", tags=["calls"])
async def get_call(call_id: uuid.UUID, deps: Deps) -> v.CallDetail:
    return v.CallDetail.of(_found(await deps.store.get_call(call_id), "call"))


@router.post("/calls/{call_id}/control", tags=["calls"],
             responses={status: {"model": v.ErrorBody} for status in (503, 504)})
async def control_call(
    call_id: uuid.UUID, body: schemas.ControlCommand, deps: Deps, limiter: ControlLimiter
) -> v.ControlResult:
    """200 once the call's session accepted the command; 409 when its state refuses it
    now (a transfer still ringing), 400 when the call is not in progress."""
    command = _command(body, deps)
    verdict = limiter.hit(call_id)
    if not verdict.allowed:
        raise TooManyRequests(f"at most {verdict.limit} control commands per minute per call",
                              verdict.headers())
    try:
        message = await deps.control(call_id, command)
    except ValidationError as exc:
        raise CallNotControllable(exc.message, details=exc.details) from exc
    return v.ControlResult(success=True, message=message)


def _command(body: schemas.ControlCommand, deps: ApiDeps) -> ControlCommand:
    if body.type == "end-call":
        return EndCall()
    if not body.destination:
        raise schemas.invalid("destination", "is required for a transfer")
    return TransferCall(deps.management.control_destination(body.destination), body.message)


# -- webhook deliveries (status-update outbox) --------------------------------------------

@router.get("/webhooks/deliveries", tags=["webhooks"])
async def list_deliveries(
    deps: Deps,
    status: DeliveryStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> v.DeliveryList:
    """Newest first; ``status=failed`` lists what was given up, ``pending`` what waits."""
    found, total = await deps.store.list_deliveries(status, limit, offset)
    return v.DeliveryList(deliveries=[v.DeliveryView.of(d) for d in found],
                          pagination=v.Pagination(total=total, limit=limit, offset=offset))


@router.post("/webhooks/deliveries/{delivery_id}/retry", tags=["webhooks"])
async def retry_delivery(delivery_id: uuid.UUID, deps: Deps) -> v.DeliveryEnvelope:
    """Try a failed (or waiting) delivery again now, with a fresh ``retry_hours``."""
    return v.DeliveryEnvelope(delivery=v.DeliveryView.of(await deps.retry_delivery(delivery_id)))


# -- health (open) ---------------------------------------------------------------------

@open_router.get("/health", tags=["health"], responses={503: {"model": v.Health}})
async def health(deps: Deps, response: Response) -> v.Health:
    checks = await deps.health()
    healthy = all(check.get("status") == "ok" for check in checks.values())
    # Liveness: the router is alive while its SIP side is. A database outage is
    # "degraded" (calls are routed from memory and their records spooled), not down.
    if checks.get("sip", {}).get("status") == "down":
        response.status_code = 503
    return v.Health(status="ok" if healthy else "degraded", version=deps.version, checks=checks)


@open_router.get("/ready", tags=["health"], responses={503: {"model": v.Readiness}})
async def ready(deps: Deps, response: Response) -> v.Readiness:
    is_ready, reason = deps.ready()
    if not is_ready:
        response.status_code = 503
    return v.Readiness(status="ready" if is_ready else "not_ready", reason=reason)
