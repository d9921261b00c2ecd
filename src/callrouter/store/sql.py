"""What the SQLite and the PostgreSQL store share: every query that is the same SQL on both.

How it works: ``SqlStore`` implements the ``ports.Store`` methods whose SQL both
databases speak, over four primitives each store provides: ``_read`` (queries in one
transaction), ``_change`` (one statement, rows affected), ``_change_many`` (one
statement over many rows) and the translation of its driver's errors. Every statement
here uses ``:name`` parameters with a dict (SQLite takes them as they are; the
PostgreSQL store rewrites them to ``$n`` once per statement). Rows are mapped by
``store.rows``. A store adds what differs: its connection, its migrations, bulk inserts
and lookups by many values, and spells ``GREATEST`` its own way (``_GREATEST``).

A method added to ``ports.Store`` whose SQL is portable belongs here, once; only SQL
that differs goes into the two adapters.
"""

from __future__ import annotations

import asyncio
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from callrouter.domain.models import (
    ApiKey,
    Assistant,
    CallRecord,
    CallStatus,
    EndReason,
    PhoneNumber,
    Trunk,
)
from callrouter.ports import CallQuery, NumberQuery, RouteRow
from callrouter.store import rows, rules
from callrouter.store.rows import (
    ASSISTANT_COLS,
    CALL_COLS,
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
_UPSERT_CALL = (insert_sql("calls", CALL_COLS)
                + f" ON CONFLICT (id) DO UPDATE SET {rows.assignments(CALL_COLS)}")
_BY_AGE = " ORDER BY created_at, id"


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
    async def _change_many(self, sql: str, params: Sequence[Params]) -> None:
        """Run one statement for each of ``params``, all in one transaction."""

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
        found = await self._fetch(select_sql("assistants", ASSISTANT_COLS) + _BY_AGE)
        return [rows.assistant_from_row(r) for r in found]

    async def get_assistant(self, assistant_id: uuid.UUID) -> Assistant | None:
        row = await self._one(select_sql("assistants", ASSISTANT_COLS), assistant_id)
        return None if row is None else rows.assistant_from_row(row)

    async def create_assistant(self, assistant: Assistant) -> Assistant:
        sql = insert_sql("assistants", ASSISTANT_COLS)
        await self._change(sql, rows.assistant_to_row(assistant))
        return assistant

    async def update_assistant(self, assistant: Assistant) -> Assistant:
        sql = update_sql("assistants", ASSISTANT_COLS)
        await self._update_one(sql, rows.assistant_to_row(assistant), "assistant")
        return assistant

    async def delete_assistant(self, assistant_id: uuid.UUID) -> bool:
        return await self._delete("assistants", assistant_id, rules.ASSISTANT_IN_USE)

    # -- calls -----------------------------------------------------------------------

    async def upsert_calls(self, records: Sequence[CallRecord]) -> None:
        await self._change_many(_UPSERT_CALL, [rows.call_to_row(r) for r in records])

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

    async def close_open_calls(self, now: datetime, router: str) -> int:
        # The '' heartbeat is the one a router wrote before routers were named.
        return await self._change(
            "UPDATE calls SET status=:status, end_reason=:reason, updated_at=:now, "
            f"ended_at={self._GREATEST}(updated_at, COALESCE("
            "(SELECT at FROM heartbeats WHERE router = :router), "
            "(SELECT at FROM heartbeats WHERE router = ''), :now)) "
            "WHERE status IN (:open1, :open2) AND router IN (:router, '')",
            {"status": CallStatus.FAILED.value, "reason": EndReason.ROUTER_RESTART.value,
             "now": to_text(now), "router": router, **_OPEN})

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
