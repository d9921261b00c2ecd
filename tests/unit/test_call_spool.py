"""Call records while the database is away (issue 10 item 4): spooled on disk in order,
kept across a restart, written when the database answers again, never lost; and the
webhook status-updates they cause (issue 12) spooled with them and written in the same
transaction as their records."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from callrouter.domain.models import (
    CallRecord,
    CallStatus,
    EndReason,
    PhoneNumber,
    WebhookDelivery,
)
from callrouter.domain.webhooks import EVENTS, CallFacts, StatusEvent, WebhookTarget
from callrouter.errors import StoreUnavailable
from callrouter.ports import CallQuery
from callrouter.service import CallRecorder
from callrouter.store.memory import MemoryStore
from callrouter.store.spool import SPOOL_FILE, CallSpool

pytestmark = pytest.mark.anyio
T0 = datetime(2025, 12, 13, 10, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FlakyStore(MemoryStore):
    """The in-memory store, unreachable while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.writes: list[tuple[list[uuid.UUID], list[uuid.UUID]]] = []  # one a transaction

    async def upsert_calls(self, records: Sequence[CallRecord],
                           deliveries: Sequence[WebhookDelivery] = ()) -> None:
        self._check()
        await super().upsert_calls(records, deliveries)
        self.writes.append(([r.id for r in records], [d.id for d in deliveries]))

    async def get_number(self, number_id: uuid.UUID) -> PhoneNumber | None:
        self._check()
        return await super().get_number(number_id)

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("the database is unreachable (test)")


def call(status: CallStatus = CallStatus.CONNECTING, **changes: object) -> CallRecord:
    base = CallRecord(id=uuid.uuid4(), status=status, caller_phone="+31612345678",
                      assistant_phone="+31850835037", number_id=None, assistant_id=None,
                      sip_call_id=f"sip-{uuid.uuid4()}", started_at=None, ended_at=None,
                      end_reason=None, error="a \"quoted\"\nline", created_at=T0,
                      updated_at=T0, router="edge-a:5060")
    return replace(base, **changes)  # type: ignore[arg-type]


HOOK = WebhookTarget("http://127.0.0.1:9/hook", None, frozenset(EVENTS))


def status_update(record: CallRecord, at: datetime) -> StatusEvent:
    """The status-update ``record`` causes (the SIP thread does not know the number's
    name: the recorder reads it)."""
    facts = CallFacts(call_id=record.id, number_id=record.number_id,
                      number=record.assistant_phone, number_name="",
                      caller=record.caller_phone, assistant_id=None)
    return StatusEvent(facts, HOOK, at)


def _down(tmp_path: Path) -> tuple[FlakyStore, CallRecorder]:
    """A store that is away, and a recorder spooling to ``tmp_path``."""
    store = FlakyStore()
    store.down = True
    return store, CallRecorder(store, asyncio.get_running_loop(),
                               CallSpool(tmp_path / SPOOL_FILE))


async def test_records_go_to_disk_while_the_database_is_away_and_survive_a_restart(
        tmp_path: Path) -> None:
    store, recorder = _down(tmp_path)
    ringing = call()
    recorder.submit(ringing)
    await recorder.flush()
    ended = replace(ringing, status=CallStatus.ENDED, started_at=T0, updated_at=T0 +
                    timedelta(seconds=9), ended_at=T0 + timedelta(seconds=9),
                    end_reason=EndReason.CALLER_HANGUP)
    other = call(CallStatus.FAILED, end_reason=EndReason.REJECTED_UNKNOWN_NUMBER)
    recorder.submit(ended)
    recorder.submit(other)
    await recorder.flush()
    assert recorder.spooled == 3 and (await store.list_calls(CallQuery()))[1] == 0

    # The router restarts during the outage: the spool is still there, in order.
    again = CallRecorder(store, asyncio.get_running_loop(), CallSpool(tmp_path / SPOOL_FILE))
    assert again.spooled == 3
    assert not await again.flush_spool()  # still down: kept
    assert again.spooled == 3
    store.down = False
    assert await again.flush_spool()
    assert again.spooled == 0 and not (tmp_path / SPOOL_FILE).exists()
    assert await store.get_call(ringing.id) == ended  # the later state won
    assert await store.get_call(other.id) == other


async def test_while_anything_is_spooled_new_records_queue_behind_it(tmp_path: Path) -> None:
    """A later state of a call must never land before an earlier spooled one."""
    store, recorder = _down(tmp_path)
    first = call()
    recorder.submit(first)
    await recorder.flush()
    store.down = False
    done = replace(first, status=CallStatus.FAILED, end_reason=EndReason.CALLER_CANCELLED,
                   updated_at=T0 + timedelta(seconds=2))
    recorder.submit(done)
    await recorder.flush()  # writes the spool first, then this batch
    assert recorder.spooled == 0
    assert await store.get_call(first.id) == done


