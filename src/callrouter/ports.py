"""The Protocols the service and the API depend on.

One seam per external system: the store (SQLite, or the in-memory fake for
tests) and the SIP engine (pjsua2, or a fake SIP side for tests). Both
implementations of a seam pass the same contract tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from callrouter.domain.models import (
    ApiKey,
    Assistant,
    CallRecord,
    CallStatus,
    PhoneNumber,
    Trunk,
)
from callrouter.domain.session import Command, Event


@dataclass(frozen=True)
class CallQuery:
    limit: int = 100
    offset: int = 0
    status: CallStatus | None = None
    start_date: datetime | None = None
    end_date: datetime | None = None


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

    # trunks: the password is passed and returned encrypted (bytes) or None
    async def list_trunks(self) -> Sequence[Trunk]: ...
    async def get_trunk(self, trunk_id: uuid.UUID) -> Trunk | None: ...
    async def create_trunk(self, trunk: Trunk, password_enc: bytes | None) -> Trunk: ...
    async def update_trunk(
        self, trunk: Trunk, password_enc: bytes | None, keep_password: bool
    ) -> Trunk: ...
    async def delete_trunk(self, trunk_id: uuid.UUID) -> bool: ...
    async def get_trunk_password(self, trunk_id: uuid.UUID) -> bytes | None: ...

    # assistants
    async def list_assistants(self) -> Sequence[Assistant]: ...
    async def get_assistant(self, assistant_id: uuid.UUID) -> Assistant | None: ...
    async def create_assistant(self, assistant: Assistant) -> Assistant: ...
    async def update_assistant(self, assistant: Assistant) -> Assistant: ...
    async def delete_assistant(self, assistant_id: uuid.UUID) -> bool: ...

    # calls: written by the service as a call progresses
    async def upsert_calls(self, records: Sequence[CallRecord]) -> None: ...
    async def get_call(self, call_id: uuid.UUID) -> CallRecord | None: ...
    async def list_calls(self, query: CallQuery) -> tuple[Sequence[CallRecord], int]: ...
    async def close_open_calls(self, now: datetime) -> int:
        """Close every call still connecting/in-progress as failed/router_restart."""
        ...

    # API keys: only the hash is stored
    async def create_api_key(self, key: ApiKey, key_hash: bytes) -> ApiKey: ...
    async def find_api_key(self, key_hash: bytes) -> ApiKey | None: ...
    async def count_api_keys(self) -> int: ...


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


@dataclass(frozen=True)
class Rejected:
    code: int
    reason: str
    retry_after: int | None = None


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


class CallHandler(Protocol):
    def on_invite(self, invite: InboundInvite) -> Accepted | Rejected: ...
    def on_event(self, call_id: uuid.UUID, event: Event, now: float) -> Reaction: ...


@dataclass(frozen=True)
class EngineStatus:
    running: bool
    max_calls: int  # engine call slots (pjsua calls)
    calls_in_use: int
    guard: dict[str, int]  # guard module counters
    version: str


class CallControl(Protocol):
    """What the service asks of the SIP side; safe to call from any thread."""

    def deliver(self, call_id: uuid.UUID, event: Event) -> None:
        """Hand ``event`` to the call on the SIP thread (ignored if the call is gone)."""
        ...

    def status(self) -> EngineStatus: ...
