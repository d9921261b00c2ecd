"""The Protocols the service and the API depend on.

One seam per external system: the store (SQLite, or the in-memory fake for
tests) and the SIP engine (pjsua2, or a fake SIP side for tests). Both
implementations of a seam pass the same contract tests.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from callrouter.domain.models import (
    ApiKey,
    Assistant,
    CallRecord,
    CallStatus,
    DeliveryStatus,
    PhoneNumber,
    Trunk,
    WebhookDelivery,
)
from callrouter.domain.routetable import FeedChange
from callrouter.domain.session import Command, DialCustomer, Event, Refused, Request
from callrouter.domain.trunknets import TrunkNetwork
from callrouter.domain.webhooks import AssistantReply


@dataclass(frozen=True)
class CallQuery:
    limit: int = 100
    offset: int = 0
    status: CallStatus | None = None
    start_date: datetime | None = None
    end_date: datetime | None = None


# One number as the route table's full rebuild reads it: (E.164, number id, assistant id,
# is_active), ids as UUID text (see ``domain.routetable.RouteTableBuilder.add_rows``).
RouteRow = tuple[str, str, str | None, bool]

# What ``close_open_calls`` asks about each call it closes: given the closed record and the
# call's last outbox event, the ``ended`` event to add in the same transaction (or None).
EndedEvent = Callable[[CallRecord, WebhookDelivery], WebhookDelivery | None]


@dataclass(frozen=True)
class NumberQuery:
    """A page of the number table in ``phone_number`` (text) order: numbers starting with
    ``prefix``, after the number ``after`` (keyset paging), skipping ``offset``."""

    limit: int = 1000
    offset: int = 0
    prefix: str = ""
    after: str = ""


class Store(Protocol):
    """Everything the router keeps. All methods may raise ``errors.StoreError``."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> float:
        """Round-trip a trivial query; returns its latency in seconds."""
        ...

    # numbers: create/update raise Conflict on a duplicate E.164 number
    async def list_numbers(self) -> Sequence[PhoneNumber]: ...
    async def get_number(self, number_id: uuid.UUID) -> PhoneNumber | None: ...
    async def create_number(self, number: PhoneNumber) -> PhoneNumber: ...
    async def update_number(self, number: PhoneNumber) -> PhoneNumber: ...
    async def delete_number(self, number_id: uuid.UUID) -> bool: ...
    async def page_numbers(self, query: NumberQuery) -> Sequence[PhoneNumber]: ...
    async def existing_numbers(self, e164s: Sequence[str]) -> set[str]:
        """Which of ``e164s`` are registered already."""
        ...
    async def create_numbers(self, numbers: Sequence[PhoneNumber]) -> None:
        """All of ``numbers`` in one transaction, or none (``Conflict`` as create_number)."""
        ...
    async def route_rows(self, after: str, limit: int) -> Sequence[RouteRow]:
        """At most ``limit`` numbers after the number ``after`` in ``phone_number`` order
        (the route table's key order), as ``RouteRow``; one short read each."""
        ...

    # trunks: the password is passed and returned encrypted (bytes) or None
    async def list_trunks(self) -> Sequence[Trunk]: ...
    async def get_trunk(self, trunk_id: uuid.UUID) -> Trunk | None: ...
    async def create_trunk(self, trunk: Trunk, password_enc: bytes | None) -> Trunk: ...
    async def update_trunk(
        self, trunk: Trunk, password_enc: bytes | None, keep_password: bool
    ) -> Trunk: ...
    async def delete_trunk(self, trunk_id: uuid.UUID) -> bool: ...
    async def get_trunk_password(self, trunk_id: uuid.UUID) -> bytes | None: ...

    # assistants: the webhook secret is passed encrypted, like a trunk password, and
    # kept as it is unless ``keep_webhook_secret`` is False
    async def list_assistants(self) -> Sequence[Assistant]: ...
    async def get_assistant(self, assistant_id: uuid.UUID) -> Assistant | None: ...
    async def create_assistant(self, assistant: Assistant,
                               webhook_secret_enc: bytes | None = None) -> Assistant: ...
    async def update_assistant(self, assistant: Assistant,
                               webhook_secret_enc: bytes | None = None,
                               keep_webhook_secret: bool = True) -> Assistant: ...
    async def delete_assistant(self, assistant_id: uuid.UUID) -> bool: ...
    async def get_assistant_webhook_secret(self, assistant_id: uuid.UUID) -> bytes | None: ...

    # calls: written by the service as a call progresses; the webhook events that a change
    # causes are written to the outbox in the same transaction
    async def upsert_calls(self, records: Sequence[CallRecord],
                           deliveries: Sequence[WebhookDelivery] = ()) -> None: ...
    async def get_call(self, call_id: uuid.UUID) -> CallRecord | None: ...
    async def list_calls(self, query: CallQuery) -> tuple[Sequence[CallRecord], int]: ...
    async def close_open_calls(self, now: datetime, router: str,
                               ended: EndedEvent | None = None) -> int:
        """Close every call of ``router`` (``CallRecord.router``; records from before
        routers were named, ``""``, count as anyone's) still connecting/in-progress as
        failed/router_restart, ended at that router's last heartbeat (``now`` if none was
        written) but never before the call's own last update; ``updated_at`` becomes
        ``now``. Other routers' calls are left alone: they may still be running. With
        ``ended``, each closed call that has outbox events gets the event ``ended`` makes,
        in the same transaction."""
        ...

    # a router's last sign of life, so a crash does not count as call time; one per router
    async def heartbeat(self, at: datetime, router: str) -> None: ...

    async def delete_calls_before(self, before: datetime, limit: int) -> int:
        """Delete at most ``limit`` ended/failed calls created before ``before``, oldest
        first, in one transaction; returns how many (the retention prune's one batch)."""
        ...

    # the webhook outbox (status-update events), delivered at least once, in order per call
    async def due_deliveries(self, now: datetime, limit: int) -> Sequence[WebhookDelivery]:
        """Pending events due by ``now``, oldest first, at most one per call (the first
        pending one: a later event of a call waits for the earlier)."""
        ...
    async def next_delivery_at(self) -> datetime | None:
        """When the earliest pending event is due (None: nothing pending)."""
        ...
    async def claim_delivery(self, delivery: WebhookDelivery, until: datetime) -> bool:
        """Take a due event for one attempt: its next attempt becomes ``until`` if it is
        still pending and due when ``delivery`` was read (compare and set); False when
        someone (another router sharing the outbox) took or settled it first."""
        ...
    async def update_delivery(self, delivery: WebhookDelivery) -> None:
        """Store an attempt's outcome (status, attempts, next attempt, expiry, error)."""
        ...
    async def get_delivery(self, delivery_id: uuid.UUID) -> WebhookDelivery | None: ...
    async def list_deliveries(self, status: DeliveryStatus | None, limit: int,
                              offset: int) -> tuple[Sequence[WebhookDelivery], int]:
        """Newest first, and how many match in all."""
        ...
    async def count_deliveries(self, status: DeliveryStatus) -> int: ...
    async def delete_deliveries_before(self, before: datetime, limit: int) -> int:
        """Delete at most ``limit`` delivered or given-up events created before ``before``
        (never a pending one), oldest first, in one transaction; returns how many."""
        ...

    # API keys: only the hash is stored
    async def create_api_key(self, key: ApiKey, key_hash: bytes) -> ApiKey: ...
    async def find_api_key(self, key_hash: bytes) -> ApiKey | None: ...
    async def count_api_keys(self) -> int: ...

    # the trunk-password key's check value (the key encrypting a known text)
    async def key_check(self, candidate: bytes) -> bytes:
        """Keep ``candidate`` as the check value unless one is stored already; return
        the stored one (so the first router to start decides, as for migrations)."""
        ...

    async def claim(self, name: str) -> bool:
        """True for the first caller ever to claim ``name``, False for every later one
        (any process on the same database): a one-time step of several routers."""
        ...


