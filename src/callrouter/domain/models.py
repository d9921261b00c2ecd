"""The router's stored objects, as frozen dataclasses.

These are what the store returns and the API renders; the routing snapshot
(``domain.routing.RouteTable``) is built from them. Times are timezone-aware UTC
``datetime`` values; ids are ``uuid.UUID``.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class PhoneNumber:
    id: uuid.UUID
    phone_number: str  # always E.164
    name: str
    assistant_id: uuid.UUID | None
    transfer_trunk_id: uuid.UUID | None
    is_active: bool
    created_at: datetime
    updated_at: datetime


class TrunkTransport(enum.StrEnum):
    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"


@dataclass(frozen=True)
class Trunk:
    """A provider, both ways: where outbound legs go (``host``/``port``/``transport``; an
    empty ``host`` is an inbound-only trunk), the addresses its calls come from
    (``inbound_addresses``: IPs, CIDRs or host names), the caller id of outbound legs,
    digest credentials, and whether the router registers with it (``register``) or
    challenges its INVITEs (``inbound_auth``)."""

    id: uuid.UUID
    name: str
    host: str
    port: int
    transport: TrunkTransport
    provider: str
    username: str | None
    has_password: bool  # the password itself never leaves the store decrypted unasked
    is_active: bool
    created_at: datetime
    updated_at: datetime
    inbound_addresses: tuple[str, ...] = ()
    outbound_number: str | None = None  # E.164 caller id on outbound legs
    register: bool = False
    register_expires: int = 300
    inbound_auth: bool = False

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def outbound_address(self) -> str | None:
        return self.address if self.host else None


@dataclass(frozen=True)
class Assistant:
    id: uuid.UUID
    name: str
    runtime_uri: str | None  # None: use the default runtime pool from config
    created_at: datetime
    updated_at: datetime
    webhook_url: str | None = None  # None: the account-level webhook (config), if any
    webhook_events: tuple[str, ...] = ()  # subset of domain.webhooks.EVENTS
    has_webhook_secret: bool = False  # the secret itself is stored encrypted, never shown


class CallStatus(enum.StrEnum):
    CONNECTING = "connecting"
    IN_PROGRESS = "in-progress"
    ENDED = "ended"
    FAILED = "failed"


class EndReason(enum.StrEnum):
    """Why a call ended: a closed set (``../shared/api.md``); also a metric label."""

    CALLER_HANGUP = "caller_hangup"
    ASSISTANT_HANGUP = "assistant_hangup"
    TRANSFERRED = "transferred"
    REJECTED_UNKNOWN_NUMBER = "rejected_unknown_number"
    REJECTED_UNASSIGNED = "rejected_unassigned"
    REJECTED_OVER_CAPACITY = "rejected_over_capacity"
    REJECTED_DRAINING = "rejected_draining"
    REJECTED_BY_WEBHOOK = "rejected_by_webhook"  # assistant-request answered {"error": ...}
    RUNTIME_UNAVAILABLE = "runtime_unavailable"
    CALLER_CANCELLED = "caller_cancelled"
    CUSTOMER_BUSY = "customer_busy"  # an outbound call's destination: 486, 600, 603
    CUSTOMER_DID_NOT_ANSWER = "customer_did_not_answer"  # 408, 480, 487, ring timeout
    CUSTOMER_UNREACHABLE = "customer_unreachable"  # any other refusal
    MAX_DURATION = "max_duration"
    ENDED_BY_API = "ended_by_api"
    ROUTER_SHUTDOWN = "router_shutdown"
    ROUTER_RESTART = "router_restart"
    ERROR = "error"


@dataclass(frozen=True)
class CallRecord:
    id: uuid.UUID
    status: CallStatus
    caller_phone: str
    assistant_phone: str  # the dialled number, E.164 (or the raw user part if unparsable)
    number_id: uuid.UUID | None
    assistant_id: uuid.UUID | None
    sip_call_id: str
    started_at: datetime | None  # answer time
    ended_at: datetime | None
    end_reason: EndReason | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    direction: str = "inbound"
    trunk_id: uuid.UUID | None = None  # the trunk the call came in on (or went out through)
    router: str = ""  # the node name of the router that handled it (config node.name)

    @property
    def duration_seconds(self) -> int | None:
        if self.started_at is None:
            return 0 if self.ended_at is not None else None
        if self.ended_at is None:
            return None
        return int((self.ended_at - self.started_at).total_seconds())


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for its (next) attempt
    DELIVERED = "delivered"  # a 2xx was received
    FAILED = "failed"  # given up: a 4xx other than 429, or retries ran out


@dataclass(frozen=True)
class WebhookDelivery:
    """One event in the durable outbox (``status-update``): the exact body to sign and
    send, where, and how its delivery goes. ``id`` is the ``X-Webhook-Id``."""

    id: uuid.UUID
    call_id: uuid.UUID | None
    event: str
    url: str
    assistant_id: uuid.UUID | None  # whose webhook secret signs it (None: the account's)
    body: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime
    expires_at: datetime  # retried until then (webhooks.retry_hours), then given up
    last_error: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ApiKey:
    id: uuid.UUID
    name: str
    prefix: str  # first characters of the key, for operators to recognise it
    read_only: bool
    created_at: datetime
