"""One contract suite for ``ports.Store``, run against ``SqliteStore``, ``PostgresStore``
(a fresh database in the session's throw-away cluster) and ``MemoryStore``.

The in-memory fake is only worth having if it behaves like the real stores; every test
here runs on all three, so a rule enforced by one but not another (a UNIQUE number, a
RESTRICT on delete, newest-first calls) fails here.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from callrouter.domain.models import (
    ApiKey,
    Assistant,
    CallRecord,
    CallStatus,
    DeliveryStatus,
    EndReason,
    PhoneNumber,
    Trunk,
    TrunkTransport,
    WebhookDelivery,
)
from callrouter.errors import Conflict, NotFound, StoreError
from callrouter.ports import CallQuery, NumberQuery, Store
from callrouter.store import MemoryStore, PostgresStore, SqliteStore, rows
from callrouter.store.rows import DELIVERY_COLS, insert_sql
from callrouter.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS

pytestmark = pytest.mark.anyio
T0 = datetime(2025, 12, 13, 10, 0, 0, 123456, tzinfo=UTC)
ROUTER = "edge-a:5060"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "memory", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    made: Store
    if request.param == "sqlite":
        made = SqliteStore(tmp_path / "db" / "callrouter.db")
    elif request.param == "postgres":
        made = PostgresStore(request.getfixturevalue("postgres_url"))
    else:
        made = MemoryStore()
    await made.open()
    yield made
    await made.close()


def number(e164: str = "+31850835037", **changes: object) -> PhoneNumber:
    base = PhoneNumber(id=uuid.uuid4(), phone_number=e164, name="Sales", assistant_id=None,
                       transfer_trunk_id=None, is_active=True, created_at=T0, updated_at=T0)
    return replace(base, **changes)  # type: ignore[arg-type]


def assistant(name: str = "Sales") -> Assistant:
    return Assistant(id=uuid.uuid4(), name=name, runtime_uri="sip:rt@host",
                     created_at=T0, updated_at=T0)


def trunk(**changes: object) -> Trunk:
    base = Trunk(id=uuid.uuid4(), name="carrier", host="sip.example.com", port=5060,
                 transport=TrunkTransport.UDP, provider="acme", username="user",
                 has_password=False, is_active=True, created_at=T0, updated_at=T0)
    return replace(base, **changes)  # type: ignore[arg-type]


def call(created: datetime, status: CallStatus = CallStatus.ENDED, **changes: object
         ) -> CallRecord:
    base = CallRecord(id=uuid.uuid4(), status=status, caller_phone="+31612345678",
                      assistant_phone="+31850835037", number_id=None, assistant_id=None,
                      sip_call_id=f"sip-{uuid.uuid4()}", started_at=None, ended_at=None,
                      end_reason=None, error=None, created_at=created, updated_at=created,
                      router=ROUTER)
    return replace(base, **changes)  # type: ignore[arg-type]


# -- numbers -----------------------------------------------------------------------------

async def test_number_round_trips_exactly(store: Store) -> None:
    a = await store.create_assistant(assistant())
    n = number(assistant_id=a.id)
    await store.create_number(n)
    assert await store.get_number(n.id) == n
    assert list(await store.list_numbers()) == [n]


async def test_number_pages_in_text_order_by_prefix_offset_and_keyset(store: Store) -> None:
    made = [await store.create_number(number(e164)) for e164 in
            ("+31850835038", "+4420", "+31850835037", "+3185", "+3120")]
    by_text = sorted(made, key=lambda n: n.phone_number)
    assert list(await store.page_numbers(NumberQuery())) == by_text
    assert [n.phone_number for n in await store.page_numbers(NumberQuery(prefix="+3185"))] == [
        "+3185", "+31850835037", "+31850835038"]
    assert list(await store.page_numbers(NumberQuery(limit=2, offset=1))) == by_text[1:3]
    after = await store.page_numbers(NumberQuery(limit=2, after="+31850835037"))
    assert [n.phone_number for n in after] == ["+31850835038", "+4420"]


async def test_route_rows_are_the_numbers_in_text_order(store: Store) -> None:
    a = await store.create_assistant(assistant())
    first = await store.create_number(number("+31850835038", assistant_id=a.id))
    second = await store.create_number(number("+3185", is_active=False))
    assert list(await store.route_rows("", 10)) == [
        ("+3185", str(second.id), None, False), ("+31850835038", str(first.id), str(a.id), True)]
    assert list(await store.route_rows("+3185", 1)) == [
        ("+31850835038", str(first.id), str(a.id), True)]


async def test_bulk_create_is_all_or_nothing_and_existing_numbers_are_found(
        store: Store) -> None:
    await store.create_number(number("+31850835037"))
    batch = [number("+31850835038"), number("+31850835039"), number("+31850835037")]
    with pytest.raises(Conflict):
        await store.create_numbers(batch)
    assert len(await store.list_numbers()) == 1
    await store.create_numbers(batch[:2])
    assert len(await store.list_numbers()) == 3
    asked = [f"+318508350{i:02d}" for i in range(30, 60)] * 40  # more than one IN () chunk
    assert await store.existing_numbers(asked) == {"+31850835037", "+31850835038",
                                                   "+31850835039"}


async def test_duplicate_number_is_a_conflict_naming_the_field(store: Store) -> None:
    await store.create_number(number())
    with pytest.raises(Conflict) as caught:
        await store.create_number(number())
    assert caught.value.details[0].field == "phone_number"


async def test_concurrent_duplicate_registration_has_exactly_one_winner(store: Store) -> None:
    """Guards the UNIQUE constraint: no check-then-insert race between coroutines."""
    results = await asyncio.gather(*(store.create_number(number()) for _ in range(8)),
                                   return_exceptions=True)
    assert sum(isinstance(r, PhoneNumber) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 7
    assert len(await store.list_numbers()) == 1


async def test_update_to_a_taken_number_is_a_conflict(store: Store) -> None:
    await store.create_number(number("+31850835037"))
    other = await store.create_number(number("+31850835038"))
    with pytest.raises(Conflict):
        await store.update_number(replace(other, phone_number="+31850835037"))


async def test_update_keeps_created_at_and_applies_fields(store: Store) -> None:
    n = await store.create_number(number())
    later = T0 + timedelta(minutes=5)
    await store.update_number(replace(n, name="Support", is_active=False, updated_at=later,
                                      created_at=later))
    stored = await store.get_number(n.id)
    assert stored == replace(n, name="Support", is_active=False, updated_at=later)


async def test_update_of_unknown_number_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.update_number(number())


async def test_delete_number_reports_whether_it_existed(store: Store) -> None:
    n = await store.create_number(number())
    assert await store.delete_number(n.id) is True
    assert await store.delete_number(n.id) is False
    assert await store.get_number(n.id) is None


async def test_number_may_not_point_at_a_missing_assistant(store: Store) -> None:
    with pytest.raises(Conflict):
        await store.create_number(number(assistant_id=uuid.uuid4()))


# -- references --------------------------------------------------------------------------

async def test_assistant_in_use_cannot_be_deleted(store: Store) -> None:
    a = await store.create_assistant(assistant())
    n = await store.create_number(number(assistant_id=a.id))
    with pytest.raises(Conflict):
        await store.delete_assistant(a.id)
    await store.update_number(replace(n, assistant_id=None))
    assert await store.delete_assistant(a.id) is True


async def test_trunk_in_use_cannot_be_deleted(store: Store) -> None:
    t = await store.create_trunk(trunk(), None)
    await store.create_number(number(transfer_trunk_id=t.id))
    with pytest.raises(Conflict):
        await store.delete_trunk(t.id)
    assert await store.get_trunk(t.id) is not None


# -- trunks ------------------------------------------------------------------------------

async def test_trunk_password_is_kept_replaced_or_cleared(store: Store) -> None:
    t = await store.create_trunk(trunk(), b"secret-1")
    assert t.has_password and await store.get_trunk_password(t.id) == b"secret-1"
    kept = await store.update_trunk(replace(t, name="renamed"), None, keep_password=True)
    assert kept.name == "renamed" and await store.get_trunk_password(t.id) == b"secret-1"
    await store.update_trunk(t, b"secret-2", keep_password=False)
    assert await store.get_trunk_password(t.id) == b"secret-2"
    cleared = await store.update_trunk(t, None, keep_password=False)
    assert not cleared.has_password and await store.get_trunk_password(t.id) is None


async def test_trunk_round_trips(store: Store) -> None:
    t = trunk(transport=TrunkTransport.TLS, port=5061, username=None)
    assert await store.create_trunk(t, None) == t
    assert list(await store.list_trunks()) == [t]
    assert await store.delete_trunk(t.id) is True
    assert await store.get_trunk(t.id) is None


async def test_provider_trunk_fields_round_trip(store: Store) -> None:
    t = trunk(host="", inbound_addresses=("192.0.2.1", "10.0.0.0/8", "gw.example"),
              outbound_number="+31850835037", register=True, register_expires=120,
              inbound_auth=True)
    assert await store.create_trunk(t, None) == t
    assert await store.get_trunk(t.id) == t
    changed = replace(t, inbound_addresses=(), register=False)
    assert await store.update_trunk(changed, None, keep_password=True) == changed
    assert list(await store.list_trunks()) == [changed]


# -- assistants --------------------------------------------------------------------------

async def test_assistant_crud(store: Store) -> None:
    a = await store.create_assistant(assistant())
    with pytest.raises(Conflict):
        await store.create_assistant(a)
    await store.update_assistant(replace(a, runtime_uri=None))
    assert (await store.get_assistant(a.id)) == replace(a, runtime_uri=None)
    with pytest.raises(NotFound):
        await store.update_assistant(assistant())
    assert [x.id for x in await store.list_assistants()] == [a.id]


async def test_assistant_webhook_fields_round_trip_and_the_secret_stays_apart(
        store: Store) -> None:
    a = replace(assistant(), webhook_url="https://hooks.example.com/x",
                webhook_events=("assistant-request", "status-update"))
    created = await store.create_assistant(a, b"enc-1")
    assert created.has_webhook_secret and created.webhook_events == a.webhook_events
    assert await store.get_assistant(a.id) == created
    assert await store.get_assistant_webhook_secret(a.id) == b"enc-1"
    kept = await store.update_assistant(replace(created, name="Renamed"))
    assert kept.has_webhook_secret and await store.get_assistant_webhook_secret(a.id) == b"enc-1"
    replaced = await store.update_assistant(kept, b"enc-2", keep_webhook_secret=False)
    assert replaced.has_webhook_secret
    assert await store.get_assistant_webhook_secret(a.id) == b"enc-2"
    cleared = await store.update_assistant(
        replace(kept, webhook_url=None, webhook_events=()), None, keep_webhook_secret=False)
    assert not cleared.has_webhook_secret and cleared.webhook_url is None
    assert await store.get_assistant(a.id) == cleared
    assert await store.get_assistant_webhook_secret(a.id) is None


# -- calls -------------------------------------------------------------------------------

async def test_call_direction_and_trunk_round_trip(store: Store) -> None:
    c = call(T0, direction="outbound", trunk_id=uuid.uuid4())
    await store.upsert_calls([c])
    assert await store.get_call(c.id) == c


async def test_calls_list_newest_first_with_total_and_paging(store: Store) -> None:
    calls = [call(T0 + timedelta(seconds=i)) for i in range(5)]
    await store.upsert_calls(calls)
    page, total = await store.list_calls(CallQuery(limit=2, offset=1))
    assert total == 5
    assert [c.id for c in page] == [calls[3].id, calls[2].id]


async def test_calls_filter_by_status_and_dates(store: Store) -> None:
    old = call(T0 - timedelta(days=2))
    live = call(T0, CallStatus.IN_PROGRESS)
    new = call(T0 + timedelta(days=2))
    await store.upsert_calls([old, live, new])
    found, total = await store.list_calls(CallQuery(status=CallStatus.IN_PROGRESS))
    assert [c.id for c in found] == [live.id] and total == 1
    window = CallQuery(start_date=T0 - timedelta(days=1), end_date=T0 + timedelta(days=1))
    assert [c.id for c in (await store.list_calls(window))[0]] == [live.id]


async def test_upsert_updates_but_keeps_created_at(store: Store) -> None:
    c = call(T0, CallStatus.CONNECTING)
    await store.upsert_calls([c])
    ended = replace(c, status=CallStatus.ENDED, started_at=T0, ended_at=T0 + timedelta(seconds=42),
                    end_reason=EndReason.CALLER_HANGUP, created_at=T0 + timedelta(hours=1))
    await store.upsert_calls([ended])
    stored = await store.get_call(c.id)
    assert stored == replace(ended, created_at=T0)
    assert stored is not None and stored.duration_seconds == 42


async def test_close_open_calls_marks_them_failed_router_restart(store: Store) -> None:
    open_calls = [call(T0, CallStatus.CONNECTING), call(T0, CallStatus.IN_PROGRESS)]
    done = call(T0, CallStatus.ENDED, end_reason=EndReason.CALLER_HANGUP)
    await store.upsert_calls([*open_calls, done])
    later = T0 + timedelta(minutes=1)
    assert await store.close_open_calls(later, ROUTER) == 2
    for c in open_calls:
        closed = await store.get_call(c.id)
        assert closed is not None
        assert (closed.status, closed.end_reason, closed.ended_at) == (
            CallStatus.FAILED, EndReason.ROUTER_RESTART, later)
    assert await store.get_call(done.id) == done


async def test_close_open_calls_ends_them_at_the_last_heartbeat(store: Store) -> None:
    """Guards true durations after a crash: a call left open ends at the router's last
    heartbeat, not at the restart (the downtime is not call time), and never before the
    record's own last update (a call that began after the last beat)."""
    ringing = call(T0, CallStatus.CONNECTING)
    talking = call(T0, CallStatus.IN_PROGRESS, started_at=T0 + timedelta(seconds=5),
                   updated_at=T0 + timedelta(seconds=5))
    late = call(T0 + timedelta(seconds=25), CallStatus.IN_PROGRESS,
                started_at=T0 + timedelta(seconds=25))
    await store.upsert_calls([ringing, talking, late])
    await store.heartbeat(T0 + timedelta(seconds=10), ROUTER)
    await store.heartbeat(T0 + timedelta(seconds=20), ROUTER)
    await store.heartbeat(T0 + timedelta(seconds=50), "other:5060")
    restart = T0 + timedelta(hours=1)
    assert await store.close_open_calls(restart, ROUTER) == 3
    closed = [await store.get_call(c.id) for c in (ringing, talking, late)]
    assert [c and (c.status, c.end_reason, c.ended_at, c.updated_at) for c in closed] == [
        (CallStatus.FAILED, EndReason.ROUTER_RESTART, T0 + timedelta(seconds=20), restart),
        (CallStatus.FAILED, EndReason.ROUTER_RESTART, T0 + timedelta(seconds=20), restart),
        (CallStatus.FAILED, EndReason.ROUTER_RESTART, T0 + timedelta(seconds=25), restart)]
    assert closed[1] is not None and closed[1].duration_seconds == 15


