"""Request bodies, and how each becomes a ``management`` input value.

pydantic checks types (a bad UUID or a non-boolean ``is_active`` is a 422 naming the
field); the rules that need the router's knowledge (E.164, existing ids) are left to
``Management``. What is settled here is the two published spellings: ``agent_id`` is the
older name of ``assistant_id``; a trunk is ``host``+``port``+``username``+``password`` or
``outbound_address`` (or ``address``)+``auth_username``+``auth_password``. Giving both
spellings is fine when they agree and a 422 when they do not. In a PATCH, a field the
body leaves out is ``UNSET`` and an explicit ``null`` detaches (or is refused where the
field cannot be empty). Unknown fields are ignored, so clients of the platform's wider
API keep working.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

from callrouter.domain.models import TrunkTransport
from callrouter.errors import FieldProblem, ValidationError
from callrouter.management import (
    UNSET,
    AssistantChanges,
    AssistantInput,
    NumberChanges,
    NumberInput,
    TrunkChanges,
    TrunkInput,
)
from callrouter.outbound import OutboundRequest


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


Transport = Annotated[TrunkTransport, BeforeValidator(_lower)]


def invalid(field: str, message: str) -> ValidationError:
    return ValidationError(f"{field}: {message}", details=[FieldProblem(field, message)])


def either(body: BaseModel, name: str, alias: str) -> Any:
    """The value given under ``name`` or its other spelling ``alias``; ``UNSET`` if neither."""
    sent = body.model_fields_set
    value, other = getattr(body, name), getattr(body, alias)
    if name in sent and alias in sent and value != other:
        raise invalid(alias, f"conflicts with {name}; send one of them")
    if name in sent:
        return value
    return other if alias in sent else UNSET


def not_null(body: BaseModel, *names: str) -> None:
    for name in names:
        if name in body.model_fields_set and getattr(body, name) is None:
            raise invalid(name.rstrip("_"), "must not be null")


def _default(value: Any, fallback: Any) -> Any:
    return fallback if value is UNSET or value is None else value


class NumberCreate(BaseModel):
    phone_number: str
    name: str | None = None
    assistant_id: uuid.UUID | None = None
    agent_id: uuid.UUID | None = None
    transfer_trunk_id: uuid.UUID | None = None
    is_active: bool = True

    def to_input(self) -> NumberInput:
        return NumberInput(
            phone_number=self.phone_number, name=self.name or "",
            assistant_id=_default(either(self, "assistant_id", "agent_id"), None),
            transfer_trunk_id=self.transfer_trunk_id, is_active=self.is_active)


class NumberPatch(BaseModel):
    name: str | None = None
    assistant_id: uuid.UUID | None = None
    agent_id: uuid.UUID | None = None
    transfer_trunk_id: uuid.UUID | None = None
    is_active: bool | None = None

    def to_changes(self) -> NumberChanges:
        not_null(self, "is_active")
        sent = self.model_fields_set
        return NumberChanges(
            name=(self.name or "") if "name" in sent else UNSET,
            assistant_id=either(self, "assistant_id", "agent_id"),
            transfer_trunk_id=self.transfer_trunk_id if "transfer_trunk_id" in sent else UNSET,
            is_active=self.is_active if self.is_active is not None else UNSET)


class TrunkFields(BaseModel):
    """The fields trunk create and patch share, in both spellings (``../shared/api.md``):
    ``outbound_address`` or ``address`` or ``host``+``port``; ``auth_username`` or
    ``username``; ``auth_password`` or ``password``."""

    host: str | None = None
    port: int | None = None
    address: str | None = None
    outbound_address: str | None = None
    transport: Transport | None = None
    provider: str | None = None
    username: str | None = None
    auth_username: str | None = None
    password: str | None = None
    auth_password: str | None = None
    is_active: bool | None = None
    inbound_addresses: list[str] | None = None
    outbound_number: str | None = None
    # "register" shadows pydantic's ABC ``register``: the attribute differs, the JSON not.
    register_: bool | None = Field(default=None, alias="register")
    register_expires: int | None = None
    inbound_auth: bool | None = None

    def endpoint(self) -> dict[str, Any]:
        """Host, port and transport from ``host``/``port`` and/or the outbound address
        (``host[:port]`` or a SIP URI); a ``null`` outbound address makes the trunk
        inbound-only."""
        values: dict[str, Any] = {}
        if self.host is not None:
            values["host"] = self.host
        if self.port is not None:
            values["port"] = self.port
        address = either(self, "outbound_address", "address")
        if address is UNSET:
            return values
        if address is None or not address.strip():
            if self.host:
                raise invalid("outbound_address", "is empty but host is given")
            return {"host": ""}
        field = "outbound_address" if "outbound_address" in self.model_fields_set else "address"
        a_host, a_port, a_transport = split_address(address, field)
        if self.host is not None and self.host != a_host:
            raise invalid(field, "names a different host than host")
        if self.port is not None and a_port is not None and self.port != a_port:
            raise invalid(field, "names a different port than port")
        if a_transport is not None:
            if self.transport is not None and self.transport != a_transport:
                raise invalid(field, "names a different transport than transport")
            values["transport"] = a_transport
        values["host"] = a_host
        if a_port is not None:
            values["port"] = a_port
        return values

    def common(self) -> dict[str, Any]:
        not_null(self, "is_active", "transport", "provider", "register_", "register_expires",
                 "inbound_auth")
        values: dict[str, Any] = {
            "username": either(self, "username", "auth_username"),
            "password": either(self, "password", "auth_password")}
        values |= {k: getattr(self, k) for k in (
            "transport", "provider", "is_active", "register_expires",
            "inbound_auth") if getattr(self, k) is not None}
        if self.register_ is not None:
            values["register"] = self.register_
        values |= self.endpoint()
        if "inbound_addresses" in self.model_fields_set:
            values["inbound_addresses"] = tuple(self.inbound_addresses or ())
        if "outbound_number" in self.model_fields_set:
            values["outbound_number"] = self.outbound_number
        return {k: v for k, v in values.items() if v is not UNSET}


class TrunkCreate(TrunkFields):
    name: str

    def to_input(self) -> TrunkInput:
        return TrunkInput(name=self.name, **self.common())


class TrunkPatch(TrunkFields):
    name: str | None = None

    def to_changes(self) -> TrunkChanges:
        not_null(self, "name")
        values = self.common()
        if self.name is not None:
            values["name"] = self.name
        return TrunkChanges(**values)


def split_address(address: str, field: str = "address") -> tuple[str, int | None,
                                                                  TrunkTransport | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port``, a bare IPv6 address, or a SIP URI
    (``sip:host:port;transport=tcp``, a user part is ignored)."""
    text = address.strip()
    transport: TrunkTransport | None = None
    lowered = text.lower()
    if lowered.startswith(("sip:", "sips:")):
        if lowered.startswith("sips:"):
            transport = TrunkTransport.TLS
        text, _, params = text.split(":", 1)[1].partition(";")
        text = text.rsplit("@", 1)[-1]
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "transport" and value:
                try:
                    transport = TrunkTransport(value.strip().lower())
                except ValueError as exc:
                    raise invalid(field, f"unknown transport {value!r}") from exc
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, _port(rest.removeprefix(":"), field) if rest else None, transport
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, _port(port, field), transport
    return text, None, transport


