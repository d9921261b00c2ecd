"""What the SQLite and the PostgreSQL store share: every query that is the same SQL on both.

How it works: ``SqlStore`` implements the ``ports.Store`` methods whose SQL both
databases speak, over three primitives each store provides: ``_read`` (queries in one
transaction), ``_change`` (one statement, rows affected), ``_writing`` (one write
transaction for several statements, ``Tx``) and the translation of its driver's errors.
Every statement here uses ``:name`` parameters with a dict (SQLite takes them as they
are; the PostgreSQL store rewrites them to ``$n`` once per statement). Rows are mapped by
``store.rows``. A store adds what differs: its connection, its migrations, bulk inserts
and lookups by many values, and spells ``GREATEST`` its own way (``_GREATEST``).

A method added to ``ports.Store`` whose SQL is portable belongs here, once; only SQL
that differs goes into the two adapters.
"""

from __future__ import annotations

import asyncio
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from callrouter.domain.models import (
    ApiKey,
    Assistant,
    CallRecord,
    CallStatus,
    DeliveryStatus,
    EndReason,
    PhoneNumber,
    Trunk,
    WebhookDelivery,
)
from callrouter.errors import StoreError
from callrouter.ports import CallQuery, EndedEvent, NumberQuery, RouteRow
from callrouter.store import rows, rules
from callrouter.store.rows import (
    ASSISTANT_COLS,
    CALL_COLS,
    DELIVERY_COLS,
    KEY_COLS,
    NUMBER_COLS,
    TRUNK_COLS,
    Row,
    insert_sql,
    select_sql,
    to_text,
    update_sql,
)

Params = Mapping[str, Any]
Query = tuple[str, Params]

_TRUNK_SELECT = select_sql("trunks", TRUNK_COLS, ", password_enc IS NOT NULL")
_ASSISTANT_SELECT = select_sql("assistants", ASSISTANT_COLS, ", webhook_secret_enc IS NOT NULL")
_DELIVERY_SELECT = select_sql("webhook_outbox", DELIVERY_COLS)
_INSERT_DELIVERY = insert_sql("webhook_outbox", DELIVERY_COLS)
_PENDING = DeliveryStatus.PENDING.value
_UPSERT_CALL = (insert_sql("calls", CALL_COLS)
                + f" ON CONFLICT (id) DO UPDATE SET {rows.assignments(CALL_COLS)}")
_BY_AGE = " ORDER BY created_at, id"

# Issue 11's columns, the same SQL in both stores' migrations (SQLite 5, PostgreSQL 3).
TRUNKS_BOTH_WAYS = (
    "ALTER TABLE trunks ADD COLUMN inbound_addresses TEXT NOT NULL DEFAULT '[]'",
    "ALTER TABLE trunks ADD COLUMN outbound_number TEXT",
    "ALTER TABLE trunks ADD COLUMN register INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE trunks ADD COLUMN register_expires INTEGER NOT NULL DEFAULT 300",
    "ALTER TABLE trunks ADD COLUMN inbound_auth INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE calls ADD COLUMN trunk_id TEXT",
)


