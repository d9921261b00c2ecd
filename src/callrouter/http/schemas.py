"""Request bodies, and how each becomes a ``management`` input value.

pydantic checks types (a bad UUID or a non-boolean ``is_active`` is a 422 naming the
field); the rules that need the router's knowledge (E.164, existing ids) are left to
``Management``. What is settled here is the two published spellings: ``agent_id`` is the
older name of ``assistant_id``; a trunk is ``host``+``port``+``username``+``password`` or
``address``+``auth_username``+``auth_password``. Giving both spellings is fine when they
agree and a 422 when they do not. In a PATCH, a field the body leaves out is ``UNSET``
and an explicit ``null`` detaches (or is refused where the field cannot be empty).
Unknown fields are ignored, so clients of the platform's wider API keep working.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator

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
    Unset,
)


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
            raise invalid(name, "must not be null")


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
    """The fields trunk create and patch share, in both spellings."""

    host: str | None = None
    port: int | None = None
    address: str | None = None
    transport: Transport | None = None
    provider: str | None = None
    username: str | None = None
    auth_username: str | None = None
    password: str | None = None
    auth_password: str | None = None
    is_active: bool | None = None

    def endpoint(self) -> tuple[str | Unset, int | Unset]:
        """Host and port from ``host``/``port`` and/or ``address`` (``host[:port]``)."""
        host: str | Unset = self.host if self.host is not None else UNSET
        port: int | Unset = self.port if self.port is not None else UNSET
        if self.address is None:
            return host, port
        a_host, a_port = split_address(self.address)
        if host is not UNSET and host != a_host:
            raise invalid("address", "names a different host than host")
        if port is not UNSET and a_port is not None and port != a_port:
            raise invalid("address", "names a different port than port")
        return a_host, a_port if a_port is not None else port

    def common(self) -> dict[str, Any]:
        not_null(self, "is_active", "transport", "provider")
        host, port = self.endpoint()
        values: dict[str, Any] = {
            "host": host, "port": port,
            "username": either(self, "username", "auth_username"),
            "password": either(self, "password", "auth_password")}
        values |= {k: getattr(self, k) for k in ("transport", "provider", "is_active")
                   if getattr(self, k) is not None}
        return {k: v for k, v in values.items() if v is not UNSET}


class TrunkCreate(TrunkFields):
    name: str

    def to_input(self) -> TrunkInput:
        values = self.common()
        if "host" not in values:
            raise invalid("host", "host or address is required")
        return TrunkInput(name=self.name, **values)


class TrunkPatch(TrunkFields):
    name: str | None = None

    def to_changes(self) -> TrunkChanges:
        not_null(self, "name")
        values = self.common()
        if self.name is not None:
            values["name"] = self.name
        return TrunkChanges(**values)


def split_address(address: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, _port(rest.removeprefix(":")) if rest else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, _port(port)
    return text, None


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise invalid("address", "port must be a number between 1 and 65535")
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


class ControlCommand(BaseModel):
    type: Literal["transfer", "end-call"]
    destination: str | None = None
    message: str | None = None
