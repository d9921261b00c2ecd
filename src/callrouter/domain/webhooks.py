"""Webhooks, without I/O: who is told what, the platform's signing scheme, the bodies, the
replies to ``assistant-request``, URL safety and the retry schedule.

How it works: an assistant may have its own webhook (``webhook_url``, secret, events); an
account-level webhook from the config is the fallback for assistants without one and the
only one asked about numbers with no assistant. ``WebhookDirectory`` is that mapping as an
immutable value the service swaps in on every change, read on the SIP thread without a
lock. Bodies are built here as bytes, once: the exact bytes stored in the outbox are the
bytes signed and sent (``sign`` over ``"{timestamp}.{body}"``, the timestamp taken at each
attempt so a retry is never rejected as stale). ``parse_reply`` turns a receiver's answer
to ``assistant-request`` into an ``AssistantReply``; anything it cannot read is the saved
assistant, with the reason kept for the metric.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from callrouter.domain.models import CallRecord, CallStatus, DeliveryStatus, WebhookDelivery

ASSISTANT_REQUEST = "assistant-request"
STATUS_UPDATE = "status-update"
EVENTS = (ASSISTANT_REQUEST, STATUS_UPDATE)
MAX_RESPONSE_BYTES = 64 * 1024  # a receiver's reply is read this far, never further
MAX_REFUSAL_TEXT = 200  # characters of an ``error`` reply carried in the SIP Reason header
MAX_DURATION_LIMIT = 7 * 24 * 3600  # a ``max_duration_seconds`` beyond this is not a limit
_REPLY_FIELDS = frozenset({"assistant_id", "assistantId", "max_duration_seconds", "error"})


@dataclass(frozen=True)
class WebhookTarget:
    """Where events go and which ones: an assistant's own webhook or the account's."""

    url: str
    secret: str | None
    events: frozenset[str]
    assistant_id: uuid.UUID | None = None  # None: the account-level webhook

    def wants(self, event: str) -> bool:
        return event in self.events


@dataclass(frozen=True)
class AssistantHooks:
    """What the SIP thread needs to know of one existing assistant."""

    runtime_uri: str | None
    target: WebhookTarget | None  # its own webhook, if it has one


@dataclass(frozen=True)
class WebhookDirectory:
    """Every assistant's webhook (or none) and the account's; replaced, never changed."""

    account: WebhookTarget | None = None
    assistants: Mapping[uuid.UUID, AssistantHooks] = field(default_factory=dict)

    def target_for(self, assistant_id: uuid.UUID | None) -> WebhookTarget | None:
        """The assistant's own webhook, else the account's (the only one with no assistant)."""
        hooks = self.assistants.get(assistant_id) if assistant_id is not None else None
        if hooks is not None and hooks.target is not None:
            return hooks.target
        return self.account

    def subscriber(self, assistant_id: uuid.UUID | None, event: str) -> WebhookTarget | None:
        target = self.target_for(assistant_id)
        return target if target is not None and target.wants(event) else None

    def with_assistant(self, assistant_id: uuid.UUID, hooks: AssistantHooks | None
                       ) -> WebhookDirectory:
        assistants = dict(self.assistants)
        if hooks is None:
            assistants.pop(assistant_id, None)
        else:
            assistants[assistant_id] = hooks
        return WebhookDirectory(self.account, assistants)


def hooks_of(assistant_id: uuid.UUID, runtime_uri: str | None, webhook_url: str | None,
             events: tuple[str, ...], secret: str | None) -> AssistantHooks:
    target = None if not webhook_url else WebhookTarget(webhook_url, secret or None,
                                                        frozenset(events), assistant_id)
    return AssistantHooks(runtime_uri, target)


# ---- signing -----------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>``, the platform's scheme."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver does (tests and operators' receivers use it)."""
    if not timestamp.isdigit():
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)


def request_headers(event: str, delivery_id: uuid.UUID, timestamp: int, body: bytes,
                    secret: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Webhook-Event": event,
               "X-Webhook-Timestamp": str(timestamp), "X-Webhook-Id": str(delivery_id)}
    if secret:
        headers["X-Webhook-Signature"] = sign(secret, timestamp, body)
    return headers


# ---- bodies --------------------------------------------------------------------------------