def _port(text: str, field: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise invalid(field, "port must be a number between 1 and 65535")
    return int(text)


class AssistantWebhookFields(BaseModel):
    """``webhook_secret`` is write-only: responses say only ``has_webhook_secret``."""

    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_events: list[str] | None = None


class AssistantCreate(AssistantWebhookFields):
    id: uuid.UUID | None = None
    name: str
    runtime_uri: str | None = None

    def to_input(self) -> AssistantInput:
        events = None if self.webhook_events is None else tuple(self.webhook_events)
        return AssistantInput(id=self.id, name=self.name, runtime_uri=self.runtime_uri,
                              webhook_url=self.webhook_url, webhook_secret=self.webhook_secret,
                              webhook_events=events)


class AssistantPatch(AssistantWebhookFields):
    name: str | None = None
    runtime_uri: str | None = None

    def to_changes(self) -> AssistantChanges:
        not_null(self, "name")
        sent = self.model_fields_set

        def sent_or_unset(name: str) -> Any:
            return getattr(self, name) if name in sent else UNSET

        events = sent_or_unset("webhook_events")
        return AssistantChanges(
            name=self.name if self.name is not None else UNSET,
            runtime_uri=sent_or_unset("runtime_uri"),
            webhook_url=sent_or_unset("webhook_url"),
            webhook_secret=sent_or_unset("webhook_secret"),
            webhook_events=tuple(events) if isinstance(events, list) else events)


class OutboundCallBody(BaseModel):
    """``POST /calls/outbound``. The SDK also sends ``assistant``, ``assistant_override``
    and ``first_message`` (runtime configuration): ignored, never refused."""

    destination: str
    number_id: uuid.UUID | None = None
    assistant_id: uuid.UUID | None = None

    def to_request(self) -> OutboundRequest:
        return OutboundRequest(self.destination, self.number_id, self.assistant_id)


class ControlCommand(BaseModel):
    type: Literal["transfer", "end-call"]
    destination: str | None = None
    message: str | None = None
