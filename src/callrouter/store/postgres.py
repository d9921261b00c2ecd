"""The PostgreSQL store (asyncpg): the same tables as SQLite, shared by several routers.

How it works: a connection pool (``store.pool_size``); every operation is one
transaction on one pooled connection, with ``store.timeout_seconds`` on connecting and
on each statement. Rows are the SQLite store's (``store.rows``: UUIDs and times as
fixed-width text, flags as integers), so both stores share one mapping; text columns
that are sorted or range-scanned are ``COLLATE "C"`` so text order is byte order
whatever the database's locale. SQL is written with ``:name`` parameters, as for
SQLite, and turned into asyncpg's ``$n`` once per statement (``_positional``).

Schema changes are this store's own numbered migrations (``MIGRATIONS``; version 1 is the
whole schema of today), applied at ``open()`` inside one transaction that first takes
``pg_advisory_xact_lock``: of several routers starting on an empty database one
migrates, the others wait for it and then find nothing to do.

Every router sees every change: triggers on ``numbers`` and ``assistants`` send one
``NOTIFY callrouter_routes`` per changed row (JSON, see ``_change_of``) in the writing
transaction, so a notification exists exactly when the change is committed, whichever
router or tool made it; a statement touching more than ``NOTIFY_ROWS`` rows (a bulk
import) sends one ``{"reload": true}`` instead. ``watch_routes`` listens on its own
connection, hands each batch to the router as ``RouteChange`` values and, after every
(re)connection, asks for a full reload (``None``): what changed while it was not
listening is not lost.

Errors are translated in one function, ``_translate``: a constraint becomes ``Conflict``,
an unreachable server (refused, reset, timed out, shutting down) ``StoreUnavailable``
(503), anything else ``StoreError``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import structlog

from callrouter.domain.models import ApiKey, Assistant, CallRecord, PhoneNumber, Trunk
from callrouter.domain.routetable import (
    AssistantRemoved,
    AssistantUpserted,
    NumberRemoved,
    NumberUpserted,
    RouteChange,
)
from callrouter.errors import Conflict, StoreError, StoreUnavailable
from callrouter.ports import CallQuery, NumberQuery, OnRouteChanges, RouteRow
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
)

_TRUNK_SELECT = select_sql("trunks", TRUNK_COLS, ", password_enc IS NOT NULL")
_UPSERT_CALL = (insert_sql("calls", CALL_COLS)
                + f" ON CONFLICT (id) DO UPDATE SET {rows.assignments(CALL_COLS)}")
_BY_AGE = " ORDER BY created_at, id"
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


def _bind(sql: str, params: Mapping[str, Any] | Sequence[Any]) -> tuple[str, list[Any]]:
    if isinstance(params, Mapping):
        text, names = _positional(sql)
        return text, [params[n] for n in names]
    return sql, list(params)


_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
_DB_ERRORS: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *_UNAVAILABLE)


def safe_url(url: str) -> str:
    """The database URL without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.username + '@' if parts.username else ''}" \
           f"{host}{port}{parts.path}"


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
        text = str(exc) or type(exc).__name__
        return StoreUnavailable(f"the database is unreachable ({text}); calls are still "
                                "routed, try this request again later")
    return StoreError(f"{doing}: {exc}")


def _change_of(payload: str) -> RouteChange | None:
    """One notification as a route change; None for ``{"reload": true}``."""
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
    return None