def safe_url(url: str) -> str:
    """A database URL without its password, for messages and logs."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{user}{parts.hostname or 'localhost'}{port}{parts.path}"


def pending_migrations(current: int, migrations: Sequence[Sequence[str]],
                       where: str) -> Iterator[tuple[int, Sequence[str]]]:
    """The (version, statements) a database at schema ``current`` still needs; a schema
    newer than this router knows is refused (an older router must not write to it)."""
    if current > len(migrations):
        raise StoreError(f"the database {where} has schema {current}, newer than this "
                         f"router supports ({len(migrations)})")
    for version in range(current + 1, len(migrations) + 1):
        yield version, migrations[version - 1]


class Tx(Protocol):
    """Statements inside one write transaction (``SqlStore._writing``)."""

    async def fetch(self, sql: str, params: Params) -> list[Row]: ...
    async def execute_many(self, sql: str, params: Sequence[Params]) -> None: ...


class SqlStore(ABC):
    """The shared half of ``SqliteStore`` and ``PostgresStore`` (see the module doc)."""

    _GREATEST = "GREATEST"  # the larger of two values; SQLite says MAX

    # -- the primitives each store provides -------------------------------------------

    @abstractmethod
    async def _read(self, queries: Sequence[Query]) -> list[list[Row]]:
        """Run ``queries`` in one read transaction; the rows of each."""

    @abstractmethod
    async def _change(self, sql: str, params: Params, *, in_use: str = rules.IN_USE) -> int:
        """Run one writing statement in its own transaction; how many rows it touched.
        A broken reference raises ``Conflict(in_use)``."""

    @abstractmethod
    def _writing(self) -> AbstractAsyncContextManager[Tx]:
        """One write transaction for several statements: committed when the block ends,
        rolled back if it raises."""

    # -- built on them ---------------------------------------------------------------

    async def _fetch(self, sql: str, params: Params | None = None) -> list[Row]:
        return (await self._read([(sql, params or {})]))[0]

    async def _update_one(self, sql: str, params: Params, what: str) -> None:
        if await self._change(sql, params) == 0:
            raise rules.not_found(what)

    async def _one(self, sql: str, object_id: uuid.UUID) -> Row | None:
        found = await self._fetch(f"{sql} WHERE id = :id", {"id": str(object_id)})
        return found[0] if found else None

    async def _delete(self, table: str, object_id: uuid.UUID,
                      in_use: str = rules.IN_USE) -> bool:
        sql = f"DELETE FROM {table} WHERE id = :id"
        return await self._change(sql, {"id": str(object_id)}, in_use=in_use) > 0

    async def ping(self) -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._fetch("SELECT 1")
        return loop.time() - started

    # -- numbers ---------------------------------------------------------------------

    async def list_numbers(self) -> Sequence[PhoneNumber]:
        found = await self._fetch(select_sql("numbers", NUMBER_COLS) + _BY_AGE)
        return [rows.number_from_row(r) for r in found]

    async def get_number(self, number_id: uuid.UUID) -> PhoneNumber | None:
        row = await self._one(select_sql("numbers", NUMBER_COLS), number_id)
        return None if row is None else rows.number_from_row(row)

    async def create_number(self, number: PhoneNumber) -> PhoneNumber:
        await self._change(insert_sql("numbers", NUMBER_COLS), rows.number_to_row(number))
        return number

    async def update_number(self, number: PhoneNumber) -> PhoneNumber:
        sql = update_sql("numbers", NUMBER_COLS)
        await self._update_one(sql, rows.number_to_row(number), "number")
        return number

    async def delete_number(self, number_id: uuid.UUID) -> bool:
        return await self._delete("numbers", number_id)

    async def page_numbers(self, query: NumberQuery) -> Sequence[PhoneNumber]:
        # The phone_number UNIQUE index gives the order and the prefix range without a
        # sort. Every stored number is "+" and digits, so prefix + DEL bounds the range.
        high = query.prefix + "\x7f" if query.prefix else "\x7f"
        found = await self._fetch(
            select_sql("numbers", NUMBER_COLS) + " WHERE phone_number > :after AND "
            "phone_number >= :low AND phone_number < :high ORDER BY phone_number "
            "LIMIT :limit OFFSET :offset",
            {"after": query.after, "low": query.prefix, "high": high,
             "limit": query.limit, "offset": query.offset})
        return [rows.number_from_row(r) for r in found]

    async def route_rows(self, after: str, limit: int) -> Sequence[RouteRow]:
        found = await self._fetch(
            "SELECT phone_number, id, assistant_id, is_active FROM numbers "
            "WHERE phone_number > :after ORDER BY phone_number LIMIT :limit",
            {"after": after, "limit": limit})
        return [(r[0], r[1], r[2], bool(r[3])) for r in found]

    # -- trunks ----------------------------------------------------------------------

    async def list_trunks(self) -> Sequence[Trunk]:
        return [rows.trunk_from_row(r) for r in await self._fetch(_TRUNK_SELECT + _BY_AGE)]

    async def get_trunk(self, trunk_id: uuid.UUID) -> Trunk | None:
        row = await self._one(_TRUNK_SELECT, trunk_id)
        return None if row is None else rows.trunk_from_row(row)

    async def create_trunk(self, trunk: Trunk, password_enc: bytes | None) -> Trunk:
        sql = insert_sql("trunks", (*TRUNK_COLS, "password_enc"))
        await self._change(sql, {**rows.trunk_to_row(trunk), "password_enc": password_enc})
        return await self._must_get_trunk(trunk.id)

    async def update_trunk(
        self, trunk: Trunk, password_enc: bytes | None, keep_password: bool
    ) -> Trunk:
        cols = TRUNK_COLS if keep_password else (*TRUNK_COLS, "password_enc")
        params = {**rows.trunk_to_row(trunk), "password_enc": password_enc}
        await self._update_one(update_sql("trunks", cols), params, "trunk")
        return await self._must_get_trunk(trunk.id)

    async def delete_trunk(self, trunk_id: uuid.UUID) -> bool:
        return await self._delete("trunks", trunk_id, rules.TRUNK_IN_USE)

    async def get_trunk_password(self, trunk_id: uuid.UUID) -> bytes | None:
        row = await self._one("SELECT password_enc FROM trunks", trunk_id)
        return None if row is None or row[0] is None else bytes(row[0])

    async def _must_get_trunk(self, trunk_id: uuid.UUID) -> Trunk:
        trunk = await self.get_trunk(trunk_id)
        if trunk is None:
            raise rules.not_found("trunk")
        return trunk

    # -- assistants ------------------------------------------------------------------

    async def list_assistants(self) -> Sequence[Assistant]:
        found = await self._fetch(_ASSISTANT_SELECT + _BY_AGE)
        return [rows.assistant_from_row(r) for r in found]

    async def get_assistant(self, assistant_id: uuid.UUID) -> Assistant | None:
        row = await self._one(_ASSISTANT_SELECT, assistant_id)
        return None if row is None else rows.assistant_from_row(row)

    async def create_assistant(self, assistant: Assistant,
                               webhook_secret_enc: bytes | None = None) -> Assistant:
        sql = insert_sql("assistants", (*ASSISTANT_COLS, "webhook_secret_enc"))
        await self._change(sql, {**rows.assistant_to_row(assistant),
                                 "webhook_secret_enc": webhook_secret_enc})
        return replace(assistant, has_webhook_secret=webhook_secret_enc is not None)

    async def update_assistant(self, assistant: Assistant,
                               webhook_secret_enc: bytes | None = None,
                               keep_webhook_secret: bool = True) -> Assistant:
        cols = ASSISTANT_COLS if keep_webhook_secret else (*ASSISTANT_COLS,
                                                           "webhook_secret_enc")
        params = {**rows.assistant_to_row(assistant), "webhook_secret_enc": webhook_secret_enc}
        await self._update_one(update_sql("assistants", cols), params, "assistant")
        found = await self.get_assistant(assistant.id)
        if found is None:
            raise rules.not_found("assistant")
        return found

    async def delete_assistant(self, assistant_id: uuid.UUID) -> bool:
        return await self._delete("assistants", assistant_id, rules.ASSISTANT_IN_USE)

    async def get_assistant_webhook_secret(self, assistant_id: uuid.UUID) -> bytes | None:
        row = await self._one("SELECT webhook_secret_enc FROM assistants", assistant_id)
        return None if row is None or row[0] is None else bytes(row[0])

    # -- calls -----------------------------------------------------------------------

    async def upsert_calls(self, records: Sequence[CallRecord],
                           deliveries: Sequence[WebhookDelivery] = ()) -> None:
        async with self._writing() as tx:
            if records:
                await tx.execute_many(_UPSERT_CALL, [rows.call_to_row(r) for r in records])
            if deliveries:
                await tx.execute_many(_INSERT_DELIVERY,
                                      [rows.delivery_to_row(d) for d in deliveries])

    async def get_call(self, call_id: uuid.UUID) -> CallRecord | None:
        row = await self._one(select_sql("calls", CALL_COLS), call_id)
        return None if row is None else rows.call_from_row(row)

    async def list_calls(self, query: CallQuery) -> tuple[Sequence[CallRecord], int]:
        where, params = _call_filter(query)
        page = {**params, "limit": query.limit, "offset": query.offset}
        listing = (select_sql("calls", CALL_COLS) + where
                   + " ORDER BY created_at DESC, id DESC LIMIT :limit OFFSET :offset")
        counted, found = await self._read([(f"SELECT COUNT(*) FROM calls{where}", params),
                                           (listing, page)])
        return [rows.call_from_row(r) for r in found], int(counted[0][0]) if counted else 0

    async def close_open_calls(self, now: datetime, router: str,
                               ended: EndedEvent | None = None) -> int:
        # The '' heartbeat is the one a router wrote before routers were named.
        async with self._writing() as tx:
            found = await tx.fetch(
                "UPDATE calls SET status=:status, end_reason=:reason, updated_at=:now, "
                f"ended_at={self._GREATEST}(updated_at, COALESCE("
                "(SELECT at FROM heartbeats WHERE router = :router), "
                "(SELECT at FROM heartbeats WHERE router = ''), :now)) "
                "WHERE status IN (:open1, :open2) AND router IN (:router, '') "
                "RETURNING " + ", ".join(CALL_COLS),
                {"status": CallStatus.FAILED.value, "reason": EndReason.ROUTER_RESTART.value,
                 "now": to_text(now), "router": router, **_OPEN})
            closed = [rows.call_from_row(r) for r in found]
            if ended is not None and closed:
                events = await self._ended_events(tx, closed, ended)
                if events:
                    await tx.execute_many(_INSERT_DELIVERY,
                                          [rows.delivery_to_row(d) for d in events])
        return len(closed)

    @staticmethod
    async def _ended_events(tx: Tx, closed: Sequence[CallRecord],
                            ended: EndedEvent) -> list[WebhookDelivery]:
        """The ``ended`` event of each closed call that had events (its last one says
        where they go and what the call was)."""
        events = []
        for record in closed:
            last = await tx.fetch(_DELIVERY_SELECT + " WHERE call_id = :call_id "
                                  "ORDER BY seq DESC LIMIT 1", {"call_id": str(record.id)})
            event = ended(record, rows.delivery_from_row(last[0])) if last else None
            if event is not None:
                events.append(event)
        return events

    async def heartbeat(self, at: datetime, router: str) -> None:
        await self._change("INSERT INTO heartbeats (router, at) VALUES (:router, :at) "
                           "ON CONFLICT (router) DO UPDATE SET at = excluded.at",
                           {"router": router, "at": to_text(at)})

    async def delete_calls_before(self, before: datetime, limit: int) -> int:
        # The calls_newest index (created_at, id) finds the oldest rows without a scan.
        return await self._change(
            "DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE created_at < :before "
            "AND status NOT IN (:open1, :open2) ORDER BY created_at, id LIMIT :limit)",
            {"before": to_text(before), "limit": limit, **_OPEN})

    # -- the webhook outbox ----------------------------------------------------------

    async def due_deliveries(self, now: datetime, limit: int) -> Sequence[WebhookDelivery]:
        # In order per call: a row waits while an earlier row of its call is pending.
        found = await self._fetch(
            _DELIVERY_SELECT + " AS o WHERE status = :pending AND next_attempt_at <= :now "
            "AND NOT EXISTS (SELECT 1 FROM webhook_outbox AS p WHERE p.call_id = o.call_id "
            "AND p.status = :pending AND p.seq < o.seq) ORDER BY seq LIMIT :limit",
            {"pending": _PENDING, "now": to_text(now), "limit": limit})
        return [rows.delivery_from_row(r) for r in found]

    async def next_delivery_at(self) -> datetime | None:
        found = await self._fetch("SELECT MIN(next_attempt_at) FROM webhook_outbox "
                                  "WHERE status = :pending", {"pending": _PENDING})
        return None if not found or found[0][0] is None else rows.from_text(found[0][0])

    async def claim_delivery(self, delivery: WebhookDelivery, until: datetime) -> bool:
        return await self._change(
            "UPDATE webhook_outbox SET next_attempt_at = :until WHERE id = :id "
            "AND status = :pending AND next_attempt_at = :seen",
            {"until": to_text(until), "id": str(delivery.id), "pending": _PENDING,
             "seen": to_text(delivery.next_attempt_at)}) == 1

    async def update_delivery(self, delivery: WebhookDelivery) -> None:
        await self._update_one(
            "UPDATE webhook_outbox SET status=:status, attempts=:attempts, "
            "next_attempt_at=:next_attempt_at, expires_at=:expires_at, "
            "last_error=:last_error, updated_at=:updated_at WHERE id=:id",
            rows.delivery_to_row(delivery), "delivery")

    async def get_delivery(self, delivery_id: uuid.UUID) -> WebhookDelivery | None:
        row = await self._one(_DELIVERY_SELECT, delivery_id)
        return None if row is None else rows.delivery_from_row(row)

    async def list_deliveries(self, status: DeliveryStatus | None, limit: int,
                              offset: int) -> tuple[Sequence[WebhookDelivery], int]:
        where = " WHERE status = :status" if status else ""
        params = {"status": status and status.value, "limit": limit, "offset": offset}
        counted, found = await self._read([
            (f"SELECT COUNT(*) FROM webhook_outbox{where}", params),
            (_DELIVERY_SELECT + where + " ORDER BY seq DESC LIMIT :limit OFFSET :offset",
             params)])
        return [rows.delivery_from_row(r) for r in found], int(counted[0][0]) if counted else 0

    async def count_deliveries(self, status: DeliveryStatus) -> int:
        found = await self._fetch("SELECT COUNT(*) FROM webhook_outbox WHERE status = :status",
                                  {"status": status.value})
        return int(found[0][0])

    async def delete_deliveries_before(self, before: datetime, limit: int) -> int:
        return await self._change(
            "DELETE FROM webhook_outbox WHERE seq IN (SELECT seq FROM webhook_outbox "
            "WHERE created_at < :before AND status != :pending ORDER BY seq LIMIT :limit)",
            {"before": to_text(before), "pending": _PENDING, "limit": limit})

    # -- API keys and the key check -----------------------------------------------------

    async def create_api_key(self, key: ApiKey, key_hash: bytes) -> ApiKey:
        sql = insert_sql("api_keys", (*KEY_COLS, "key_hash"))
        await self._change(sql, {**rows.key_to_row(key), "key_hash": key_hash})
        return key

    async def find_api_key(self, key_hash: bytes) -> ApiKey | None:
        found = await self._fetch(select_sql("api_keys", KEY_COLS)
                                  + " WHERE key_hash = :hash", {"hash": key_hash})
        return rows.key_from_row(found[0]) if found else None

    async def count_api_keys(self) -> int:
        found = await self._fetch("SELECT COUNT(*) FROM api_keys")
        return int(found[0][0])

    async def claim(self, name: str) -> bool:
        sql = ("INSERT INTO settings (name, value) VALUES (:name, :value) "
               "ON CONFLICT (name) DO NOTHING")
        return await self._change(sql, {"name": f"claim:{name}", "value": b""}) == 1

    async def key_check(self, candidate: bytes) -> bytes:
        # Once written the value never changes, so the insert and the read need not
        # share a transaction: whoever inserted first, both read the same value.
        await self._change("INSERT INTO settings (name, value) VALUES (:name, :value) "
                           "ON CONFLICT (name) DO NOTHING",
                           {"name": KEY_CHECK, "value": candidate})
        found = await self._fetch("SELECT value FROM settings WHERE name = :name",
                                  {"name": KEY_CHECK})
        return bytes(found[0][0])


KEY_CHECK = "secrets_key_check"  # the settings row holding the trunk-password key check
_OPEN = {"open1": rules.OPEN_STATUSES[0].value, "open2": rules.OPEN_STATUSES[1].value}


def _call_filter(query: CallQuery) -> tuple[str, dict[str, Any]]:
    """The WHERE clause (with a leading space) and its parameters for a calls query."""
    candidates = {
        "status = :status": ("status", query.status and query.status.value),
        "created_at >= :start": ("start", query.start_date and to_text(query.start_date)),
        "created_at <= :end": ("end", query.end_date and to_text(query.end_date)),
    }
    used = {clause: pair for clause, pair in candidates.items() if pair[1]}
    where = " WHERE " + " AND ".join(used) if used else ""
    return where, dict(used.values())