# Route changes made by other routers sharing the database (PostgreSQL's LISTEN/NOTIFY).
OnRouteChanges = Callable[[Sequence[FeedChange] | None], Awaitable[None]]


@runtime_checkable
class RouteFeed(Protocol):
    """A store shared by several routers tells each of them what the others changed."""

    async def watch_routes(self, on_changes: OnRouteChanges) -> None:
        """Until cancelled: hand each batch of committed changes to ``on_changes``, in
        commit order, and ``None`` (reload the whole table) whenever changes may have
        been missed: after every (re)connection and for a bulk change."""
        ...


class RegistrationState(enum.StrEnum):
    REGISTERED = "registered"
    FAILED = "failed"
    UNREGISTERED = "unregistered"


@dataclass(frozen=True)
class RegistrationStatus:
    """Where a registration trunk's REGISTER stands (reported by the SIP side)."""

    state: RegistrationState
    code: int | None = None  # the last final response (408: no answer)
    expires_at: datetime | None = None  # when the binding lapses unless refreshed
    reason: str = ""


@dataclass(frozen=True)
class Registration:
    """A trunk the router registers with (``register: true``): REGISTER to ``registrar``
    (a SIP URI) for the address-of-record ``sip:username@domain``, with digest
    credentials, every ``expires`` seconds, advertising ``contact_user`` in its Contact."""

    trunk_id: uuid.UUID
    registrar: str
    domain: str
    username: str
    password: str
    expires: int
    contact_user: str
    transport: str = "udp"