class PostgresStore:
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
                self._url, min_size=0, max_size=self._pool_size, timeout=self._timeout,
                command_timeout=self._timeout,
                server_settings={"application_name": "callrouter"})
            await self._migrate()
        except StoreError:
            await self.close()
            raise
        except _DB_ERRORS as exc:
            await self.close()
            error = _translate(exc, doing=f"cannot open the database {self.where}")
            if isinstance(error, StoreUnavailable):
                error = StoreUnavailable(f"cannot reach the database {self.where}: {exc}")
            raise error from exc

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except _UNAVAILABLE:
                pool.terminate()

    async def ping(self) -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._fetch("SELECT 1")
        return loop.time() - started

    async def _migrate(self) -> None:
        async with self._tx() as con:
            await con.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            await con.execute("CREATE TABLE IF NOT EXISTS schema_version "
                              "(version INTEGER NOT NULL)")
            current = await con.fetchval("SELECT MAX(version) FROM schema_version") or 0
            if current > len(MIGRATIONS):
                raise StoreError(f"the database {self.where} has schema {current}, newer "
                                 f"than this router supports ({len(MIGRATIONS)})")
            for version in range(current + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[version - 1]:
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

    async def _fetch(self, sql: str, params: Mapping[str, Any] | Sequence[Any] = ()
                     ) -> list[Row]:
        text, args = _bind(sql, params)
        async with self._tx() as con:
            return list(await con.fetch(text, *args))

    async def _change(self, sql: str, params: Mapping[str, Any] | Sequence[Any], *,
                      in_use: str = rules.IN_USE) -> int:
        text, args = _bind(sql, params)
        async with self._tx(in_use=in_use) as con:
            status = await con.execute(text, *args)
        return int(status.rsplit(" ", 1)[-1])  # "UPDATE 3", "INSERT 0 1", "DELETE 0"

    async def _update_one(self, sql: str, params: Mapping[str, Any], what: str) -> None:
        if await self._change(sql, params) == 0:
            raise rules.not_found(what)

    async def _one(self, sql: str, object_id: uuid.UUID) -> Row | None:
        found = await self._fetch(f"{sql} WHERE id = $1", (str(object_id),))
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
        return await self._change("DELETE FROM numbers WHERE id = $1", (str(number_id),)) > 0

    async def page_numbers(self, query: NumberQuery) -> Sequence[PhoneNumber]:
        high = query.prefix + "\x7f" if query.prefix else "\x7f"
        found = await self._fetch(
            select_sql("numbers", NUMBER_COLS) + " WHERE phone_number > :after AND "
            "phone_number >= :low AND phone_number < :high ORDER BY phone_number "
            "LIMIT :limit OFFSET :offset",
            {"after": query.after, "low": query.prefix, "high": high,
             "limit": query.limit, "offset": query.offset})
        return [rows.number_from_row(r) for r in found]

    async def existing_numbers(self, e164s: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(e164s), 10_000):
            rows_ = await self._fetch(
                "SELECT phone_number FROM numbers WHERE phone_number = ANY($1::text[])",
                (list(e164s[start:start + 10_000]),))
            found.update(r[0] for r in rows_)
        return found

    async def create_numbers(self, numbers: Sequence[PhoneNumber]) -> None:
        async with self._tx() as con:
            await con.copy_records_to_table("numbers", records=rows.number_tuples(numbers),
                                            columns=NUMBER_COLS)

    async def route_rows(self, after: str, limit: int) -> Sequence[RouteRow]:
        found = await self._fetch(
            "SELECT phone_number, id, assistant_id, is_active FROM numbers "
            "WHERE phone_number > $1 ORDER BY phone_number LIMIT $2", (after, limit))
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
        sql = "DELETE FROM trunks WHERE id = $1"
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
        await self._change(insert_sql("assistants", ASSISTANT_COLS),
                           rows.assistant_to_row(assistant))
        return assistant

    async def update_assistant(self, assistant: Assistant) -> Assistant:
        sql = update_sql("assistants", ASSISTANT_COLS)
        await self._update_one(sql, rows.assistant_to_row(assistant), "assistant")
        return assistant

    async def delete_assistant(self, assistant_id: uuid.UUID) -> bool:
        sql = "DELETE FROM assistants WHERE id = $1"
        return await self._change(sql, (str(assistant_id),),
                                  in_use=rules.ASSISTANT_IN_USE) > 0

    # -- calls -----------------------------------------------------------------------

    async def upsert_calls(self, records: Sequence[CallRecord]) -> None:
        text, names = _positional(_UPSERT_CALL)
        args = [[row[n] for n in names] for row in map(rows.call_to_row, records)]
        async with self._tx() as con:
            await con.executemany(text, args)

    async def get_call(self, call_id: uuid.UUID) -> CallRecord | None:
        row = await self._one(select_sql("calls", CALL_COLS), call_id)
        return None if row is None else rows.call_from_row(row)

    async def list_calls(self, query: CallQuery) -> tuple[Sequence[CallRecord], int]:
        clauses = {"status = :status": ("status", query.status and query.status.value),
                   "created_at >= :start": ("start", query.start_date
                                            and to_text(query.start_date)),
                   "created_at <= :end": ("end", query.end_date and to_text(query.end_date))}
        used = {clause: pair for clause, pair in clauses.items() if pair[1]}
        where = " WHERE " + " AND ".join(used) if used else ""
        params = dict(used.values())
        count_sql, count_args = _bind(f"SELECT COUNT(*) FROM calls{where}", params)
        page_sql, page_args = _bind(
            select_sql("calls", CALL_COLS) + where
            + " ORDER BY created_at DESC, id DESC LIMIT :limit OFFSET :offset",
            {**params, "limit": query.limit, "offset": query.offset})
        async with self._tx() as con:
            total = await con.fetchval(count_sql, *count_args)
            found = await con.fetch(page_sql, *page_args)
        return [rows.call_from_row(r) for r in found], int(total or 0)

    async def close_open_calls(self, now: datetime, router: str) -> int:
        return await self._change(
            "UPDATE calls SET status=:status, end_reason=:reason, updated_at=:now, "
            "ended_at=GREATEST(updated_at, COALESCE("
            "(SELECT at FROM heartbeats WHERE router = :router), "
            "(SELECT at FROM heartbeats WHERE router = ''), :now)) "
            "WHERE status IN (:open1, :open2) AND router IN (:router, '')",
            rows.close_params(now, router))

    async def heartbeat(self, at: datetime, router: str) -> None:
        await self._change("INSERT INTO heartbeats (router, at) VALUES (:router, :at) "
                           "ON CONFLICT (router) DO UPDATE SET at = excluded.at",
                           {"router": router, "at": to_text(at)})

    async def delete_calls_before(self, before: datetime, limit: int) -> int:
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
        found = await self._fetch(select_sql("api_keys", KEY_COLS) + " WHERE key_hash = $1",
                                  (key_hash,))
        return rows.key_from_row(found[0]) if found else None

    async def count_api_keys(self) -> int:
        found = await self._fetch("SELECT COUNT(*) FROM api_keys")
        return int(found[0][0])

    async def key_check(self, candidate: bytes) -> bytes:
        insert, args = _bind(rows.KEY_CHECK_INSERT, rows.key_check_params(candidate))
        async with self._tx() as con:
            await con.execute(insert, *args)
            found = await con.fetchval(rows.KEY_CHECK_SELECT)
        return bytes(found)

    # -- every router sees every change ------------------------------------------------

    async def watch_routes(self, on_changes: OnRouteChanges, *,
                           probe_seconds: float = 5.0) -> None:
        """Listen for route changes until cancelled: each batch of notifications goes to
        ``on_changes`` as values, in commit order; after every (re)connection (and for a
        ``{"reload": true}``) it gets ``None``: reload everything. A lost connection is
        found by the termination callback or a ``SELECT 1`` every ``probe_seconds`` of
        silence, and reconnected with a growing pause (at most ``probe_seconds``)."""
        pause = 0.1
        while True:
            try:
                await self._listen(on_changes, probe_seconds)
            except _DB_ERRORS as exc:
                log.warning("store.listen_lost", database=self.where, error=str(exc),
                            retry_in_seconds=pause)
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
        changes: list[RouteChange] = []
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