async def test_prune_deletes_old_closed_calls_oldest_first_at_most_limit_at_a_time(
        store: Store) -> None:
    """Guards the retention prune (issue 9 item 7): one bounded batch per call, only
    records created before the cut-off, never a call still connecting or in progress."""
    cutoff = T0 - timedelta(days=90)
    old = [call(cutoff - timedelta(days=1, seconds=i), status)
           for i, status in enumerate([CallStatus.ENDED, CallStatus.FAILED] * 3)]
    still_open = call(cutoff - timedelta(days=5), CallStatus.IN_PROGRESS)
    recent = call(cutoff + timedelta(seconds=1), CallStatus.FAILED)
    await store.upsert_calls([*old, still_open, recent])
    assert await store.delete_calls_before(cutoff, limit=4) == 4
    left = {c.id for c in (await store.list_calls(CallQuery()))[0]}
    assert left == {old[0].id, old[1].id, still_open.id, recent.id}  # the oldest went first
    assert await store.delete_calls_before(cutoff, limit=4) == 2
    assert await store.delete_calls_before(cutoff, limit=4) == 0
    assert (await store.list_calls(CallQuery()))[1] == 2


async def test_close_open_calls_closes_only_the_restarting_routers_calls(
        store: Store) -> None:
    """Guards a shared database: a restarting router must not end the calls another
    router is still carrying, and its own end at its own last heartbeat."""
    mine = call(T0, CallStatus.IN_PROGRESS, started_at=T0)
    theirs = call(T0, CallStatus.IN_PROGRESS, started_at=T0, router="edge-b:5060")
    unnamed = call(T0, CallStatus.CONNECTING, router="")  # written before routers had names
    await store.upsert_calls([mine, theirs, unnamed])
    await store.heartbeat(T0 + timedelta(seconds=7), ROUTER)
    await store.heartbeat(T0 + timedelta(seconds=90), "edge-b:5060")
    assert await store.close_open_calls(T0 + timedelta(hours=1), ROUTER) == 2
    closed = await store.get_call(mine.id)
    assert closed is not None and closed.ended_at == T0 + timedelta(seconds=7)
    assert closed.router == ROUTER
    assert await store.get_call(theirs.id) == theirs
    still = await store.get_call(unnamed.id)
    assert still is not None and still.status == CallStatus.FAILED


