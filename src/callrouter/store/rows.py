"""Mapping between domain objects and SQLite rows, and the SQL built from column lists.

Each table has one column tuple; rows go in as ``{column: value}`` dicts bound to named
parameters and come out in column order, so a column is named in exactly one place.
Times are fixed-width UTC text (microseconds, ``Z``) so text order is time order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from callrouter.domain.models import (
    ApiKey,
    Assistant,
    CallRecord,
    CallStatus,
    DeliveryStatus,
    EndReason,
    PhoneNumber,
    Trunk,
    TrunkTransport,
    WebhookDelivery,
)

Row = Sequence[Any]

NUMBER_COLS = ("id", "phone_number", "name", "assistant_id", "transfer_trunk_id",
               "is_active", "created_at", "updated_at")
TRUNK_COLS = ("id", "name", "host", "port", "transport", "provider", "username",
              "is_active", "created_at", "updated_at", "inbound_addresses", "outbound_number",
              "register", "register_expires", "inbound_auth")
ASSISTANT_COLS = ("id", "name", "runtime_uri", "created_at", "updated_at", "webhook_url",
                  "webhook_events")
CALL_COLS = ("id", "status", "caller_phone", "assistant_phone", "number_id", "assistant_id",
             "sip_call_id", "started_at", "ended_at", "end_reason", "error", "created_at",
             "updated_at", "direction", "router", "trunk_id")
KEY_COLS = ("id", "name", "prefix", "read_only", "created_at")
DELIVERY_COLS = ("id", "call_id", "event", "url", "assistant_id", "body", "status",
                 "attempts", "next_attempt_at", "expires_at", "last_error", "created_at",
                 "updated_at")

_IMMUTABLE = ("id", "created_at")

def select_sql(table: str, cols: Sequence[str], extra: str = "") -> str:
    return f"SELECT {', '.join(cols)}{extra} FROM {table}"


def insert_sql(table: str, cols: Sequence[str]) -> str:
    names = ", ".join(cols)
    return f"INSERT INTO {table} ({names}) VALUES ({', '.join(':' + c for c in cols)})"


def assignments(cols: Sequence[str]) -> str:
    return ", ".join(f"{c}=:{c}" for c in cols if c not in _IMMUTABLE)


def update_sql(table: str, cols: Sequence[str]) -> str:
    return f"UPDATE {table} SET {assignments(cols)} WHERE id=:id"


def to_text(moment: datetime) -> str:
    """``2026-11-30T03:00:00.123456Z``: fixed width, so text order is time order. (isoformat
    and fromisoformat are C; strftime/strptime cost 20 us a value, which a million-number
    listing pays twice per number.)"""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def from_text(text: str) -> datetime:
    return _time(text)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)  # "...Z" -> UTC (Python 3.11)


def _opt_time(text: str | None) -> datetime | None:
    return None if text is None else _time(text)


def _opt_id(text: str | None) -> uuid.UUID | None:
    return None if text is None else uuid.UUID(text)


def _opt_text(value: object) -> str | None:
    return None if value is None else str(value)


def number_to_row(n: PhoneNumber) -> dict[str, Any]:
    return {"id": str(n.id), "phone_number": n.phone_number, "name": n.name,
            "assistant_id": _opt_text(n.assistant_id),
            "transfer_trunk_id": _opt_text(n.transfer_trunk_id), "is_active": int(n.is_active),
            "created_at": to_text(n.created_at), "updated_at": to_text(n.updated_at)}


def number_tuples(numbers: Iterable[PhoneNumber]) -> Iterator[tuple[Any, ...]]:
    """``number_to_row`` as tuples in ``NUMBER_COLS`` order, for bulk inserts: a bulk import
    stamps every row with one time, so each distinct time is formatted once."""
    texts: dict[datetime, str] = {}

    def text(moment: datetime) -> str:
        found = texts.get(moment)
        if found is None:
            found = texts[moment] = to_text(moment)
        return found

    for n in numbers:
        yield (str(n.id), n.phone_number, n.name, _opt_text(n.assistant_id),
               _opt_text(n.transfer_trunk_id), int(n.is_active), text(n.created_at),
               text(n.updated_at))


def number_from_row(r: Row) -> PhoneNumber:
    return PhoneNumber(id=uuid.UUID(r[0]), phone_number=r[1], name=r[2],
                       assistant_id=_opt_id(r[3]), transfer_trunk_id=_opt_id(r[4]),
                       is_active=bool(r[5]), created_at=_time(r[6]), updated_at=_time(r[7]))


def trunk_to_row(t: Trunk) -> dict[str, Any]:
    return {"id": str(t.id), "name": t.name, "host": t.host, "port": t.port,
            "transport": t.transport.value, "provider": t.provider, "username": t.username,
            "is_active": int(t.is_active), "created_at": to_text(t.created_at),
            "updated_at": to_text(t.updated_at),
            "inbound_addresses": json.dumps(list(t.inbound_addresses)),
            "outbound_number": t.outbound_number, "register": int(t.register),
            "register_expires": t.register_expires, "inbound_auth": int(t.inbound_auth)}


def trunk_from_row(r: Row) -> Trunk:
    """A row of ``TRUNK_COLS`` followed by ``password_enc IS NOT NULL``."""
    return Trunk(id=uuid.UUID(r[0]), name=r[1], host=r[2], port=int(r[3]),
                 transport=TrunkTransport(r[4]), provider=r[5], username=r[6],
                 is_active=bool(r[7]), created_at=_time(r[8]), updated_at=_time(r[9]),
                 inbound_addresses=tuple(json.loads(r[10])), outbound_number=r[11],
                 register=bool(r[12]), register_expires=int(r[13]),
                 inbound_auth=bool(r[14]), has_password=bool(r[15]))


def assistant_to_row(a: Assistant) -> dict[str, Any]:
    return {"id": str(a.id), "name": a.name, "runtime_uri": a.runtime_uri,
            "created_at": to_text(a.created_at), "updated_at": to_text(a.updated_at),
            "webhook_url": a.webhook_url, "webhook_events": ",".join(a.webhook_events)}


def assistant_from_row(r: Row) -> Assistant:
    """A row of ``ASSISTANT_COLS`` followed by ``webhook_secret_enc IS NOT NULL``."""
    return Assistant(id=uuid.UUID(r[0]), name=r[1], runtime_uri=r[2],
                     created_at=_time(r[3]), updated_at=_time(r[4]), webhook_url=r[5],
                     webhook_events=tuple(e for e in str(r[6] or "").split(",") if e),
                     has_webhook_secret=bool(r[7]))


def call_to_row(c: CallRecord) -> dict[str, Any]:
    return {"id": str(c.id), "status": c.status.value, "caller_phone": c.caller_phone,
            "assistant_phone": c.assistant_phone, "number_id": _opt_text(c.number_id),
            "assistant_id": _opt_text(c.assistant_id), "sip_call_id": c.sip_call_id,
            "started_at": c.started_at and to_text(c.started_at),
            "ended_at": c.ended_at and to_text(c.ended_at),
            "end_reason": c.end_reason and c.end_reason.value, "error": c.error,
            "created_at": to_text(c.created_at), "updated_at": to_text(c.updated_at),
            "direction": c.direction, "router": c.router, "trunk_id": _opt_text(c.trunk_id)}


def call_from_row(r: Row) -> CallRecord:
    return CallRecord(id=uuid.UUID(r[0]), status=CallStatus(r[1]), caller_phone=r[2],
                      assistant_phone=r[3], number_id=_opt_id(r[4]), assistant_id=_opt_id(r[5]),
                      sip_call_id=r[6], started_at=_opt_time(r[7]), ended_at=_opt_time(r[8]),
                      end_reason=None if r[9] is None else EndReason(r[9]), error=r[10],
                      created_at=_time(r[11]), updated_at=_time(r[12]), direction=r[13],
                      router=r[14], trunk_id=_opt_id(r[15]))


def key_to_row(k: ApiKey) -> dict[str, Any]:
    return {"id": str(k.id), "name": k.name, "prefix": k.prefix, "read_only": int(k.read_only),
            "created_at": to_text(k.created_at)}


def key_from_row(r: Row) -> ApiKey:
    return ApiKey(id=uuid.UUID(r[0]), name=r[1], prefix=r[2], read_only=bool(r[3]),
                  created_at=_time(r[4]))


def delivery_to_row(d: WebhookDelivery) -> dict[str, Any]:
    return {"id": str(d.id), "call_id": _opt_text(d.call_id), "event": d.event, "url": d.url,
            "assistant_id": _opt_text(d.assistant_id), "body": d.body,
            "status": d.status.value, "attempts": d.attempts,
            "next_attempt_at": to_text(d.next_attempt_at),
            "expires_at": to_text(d.expires_at), "last_error": d.last_error,
            "created_at": to_text(d.created_at), "updated_at": to_text(d.updated_at)}


def delivery_from_row(r: Row) -> WebhookDelivery:
    return WebhookDelivery(id=uuid.UUID(r[0]), call_id=_opt_id(r[1]), event=r[2], url=r[3],
                           assistant_id=_opt_id(r[4]), body=r[5], status=DeliveryStatus(r[6]),
                           attempts=int(r[7]), next_attempt_at=_time(r[8]),
                           expires_at=_time(r[9]), last_error=r[10], created_at=_time(r[11]),
                           updated_at=_time(r[12]))
