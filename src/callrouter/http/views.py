"""Response models: what the API returns, in the platform's published shapes.

Each view is a pydantic model built from a domain object by ``of``; the handlers declare
them as ``response_model`` so FastAPI's OpenAPI schema is exactly what is served.
Timestamps render as ISO 8601 UTC with milliseconds and ``Z``; older field names the
platform still documents are echoed (``agent_id`` beside ``assistant_id``, ``auth_username``
beside ``username``, trunks under both ``sip_trunk`` and ``trunk``). A trunk password has
no field here, so no response can carry one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, PlainSerializer, TypeAdapter

from callrouter.domain.models import (
    Assistant,
    CallRecord,
    CallStatus,
    PhoneNumber,
    Trunk,
    TrunkTransport,
    WebhookDelivery,
)
from callrouter.errors import FieldProblem
from callrouter.ports import RegistrationStatus


def iso_ms(moment: datetime) -> str:
    """``2025-12-13T10:00:00.000Z``: UTC, milliseconds, ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


Timestamp = Annotated[datetime, PlainSerializer(iso_ms, return_type=str)]


class NumberView(BaseModel):
    id: uuid.UUID
    phone_number: str
    name: str
    assistant_id: uuid.UUID | None
    agent_id: uuid.UUID | None
    transfer_trunk_id: uuid.UUID | None
    is_active: bool
    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def of(cls, n: PhoneNumber) -> NumberView:
        return cls(id=n.id, phone_number=n.phone_number, name=n.name,
                   assistant_id=n.assistant_id, agent_id=n.assistant_id,
                   transfer_trunk_id=n.transfer_trunk_id, is_active=n.is_active,
                   created_at=n.created_at, updated_at=n.updated_at)


class NumberEnvelope(BaseModel):
    number: NumberView


class NumberList(BaseModel):
    numbers: list[NumberView]


class SkippedRow(BaseModel):
    line: int
    message: str


class ImportResult(BaseModel):
    imported: int
    skipped: list[SkippedRow]  # bad rows left out (only with skip_invalid)


class RegistrationView(BaseModel):
    """A registration trunk's state: ``registered`` (until ``expires_at``), ``failed``
    (``code`` is the last SIP status, 408 for no answer), ``unregistered``."""

    state: str
    code: int | None
    expires_at: Timestamp | None
    reason: str

    @classmethod
    def of(cls, r: RegistrationStatus) -> RegistrationView:
        return cls(state=str(r.state), code=r.code, expires_at=r.expires_at, reason=r.reason)


class TrunkView(BaseModel):
    id: uuid.UUID
    name: str
    provider: str
    inbound_addresses: list[str]
    outbound_address: str | None
    outbound_number: str | None
    auth_username: str | None
    host: str
    port: int
    address: str | None
    transport: TrunkTransport
    username: str | None
    is_active: bool
    # "register" shadows pydantic's ABC ``register``: the attribute differs, the JSON not.
    register_: bool = Field(serialization_alias="register")
    register_expires: int
    inbound_auth: bool
    registration: RegistrationView | None
    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def of(cls, t: Trunk, registration: RegistrationStatus | None = None) -> TrunkView:
        return cls(id=t.id, name=t.name, provider=t.provider,
                   inbound_addresses=list(t.inbound_addresses),
                   outbound_address=t.outbound_address, outbound_number=t.outbound_number,
                   auth_username=t.username, host=t.host, port=t.port,
                   address=t.outbound_address, transport=t.transport, username=t.username,
                   is_active=t.is_active, register_=t.register,
                   register_expires=t.register_expires, inbound_auth=t.inbound_auth,
                   registration=None if registration is None
                   else RegistrationView.of(registration),
                   created_at=t.created_at, updated_at=t.updated_at)


class TrunkEnvelope(BaseModel):
    sip_trunk: TrunkView
    trunk: TrunkView

    @classmethod
    def of(cls, t: Trunk, registration: RegistrationStatus | None = None) -> TrunkEnvelope:
        view = TrunkView.of(t, registration)
        return cls(sip_trunk=view, trunk=view)


class TrunkList(BaseModel):
    trunks: list[TrunkView]


class AssistantView(BaseModel):
    id: uuid.UUID
    name: str
    runtime_uri: str | None
    webhook_url: str | None
    webhook_events: list[str]
    has_webhook_secret: bool  # the secret itself is never returned
    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def of(cls, a: Assistant) -> AssistantView:
        return cls(id=a.id, name=a.name, runtime_uri=a.runtime_uri,
                   webhook_url=a.webhook_url, webhook_events=list(a.webhook_events),
                   has_webhook_secret=a.has_webhook_secret,
                   created_at=a.created_at, updated_at=a.updated_at)