@dataclass(frozen=True)
class InboundAuth:
    """INVITEs from the trunk's addresses must authenticate as this user (407, then 403)."""

    trunk_id: uuid.UUID
    username: str
    password: str


@dataclass(frozen=True)
class TrunkPolicy:
    """Everything the SIP side enforces for trunks, as a whole (``ProviderControl``)."""

    networks: tuple[TrunkNetwork, ...] = ()
    inbound_auth: tuple[InboundAuth, ...] = ()
    registrations: tuple[Registration, ...] = ()


class ProviderControl(Protocol):
    """What the trunk keeper (``providers.Providers``) asks of the SIP side."""

    def apply_trunks(self, policy: TrunkPolicy) -> None:
        """Replace the trunk allow-list and digest challenges at once (the next request
        sees them) and bring registrations in line (added, changed, removed: expires 0).
        Safe from any thread."""
        ...

    def registration(self, trunk_id: uuid.UUID) -> RegistrationStatus | None: ...

    def registration_statuses(self) -> list[RegistrationStatus]: ...


# ---- the SIP side ------------------------------------------------------------------
# The SIP adapter calls a CallHandler (the service) on the SIP thread for every new
# INVITE and every event on a bridged call; the handler answers with values and the
# adapter carries them out. The service reaches the SIP side through CallControl.


@dataclass(frozen=True)
class InboundInvite:
    sip_call_id: str
    request_uri: str
    to_header: str
    from_header: str
    source: str  # "ip:port" the INVITE came from
    received_at: float  # monotonic seconds
    trunk_id: uuid.UUID | None = None  # the trunk it came in on (None: static list only)
    via_registration: bool = False  # sent to the Contact of a trunk registration


@dataclass(frozen=True)
class OutboundCall:
    """API ``POST /calls/outbound``, resolved: dial ``customer`` (the destination through
    the number's trunk) and, once it answers, the first of ``targets`` (runtime URIs)."""

    destination: str  # E.164
    number: str  # E.164 of the number it is placed from
    number_id: uuid.UUID
    assistant_id: uuid.UUID
    trunk_id: uuid.UUID
    targets: tuple[str, ...]
    customer: DialCustomer


@dataclass(frozen=True)
class Rejected:
    code: int
    reason: str
    retry_after: int | None = None
    headers: tuple[tuple[str, str], ...] = ()  # e.g. Reason (RFC 3326) on a 603


@dataclass(frozen=True)
class Held:
    """The INVITE waits for an ``assistant-request`` reply: the caller hears ringing (180)
    until the decision comes back through ``CallControl.resume`` (``on_decided``)."""

    call_id: uuid.UUID


@dataclass(frozen=True)
class Reaction:
    """SIP commands for the adapter, and when the call next wants a TimerFired."""

    commands: tuple[Command, ...]
    deadline: float | None


@dataclass(frozen=True)
class Accepted:
    call_id: uuid.UUID
    runtime_headers: tuple[tuple[str, str], ...]
    reaction: Reaction


@dataclass(frozen=True)
class ResponseSent:
    """A response to a caller's INVITE that the engine took: pjsua2 accepted it without
    raising (pjsua2 cannot report when a response actually leaves; this is the closest
    point). pjsua's automatic 100 Trying is reported when pjsua hands the INVITE over."""

    code: int
    first: bool  # the router's first response to this INVITE after the 100 Trying
    since_invite: float  # seconds from the INVITE reaching the router to this response


