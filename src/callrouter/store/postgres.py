"""The PostgreSQL store (asyncpg): the same tables as SQLite, shared by several routers.

How it works: the queries both SQL stores share are in ``store.sql`` (``SqlStore``);
this module has the connection, the migrations, the route feed and what PostgreSQL does
its own way. A connection pool (``store.pool_size``); every operation is one
transaction on one pooled connection, with ``store.timeout_seconds`` on connecting and
on each statement. Rows are the SQLite store's (``store.rows``: UUIDs and times as
fixed-width text, flags as integers), so both stores share one mapping; text columns
that are sorted or range-scanned are ``COLLATE "C"`` so text order is byte order
whatever the database's locale. SQL is written with ``:name`` parameters, as for
SQLite, and turned into asyncpg's ``$n`` once per statement (``_positional``).

Schema changes are this store's own numbered migrations (``MIGRATIONS``; version 1 is the
schema of issue 10, version 2 adds the webhook columns and outbox, version 3 the trunk
columns of issue 11 and the trunks' notifications), applied at ``open()``
inside one transaction that first takes ``pg_advisory_xact_lock``: of several routers
starting on an empty database one migrates, the others wait for it and then find nothing to do.

Every router sees every change: triggers on ``numbers``, ``assistants`` and ``trunks``
send one ``NOTIFY callrouter_routes`` per changed row (JSON, see ``_change_of``) in the writing
transaction, so a notification exists exactly when the change is committed, whichever
router or tool made it; a statement touching more than ``NOTIFY_ROWS`` rows (a bulk
import) sends one ``{"reload": true}`` instead. ``watch_routes`` listens on its own
connection, hands each batch to the router as ``RouteChange`` (and ``TrunkChanged``)
values and, after every (re)connection, asks for a full reload (``None``): what changed
while it was not listening is not lost.

Errors are translated in one function, ``_translate``: a constraint becomes ``Conflict``,
an unreachable server (refused, reset, timed out, shutting down) ``StoreUnavailable``
(503), anything else ``StoreError``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import structlog

from callrouter.domain.models import PhoneNumber
from callrouter.domain.routetable import (
    AssistantRemoved,
    AssistantUpserted,
    FeedChange,
    NumberRemoved,
    NumberUpserted,
    TrunkChanged,
)
from callrouter.errors import Conflict, StoreError, StoreUnavailable
from callrouter.ports import OnRouteChanges
from callrouter.store import rows, rules
from callrouter.store.rows import NUMBER_COLS, Row
from callrouter.store.sql import (
    TRUNKS_BOTH_WAYS,
    Params,
    Query,
    SqlStore,
    Tx,
    pending_migrations,
    safe_url,
)

log = structlog.get_logger("callrouter.store")

CHANNEL = "callrouter_routes"
LISTENER_NAME = "callrouter-listen"  # application_name of the notification connection
NOTIFY_ROWS = 1000  # a statement changing more rows notifies one full reload instead
_LOCK_KEY = 0x63616C6C726F7574  # "callrout": the advisory lock migrations run under
_C = 'TEXT COLLATE "C"'

# A notification per changed row, or one reload for a big statement. One function for
# both tables; transition tables (old_rows/new_rows) exist only for the trigger's event,
# and PL/pgSQL plans a query only when it runs, so each branch names only its own.
_NOTIFY_FUNCTION = f"""
CREATE FUNCTION callrouter_notify_routes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed bigint;
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN
        SELECT count(*) INTO changed FROM old_rows;
    ELSE
        SELECT count(*) INTO changed FROM new_rows;
    END IF;
    IF changed > {NOTIFY_ROWS} THEN
        PERFORM pg_notify('{CHANNEL}', '{{"reload": true}}');
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'numbers' THEN
        IF TG_OP = 'UPDATE' THEN
            FOR r IN SELECT o.phone_number FROM old_rows o JOIN new_rows n ON n.id = o.id
                     WHERE n.phone_number <> o.phone_number LOOP
                PERFORM pg_notify('{CHANNEL}', json_build_object(
                    'op', 'number-removed', 'e164', r.phone_number)::text);
            END LOOP;
        END IF;
        IF TG_OP = 'DELETE' THEN
            FOR r IN SELECT phone_number FROM old_rows LOOP
                PERFORM pg_notify('{CHANNEL}', json_build_object(
                    'op', 'number-removed', 'e164', r.phone_number)::text);
            END LOOP;
        ELSE
            FOR r IN SELECT id, phone_number, assistant_id, is_active FROM new_rows LOOP
                PERFORM pg_notify('{CHANNEL}', json_build_object(
                    'op', 'number', 'id', r.id, 'e164', r.phone_number,
                    'assistant_id', r.assistant_id, 'is_active', r.is_active <> 0)::text);
            END LOOP;
        END IF;
    ELSE
        IF TG_OP = 'DELETE' THEN
            FOR r IN SELECT id FROM old_rows LOOP
                PERFORM pg_notify('{CHANNEL}', json_build_object(
                    'op', 'assistant-removed', 'id', r.id)::text);
            END LOOP;
        ELSE
            FOR r IN SELECT id, runtime_uri FROM new_rows LOOP
                PERFORM pg_notify('{CHANNEL}', json_build_object(
                    'op', 'assistant', 'id', r.id, 'runtime_uri', r.runtime_uri)::text);
            END LOOP;
        END IF;
    END IF;
    RETURN NULL;
