"""A flood of rejected INVITEs against the real router: every one answered and counted,
only a sample of them recorded, each recorded one a whole call object.

Guards issue 9 item 7(a) end to end: 30,000 INVITEs to an unknown number used to write
one call record each (20,099 rows, 15.8 MB). The rules themselves are pinned in the unit
tier (tests/unit/test_call_records.py).
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support.router import RouterProcess
from tests.support.sipp import Sipp, scenario

pytestmark = pytest.mark.sip

UNKNOWN = "+31850000000"
INVITES, RATE, PER_SECOND = 400, 200, 3
API_FIELDS = {"id", "direction", "status", "caller_phone", "assistant_phone", "phone_number",
              "number_id", "assistant_id", "sip_call_id", "started_at", "ended_at",
              "duration_seconds", "end_reason", "error", "created_at", "updated_at"}


def decisions(router: RouterProcess, outcome: str) -> float:
    series = f'callrouter_routing_decisions_total{{outcome="{outcome}"}} '
    text = httpx.get(f"{router.http_url}/metrics", timeout=5).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series))


def test_a_flood_of_rejections_is_answered_and_counted_but_recorded_sampled(
        router_factory: type[RouterProcess]) -> None:
    router = router_factory(  # type: ignore[call-arg]
        CALLROUTER_CALLS_REJECTED_RECORDS_PER_SECOND=str(PER_SECOND))
    started = time.monotonic()
    flood = Sipp(scenario("uac-invite-404"), target=router.sip_address,
                 keys={"dialled": UNKNOWN, "caller": "+31201234567"}, calls=INVITES,
                 rate=RATE, limit=RATE, timeout_s=30).run()
    seconds = time.monotonic() - started
    assert flood.ok, flood.explain()  # every INVITE got its 404
    assert decisions(router, "unknown_number") == INVITES
    time.sleep(0.5)  # the record writer batches for 100 ms
    response = router.api("GET", "/calls", params={"limit": 1000})
    assert response.status_code == 200, response.text
    calls, total = response.json()["calls"], response.json()["pagination"]["total"]
    assert len(calls) == total > 0
    assert total <= PER_SECOND * (int(seconds) + 2), f"{total} records in {seconds:.1f} s"
    for call in calls:
        assert not API_FIELDS - set(call), sorted(API_FIELDS - set(call))
        assert (call["status"], call["end_reason"], call["assistant_phone"]) == (
            "failed", "rejected_unknown_number", UNKNOWN)
