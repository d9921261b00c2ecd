"""What only the PostgreSQL store does (the shared contract is test_store_contract.py):
migrations under a lock when routers start together, the route feed every router
listens to, and an unreachable server as ``StoreUnavailable``."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import asyncpg
import pytest

from callrouter.domain.models import Assistant, PhoneNumber, Trunk, TrunkTransport
from callrouter.domain.routetable import (
    AssistantRemoved,
    AssistantUpserted,
    FeedChange,
    NumberRemoved,
    NumberUpserted,
    TrunkChanged,
)
from callrouter.errors import StoreError, StoreUnavailable
from callrouter.store.postgres import (
    LISTENER_NAME,
    MIGRATIONS,
    NOTIFY_ROWS,
    PostgresStore,
)
from callrouter.store.rows import to_text
from callrouter.store.sql import safe_url

pytestmark = pytest.mark.anyio
T0 = datetime(2025, 12, 13, 10, 0, 0, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    made = PostgresStore(postgres_url)
    await made.open()
    yield made
    await made.close()


async def test_routers_starting_together_migrate_once(postgres_url: str) -> None:
    """Guards concurrent starts on an empty database: one migrates under the advisory
    lock, the others wait and find the schema done (no duplicate-table error)."""
    stores = [PostgresStore(postgres_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        con = await asyncpg.connect(postgres_url)
        versions = [r[0] for r in await con.fetch("SELECT version FROM schema_version")]
        await con.close()
        assert versions == list(range(1, len(MIGRATIONS) + 1))
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_database_from_a_newer_router_is_refused(postgres_url: str) -> None:
    first = PostgresStore(postgres_url)
    await first.open()
    await first.close()
    con = await asyncpg.connect(postgres_url)
    await con.execute("INSERT INTO schema_version VALUES (99)")
    await con.close()
    with pytest.raises(StoreError, match="newer"):
        await PostgresStore(postgres_url).open()


async def test_a_version_1_database_gets_the_webhook_columns_and_outbox(
        postgres_url: str) -> None:
    """Guards the upgrade of a database made before webhooks: version 2 adds the
    assistants' webhook columns (existing rows get none) and the outbox."""
    sales = Assistant(id=uuid.uuid4(), name="Sales", runtime_uri="sip:rt@host",
                      created_at=T0, updated_at=T0)
    con = await asyncpg.connect(postgres_url)
    try:
        async with con.transaction():
            await con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for statement in MIGRATIONS[0]:
                await con.execute(statement)
            await con.execute("INSERT INTO schema_version VALUES (1)")
            await con.execute(
                "INSERT INTO assistants (id, name, runtime_uri, created_at, updated_at) "
                "VALUES ($1, $2, $3, $4, $5)", str(sales.id), sales.name, sales.runtime_uri,
                to_text(T0), to_text(T0))
    finally:
        await con.close()
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        assert await store.get_assistant(sales.id) == sales
        assert await store.get_assistant_webhook_secret(sales.id) is None
        assert await store.next_delivery_at() is None
    finally:
        await store.close()


async def test_a_version_2_database_gets_the_trunk_columns_and_their_notifications(
        postgres_url: str) -> None:
    """Guards the upgrade of a database made before trunks had both directions: version 3
    gives existing trunks the defaults (outbound-only, no registration, no challenge) and
    the notification function keeps its number branch while gaining the trunks'."""
    acme = Trunk(id=uuid.uuid4(), name="acme", host="gw.example", port=5060,
                 transport=TrunkTransport.UDP, provider="acme", username=None,
                 has_password=False, is_active=True, created_at=T0, updated_at=T0)
    con = await asyncpg.connect(postgres_url)
    try:
        async with con.transaction():
            await con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for version, statements in enumerate(MIGRATIONS[:2], 1):
                for statement in statements:
                    await con.execute(statement)
                await con.execute("INSERT INTO schema_version VALUES ($1)", version)
            await con.execute(
                "INSERT INTO trunks (id, name, host, port, transport, provider, is_active, "
                "created_at, updated_at) VALUES ($1, $2, $3, 5060, 'udp', 'acme', 1, $4, $4)",
                str(acme.id), acme.name, acme.host, to_text(T0))
    finally:
        await con.close()
    store = PostgresStore(postgres_url)
    await store.open()
    feed = Feed()
    task = asyncio.create_task(PostgresStore(postgres_url).watch_routes(feed))
    try:
        assert await store.get_trunk(acme.id) == acme
        await feed.until(1)
        n = PhoneNumber(uuid.uuid4(), "+31850835037", "", None, None, True, T0, T0)
        await store.create_number(n)
        await store.delete_trunk(acme.id)
        assert (await feed.until(3))[1:] == [NumberUpserted(n.id, n.phone_number, None, True),
                                             TrunkChanged(acme.id, removed=True)]
    finally:
        task.cancel()
        await store.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_server_is_store_unavailable_without_the_password() -> None:
    url = f"postgresql://router:s3cret@127.0.0.1:{_closed_port()}/callrouter"
    with pytest.raises(StoreUnavailable) as raised:
        await PostgresStore(url, timeout=2).open()
    assert raised.value.status == 503
    assert "127.0.0.1" in raised.value.message and "s3cret" not in raised.value.message
    assert safe_url(url) == f"postgresql://router@127.0.0.1:{url.split(':')[3]}"