def iso_ms(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class CallFacts:
    """What every event of one call says about it (and the reply's extra fields)."""

    call_id: uuid.UUID
    number_id: uuid.UUID | None
    number: str
    number_name: str
    caller: str
    assistant_id: uuid.UUID | None
    call_type: str = "inbound_phone_call"
    extras: Mapping[str, Any] = field(default_factory=dict)


def _envelope(event: str, at: datetime, facts: CallFacts, status: str) -> dict[str, Any]:
    message: dict[str, Any] = {**facts.extras}
    message.update({
        "type": event, "timestamp": iso_ms(at),
        "call": {"id": str(facts.call_id), "type": facts.call_type, "status": status,
                 "assistant_id": str(facts.assistant_id) if facts.assistant_id else None},
        "phone_number": {"id": str(facts.number_id) if facts.number_id else None,
                         "number": facts.number, "name": facts.number_name},
        "customer": {"number": facts.caller},
    })
    return message


def _encoded(message: dict[str, Any]) -> bytes:
    return json.dumps({"message": message}, separators=(",", ":"),
                      ensure_ascii=False).encode()


def assistant_request_body(facts: CallFacts, at: datetime) -> bytes:
    return _encoded(_envelope(ASSISTANT_REQUEST, at, facts, "ringing"))


def status_update_body(facts: CallFacts, record: CallRecord, at: datetime) -> bytes:
    """``in-progress`` while the record is open; once it is closed, ``ended`` or (a failed
    record) ``ended-with-error`` with ``error``, and the end fields."""
    if record.ended_at is None:
        return _encoded(_envelope(STATUS_UPDATE, at, facts, "in-progress"))
    failed = record.status is CallStatus.FAILED
    message = _envelope(STATUS_UPDATE, at, facts, "ended-with-error" if failed else "ended")
    message["end_reason"] = str(record.end_reason) if record.end_reason else None
    message["started_at"] = iso_ms(record.started_at) if record.started_at else None
    message["ended_at"] = iso_ms(record.ended_at)
    message["duration_seconds"] = record.duration_seconds
    if failed:
        message["error"] = record.error or (str(record.end_reason) if record.end_reason
                                            else "error")
    return _encoded(message)


def facts_of(body: bytes | str) -> CallFacts | None:
    """The call facts back out of an event body (a restart closes a call whose facts only
    its stored events still know)."""
    try:
        message = json.loads(body)["message"]
        call, number = message["call"], message["phone_number"]
        known = {"type", "timestamp", "call", "phone_number", "customer", "end_reason",
                 "started_at", "ended_at", "duration_seconds", "error"}
        return CallFacts(
            call_id=uuid.UUID(call["id"]),
            number_id=uuid.UUID(number["id"]) if number.get("id") else None,
            number=str(number.get("number", "")), number_name=str(number.get("name", "")),
            caller=str(message.get("customer", {}).get("number", "")),
            assistant_id=uuid.UUID(call["assistant_id"]) if call.get("assistant_id") else None,
            call_type=str(call.get("type", "inbound_phone_call")),
            extras={k: v for k, v in message.items() if k not in known})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass(frozen=True)
class AssistantAsk:
    """An ``assistant-request`` to send for a held INVITE (SIP thread -> asyncio side)."""

    call_id: uuid.UUID
    target: WebhookTarget
    facts: CallFacts
    at: datetime


@dataclass(frozen=True)
class StatusEvent:
    """A ``status-update`` to write to the outbox with a call-record change."""

    facts: CallFacts
    target: WebhookTarget
    at: datetime


def new_delivery(call_id: uuid.UUID, target_url: str, assistant_id: uuid.UUID | None,
                 body: bytes, at: datetime, retry_hours: float,
                 event: str = STATUS_UPDATE) -> WebhookDelivery:
    """A new outbox entry, due at once."""
    return WebhookDelivery(
        id=uuid.uuid4(), call_id=call_id, event=event, url=target_url,
        assistant_id=assistant_id, body=body.decode(), status=DeliveryStatus.PENDING,
        attempts=0, next_attempt_at=at, expires_at=expires(at, retry_hours), last_error=None,
        created_at=at, updated_at=at)


def restart_ended(record: CallRecord, last: WebhookDelivery, at: datetime,
                  retry_hours: float) -> WebhookDelivery | None:
    """The ``ended-with-error`` event of a call a restart closed, sent where the call's
    last event went (``ports.EndedEvent``)."""
    facts = facts_of(last.body) if last.event == STATUS_UPDATE else None
    if facts is None:
        return None
    return new_delivery(record.id, last.url, last.assistant_id,
                        status_update_body(facts, record, at), at, retry_hours)


# ---- replies to assistant-request ------------------------------------------------------------


class ReplyKind(enum.StrEnum):
    """How an ``assistant-request`` was answered: also the metric's label."""

    SAVED = "saved"  # {} (or only extra fields): the saved assistant
    ASSISTANT = "assistant"  # {"assistant_id": ...}
    REFUSED = "refused"  # {"error": ...}
    TIMEOUT = "timeout"  # no answer in time: the saved assistant
    HTTP_ERROR = "http_error"  # non-2xx, or no connection: the saved assistant
    INVALID = "invalid"  # unparsable or wrong types: the saved assistant
    UNKNOWN_ASSISTANT = "unknown_assistant"  # names an assistant the router does not have


@dataclass(frozen=True)
class AssistantReply:
    kind: ReplyKind
    assistant_id: uuid.UUID | None = None
    max_duration_seconds: int | None = None
    error: str | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    detail: str = ""  # why a fallback was taken, for the log

    @property
    def falls_back(self) -> bool:
        return self.kind in (ReplyKind.TIMEOUT, ReplyKind.HTTP_ERROR, ReplyKind.INVALID,
                             ReplyKind.UNKNOWN_ASSISTANT)


def parse_reply(status: int, body: bytes) -> AssistantReply:
    if not 200 <= status < 300:
        return AssistantReply(ReplyKind.HTTP_ERROR, detail=f"HTTP {status}")
    if not body.strip():
        return AssistantReply(ReplyKind.SAVED)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return AssistantReply(ReplyKind.INVALID, detail="the reply is not JSON")
    if not isinstance(data, dict):
        return AssistantReply(ReplyKind.INVALID, detail="the reply is not a JSON object")
    extras = {k: v for k, v in data.items() if k not in _REPLY_FIELDS}
    error = data.get("error")
    if error is not None:
        if not isinstance(error, str) or not error.strip():
            return AssistantReply(ReplyKind.INVALID, detail="error must be a non-empty string")
        return AssistantReply(ReplyKind.REFUSED, error=error.strip(), extras=extras)
    limit = data.get("max_duration_seconds")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float)
                              or not 0 < limit <= MAX_DURATION_LIMIT or math.isnan(limit)):
        return AssistantReply(ReplyKind.INVALID,
                              detail=f"max_duration_seconds must be 1..{MAX_DURATION_LIMIT}")
    seconds = None if limit is None else max(1, int(limit))
    raw_id = data.get("assistant_id", data.get("assistantId"))
    if raw_id is None:
        return AssistantReply(ReplyKind.SAVED, max_duration_seconds=seconds, extras=extras)
    try:
        assistant_id = uuid.UUID(str(raw_id))
    except ValueError:
        return AssistantReply(ReplyKind.INVALID, detail="assistant_id is not a UUID")
    return AssistantReply(ReplyKind.ASSISTANT, assistant_id, seconds, extras=extras)