async def test_a_claim_is_won_once(store: Store) -> None:
    assert await asyncio.gather(*(store.claim("first_api_key") for _ in range(3))) in (
        [True, False, False], [False, True, False], [False, False, True])
    assert await store.claim("something else")


async def test_key_check_keeps_the_first_value(store: Store) -> None:
    assert await store.key_check(b"first") == b"first"
    assert await store.key_check(b"second") == b"first"


# -- API keys ----------------------------------------------------------------------------

async def test_api_keys_are_found_by_hash_only(store: Store) -> None:
    key = ApiKey(id=uuid.uuid4(), name="ops", prefix="cr_abcde", read_only=True, created_at=T0)
    assert await store.count_api_keys() == 0
    await store.create_api_key(key, b"h" * 32)
    assert await store.find_api_key(b"h" * 32) == key
    assert await store.find_api_key(b"x" * 32) is None
    assert await store.count_api_keys() == 1


async def test_ping_answers(store: Store) -> None:
    assert await store.ping() >= 0


# -- SQLite only: persistence and migrations ---------------------------------------------

async def test_sqlite_data_survives_reopen_and_migrations_run_once(tmp_path: Path) -> None:
    path = tmp_path / "callrouter.db"
    first = SqliteStore(path)
    await first.open()
    n = await first.create_number(number())
    await first.close()
    second = SqliteStore(path)
    await second.open()  # a second open must not re-run migration 1 (tables exist)
    try:
        assert await second.get_number(n.id) == n
    finally:
        await second.close()


