"""Call records while the database is away (issue 10 item 4): spooled on disk in order,
kept across a restart, written when the database answers again, never lost."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from callrouter.domain.models import CallRecord, CallStatus, EndReason
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

    async def upsert_calls(self, records: Sequence[CallRecord]) -> None:
        if self.down:
            raise StoreUnavailable("the database is unreachable (test)")
        await super().upsert_calls(records)


def call(status: CallStatus = CallStatus.CONNECTING, **changes: object) -> CallRecord:
    base = CallRecord(id=uuid.uuid4(), status=status, caller_phone="+31612345678",
                      assistant_phone="+31850835037", number_id=None, assistant_id=None,
                      sip_call_id=f"sip-{uuid.uuid4()}", started_at=None, ended_at=None,
                      end_reason=None, error="a \"quoted\"\nline", created_at=T0,
                      updated_at=T0, router="edge-a:5060")
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_records_go_to_disk_while_the_database_is_away_and_survive_a_restart(
        tmp_path: Path) -> None:
    store = FlakyStore()
    store.down = True
    recorder = CallRecorder(store, asyncio.get_running_loop(), CallSpool(tmp_path / SPOOL_FILE))
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
    store = FlakyStore()
    store.down = True
    recorder = CallRecorder(store, asyncio.get_running_loop(), CallSpool(tmp_path / SPOOL_FILE))
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
    store = FlakyStore()
    store.down = True
    recorder = CallRecorder(store, asyncio.get_running_loop(), CallSpool(tmp_path / SPOOL_FILE))
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


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path: Path) -> None:
    spool = CallSpool(tmp_path / SPOOL_FILE)
    kept = call()
    spool.append([kept])
    with open(spool.path, "a") as out:
        out.write('["cut sh')
    assert CallSpool(spool.path).read() == [kept]
