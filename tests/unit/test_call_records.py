"""Call records under a flood: rejected INVITEs sampled, old records pruned.

Guards issue 9 item 7(a): 30,000 INVITEs to an unknown number wrote one call record per
INVITE (20,099 rows, 15.8 MB) and nothing ever deleted them. A rejected INVITE is now
always counted (``callrouter_routing_decisions_total``) but recorded, and logged, at most
``calls.rejected_records_per_second`` times per outcome per second; bridged calls are
always recorded; records older than ``calls.retention_days`` are deleted in batches on
the asyncio loop. The in-memory service tier, with an injected clock.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from structlog.testing import capture_logs

from callrouter.domain import session as s
from callrouter.domain.models import (
    Assistant,
    CallRecord,
    CallStatus,
    EndReason,
    PhoneNumber,
)
from callrouter.domain.routing import Policy, RuntimePool
from callrouter.domain.sampling import PerSecondSampler
from callrouter.metrics import Metrics
from callrouter.ports import Accepted, CallQuery, InboundInvite, Rejected
from callrouter.service import CallPruner, CallService
from callrouter.store.memory import MemoryStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ASSISTANT = uuid.UUID(int=7)
NUMBER = "+31850835037"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_service(per_second: int) -> tuple[CallService, list[CallRecord], Clock, Metrics]:
    records: list[CallRecord] = []
    clock, metrics = Clock(), Metrics()
    service = CallService(
        policy=Policy(max_calls=100), timing=s.Timing(ring_timeout=5, max_duration=60),
        pool=RuntimePool(()), default_region="NL", metrics=metrics, record=records.append,
        wall=lambda: T0, clock=clock, rejected_records_per_second=per_second)
    store = MemoryStore()

    async def seed() -> None:
        await store.create_assistant(Assistant(ASSISTANT, "A", "sip:rt@10.0.0.1", T0, T0))
        await store.create_number(PhoneNumber(uuid.UUID(int=1), NUMBER, "", ASSISTANT,
                                              None, True, T0, T0))
        await service.reload_routes(store)

    asyncio.run(seed())
    return service, records, clock, metrics


def invite(clock: Clock, dialled: str = "+31850835099", n: int = 0) -> InboundInvite:
    uri = f"sip:{dialled}@router"
    return InboundInvite(f"flood-{n}@provider", uri, f"<{uri}>", "<sip:0201234567@p>;tag=1",
                         "127.0.0.1:5062", clock.now)


def decisions(metrics: Metrics, outcome: str) -> float:
    series = f'callrouter_routing_decisions_total{{outcome="{outcome}"}} '
    body = metrics.render()[0].decode()
    return next(float(line.split()[-1]) for line in body.splitlines() if line.startswith(series))


def test_rejections_beyond_the_limit_per_outcome_and_second_are_counted_not_recorded() -> None:
    service, records, clock, metrics = make_service(per_second=5)
    for n in range(300):  # 200 INVITEs a second for 1.5 s, to a number nobody registered
        answer = service.on_invite(invite(clock, n=n))
        assert isinstance(answer, Rejected) and answer.code == 404  # every one answered
        clock.now += 0.005
    for n in range(3):  # another outcome has its own allowance
        service.on_invite(invite(clock, "alice", n))
    clock.now += 1.0
    service.on_invite(invite(clock, n=300))  # a new second: recorded again
    dialled = [r.assistant_phone for r in records]
    assert dialled.count("+31850835099") == 5 + 5 + 1  # seconds 100, 101 and 102
    assert dialled.count("alice") == 3
    assert decisions(metrics, "unknown_number") == 301
    assert decisions(metrics, "not_a_number") == 3


def test_a_recorded_rejection_is_the_same_full_record_as_before() -> None:
    """The calls API contract (../shared/api.md, Calls) holds for what is recorded."""
    service, records, clock, _ = make_service(per_second=1)
    service.on_invite(invite(clock, n=1))
    (record,) = records
    assert (record.status, record.end_reason, record.ended_at, record.sip_call_id,
            record.assistant_phone, record.caller_phone) == (
        CallStatus.FAILED, EndReason.REJECTED_UNKNOWN_NUMBER, T0, "flood-1@provider",
        "+31850835099", "+31201234567")


def test_bridged_calls_are_always_recorded_and_skipped_rejections_are_summed_up() -> None:
    service, records, clock, _ = make_service(per_second=1)
    with capture_logs() as logs:
        for n in range(4):
            service.on_invite(invite(clock, n=n))
            answer = service.on_invite(invite(clock, NUMBER, n))
            assert isinstance(answer, Accepted)
        clock.now += 1.0
        service.on_invite(invite(clock, n=9))
    assert sum(r.status == CallStatus.CONNECTING for r in records) == 4
    assert sum(r.status == CallStatus.FAILED for r in records) == 2
    summaries = [e for e in logs if e["event"] == "call.rejections_unrecorded"]
    assert [(e["outcome"], e["count"]) for e in summaries] == [("unknown_number", 3)]
    routed = [e for e in logs if e["event"] == "call.routed" and e["outcome"] != "bridged"]
    assert len(routed) == 2  # a rejection that is not recorded is not logged one by one


def test_the_sampler_counts_per_key_and_whole_second() -> None:
    sampler = PerSecondSampler[str](limit=2)
    admitted = [sampler.sample("a", t).admitted for t in (10.0, 10.5, 10.9, 11.0)]
    assert admitted == [True, True, False, True]
    assert sampler.sample("b", 11.2).admitted
    assert sampler.sample("a", 12.0).skipped_before == 0  # second 11 skipped none
    none = PerSecondSampler[str](limit=0)
    assert not none.sample("a", 1.0).admitted


# ---- retention ---------------------------------------------------------------------------


def old_call(age_days: float, status: CallStatus = CallStatus.ENDED) -> CallRecord:
    created = T0 - timedelta(days=age_days)
    return CallRecord(id=uuid.uuid4(), status=status, caller_phone="+31612345678",
                      assistant_phone=NUMBER, number_id=None, assistant_id=None,
                      sip_call_id=f"sip-{uuid.uuid4()}", started_at=None, ended_at=None,
                      end_reason=None, error=None, created_at=created, updated_at=created)


class Spy(MemoryStore):
    """The in-memory store, noting each prune batch in a shared timeline."""

    def __init__(self, timeline: list[str]) -> None:
        super().__init__()
        self.timeline = timeline

    async def delete_calls_before(self, before: datetime, limit: int) -> int:
        self.timeline.append("prune-batch")
        return await super().delete_calls_before(before, limit)


def test_prune_deletes_expired_records_in_batches_yielding_between_them() -> None:
    """Guards routing against the prune: each batch is one bounded store call and the
    loop runs other work (the record writer, the API) between batches."""
    timeline: list[str] = []
    store = Spy(timeline)
    kept = [old_call(89), old_call(200, CallStatus.IN_PROGRESS)]

    async def scenario() -> int:
        await store.upsert_calls([*(old_call(91 + i / 1000) for i in range(2500)), *kept])
        pruner = CallPruner(store, retention_days=90, wall=lambda: T0, batch=1000)

        async def other_work() -> None:
            for _ in range(5):
                timeline.append("other")
                await asyncio.sleep(0)

        pruned, _ = await asyncio.gather(pruner.prune_once(), other_work())
        return pruned

    assert asyncio.run(scenario()) == 2500
    assert timeline.count("prune-batch") == 3  # 1000 + 1000 + 500
    assert "prune-batch,prune-batch" not in ",".join(timeline)
    left = asyncio.run(store.list_calls(CallQuery(limit=1000)))[0]
    assert {c.id for c in left} == {c.id for c in kept}


def test_retention_zero_keeps_every_record() -> None:
    store = MemoryStore()
    asyncio.run(store.upsert_calls([old_call(10_000)]))
    pruner = CallPruner(store, retention_days=0, wall=lambda: T0)
    assert asyncio.run(pruner.prune_once()) == 0
    assert asyncio.run(store.list_calls(CallQuery()))[1] == 1