def reason_header(text: str) -> str:
    """An RFC 3326 ``Reason`` header value carrying ``text`` safely (one line, quoted)."""
    printable = "".join(ch if ch.isprintable() else " " for ch in text)[:MAX_REFUSAL_TEXT]
    quoted = printable.replace("\\", "\\\\").replace('"', '\\"')
    return f'SIP ;cause=603 ;text="{quoted}"'


# ---- URL safety ---------------------------------------------------------------------------------

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a webhook URL at all (None: it can, subject to its addresses)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "must name a host"
    if parts.username or parts.password:
        return "must not carry credentials (use webhook_secret)"
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "must not contain spaces or control characters"
    return None


def literal_address(url: str) -> Address | None:
    host = urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def address_problem(address: Address, allow_private: bool) -> str | None:
    """Loopback and public addresses are fine; link-local never (cloud metadata lives
    there), other private, shared or reserved ranges only with ``allow_private``."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_link_local:
        return f"{address} is link-local (refused always)"
    if address.is_loopback:
        return None
    if address.is_multicast or address.is_unspecified:
        return f"{address} is not a unicast destination"
    if (address.is_private or address.is_reserved or not address.is_global) and \
            not allow_private:
        return f"{address} is a private address (set webhooks.allow_private)"
    return None


def destination_problem(url: str, allow_private: bool) -> str | None:
    """``url_problem``, then the address check when the host is an IP literal (a name is
    checked again at each delivery, against what it resolves to)."""
    problem = url_problem(url)
    if problem is not None:
        return problem
    address = literal_address(url)
    return None if address is None else address_problem(address, allow_private)


def destination_key(url: str) -> str:
    """What ``bounded concurrency per destination`` counts by: scheme, host and port."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"


# ---- retries --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    first: float = 1.0  # seconds before the second attempt (before jitter)
    cap: float = 600.0  # never more than this between attempts (Retry-After aside)
    retry_after_cap: float = 3600.0  # a receiver's Retry-After is honoured up to this

    def delay(self, attempts: int, jitter: float, retry_after: float | None = None) -> float:
        """Seconds until the next attempt after ``attempts`` failed ones; ``jitter`` in
        [0, 1) spreads retries over the upper half of the exponential step."""
        step = min(self.cap, self.first * float(2 ** min(max(0, attempts - 1), 30)))
        wait = step * (0.5 + jitter / 2)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.retry_after_cap))
        return wait


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """A ``Retry-After`` header: delta seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


def expires(created: datetime, retry_hours: float) -> datetime:
    return created + timedelta(hours=retry_hours)
