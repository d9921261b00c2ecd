"""The in-memory store: the fake beside ``SqliteStore`` for tests of the service and API.

How it works: plain dicts keyed by id. Every method runs without an ``await`` between
its check and its write, so on one event loop each call is atomic, like a SQLite
transaction. It enforces the schema's rules by hand (unique E.164 number, unique ids,
references from numbers to existing assistants/trunks, ``RESTRICT`` on delete) and
raises the same errors (``store.rules``), so the shared contract suite passes on both.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from callrouter.domain.models import (
    ApiKey,
    Assistant,
    CallRecord,
    DeliveryStatus,
    PhoneNumber,
    Trunk,
    WebhookDelivery,
)
from callrouter.errors import Conflict
from callrouter.ports import CallQuery, EndedEvent, NumberQuery, RouteRow
from callrouter.store import rules


class MemoryStore:
    """``ports.Store`` in dicts; ``open``/``close`` only mark it usable."""

    def __init__(self) -> None:
        self._numbers: dict[uuid.UUID, PhoneNumber] = {}
        self._trunks: dict[uuid.UUID, tuple[Trunk, bytes | None]] = {}
        self._assistants: dict[uuid.UUID, Assistant] = {}
        self._calls: dict[uuid.UUID, CallRecord] = {}
        self._keys: dict[bytes, ApiKey] = {}
        self._heartbeats: dict[str, datetime] = {}
        self._key_check: bytes | None = None
        self._claims: set[str] = set()
        self._webhook_secrets: dict[uuid.UUID, bytes] = {}
        self._outbox: dict[uuid.UUID, WebhookDelivery] = {}  # insertion order is seq order

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> float:
        return 0.0

    # -- numbers ---------------------------------------------------------------------

    async def list_numbers(self) -> Sequence[PhoneNumber]:
        return sorted(self._numbers.values(), key=lambda n: (n.created_at, str(n.id)))

    async def get_number(self, number_id: uuid.UUID) -> PhoneNumber | None:
        return self._numbers.get(number_id)

    async def create_number(self, number: PhoneNumber) -> PhoneNumber:
        if number.id in self._numbers:
            raise rules.duplicate_id()
        self._check_number(number)
        self._numbers[number.id] = number
        return number

    async def update_number(self, number: PhoneNumber) -> PhoneNumber:
        old = self._numbers.get(number.id)
        if old is None:
            raise rules.not_found("number")
        self._check_number(number)
        self._numbers[number.id] = replace(number, created_at=old.created_at)
        return number

    async def delete_number(self, number_id: uuid.UUID) -> bool:
        return self._numbers.pop(number_id, None) is not None

    async def page_numbers(self, query: NumberQuery) -> Sequence[PhoneNumber]:
        found = sorted((n for n in self._numbers.values()
                        if n.phone_number > query.after
                        and n.phone_number.startswith(query.prefix)),
                       key=lambda n: n.phone_number)
        return found[query.offset:query.offset + query.limit]

    async def existing_numbers(self, e164s: Sequence[str]) -> set[str]:
        taken = {n.phone_number for n in self._numbers.values()}
        return {e for e in e164s if e in taken}

    async def create_numbers(self, numbers: Sequence[PhoneNumber]) -> None:
        before = dict(self._numbers)
        try:
            for number in numbers:
                await self.create_number(number)
        except BaseException:
            self._numbers = before  # all or nothing, like the SQLite transaction
            raise

    async def route_rows(self, after: str, limit: int) -> Sequence[RouteRow]:
        found = sorted((n for n in self._numbers.values() if n.phone_number > after),
                       key=lambda n: n.phone_number)[:limit]
        return [(n.phone_number, str(n.id), None if n.assistant_id is None
                 else str(n.assistant_id), n.is_active) for n in found]

    def _check_number(self, number: PhoneNumber) -> None:
        if any(other.phone_number == number.phone_number and other.id != number.id
               for other in self._numbers.values()):
            raise rules.duplicate_number()
        dangling_assistant = (number.assistant_id is not None
                              and number.assistant_id not in self._assistants)
        dangling_trunk = (number.transfer_trunk_id is not None
                          and number.transfer_trunk_id not in self._trunks)
        if dangling_assistant or dangling_trunk:
            raise Conflict(rules.IN_USE)

    def _numbers_using(self, *, assistant: uuid.UUID | None = None,
                       trunk: uuid.UUID | None = None) -> bool:
        return any((assistant is not None and n.assistant_id == assistant)
                   or (trunk is not None and n.transfer_trunk_id == trunk)
                   for n in self._numbers.values())

    # -- trunks ----------------------------------------------------------------------

    async def list_trunks(self) -> Sequence[Trunk]:
        trunks = (t for t, _ in self._trunks.values())
        return sorted(trunks, key=lambda t: (t.created_at, str(t.id)))

    async def get_trunk(self, trunk_id: uuid.UUID) -> Trunk | None:
        found = self._trunks.get(trunk_id)
        return None if found is None else found[0]

    async def create_trunk(self, trunk: Trunk, password_enc: bytes | None) -> Trunk:
        if trunk.id in self._trunks:
            raise rules.duplicate_id()
        return self._put_trunk(trunk, password_enc)

    async def update_trunk(
        self, trunk: Trunk, password_enc: bytes | None, keep_password: bool
    ) -> Trunk:
        old = self._trunks.get(trunk.id)
        if old is None:
            raise rules.not_found("trunk")
        password = old[1] if keep_password else password_enc
        return self._put_trunk(replace(trunk, created_at=old[0].created_at), password)

    async def delete_trunk(self, trunk_id: uuid.UUID) -> bool:
        if self._numbers_using(trunk=trunk_id):
            raise Conflict(rules.TRUNK_IN_USE)
        return self._trunks.pop(trunk_id, None) is not None

    async def get_trunk_password(self, trunk_id: uuid.UUID) -> bytes | None:
        found = self._trunks.get(trunk_id)
        return None if found is None else found[1]

    def _put_trunk(self, trunk: Trunk, password_enc: bytes | None) -> Trunk:
        stored = replace(trunk, has_password=password_enc is not None)
        self._trunks[trunk.id] = (stored, password_enc)
        return stored

    # -- assistants ------------------------------------------------------------------

    async def list_assistants(self) -> Sequence[Assistant]:
        return sorted(self._assistants.values(), key=lambda a: (a.created_at, str(a.id)))

    async def get_assistant(self, assistant_id: uuid.UUID) -> Assistant | None:
        return self._assistants.get(assistant_id)

    async def create_assistant(self, assistant: Assistant,
                               webhook_secret_enc: bytes | None = None) -> Assistant:
        if assistant.id in self._assistants:
            raise rules.duplicate_id()
        stored = replace(assistant, has_webhook_secret=webhook_secret_enc is not None)
        self._assistants[assistant.id] = stored
        if webhook_secret_enc is not None:
            self._webhook_secrets[assistant.id] = webhook_secret_enc
        return stored

    async def update_assistant(self, assistant: Assistant,
                               webhook_secret_enc: bytes | None = None,
                               keep_webhook_secret: bool = True) -> Assistant:
        old = self._assistants.get(assistant.id)
        if old is None:
            raise rules.not_found("assistant")
        if not keep_webhook_secret:
            self._webhook_secrets.pop(assistant.id, None)
            if webhook_secret_enc is not None:
                self._webhook_secrets[assistant.id] = webhook_secret_enc
        stored = replace(assistant, created_at=old.created_at,
                         has_webhook_secret=assistant.id in self._webhook_secrets)
        self._assistants[assistant.id] = stored
        return stored

    async def delete_assistant(self, assistant_id: uuid.UUID) -> bool:
        if self._numbers_using(assistant=assistant_id):
            raise Conflict(rules.ASSISTANT_IN_USE)
        self._webhook_secrets.pop(assistant_id, None)
        return self._assistants.pop(assistant_id, None) is not None

    async def get_assistant_webhook_secret(self, assistant_id: uuid.UUID) -> bytes | None:
        return self._webhook_secrets.get(assistant_id)

    # -- calls -----------------------------------------------------------------------

    async def upsert_calls(self, records: Sequence[CallRecord],
                           deliveries: Sequence[WebhookDelivery] = ()) -> None:
        if any(d.id in self._outbox for d in deliveries):
            raise rules.duplicate_id()
        for record in records:
            old = self._calls.get(record.id)
            created = record.created_at if old is None else old.created_at
            self._calls[record.id] = replace(record, created_at=created)
        for delivery in deliveries:
            self._outbox[delivery.id] = delivery

    async def get_call(self, call_id: uuid.UUID) -> CallRecord | None:
        return self._calls.get(call_id)

    async def list_calls(self, query: CallQuery) -> tuple[Sequence[CallRecord], int]:
        matching = rules.newest_first([c for c in self._calls.values() if _matches(c, query)])
        return matching[query.offset:query.offset + query.limit], len(matching)

    async def close_open_calls(self, now: datetime, router: str,
                               ended: EndedEvent | None = None) -> int:
        open_ids = [i for i, c in self._calls.items()
                    if c.status in rules.OPEN_STATUSES and c.router in (router, "")]
        last_alive = self._heartbeats.get(router, now)
        events = []
        for call_id in open_ids:
            closed = self._calls[call_id] = rules.closed_after_restart(
                self._calls[call_id], last_alive, now)
            last = [d for d in self._outbox.values() if d.call_id == call_id][-1:]
            event = ended(closed, last[0]) if ended is not None and last else None
            if event is not None:
                events.append(event)
        self._outbox.update((e.id, e) for e in events)
        return len(open_ids)

    async def heartbeat(self, at: datetime, router: str) -> None:
        self._heartbeats[router] = at

    async def delete_calls_before(self, before: datetime, limit: int) -> int:
        expired = [c for c in self._calls.values()
                   if c.created_at < before and c.status not in rules.OPEN_STATUSES]
        for record in rules.newest_first(expired)[::-1][:limit]:
            del self._calls[record.id]
        return min(len(expired), limit)

    # -- the webhook outbox ----------------------------------------------------------

    async def due_deliveries(self, now: datetime, limit: int) -> Sequence[WebhookDelivery]:
        due, waiting = [], set()
        for delivery in self._outbox.values():
            if delivery.status is not DeliveryStatus.PENDING:
                continue
            first_of_call = delivery.call_id is None or delivery.call_id not in waiting
            if delivery.call_id is not None:
                waiting.add(delivery.call_id)
            if first_of_call and delivery.next_attempt_at <= now:
                due.append(delivery)
        return due[:limit]

    async def next_delivery_at(self) -> datetime | None:
        return min((d.next_attempt_at for d in self._outbox.values()
                    if d.status is DeliveryStatus.PENDING), default=None)

    async def claim_delivery(self, delivery: WebhookDelivery, until: datetime) -> bool:
        old = self._outbox.get(delivery.id)
        if old is None or old.status is not DeliveryStatus.PENDING or \
                old.next_attempt_at != delivery.next_attempt_at:
            return False
        self._outbox[delivery.id] = replace(old, next_attempt_at=until)
        return True

    async def update_delivery(self, delivery: WebhookDelivery) -> None:
        old = self._outbox.get(delivery.id)
        if old is None:
            raise rules.not_found("delivery")
        self._outbox[delivery.id] = replace(
            old, status=delivery.status, attempts=delivery.attempts,
            next_attempt_at=delivery.next_attempt_at, expires_at=delivery.expires_at,
            last_error=delivery.last_error, updated_at=delivery.updated_at)

    async def get_delivery(self, delivery_id: uuid.UUID) -> WebhookDelivery | None:
        return self._outbox.get(delivery_id)

    async def list_deliveries(self, status: DeliveryStatus | None, limit: int,
                              offset: int) -> tuple[Sequence[WebhookDelivery], int]:
        matching = [d for d in self._outbox.values() if status is None or d.status is status]
        matching.reverse()
        return matching[offset:offset + limit], len(matching)

    async def count_deliveries(self, status: DeliveryStatus) -> int:
        return sum(1 for d in self._outbox.values() if d.status is status)

    async def delete_deliveries_before(self, before: datetime, limit: int) -> int:
        old = [d.id for d in self._outbox.values()
               if d.created_at < before and d.status is not DeliveryStatus.PENDING][:limit]
        for delivery_id in old:
            del self._outbox[delivery_id]
        return len(old)

    # -- API keys --------------------------------------------------------------------

    async def create_api_key(self, key: ApiKey, key_hash: bytes) -> ApiKey:
        if key_hash in self._keys or any(k.id == key.id for k in self._keys.values()):
            raise rules.duplicate_id()
        self._keys[key_hash] = key
        return key

    async def find_api_key(self, key_hash: bytes) -> ApiKey | None:
        return self._keys.get(key_hash)

    async def count_api_keys(self) -> int:
        return len(self._keys)

    async def claim(self, name: str) -> bool:
        if name in self._claims:
            return False
        self._claims.add(name)
        return True

    async def key_check(self, candidate: bytes) -> bytes:
        if self._key_check is None:
            self._key_check = candidate
        return self._key_check


def _matches(call: CallRecord, query: CallQuery) -> bool:
    return ((query.status is None or call.status == query.status)
            and (query.start_date is None or call.created_at >= query.start_date)
            and (query.end_date is None or call.created_at <= query.end_date))