async def test_sqlite_heartbeat_survives_a_reopen(tmp_path: Path) -> None:
    """The heartbeat is read by the next process, after a crash: it must be on disk."""
    path = tmp_path / "callrouter.db"
    first = SqliteStore(path)
    await first.open()
    talking = call(T0, CallStatus.IN_PROGRESS, started_at=T0)
    try:
        await first.upsert_calls([talking])
        await first.heartbeat(T0 + timedelta(seconds=30), ROUTER)
    finally:
        await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        await second.close_open_calls(T0 + timedelta(hours=2), ROUTER)
        closed = await second.get_call(talking.id)
        assert closed is not None and closed.ended_at == T0 + timedelta(seconds=30)
    finally:
        await second.close()


async def test_sqlite_upgrades_a_webhooks_schema_keeping_its_heartbeat_and_outbox(
        tmp_path: Path) -> None:
    """Guards the migration order: a database at version 3 (the webhooks) gets version 4
    (named routers), its one heartbeat becoming the unnamed router's."""
    path = tmp_path / "callrouter.db"
    talking = call(T0, CallStatus.IN_PROGRESS, started_at=T0, router="")
    event = delivery(talking.id)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER)")
        for version, statements in enumerate(SQLITE_MIGRATIONS[:3], 1):
            for statement in statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_version VALUES (?)", (version,))
        row = rows.call_to_row(talking)
        del row["router"], row["trunk_id"]  # added by versions 4 and 5
        db.execute(insert_sql("calls", tuple(row)), row)
        db.execute(insert_sql("webhook_outbox", DELIVERY_COLS), rows.delivery_to_row(event))
        db.execute("INSERT INTO heartbeat (id, at) VALUES (1, ?)",
                   (rows.to_text(T0 + timedelta(seconds=30)),))
    db.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.get_delivery(event.id) == event
        assert await store.close_open_calls(T0 + timedelta(hours=2), ROUTER) == 1
        closed = await store.get_call(talking.id)
        assert closed is not None and closed.ended_at == T0 + timedelta(seconds=30)
    finally:
        await store.close()