@dataclass(frozen=True)
class Ruling:
    """The session's answer to a request: ``refused`` (and why), or None and what to do."""

    refused: Refused | None
    reaction: Reaction


class EngineEntry(enum.StrEnum):
    """Where the SIP engine called into the router: a bounded label for failures."""

    INCOMING_CALL = "incoming_call"  # a new INVITE (pjsua2 onIncomingCall)
    LEG_STATE = "leg_state"  # a leg's call state changed (onCallState)
    LEG_MEDIA = "leg_media"  # a leg's media changed (onCallMediaState)
    LEG_DTMF = "leg_dtmf"  # a digit from the caller, forwarded on the SIP thread
    CALL_EVENT = "call_event"  # the handler working on a leg event or a timer
    CONTROL = "control"  # an API command carried to the SIP thread
    TASK = "task"  # any other work queued for the SIP thread


class CallHandler(Protocol):
    """What the SIP adapter asks of the service, on the SIP thread."""

    def on_invite(self, invite: InboundInvite) -> Accepted | Rejected | Held: ...

    def on_decided(self, call_id: uuid.UUID, reply: AssistantReply,
                   now: float) -> Accepted | Rejected | None:
        """The ``assistant-request`` reply for a held INVITE (None: it is gone already)."""
        ...

    def on_held_ended(self, call_id: uuid.UUID, now: float) -> None:
        """The caller of a held INVITE gave up (CANCEL) before the decision."""
        ...

    def on_outbound(self, call: OutboundCall, now: float) -> Accepted | Rejected:
        """An outbound call to start (capacity and drain apply as to an INVITE)."""
        ...

    def on_dialled(self, call_id: uuid.UUID, sip_call_id: str) -> None:
        """An outbound call's INVITE to its customer left with this Call-ID."""
        ...
    def on_event(self, call_id: uuid.UUID, event: Event, now: float) -> Reaction: ...
    def on_request(self, call_id: uuid.UUID, request: Request, now: float) -> Ruling: ...

    def on_engine_failure(self, where: EngineEntry, call_id: uuid.UUID | None, error: str,
                          now: float) -> Reaction:
        """Something raised at ``where``: count it and end the call (if any) as failed."""
        ...

    def on_released(self, call_id: uuid.UUID) -> None:
        """The adapter let go of the call: every leg has ended."""
        ...

    def on_response_sent(self, sent: ResponseSent) -> None:
        """The engine took a response to a caller's INVITE (see ``ResponseSent``)."""
        ...


@dataclass(frozen=True)
class EngineStatus:
    running: bool
    max_calls: int  # engine call slots (pjsua calls)
    calls_in_use: int
    assertions: int  # pjlib assertions logged and survived (NDEBUG build)
    guard: dict[str, int]  # guard module counters
    version: str
    # The packet relay between bridged legs (scripts/engine/callrouter_relay.hpp): "pairs"
    # relayed now, and packet counts so far ("rtp", "rtcp", "dropped", "dtmf_events").
    media: dict[str, int] = field(default_factory=dict)


class CallControl(Protocol):
    """What the service asks of the SIP side; safe to call from any thread."""

    def submit(self, call_id: uuid.UUID, request: Request) -> Future[Refused | None]:
        """Hand ``request`` to the call's session on the SIP thread. The future holds its
        verdict: None when accepted, ``Refused`` when the call's state refuses it (or the
        call has gone). Cancelling the future before the SIP thread takes it up means the
        request is never acted on."""
        ...

    def place(self, call: OutboundCall) -> Future[Accepted | Rejected]:
        """Start an outbound call on the SIP thread; the future holds the handler's answer
        (``Accepted``: the customer is being dialled)."""
        ...

    def status(self) -> EngineStatus: ...

    def resume(self, call_id: uuid.UUID, reply: AssistantReply) -> None:
        """Hand the ``assistant-request`` reply for a held INVITE to the SIP thread."""
        ...


# ---- call control from the API ------------------------------------------------------


@dataclass(frozen=True)
class EndCall:
    """API ``{"type": "end-call"}``."""


@dataclass(frozen=True)
class TransferCall:
    """API ``{"type": "transfer", ...}``; ``destination`` is a SIP URI or an E.164 number."""

    destination: str
    message: str | None = None


ControlCommand = EndCall | TransferCall