class Feed:
    """Collects what ``watch_routes`` hands over."""

    def __init__(self) -> None:
        self.batches: list[Sequence[FeedChange] | None] = []
        self.changed = asyncio.Event()

    async def __call__(self, changes: Sequence[FeedChange] | None) -> None:
        self.batches.append(changes)
        self.changed.set()

    async def until(self, count: int) -> list[FeedChange | None]:
        async def enough() -> None:
            while len(self.flat()) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(enough(), 10)
        return self.flat()

    def flat(self) -> list[FeedChange | None]:
        return [c for batch in self.batches
                for c in ([None] if batch is None else batch)]


async def test_every_committed_change_reaches_the_feed_in_order(
        postgres_url: str, store: PostgresStore) -> None:
    """Guards item 2: a change made through any router (here: another store on the same
    database) reaches every listening router as route-table deltas."""
    feed = Feed()
    listener = PostgresStore(postgres_url)
    task = asyncio.create_task(listener.watch_routes(feed))
    try:
        assert await feed.until(1) == [None]  # connected: reload what may have been missed
        a = Assistant(uuid.uuid4(), "Sales", "sip:rt@host", T0, T0)
        await store.create_assistant(a)
        n = PhoneNumber(uuid.uuid4(), "+31850835037", "", a.id, None, True, T0, T0)
        await store.create_number(n)
        await store.update_number(PhoneNumber(n.id, n.phone_number, "", None, None, False,
                                              T0, T0))
        await store.delete_number(n.id)
        await store.delete_assistant(a.id)
        assert (await feed.until(6))[1:] == [
            AssistantUpserted(a.id, "sip:rt@host"),
            NumberUpserted(n.id, "+31850835037", a.id, True),
            NumberUpserted(n.id, "+31850835037", None, False),
            NumberRemoved("+31850835037"),
            AssistantRemoved(a.id)]
    finally:
        task.cancel()


async def test_trunk_writes_reach_the_feed(postgres_url: str, store: PostgresStore) -> None:
    """Guards issue 11 in a cluster: a trunk written through any router reaches every
    router, which reads it back (allow-list, challenge, registration follow)."""
    feed = Feed()
    task = asyncio.create_task(PostgresStore(postgres_url).watch_routes(feed))
    try:
        await feed.until(1)
        t = Trunk(id=uuid.uuid4(), name="acme", host="", port=5060,
                  transport=TrunkTransport.UDP, provider="acme", username="u",
                  has_password=False, is_active=True, created_at=T0, updated_at=T0,
                  inbound_addresses=("192.0.2.7",))
        await store.create_trunk(t, None)
        await store.update_trunk(t, b"secret", keep_password=False)
        await store.delete_trunk(t.id)
        assert (await feed.until(4))[1:] == [
            TrunkChanged(t.id), TrunkChanged(t.id), TrunkChanged(t.id, removed=True)]
    finally:
        task.cancel()


async def test_a_bulk_change_asks_for_a_reload_and_a_lost_connection_reloads(
        postgres_url: str, store: PostgresStore) -> None:
    feed = Feed()
    listener = PostgresStore(postgres_url)
    task = asyncio.create_task(listener.watch_routes(feed, probe_seconds=0.5))
    try:
        await feed.until(1)
        await store.create_numbers([
            PhoneNumber(uuid.uuid4(), f"+3185{i:07d}", "", None, None, True, T0, T0)
            for i in range(NOTIFY_ROWS + 1)])
        assert await feed.until(2) == [None, None]  # one reload, not a thousand deltas
        con = await asyncpg.connect(postgres_url)
        await con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = $1", LISTENER_NAME)
        await con.close()
        assert await feed.until(3) == [None, None, None]  # reconnected, reloaded
        a = Assistant(uuid.uuid4(), "After", None, T0, T0)
        await store.create_assistant(a)  # and listening again
        assert (await feed.until(4))[3] == AssistantUpserted(a.id, None)
    finally:
        task.cancel()