async def test_the_writer_retries_the_spool_by_itself(tmp_path: Path) -> None:
    store, recorder = _down(tmp_path)
    recorder.SPOOL_RETRY = 0.05
    writer = asyncio.create_task(recorder.run())
    try:
        record = call()
        recorder.submit(record)
        while recorder.spooled == 0:
            await asyncio.sleep(0.01)
        store.down = False
        while recorder.spooled:
            await asyncio.sleep(0.01)
        assert await store.get_call(record.id) == record
    finally:
        writer.cancel()


async def test_status_updates_caused_during_an_outage_are_spooled_with_their_records(
        tmp_path: Path) -> None:
    """No status-update is lost to an outage: each goes to disk with its record (its body
    naming the number as last read) and into the outbox in the record's transaction."""
    store = FlakyStore()
    sales = PhoneNumber(id=uuid.uuid4(), phone_number="+31850835037", name="Sales",
                        assistant_id=None, transfer_trunk_id=None, is_active=True,
                        created_at=T0, updated_at=T0)
    await store.create_number(sales)
    woken: list[bool] = []
    recorder = CallRecorder(store, asyncio.get_running_loop(),
                            CallSpool(tmp_path / SPOOL_FILE),
                            on_outbox=lambda: woken.append(True))
    talking = call(CallStatus.IN_PROGRESS, number_id=sales.id, started_at=T0)
    recorder.submit_event(talking, status_update(talking, T0))
    await recorder.flush()  # the database is up: written, and the name read
    store.down = True
    ended = replace(talking, status=CallStatus.ENDED, updated_at=T0 + timedelta(seconds=9),
                    ended_at=T0 + timedelta(seconds=9), end_reason=EndReason.CALLER_HANGUP)
    quiet = call()
    recorder.submit_event(ended, status_update(ended, T0 + timedelta(seconds=9)))
    recorder.submit(quiet)
    await recorder.flush()
    assert recorder.spooled == 2
    assert (await store.list_deliveries(None, 10, 0))[1] == 1

    # A restart during the outage keeps them; once the database is back, each spooled
    # record is written with its event in one transaction.
    again = CallRecorder(store, asyncio.get_running_loop(), CallSpool(tmp_path / SPOOL_FILE),
                         on_outbox=lambda: woken.append(True))
    store.down = False
    store.writes.clear()
    woken.clear()
    assert await again.flush_spool()
    assert await store.get_call(talking.id) == ended
    found, total = await store.list_deliveries(None, 10, 0)
    assert total == 2
    last = json.loads(found[0].body)["message"]
    assert last["call"]["status"] == "ended" and last["phone_number"]["name"] == "Sales"
    assert found[0].call_id == talking.id and found[0].url == HOOK.url
    assert store.writes == [([ended.id, quiet.id], [found[0].id])]
    assert woken == [True]  # the outbox worker looks at once


async def test_a_spool_written_twice_by_a_crash_adds_no_event_twice(tmp_path: Path) -> None:
    """A crash after the spool was written to the database but before it was emptied:
    the next start writes it again; records are upserted, events not duplicated."""
    store, recorder = _down(tmp_path)
    record = call(CallStatus.IN_PROGRESS)
    recorder.submit_event(record, status_update(record, T0))
    await recorder.flush()
    kept = tmp_path / "kept.spool"
    shutil.copy(tmp_path / SPOOL_FILE, kept)
    store.down = False
    assert await recorder.flush_spool()
    shutil.copy(kept, tmp_path / SPOOL_FILE)  # as if the crash had kept it
    again = CallRecorder(store, asyncio.get_running_loop(), CallSpool(tmp_path / SPOOL_FILE))
    assert again.spooled == 1
    assert await again.flush_spool()
    assert again.spooled == 0
    assert (await store.list_deliveries(None, 10, 0))[1] == 1


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path: Path) -> None:
    spool = CallSpool(tmp_path / SPOOL_FILE)
    kept = call()
    spool.append([(kept, [])])
    with open(spool.path, "a") as out:
        out.write('["cut sh')
    assert CallSpool(spool.path).read() == [(kept, [])]


def test_a_spool_from_before_a_column_was_added_still_reads(tmp_path: Path) -> None:
    """Guards an upgrade with records still spooled: a line lacking ``router`` and
    ``trunk_id`` (written by a router from before node names and trunks) reads back with
    the columns' defaults."""
    spool = CallSpool(tmp_path / SPOOL_FILE)
    record = call(router="")
    spool.append([(record, [])])
    line = json.loads(spool.path.read_text())
    del line["router"], line["trunk_id"]
    spool.path.write_text(json.dumps(line) + "\n")
    assert CallSpool(spool.path).read() == [(record, [])]


def test_an_outbound_call_through_a_trunk_is_spooled_whole(tmp_path: Path) -> None:
    """Guards the spool's line against dropping a record field: an outbound call keeps its
    direction and trunk through the disk."""
    spool = CallSpool(tmp_path / SPOOL_FILE)
    outbound = call(CallStatus.IN_PROGRESS, started_at=T0, direction="outbound",
                    trunk_id=uuid.uuid4())
    inbound = call(trunk_id=uuid.uuid4())
    spool.append([(outbound, []), (inbound, [])])
    assert CallSpool(spool.path).read() == [(outbound, []), (inbound, [])]
