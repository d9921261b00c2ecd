"""The SQLite store (aiosqlite): the number table, trunks, assistants, calls, API keys.

How it works: one connection in autocommit mode, WAL journal (readers never block the
writer; the ``keys create`` CLI may open the same file while the router runs) and
foreign keys on. Every operation holds one ``asyncio.Lock`` and runs inside an explicit
``BEGIN IMMEDIATE`` … ``COMMIT``, so coroutines sharing the connection never see each
other's half-done transactions.

Integrity lives in the schema, not in read-then-write checks: ``numbers.phone_number``
is UNIQUE (of two concurrent registrations of one number exactly one succeeds) and the
number -> assistant / trunk references are ``ON DELETE RESTRICT``. ``sqlite3`` errors
are translated in one function, ``_translate``; a constraint failure becomes
``Conflict`` (409), anything else ``StoreError``.

Schema changes are numbered migrations, applied at ``open()`` in one transaction each and
recorded in ``schema_version``. Times are stored as fixed-width UTC text
(``2025-12-13T10:00:00.000000Z``) so text order is time order.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from callrouter.domain.models import (
    ApiKey,
    Assistant,
    CallRecord,
    CallStatus,
    EndReason,
    PhoneNumber,
    Trunk,
)
from callrouter.errors import Conflict, StoreError
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

Params = Sequence[Any] | Mapping[str, Any]

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE assistants (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, runtime_uri TEXT,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL)""",
        """CREATE TABLE trunks (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, host TEXT NOT NULL,
            port INTEGER NOT NULL, transport TEXT NOT NULL, provider TEXT NOT NULL,
            username TEXT, password_enc BLOB, is_active INTEGER NOT NULL,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL)""",
        """CREATE TABLE numbers (
            id TEXT PRIMARY KEY, phone_number TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
            assistant_id TEXT REFERENCES assistants(id) ON DELETE RESTRICT,
            transfer_trunk_id TEXT REFERENCES trunks(id) ON DELETE RESTRICT,
            is_active INTEGER NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)""",
        "CREATE INDEX numbers_assistant ON numbers(assistant_id)",
        "CREATE INDEX numbers_trunk ON numbers(transfer_trunk_id)",
        """CREATE TABLE calls (
            id TEXT PRIMARY KEY, status TEXT NOT NULL, caller_phone TEXT NOT NULL,
            assistant_phone TEXT NOT NULL, number_id TEXT, assistant_id TEXT,
            sip_call_id TEXT NOT NULL, started_at TEXT, ended_at TEXT, end_reason TEXT,
            error TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
            direction TEXT NOT NULL)""",
        "CREATE INDEX calls_newest ON calls(created_at DESC, id DESC)",
        "CREATE INDEX calls_status_newest ON calls(status, created_at DESC, id DESC)",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, prefix TEXT NOT NULL,
            read_only INTEGER NOT NULL, key_hash BLOB NOT NULL UNIQUE,
            created_at TEXT NOT NULL)""",
    ),
    (  # one row: the running router's last sign of life (close_open_calls after a crash)
        "CREATE TABLE heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), at TEXT NOT NULL)",
    ),
    (  # issue 11 (version 4 in the merged order): providers as trunks, both directions
        "ALTER TABLE trunks ADD COLUMN inbound_addresses TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE trunks ADD COLUMN outbound_number TEXT",
        "ALTER TABLE trunks ADD COLUMN register INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE trunks ADD COLUMN register_expires INTEGER NOT NULL DEFAULT 300",
        "ALTER TABLE trunks ADD COLUMN inbound_auth INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE calls ADD COLUMN trunk_id TEXT",
    ),
)

_TRUNK_SELECT = select_sql("trunks", TRUNK_COLS, ", password_enc IS NOT NULL")
_INSERT_NUMBER_POSITIONAL = (f"INSERT INTO numbers ({', '.join(NUMBER_COLS)}) "
                             f"VALUES ({', '.join('?' * len(NUMBER_COLS))})")
_UPSERT_CALL = (insert_sql("calls", CALL_COLS)
                + f" ON CONFLICT(id) DO UPDATE SET {rows.assignments(CALL_COLS)}")


def _translate(exc: sqlite3.Error, *, in_use: str = rules.IN_USE,
               doing: str = "database error") -> Exception:
    """The one place sqlite3 errors become router errors (callers ``raise ... from exc``)."""
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        if "numbers.phone_number" in text:
            return rules.duplicate_number()
        if "UNIQUE" in text or "PRIMARY KEY" in text:
            return rules.duplicate_id()
        if "FOREIGN KEY" in text:
            return Conflict(in_use)
    return StoreError(f"{doing}: {text}")


class SqliteStore:
    """``ports.Store`` on one SQLite file; ``open()`` creates it and applies migrations."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = await self._connect()
            for pragma in ("journal_mode=WAL", "foreign_keys=ON", "synchronous=NORMAL",
                           f"busy_timeout={self._busy_timeout_ms}"):
                await self._db.execute(f"PRAGMA {pragma}")
            await self._migrate()
        except sqlite3.Error as exc:
            await self.close()
            raise _translate(exc, doing=f"cannot open the database {self._path}") from exc
        except BaseException:
            await self.close()
            raise

    async def _connect(self) -> aiosqlite.Connection:
        connection = aiosqlite.connect(self._path, isolation_level=None)
        try:
            return await connection
        except BaseException:
            # After a failed connect aiosqlite stops its worker thread without waiting for
            # it; wait here, or the thread reports to an event loop that is gone by then.
            await asyncio.to_thread(connection._thread.join)
            raise

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def ping(self) -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._fetch("SELECT 1")
        return loop.time() - started

    async def _migrate(self) -> None:
        async with self._tx(write=True) as db:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            found = await (await db.execute("SELECT MAX(version) FROM schema_version")).fetchone()
            current = int(found[0]) if found and found[0] is not None else 0
            if current > len(MIGRATIONS):
                raise StoreError(f"the database {self._path} has schema {current}, newer "
                                 f"than this router supports ({len(MIGRATIONS)})")
            for version in range(current + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[version - 1]:
                    await db.execute(statement)
                await db.execute("INSERT INTO schema_version VALUES (?)", (version,))

    # -- the one transaction/translation path -----------------------------------------

    @asynccontextmanager
    async def _tx(
        self, *, write: bool = False, in_use: str = rules.IN_USE
    ) -> AsyncIterator[aiosqlite.Connection]:
        if self._db is None:
            raise StoreError("store is not open")
        db = self._db
        async with self._lock:
            try:
                await db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield db
                except BaseException:
                    await db.rollback()
                    raise
                await db.commit()
            except sqlite3.Error as exc:
                raise _translate(exc, in_use=in_use) from exc

    async def _fetch(self, sql: str, params: Params = ()) -> list[Row]:
        async with self._tx() as db:
            cursor = await db.execute(sql, params)
            return list(await cursor.fetchall())

    async def _change(self, sql: str, params: Params, *, in_use: str = rules.IN_USE) -> int:
        async with self._tx(write=True, in_use=in_use) as db:
            cursor = await db.execute(sql, params)
            return cursor.rowcount

    async def _update_one(self, sql: str, params: Params, what: str) -> None:
        if await self._change(sql, params) == 0:
            raise rules.not_found(what)

    async def _one(self, sql: str, object_id: uuid.UUID) -> Row | None:
        found = await self._fetch(f"{sql} WHERE id = ?", (str(object_id),))
        return found[0] if found else None

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
        return await self._change("DELETE FROM numbers WHERE id = ?", (str(number_id),)) > 0

    async def page_numbers(self, query: NumberQuery) -> Sequence[PhoneNumber]:
        # phone_number's UNIQUE index gives the order and the prefix range without a sort.
        found = await self._fetch(
            select_sql("numbers", NUMBER_COLS) + " WHERE phone_number > :after AND "
            "phone_number >= :low AND phone_number < :high ORDER BY phone_number "
            "LIMIT :limit OFFSET :offset", _number_page(query))
        return [rows.number_from_row(r) for r in found]

    async def existing_numbers(self, e164s: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(e164s), 500):  # well under SQLite's variable limit
            chunk = e164s[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            rows_ = await self._fetch(
                f"SELECT phone_number FROM numbers WHERE phone_number IN ({marks})", chunk)
            found.update(r[0] for r in rows_)
        return found

    async def create_numbers(self, numbers: Sequence[PhoneNumber]) -> None:
        async with self._tx(write=True) as db:
            await db.executemany(_INSERT_NUMBER_POSITIONAL, rows.number_tuples(numbers))

    async def route_rows(self, after: str, limit: int) -> Sequence[RouteRow]:
        found = await self._fetch(
            "SELECT phone_number, id, assistant_id, is_active FROM numbers "
            "WHERE phone_number > ? ORDER BY phone_number LIMIT ?", (after, limit))
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
        sql = "DELETE FROM trunks WHERE id = ?"
        return await self._change(sql, (str(trunk_id),), in_use=rules.TRUNK_IN_USE) > 0

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
        sql = "DELETE FROM assistants WHERE id = ?"
        return await self._change(sql, (str(assistant_id),), in_use=rules.ASSISTANT_IN_USE) > 0

    # -- calls -----------------------------------------------------------------------

    async def upsert_calls(self, records: Sequence[CallRecord]) -> None:
        async with self._tx(write=True) as db:
            await db.executemany(_UPSERT_CALL, [rows.call_to_row(r) for r in records])

    async def get_call(self, call_id: uuid.UUID) -> CallRecord | None:
        row = await self._one(select_sql("calls", CALL_COLS), call_id)
        return None if row is None else rows.call_from_row(row)

    async def list_calls(self, query: CallQuery) -> tuple[Sequence[CallRecord], int]:
        where, params = _call_filter(query)
        page = {**params, "limit": query.limit, "offset": query.offset}
        listing = (select_sql("calls", CALL_COLS) + where
                   + " ORDER BY created_at DESC, id DESC LIMIT :limit OFFSET :offset")
        async with self._tx() as db:
            counted = await db.execute(f"SELECT COUNT(*) FROM calls{where}", params)
            total = await counted.fetchone()
            found = await (await db.execute(listing, page)).fetchall()
        return [rows.call_from_row(r) for r in found], int(total[0]) if total else 0

    async def close_open_calls(self, now: datetime) -> int:
        return await self._change(
            "UPDATE calls SET status=:status, end_reason=:reason, updated_at=:now, "
            "ended_at=MAX(updated_at, COALESCE((SELECT at FROM heartbeat), :now)) "
            "WHERE status IN (:open1, :open2)",
            {"status": CallStatus.FAILED.value, "reason": EndReason.ROUTER_RESTART.value,
             "now": to_text(now), "open1": rules.OPEN_STATUSES[0].value,
             "open2": rules.OPEN_STATUSES[1].value})

    async def heartbeat(self, at: datetime) -> None:
        await self._change("INSERT INTO heartbeat (id, at) VALUES (1, :at) "
                           "ON CONFLICT(id) DO UPDATE SET at=excluded.at", {"at": to_text(at)})

    async def delete_calls_before(self, before: datetime, limit: int) -> int:
        # The calls_newest index (created_at, id) finds the oldest rows without a scan.
        return await self._change(
            "DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE created_at < :before "
            "AND status NOT IN (:open1, :open2) ORDER BY created_at, id LIMIT :limit)",
            {"before": to_text(before), "limit": limit,
             "open1": rules.OPEN_STATUSES[0].value, "open2": rules.OPEN_STATUSES[1].value})

    # -- API keys --------------------------------------------------------------------

    async def create_api_key(self, key: ApiKey, key_hash: bytes) -> ApiKey:
        sql = insert_sql("api_keys", (*KEY_COLS, "key_hash"))
        await self._change(sql, {**rows.key_to_row(key), "key_hash": key_hash})
        return key

    async def find_api_key(self, key_hash: bytes) -> ApiKey | None:
        found = await self._fetch(select_sql("api_keys", KEY_COLS) + " WHERE key_hash = ?",
                                  (key_hash,))
        return rows.key_from_row(found[0]) if found else None

    async def count_api_keys(self) -> int:
        found = await self._fetch("SELECT COUNT(*) FROM api_keys")
        return int(found[0][0])


_BY_AGE = " ORDER BY created_at, id"


def _number_page(query: NumberQuery) -> dict[str, Any]:
    # Every stored number is "+" and digits, so prefix + DEL bounds the prefix's range.
    high = query.prefix + "\x7f" if query.prefix else "\x7f"
    return {"after": query.after, "low": query.prefix, "high": high,
            "limit": query.limit, "offset": query.offset}


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