END
$$"""


_ASSISTANT_BRANCH = """    ELSE
        IF TG_OP = 'DELETE' THEN
            FOR r IN SELECT id FROM old_rows LOOP"""
assert _ASSISTANT_BRANCH in _NOTIFY_FUNCTION
# Migration 3: the same function with a branch for trunks (one notification per trunk
# written or deleted, naming only its id: the routers read it back, password and all).
_TRUNK_BRANCH = f"""    ELSIF TG_TABLE_NAME = 'trunks' THEN
        IF TG_OP = 'DELETE' THEN
            FOR r IN SELECT id FROM old_rows LOOP
                PERFORM pg_notify('{CHANNEL}', json_build_object(
                    'op', 'trunk-removed', 'id', r.id)::text);
            END LOOP;
        ELSE
            FOR r IN SELECT id FROM new_rows LOOP
                PERFORM pg_notify('{CHANNEL}', json_build_object('op', 'trunk', 'id', r.id)::text);
            END LOOP;
        END IF;
"""
_NOTIFY_WITH_TRUNKS = _NOTIFY_FUNCTION.replace(
    "CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1).replace(
    _ASSISTANT_BRANCH, _TRUNK_BRANCH + _ASSISTANT_BRANCH, 1)


def _notify_triggers(table: str) -> tuple[str, ...]:
    return tuple(
        f"CREATE TRIGGER {table}_notify_{event.lower()} AFTER {event} ON {table} "
        f"REFERENCING {refs} FOR EACH STATEMENT EXECUTE FUNCTION callrouter_notify_routes()"
        for event, refs in (("INSERT", "NEW TABLE AS new_rows"),
                            ("UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
                            ("DELETE", "OLD TABLE AS old_rows")))


MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE assistants (
            id {_C} PRIMARY KEY, name TEXT NOT NULL, runtime_uri TEXT,
            created_at {_C} NOT NULL, updated_at {_C} NOT NULL)""",
        f"""CREATE TABLE trunks (
            id {_C} PRIMARY KEY, name TEXT NOT NULL, host TEXT NOT NULL,
            port INTEGER NOT NULL, transport TEXT NOT NULL, provider TEXT NOT NULL,
            username TEXT, password_enc BYTEA, is_active INTEGER NOT NULL,
            created_at {_C} NOT NULL, updated_at {_C} NOT NULL)""",
        f"""CREATE TABLE numbers (
            id {_C} PRIMARY KEY, phone_number {_C} NOT NULL UNIQUE, name TEXT NOT NULL,
            assistant_id {_C} REFERENCES assistants(id) ON DELETE RESTRICT,
            transfer_trunk_id {_C} REFERENCES trunks(id) ON DELETE RESTRICT,
            is_active INTEGER NOT NULL, created_at {_C} NOT NULL,
            updated_at {_C} NOT NULL)""",
        "CREATE INDEX numbers_assistant ON numbers(assistant_id)",
        "CREATE INDEX numbers_trunk ON numbers(transfer_trunk_id)",
        f"""CREATE TABLE calls (
            id {_C} PRIMARY KEY, status TEXT NOT NULL, caller_phone TEXT NOT NULL,
            assistant_phone TEXT NOT NULL, number_id TEXT, assistant_id TEXT,
            sip_call_id TEXT NOT NULL, started_at {_C}, ended_at {_C}, end_reason TEXT,
            error TEXT, created_at {_C} NOT NULL, updated_at {_C} NOT NULL,
            direction TEXT NOT NULL, router TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX calls_newest ON calls(created_at DESC, id DESC)",
        "CREATE INDEX calls_status_newest ON calls(status, created_at DESC, id DESC)",
        "CREATE INDEX calls_router_status ON calls(router, status)",
        f"""CREATE TABLE api_keys (
            id {_C} PRIMARY KEY, name TEXT NOT NULL, prefix TEXT NOT NULL,
            read_only INTEGER NOT NULL, key_hash BYTEA NOT NULL UNIQUE,
            created_at {_C} NOT NULL)""",
        f"CREATE TABLE heartbeats (router TEXT PRIMARY KEY, at {_C} NOT NULL)",
        "CREATE TABLE settings (name TEXT PRIMARY KEY, value BYTEA NOT NULL)",
        _NOTIFY_FUNCTION,
        *_notify_triggers("numbers"),
        *_notify_triggers("assistants"),
    ),
    (  # webhooks (issue 12): per-assistant webhook, and the status-update outbox
        "ALTER TABLE assistants ADD COLUMN webhook_url TEXT",
        "ALTER TABLE assistants ADD COLUMN webhook_events TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE assistants ADD COLUMN webhook_secret_enc BYTEA",
        f"""CREATE TABLE webhook_outbox (
            seq BIGSERIAL PRIMARY KEY, id {_C} NOT NULL UNIQUE, call_id {_C},
            event TEXT NOT NULL, url TEXT NOT NULL, assistant_id {_C}, body TEXT NOT NULL,
            status TEXT NOT NULL, attempts INTEGER NOT NULL,
            next_attempt_at {_C} NOT NULL, expires_at {_C} NOT NULL, last_error TEXT,
            created_at {_C} NOT NULL, updated_at {_C} NOT NULL)""",
        "CREATE INDEX webhook_outbox_due ON webhook_outbox(status, next_attempt_at)",
        "CREATE INDEX webhook_outbox_call ON webhook_outbox(call_id, status, seq)",
    ),
    (  # issue 11: providers as trunks, both directions; trunk changes reach every router
        *TRUNKS_BOTH_WAYS,
        _NOTIFY_WITH_TRUNKS,
        *_notify_triggers("trunks"),
    ),
)

_PARAM = re.compile(r"(?<!:):([a-z_][a-z0-9_]*)")


@functools.lru_cache(maxsize=256)
def _positional(sql: str) -> tuple[str, tuple[str, ...]]:
    """``... :name ...`` as asyncpg's ``... $1 ...`` and the names in ``$n`` order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PARAM.sub(number, sql), tuple(names)