class AssistantEnvelope(BaseModel):
    assistant: AssistantView


class AssistantList(BaseModel):
    assistants: list[AssistantView]


class CallView(BaseModel):
    id: uuid.UUID
    direction: str
    trunk_id: uuid.UUID | None
    status: CallStatus
    caller_phone: str
    assistant_phone: str
    phone_number: str
    number_id: uuid.UUID | None
    assistant_id: uuid.UUID | None
    agent_id: uuid.UUID | None
    sip_call_id: str
    started_at: Timestamp | None
    ended_at: Timestamp | None
    duration_seconds: int | None
    end_reason: str | None
    error: str | None
    created_at: Timestamp
    updated_at: Timestamp
    router: str  # extra field: which router handled the call (config node.name)

    @classmethod
    def fields_of(cls, c: CallRecord) -> dict[str, Any]:
        return {"id": c.id, "direction": c.direction, "trunk_id": c.trunk_id,
                "status": c.status,
                "caller_phone": c.caller_phone, "assistant_phone": c.assistant_phone,
                "phone_number": c.assistant_phone, "number_id": c.number_id,
                "assistant_id": c.assistant_id, "agent_id": c.assistant_id,
                "sip_call_id": c.sip_call_id, "started_at": c.started_at,
                "ended_at": c.ended_at, "duration_seconds": c.duration_seconds,
                "end_reason": c.end_reason and c.end_reason.value, "error": c.error,
                "created_at": c.created_at, "updated_at": c.updated_at, "router": c.router}

    @classmethod
    def of(cls, c: CallRecord) -> CallView:
        return cls(**cls.fields_of(c))


class CallDetail(CallView):
    """The call at top level and again under ``call`` (both published shapes)."""

    call: CallView

    @classmethod
    def of(cls, c: CallRecord) -> CallDetail:
        return cls(**cls.fields_of(c), call=CallView.of(c))


class Pagination(BaseModel):
    total: int
    limit: int
    offset: int


class CallList(BaseModel):
    calls: list[CallView]
    pagination: Pagination


class DeliveryView(BaseModel):
    """One status-update event in the outbox; ``id`` is its ``X-Webhook-Id``."""

    id: uuid.UUID
    call_id: uuid.UUID | None
    event: str
    url: str
    status: str
    attempts: int
    next_attempt_at: Timestamp
    expires_at: Timestamp
    last_error: str | None
    created_at: Timestamp
    updated_at: Timestamp
    payload: Any

    @classmethod
    def of(cls, d: WebhookDelivery) -> DeliveryView:
        try:
            payload = json.loads(d.body)
        except ValueError:
            payload = d.body
        return cls(id=d.id, call_id=d.call_id, event=d.event, url=d.url, status=d.status.value,
                   attempts=d.attempts, next_attempt_at=d.next_attempt_at,
                   expires_at=d.expires_at, last_error=d.last_error, created_at=d.created_at,
                   updated_at=d.updated_at, payload=payload)


class DeliveryList(BaseModel):
    deliveries: list[DeliveryView]
    pagination: Pagination


class DeliveryEnvelope(BaseModel):
    success: bool = True
    delivery: DeliveryView


class Success(BaseModel):
    success: bool = True


class OutboundResult(BaseModel):
    success: bool
    call_id: uuid.UUID
    status: str  # "dialing"


class ControlResult(BaseModel):
    success: bool
    message: str


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    error: str
    message: str
    details: list[ErrorDetail]

    @classmethod
    def of(cls, code: str, message: str, details: list[FieldProblem] | None = None) -> ErrorBody:
        return cls(error=code, message=message,
                   details=[ErrorDetail(field=d.field, message=d.message)
                            for d in details or []])


class Health(BaseModel):
    status: str
    version: str
    checks: dict[str, dict[str, Any]]


class Readiness(BaseModel):
    status: str
    reason: str


_NUMBER_PAGE = TypeAdapter(list[NumberView])


async def number_list_stream(pages: AsyncIterator[Sequence[PhoneNumber]]) -> AsyncIterator[bytes]:
    """``{"numbers": [...]}`` (``NumberList``'s shape) a page at a time: a million numbers
    never sit in memory as one response."""
    yield b'{"numbers":['
    sep = b""
    async for page in pages:
        if page:
            body = _NUMBER_PAGE.dump_json([NumberView.of(n) for n in page])
            yield sep + body[1:-1]
            sep = b","
    yield b"]}"
