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

The queries both SQL stores share are in ``store.sql`` (``SqlStore``); this module has
the connection, the migrations and what SQLite does its own way.

Schema changes are numbered migrations, applied at ``open()`` in one transaction each and
recorded in ``schema_version``. Times are stored as fixed-width UTC text
(``2025-12-13T10:00:00.000000Z``) so text order is time order.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from callrouter.domain.models import (
    PhoneNumber,
)
from callrouter.errors import Conflict, StoreError
from callrouter.store import rows, rules
from callrouter.store.rows import NUMBER_COLS, Row
from callrouter.store.sql import (
    TRUNKS_BOTH_WAYS,
    Params,
    Query,
    SqlStore,
    Tx,
    pending_migrations,
)

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
    (  # webhooks (issue 12): per-assistant webhook, and the status-update outbox
        "ALTER TABLE assistants ADD COLUMN webhook_url TEXT",
        "ALTER TABLE assistants ADD COLUMN webhook_events TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE assistants ADD COLUMN webhook_secret_enc BLOB",
        """CREATE TABLE webhook_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, call_id TEXT,
            event TEXT NOT NULL, url TEXT NOT NULL, assistant_id TEXT, body TEXT NOT NULL,
            status TEXT NOT NULL, attempts INTEGER NOT NULL, next_attempt_at TEXT NOT NULL,
            expires_at TEXT NOT NULL, last_error TEXT, created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        "CREATE INDEX webhook_outbox_due ON webhook_outbox(status, next_attempt_at)",
        "CREATE INDEX webhook_outbox_call ON webhook_outbox(call_id, status, seq)",
    ),
    (  # routers are named: who handled a call, a heartbeat per router; the key check
        "ALTER TABLE calls ADD COLUMN router TEXT NOT NULL DEFAULT ''",
        "CREATE TABLE heartbeats (router TEXT PRIMARY KEY, at TEXT NOT NULL)",
        "INSERT INTO heartbeats (router, at) SELECT '', at FROM heartbeat",
        "DROP TABLE heartbeat",
        "CREATE TABLE settings (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    ),
    (  # issue 11: providers as trunks, both directions
        *TRUNKS_BOTH_WAYS,
    ),
)

_INSERT_NUMBER_POSITIONAL = (f"INSERT INTO numbers ({', '.join(NUMBER_COLS)}) "
                             f"VALUES ({', '.join('?' * len(NUMBER_COLS))})")


_BULK_ROWS = 10_000
_BULK_CACHE_KIB = -262144  # 256 MiB: about what a million numbers' table and indexes take


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


class _SqliteTx:
    """``store.sql.Tx`` on the connection inside ``SqliteStore._tx``."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def fetch(self, sql: str, params: Params) -> list[Row]:
        return list(await (await self._db.execute(sql, params)).fetchall())

    async def execute_many(self, sql: str, params: Sequence[Params]) -> None:
        await self._db.executemany(sql, params)


class SqliteStore(SqlStore):
    """``ports.Store`` on one SQLite file; ``open()`` creates it and applies migrations."""

    _GREATEST = "MAX"

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

    async def _migrate(self) -> None:
        async with self._tx(write=True) as db:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            found = await (await db.execute("SELECT MAX(version) FROM schema_version")).fetchone()
            current = int(found[0]) if found and found[0] is not None else 0
            for version, statements in pending_migrations(current, MIGRATIONS, str(self._path)):
                for statement in statements:
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

    async def _read(self, queries: Sequence[Query]) -> list[list[Row]]:
        async with self._tx() as db:
            return [list(await (await db.execute(sql, params)).fetchall())
                    for sql, params in queries]

    async def _change(self, sql: str, params: Params, *, in_use: str = rules.IN_USE) -> int:
        async with self._tx(write=True, in_use=in_use) as db:
            cursor = await db.execute(sql, params)
            return cursor.rowcount

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[Tx]:
        async with self._tx(write=True) as db:
            yield _SqliteTx(db)

    # -- what SQLite does its own way --------------------------------------------------

    async def existing_numbers(self, e164s: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(e164s), 500):  # well under SQLite's variable limit
            chunk = {f"n{i}": e164 for i, e164 in enumerate(e164s[start:start + 500])}
            marks = ", ".join(f":{name}" for name in chunk)
            found.update(r[0] for r in await self._fetch(
                f"SELECT phone_number FROM numbers WHERE phone_number IN ({marks})", chunk))
        return found

    async def create_numbers(self, numbers: Sequence[PhoneNumber]) -> None:
        # A bulk insert touches every page of four indexes: a page cache that holds them
        # for the insert, given back afterwards (an idle router keeps the default 2 MiB).
        big = len(numbers) >= _BULK_ROWS
        if big and self._db is not None:
            await self._db.execute(f"PRAGMA cache_size={_BULK_CACHE_KIB}")
        try:
            async with self._tx(write=True) as db:
                await db.executemany(_INSERT_NUMBER_POSITIONAL, rows.number_tuples(numbers))
        finally:
            if big and self._db is not None:
                await self._db.execute("PRAGMA cache_size=-2000")
                await self._db.execute("PRAGMA shrink_memory")