def _bind(sql: str, params: Params) -> tuple[str, list[Any]]:
    text, names = _positional(sql)
    return text, [params[n] for n in names]


_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
_DB_ERRORS: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *_UNAVAILABLE)
_OPEN_ERRORS: tuple[type[BaseException], ...] = (StoreError, *_DB_ERRORS)


def _translate(exc: BaseException, *, in_use: str = rules.IN_USE,
               doing: str = "database error") -> Exception:
    """The one place asyncpg and connection errors become router errors."""
    if isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        if exc.constraint_name == "numbers_phone_number_key":
            return rules.duplicate_number()
        return rules.duplicate_id()
    if isinstance(exc, asyncpg.exceptions.ForeignKeyViolationError):
        return Conflict(in_use)
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"the database is unreachable ({_why(exc)}); calls are "
                                "still routed, try this request again later")
    return StoreError(f"{doing}: {exc}")


def _why(exc: BaseException) -> str:
    """A connection failure in a few words ("connection refused", "timed out")."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, OSError) and exc.errno:
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def _change_of(payload: str) -> FeedChange | None:
    """One notification as a route (or trunk) change; None for ``{"reload": true}``."""
    data = json.loads(payload)
    match data.get("op"):
        case "number":
            assistant = data["assistant_id"]
            return NumberUpserted(uuid.UUID(data["id"]), data["e164"],
                                  None if assistant is None else uuid.UUID(assistant),
                                  bool(data["is_active"]))
        case "number-removed":
            return NumberRemoved(data["e164"])
        case "assistant":
            return AssistantUpserted(uuid.UUID(data["id"]), data["runtime_uri"])
        case "assistant-removed":
            return AssistantRemoved(uuid.UUID(data["id"]))
        case "trunk" | "trunk-removed":
            return TrunkChanged(uuid.UUID(data["id"]), removed=data["op"] == "trunk-removed")
    return None


class _PostgresTx:
    """``store.sql.Tx`` on the connection inside ``PostgresStore._tx``."""

    def __init__(self, con: asyncpg.Connection) -> None:
        self._con = con

    async def fetch(self, sql: str, params: Params) -> list[Row]:
        text, args = _bind(sql, params)
        return list(await self._con.fetch(text, *args))

    async def execute_many(self, sql: str, params: Sequence[Params]) -> None:
        text, names = _positional(sql)
        await self._con.executemany(text, [[p[n] for n in names] for p in params])


class PostgresStore(SqlStore):
    """``ports.Store`` (and ``ports.RouteFeed``) on a PostgreSQL database."""

    def __init__(self, url: str, *, timeout: float = 5.0, pool_size: int = 10) -> None:
        self._url = url
        self._timeout = timeout
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self.where = safe_url(url)

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                # min_size 0: no background reconnecting (and its log noise) in an outage;
                # idle connections are kept, so a busy router still reuses them.
                self._url, min_size=0, max_size=self._pool_size,
                timeout=self._timeout, command_timeout=self._timeout,
                server_settings={"application_name": "callrouter"})
            await self._migrate()
        except _OPEN_ERRORS as exc:
            await self.close()
            cause = exc.__cause__ if isinstance(exc, StoreError) else exc
            if cause is None:  # the store's own refusal (a newer schema)
                raise
            if isinstance(_translate(cause), StoreUnavailable):
                raise StoreUnavailable(f"cannot reach the database {self.where}: "
                                       f"{_why(cause)}") from cause
            raise StoreError(f"cannot open the database {self.where}: {cause}") from cause

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except _UNAVAILABLE:
                pool.terminate()

    async def _migrate(self) -> None:
        async with self._tx() as con:
            await con.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            await con.execute("CREATE TABLE IF NOT EXISTS schema_version "
                              "(version INTEGER NOT NULL)")
            current = await con.fetchval("SELECT MAX(version) FROM schema_version") or 0
            for version, statements in pending_migrations(current, MIGRATIONS, self.where):
                for statement in statements:
                    await con.execute(statement)
                await con.execute("INSERT INTO schema_version VALUES ($1)", version)
                log.info("store.migrated", database=self.where, version=version)

    # -- the one transaction/translation path -----------------------------------------

    @asynccontextmanager
    async def _tx(self, *, in_use: str = rules.IN_USE) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise StoreError("store is not open")
        try:
            async with self._pool.acquire(timeout=self._timeout) as con, con.transaction():
                yield con
        except StoreError:
            raise
        except _DB_ERRORS as exc:
            raise _translate(exc, in_use=in_use) from exc

    async def _read(self, queries: Sequence[Query]) -> list[list[Row]]:
        bound = [_bind(sql, params) for sql, params in queries]
        async with self._tx() as con:
            return [list(await con.fetch(sql, *args)) for sql, args in bound]

    async def _change(self, sql: str, params: Params, *, in_use: str = rules.IN_USE) -> int:
        text, args = _bind(sql, params)
        async with self._tx(in_use=in_use) as con:
            status = await con.execute(text, *args)
        return int(status.rsplit(" ", 1)[-1])  # "UPDATE 3", "INSERT 0 1", "DELETE 0"

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[Tx]:
        async with self._tx() as con:
            yield _PostgresTx(con)

    # -- what PostgreSQL does its own way ----------------------------------------------

    async def existing_numbers(self, e164s: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(e164s), 10_000):
            found.update(r[0] for r in await self._fetch(
                "SELECT phone_number FROM numbers WHERE phone_number = ANY(:numbers)",
                {"numbers": list(e164s[start:start + 10_000])}))
        return found

    async def create_numbers(self, numbers: Sequence[PhoneNumber]) -> None:
        # COPY: the fastest bulk insert; the statement trigger still notifies (a reload).
        async with self._tx() as con:
            await con.copy_records_to_table("numbers", records=rows.number_tuples(numbers),
                                            columns=NUMBER_COLS)

    # -- every router sees every change ------------------------------------------------

    async def watch_routes(self, on_changes: OnRouteChanges, *,
                           probe_seconds: float = 5.0) -> None:
        """Listen for route changes until cancelled: each batch of notifications goes to
        ``on_changes`` as values, in commit order; after every (re)connection (and for a
        ``{"reload": true}``) it gets ``None``: reload everything. A lost connection is
        found by the termination callback or a ``SELECT 1`` every ``probe_seconds`` of
        silence, and reconnected with a growing pause (at most ``probe_seconds``)."""
        pause = 0.1
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._listen(on_changes, probe_seconds)
            except _DB_ERRORS as exc:
                log.warning("store.listen_lost", database=self.where, error=str(exc),
                            retry_in_seconds=pause)
            except Exception:  # the feed must outlive any failure of its consumer
                log.exception("store.listen_failed", database=self.where)
            if loop.time() - started > probe_seconds:
                pause = 0.1  # it had been listening: a new loss starts the backoff anew
            await asyncio.sleep(pause)
            pause = min(pause * 2, probe_seconds)

    async def _listen(self, on_changes: OnRouteChanges, probe_seconds: float) -> None:
        inbox: asyncio.Queue[str | None] = asyncio.Queue()
        con = await asyncpg.connect(self._url, timeout=self._timeout,
                                    command_timeout=self._timeout,
                                    server_settings={"application_name": LISTENER_NAME})
        try:
            con.add_termination_listener(lambda _: inbox.put_nowait(None))
            await con.add_listener(CHANNEL, lambda *args: inbox.put_nowait(args[3]))
            log.info("store.listening", database=self.where, channel=CHANNEL)
            await on_changes(None)  # whatever changed while nobody listened
            while True:
                try:
                    first = await asyncio.wait_for(inbox.get(), probe_seconds)
                except TimeoutError:
                    await con.execute("SELECT 1")
                    continue
                if first is None or con.is_closed():
                    raise asyncpg.exceptions.ConnectionDoesNotExistError(
                        "the notification connection closed")
                payloads = [first]
                while not inbox.empty():
                    more = inbox.get_nowait()
                    if more is None:
                        inbox.put_nowait(None)
                        break
                    payloads.append(more)
                await self._deliver(payloads, on_changes)
        finally:
            if not con.is_closed():
                con.terminate()

    @staticmethod
    async def _deliver(payloads: list[str], on_changes: OnRouteChanges) -> None:
        changes: list[FeedChange] = []
        for payload in payloads:
            try:
                change = _change_of(payload)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("store.bad_notification", payload=payload[:200], error=str(exc))
                change = None
            if change is None:
                await on_changes(None)
                return
            changes.append(change)
        await on_changes(changes)