async def test_sqlite_refuses_a_database_from_a_newer_router(tmp_path: Path) -> None:
    """Guards against an older router silently running on a schema it does not know."""
    path = tmp_path / "callrouter.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (99)")
    db.close()
    newer = SqliteStore(path)
    with pytest.raises(StoreError, match="newer"):
        await newer.open()


async def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "callrouter.db")
    await store.open()
    await store.close()
    with sqlite3.connect(tmp_path / "callrouter.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


# -- the webhook outbox ---------------------------------------------------------------------

def delivery(call_id: uuid.UUID | None, at: datetime = T0, **changes: object) -> WebhookDelivery:
    base = WebhookDelivery(
        id=uuid.uuid4(), call_id=call_id, event="status-update", url="http://127.0.0.1:9/x",
        assistant_id=None, body='{"message": {}}', status=DeliveryStatus.PENDING, attempts=0,
        next_attempt_at=at, expires_at=at + timedelta(hours=24), last_error=None,
        created_at=at, updated_at=at)
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_outbox_is_written_with_the_call_and_due_in_order_one_per_call(
        store: Store) -> None:
    c1, c2 = call(T0, CallStatus.IN_PROGRESS), call(T0, CallStatus.IN_PROGRESS)
    first, second = delivery(c1.id), delivery(c1.id)
    other = delivery(c2.id, at=T0 + timedelta(seconds=30))
    await store.upsert_calls([c1, c2], [first, second, other])
    assert await store.get_call(c1.id) == c1
    assert [d.id for d in await store.due_deliveries(T0, 10)] == [first.id]
    assert [d.id for d in await store.due_deliveries(T0 + timedelta(minutes=1), 10)] == [
        first.id, other.id]
    assert await store.next_delivery_at() == T0
    done = replace(first, status=DeliveryStatus.DELIVERED, attempts=1, updated_at=T0)
    await store.update_delivery(done)
    assert await store.get_delivery(first.id) == done
    assert [d.id for d in await store.due_deliveries(T0, 10)] == [second.id]
    assert await store.count_deliveries(DeliveryStatus.PENDING) == 2


async def test_a_due_event_is_claimed_by_one_attempt_only(store: Store) -> None:
    """Guards routers sharing an outbox: of two that read the same due event, one takes
    it; it is not due again until the claim runs out."""
    c = call(T0, CallStatus.IN_PROGRESS)
    d, later = delivery(c.id), delivery(c.id)
    await store.upsert_calls([c], [d, later])
    until = T0 + timedelta(seconds=15)
    assert await store.claim_delivery(d, until)
    assert not await store.claim_delivery(d, until)  # the other router read it as due too
    assert await store.due_deliveries(T0 + timedelta(seconds=10), 10) == []  # order kept
    assert [x.id for x in await store.due_deliveries(until, 10)] == [d.id]
    claimed = await store.get_delivery(d.id)
    assert claimed is not None and claimed.next_attempt_at == until
    await store.update_delivery(replace(claimed, status=DeliveryStatus.DELIVERED))
    assert not await store.claim_delivery(claimed, until)  # settled: nothing to take


async def test_a_duplicate_delivery_id_fails_the_whole_write(store: Store) -> None:
    c = call(T0)
    d = delivery(c.id)
    await store.upsert_calls([c], [d])
    changed = replace(c, status=CallStatus.FAILED)
    with pytest.raises(Conflict):
        await store.upsert_calls([changed], [d])
    assert await store.get_call(c.id) == c  # the record change was not kept either


async def test_failed_deliveries_are_listed_newest_first_and_retried(store: Store) -> None:
    c = call(T0)
    old, new = delivery(c.id), delivery(c.id)
    await store.upsert_calls([c], [old, new])
    for d in (old, new):
        await store.update_delivery(replace(d, status=DeliveryStatus.FAILED, attempts=3,
                                            last_error="HTTP 410"))
    found, total = await store.list_deliveries(DeliveryStatus.FAILED, 1, 0)
    assert total == 2 and [d.id for d in found] == [new.id]
    assert found[0].last_error == "HTTP 410" and found[0].attempts == 3
    assert await store.due_deliveries(T0 + timedelta(days=1), 10) == []
    assert await store.next_delivery_at() is None
    with pytest.raises(NotFound):
        await store.update_delivery(delivery(c.id))


async def test_close_open_calls_adds_the_ended_event_after_the_last_one(store: Store) -> None:
    open_call = call(T0, CallStatus.IN_PROGRESS)
    quiet = call(T0, CallStatus.IN_PROGRESS)
    last = delivery(open_call.id, body='{"last": true}')
    await store.upsert_calls([open_call, quiet], [delivery(open_call.id), last])
    seen: list[tuple[CallRecord, WebhookDelivery]] = []

    def ended(record: CallRecord, previous: WebhookDelivery) -> WebhookDelivery:
        seen.append((record, previous))
        return delivery(record.id, body=f"ended {record.end_reason}")

    assert await store.close_open_calls(T0 + timedelta(hours=1), ROUTER, ended) == 2
    assert [(r.id, r.end_reason, p.id) for r, p in seen] == [
        (open_call.id, EndReason.ROUTER_RESTART, last.id)]
    found, total = await store.list_deliveries(None, 10, 0)
    assert total == 3 and found[0].body == "ended router_restart"


async def test_old_delivered_and_failed_events_are_pruned_never_pending_ones(
        store: Store) -> None:
    c = call(T0)
    done, failed, waiting = delivery(c.id), delivery(c.id), delivery(c.id)
    young = delivery(c.id, at=T0 + timedelta(days=2))
    await store.upsert_calls([c], [done, failed, waiting, young])
    await store.update_delivery(replace(done, status=DeliveryStatus.DELIVERED))
    await store.update_delivery(replace(failed, status=DeliveryStatus.FAILED))
    await store.update_delivery(replace(young, status=DeliveryStatus.DELIVERED))
    assert await store.delete_deliveries_before(T0 + timedelta(days=1), 1) == 1
    assert await store.delete_deliveries_before(T0 + timedelta(days=1), 10) == 1
    left, total = await store.list_deliveries(None, 10, 0)
    assert total == 2 and {d.id for d in left} == {waiting.id, young.id}
