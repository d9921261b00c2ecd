"""The routing decision, table-driven: every outcome and its SIP answer."""

from __future__ import annotations

import uuid

import pytest

from callrouter.domain.models import EndReason
from callrouter.domain.routing import (
    AssistantUpserted,
    Bridge,
    CallContext,
    NumberUpserted,
    Outcome,
    Policy,
    Reject,
    Route,
    RouteTable,
    RuntimePool,
    decide,
)

A = uuid.UUID(int=1)  # an assistant with its own runtime
B = uuid.UUID(int=2)  # an assistant that uses the default pool
ASSIGNED = Route(uuid.UUID(int=10), "+31850835037", A, "sip:own@rt", True)
POOLED = Route(uuid.UUID(int=11), "+31850835038", B, None, True)
UNASSIGNED = Route(uuid.UUID(int=12), "+31850835039", None, None, True)
INACTIVE = Route(uuid.UUID(int=13), "+31850835040", A, "sip:own@rt", False)
TABLE = RouteTable.build(
    [NumberUpserted(r.number_id, r.e164, r.assistant_id, r.is_active)
     for r in (ASSIGNED, POOLED, UNASSIGNED, INACTIVE)],
    [AssistantUpserted(A, "sip:own@rt"), AssistantUpserted(B, None)])
POLICY = Policy(max_calls=2, unassigned_code=480, inactive_code=486, retry_after_seconds=7)


def ctx(dialled: str | None, active: int = 0, draining: bool = False) -> CallContext:
    return CallContext(dialled, active, draining)


@pytest.mark.parametrize(("context", "code", "outcome", "reason", "retry"), [
    (ctx("+31999999999"), 404, Outcome.UNKNOWN_NUMBER, EndReason.REJECTED_UNKNOWN_NUMBER, None),
    (ctx(None), 404, Outcome.NOT_A_NUMBER, EndReason.REJECTED_UNKNOWN_NUMBER, None),
    (ctx(UNASSIGNED.e164), 480, Outcome.UNASSIGNED, EndReason.REJECTED_UNASSIGNED, None),
    (ctx(INACTIVE.e164), 486, Outcome.INACTIVE, EndReason.REJECTED_UNASSIGNED, None),
    (ctx(ASSIGNED.e164, active=2), 503, Outcome.OVER_CAPACITY,
     EndReason.REJECTED_OVER_CAPACITY, 7),
    (ctx(ASSIGNED.e164, draining=True), 503, Outcome.DRAINING, EndReason.REJECTED_DRAINING, 7),
])
def test_rejections(context: CallContext, code: int, outcome: Outcome, reason: EndReason,
                    retry: int | None) -> None:
    decision = decide(context, TABLE, POLICY, RuntimePool(("sip:p1",)))
    assert isinstance(decision, Reject)
    assert (decision.code, decision.outcome, decision.end_reason, decision.retry_after) == (
        code, outcome, reason, retry)


def test_assistant_runtime_first_then_the_pool() -> None:
    decision = decide(ctx(ASSIGNED.e164), TABLE, POLICY, RuntimePool(("sip:p1", "sip:p2"), "first"))
    assert isinstance(decision, Bridge)
    assert decision.targets == ("sip:own@rt", "sip:p1", "sip:p2")


def test_pool_rotates_round_robin() -> None:
    pool = RuntimePool(("sip:p1", "sip:p2", "sip:p3"))
    firsts = []
    for _ in range(4):
        decision = decide(ctx(POOLED.e164), TABLE, POLICY, pool)
        assert isinstance(decision, Bridge)
        firsts.append(decision.targets[0])
        assert sorted(decision.targets) == ["sip:p1", "sip:p2", "sip:p3"]
    assert firsts == ["sip:p1", "sip:p2", "sip:p3", "sip:p1"]


def test_no_runtime_anywhere_is_503() -> None:
    decision = decide(ctx(POOLED.e164), TABLE, POLICY, RuntimePool(()))
    assert isinstance(decision, Reject)
    assert (decision.code, decision.outcome) == (503, Outcome.RUNTIME_UNAVAILABLE)
