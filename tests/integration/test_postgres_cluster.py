"""Two routers on one PostgreSQL (issue 10 items 1-4 and the PostgreSQL half of item 8).

No load balancer: SIPp sends INVITEs straight to each router. Both routers share the
database (a fresh one in the session's throw-away cluster, tests/support/postgres.py)
and the trunk-password key file; each has its own data directory and node name.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from callrouter.store.postgres import MIGRATIONS
from tests.integration.test_router_sip import NUMBER, runtime, uac
from tests.integration.test_trunks import PROVIDER, STATIC_ONLY, provider, refused_from_provider
from tests.support.postgres import PostgresCluster
from tests.support.router import RouterProcess, free_rtp_range
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.sip

Start = Callable[..., RouterProcess]


@pytest.fixture
def pair(tmp_path: Path, postgres_url: str) -> Iterator[Start]:
    """``pair(name)`` makes (not starts) a router on the shared database."""
    made: list[RouterProcess] = []
    low = int(free_rtp_range().split("-")[0])

    def make(name: str, **env: str) -> RouterProcess:
        base = low + 400 * len(made)
        router = RouterProcess(tmp_path / name, rtp_ports=f"{base}-{base + 399}", env_extra={
            "CALLROUTER_DATABASE_URL": postgres_url,
            "CALLROUTER_SECRETS_KEY_FILE": str(tmp_path / "shared.key"),
            "CALLROUTER_NODE_NAME": name,
            "CALLROUTER_SIP_RING_TIMEOUT_SECONDS": "5",
            **env})
        made.append(router)
        return router

    yield make
    for router in made:
        router.stop()


def both(pair: Start, **env: str) -> tuple[RouterProcess, RouterProcess]:
    a = pair("edge-a", **env).start()
    b = pair("edge-b", **env).start()
    b.key = a.key  # one database, one set of API keys: the first start printed it
    assert a.key
    return a, b


def listing(router: RouterProcess) -> dict[str, Any]:
    response = router.api("GET", "/calls", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_number_created_through_b_is_routed_by_a_and_calls_list_everywhere(
        pair: Start) -> None:
    a, b = both(pair)
    rt = runtime("uas-runtime-answer", calls=2)
    assistant = b.add_assistant(f"sip:assistant@{rt.address}")
    b.add_number(NUMBER, assistant)
    time.sleep(1.0)  # the measure: the INVITE 1 s after B's 2xx, sent to A
    assert uac(a, "uac-call-bridged", duration_ms=200).run().ok
    assert uac(b, "uac-call-bridged", duration_ms=200).run().ok
    for router in (a, b):
        wait_until(lambda r=router: listing(r)["pagination"]["total"] == 2, 10, "2 records")
        calls = listing(router)["calls"]
        assert sorted(c["router"] for c in calls) == ["edge-a", "edge-b"]
        assert {c["status"] for c in calls} == {"ended"}
    # and an unassignment through A reaches B the same way
    number_id = a.api("GET", "/numbers").json()["numbers"][0]["id"]
    assert a.api("PATCH", f"/numbers/{number_id}", json={"assistant_id": None}).status_code \
        == 200
    time.sleep(1.0)
    assert uac(b, "uac-invite-480").run().sequence() == ["INVITE", 100, 480, "ACK"]


def test_an_assistant_webhook_set_through_a_is_used_by_b(pair: Start) -> None:
    """Guards the webhook directory across routers: B started before the assistant
    existed; the change feed brings its webhook (and secret) to B, which then writes the
    call's status-updates to the shared outbox, signed with the assistant's secret."""
    a, b = both(pair)
    hook = WebhookReceiver(secret="per-assistant").start()
    try:
        rt = runtime("uas-runtime-answer", calls=1)
        created = a.api("POST", "/assistants", json={
            "name": "Hooked", "runtime_uri": f"sip:assistant@{rt.address}",
            "webhook_url": hook.url, "webhook_secret": "per-assistant",
            "webhook_events": ["status-update"]})
        assert created.status_code == 201, created.text
        a.add_number(NUMBER, created.json()["assistant"]["id"])
        time.sleep(1.0)
        assert uac(b, "uac-call-bridged", duration_ms=200).run().ok

        hook.wait_for(lambda got: len(got) >= 2, 15)
        time.sleep(1.0)  # both routers' workers look at the outbox meanwhile
        events = hook.events("status-update")
        assert all(r.verified for r in events)
        assert [r.message["call"]["status"] for r in events] == ["in-progress", "ended"]
        assert len({r.delivery_id for r in events}) == 2  # each sent by one router
    finally:
        hook.stop()


def test_a_trunk_created_through_b_lets_its_provider_into_a(pair: Start) -> None:
    """Guards trunks in a cluster: a trunk written through one router reaches every
    router's guard through the change feed (its inbound address let in by A although B
    made it), and its deletion through A shuts the provider out of B too."""
    a, b = both(pair, **STATIC_ONLY)
    rt = runtime("uas-runtime-answer", calls=1)
    b.add_number(NUMBER, b.add_assistant(f"sip:assistant@{rt.address}"))
    refused_from_provider(a)
    made = b.api("POST", "/sip-trunks", json={
        "name": "Acme", "provider": "acme", "inbound_addresses": [PROVIDER]})
    assert made.status_code == 201, made.text
    trunk_id = made.json()["trunk"]["id"]
    time.sleep(1.0)  # as for numbers: the INVITE 1 s after B's 2xx, sent to A
    result = provider(a, "uac-call-bridged", duration_ms=200).run()
    assert result.ok, result.explain()
    assert a.wait_for_call(lambda c: c["status"] == "ended")["trunk_id"] == trunk_id
    assert a.api("DELETE", f"/sip-trunks/{trunk_id}").status_code == 200
    time.sleep(1.0)
    refused_from_provider(b)


def test_kill_9_then_restart_closes_only_the_restarted_routers_calls(pair: Start) -> None:
    a, b = both(pair)
    rt = runtime("uas-runtime-answer", calls=2)
    a.add_number(NUMBER, a.add_assistant(f"sip:assistant@{rt.address}"))
    time.sleep(0.5)
    on_a = uac(a, "uac-call-remote-bye", timeout_s=12).start()
    on_b = uac(b, "uac-call-bridged", duration_ms=20000, timeout_s=40).start()
    wait_until(lambda: sorted(c["router"] for c in listing(a)["calls"]
                              if c["status"] == "in-progress") == ["edge-a", "edge-b"],
               10, "both calls in progress")
    a.signal(signal.SIGKILL)
    a.wait(5)
    on_a.stop()
    a.restart()
    by_router = {c["router"]: c for c in listing(a)["calls"]}
    assert (by_router["edge-a"]["status"], by_router["edge-a"]["end_reason"]) == (
        "failed", "router_restart")
    assert by_router["edge-b"]["status"] == "in-progress"  # B's call goes on
    assert on_b.wait().ok
    wait_until(lambda: {c["router"]: c["end_reason"] for c in listing(b)["calls"]}["edge-b"]
               == "caller_hangup", 10, "B's call ended normally")


def test_database_outage_under_load_loses_no_call_and_no_record(
        pair: Start, postgres_cluster: PostgresCluster) -> None:
    """PostgreSQL stopped for 10 s while both routers take a steady call rate."""
    a, b = both(pair, CALLROUTER_STORE_TIMEOUT_SECONDS="2")
    per_router = 60
    rt = runtime("uas-runtime-answer", calls=2 * per_router, timeout_s=90)
    a.add_number(NUMBER, a.add_assistant(f"sip:assistant@{rt.address}"))
    time.sleep(0.5)
    callers = [uac(r, "uac-call-bridged", duration_ms=300, calls=per_router, rate=3.0,
                   limit=10, timeout_s=90).start() for r in (a, b)]
    time.sleep(4)
    postgres_cluster.stop()
    stopped_at = time.monotonic()
    try:
        wait_until(lambda: httpx.get(f"{a.http_url}/api/v1/health", timeout=5).json()
                   ["checks"]["database"]["status"] == "down", 8, "health to see the outage")
        health = httpx.get(f"{a.http_url}/api/v1/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert httpx.get(f"{a.http_url}/api/v1/ready", timeout=5).status_code == 200
        refused = a.api("GET", "/numbers")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "database_unavailable"
        time.sleep(max(0.0, 10 - (time.monotonic() - stopped_at)))
        wait_until(lambda: _spooled(a) > 0 and _spooled(b) > 0, 5, "records spooled")
    finally:
        postgres_cluster.start()
    results = [c.wait() for c in callers]
    for result in results:
        assert (result.successful, result.failed) == (per_router, 0), result.explain()
    wait_until(lambda: _spooled(a) == 0 and _spooled(b) == 0, 20, "the spools written")
    calls = listing(b)["calls"]
    assert len(calls) == 2 * per_router
    assert {c["status"] for c in calls} == {"ended"}
    assert sorted({c["router"] for c in calls}) == ["edge-a", "edge-b"]


def _spooled(router: RouterProcess) -> int:
    for line in httpx.get(f"{router.http_url}/metrics", timeout=5).text.splitlines():
        if line.startswith("callrouter_call_records_spooled "):
            return int(float(line.split()[-1]))
    raise AssertionError("no callrouter_call_records_spooled")


def test_two_routers_starting_together_on_an_empty_database(
        pair: Start, postgres_cluster: PostgresCluster, postgres_url: str) -> None:
    routers = [pair("edge-a"), pair("edge-b")]
    failures: list[BaseException] = []

    def start(router: RouterProcess) -> None:
        try:
            router.start()
        except BaseException as exc:  # reported below, with the router's log
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(r,)) for r in routers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    database = postgres_url.rsplit("/", 1)[1]
    assert postgres_cluster.sql(
        "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_version",
        database) == ",".join(str(v) for v in range(1, len(MIGRATIONS) + 1))
    # exactly one of them made the first API key, and it works on both
    keys = [r.key for r in routers if r.key]
    assert len(keys) == 1
    for router in routers:
        router.key = keys[0]
        assert router.api("GET", "/numbers").status_code == 200


def test_a_router_with_another_key_refuses_to_start(pair: Start, tmp_path: Path) -> None:
    a = pair("edge-a").start()
    a.add_assistant(None)
    other = pair("edge-b", CALLROUTER_SECRETS_KEY_FILE=str(tmp_path / "other.key"))
    with pytest.raises(RuntimeError, match="router exited 1") as failed:
        other.start()
    assert "is not the one this database was written with" in str(failed.value)


def test_records_spooled_during_an_outage_survive_a_restart(
        pair: Start, postgres_cluster: PostgresCluster) -> None:
    """Calls taken while PostgreSQL is down, then the router stopped before it is back:
    the records wait on disk and reach the database at the next start."""
    a = pair("edge-a", CALLROUTER_STORE_TIMEOUT_SECONDS="2").start()
    rt = runtime("uas-runtime-answer", calls=3, timeout_s=60)
    a.add_number(NUMBER, a.add_assistant(f"sip:assistant@{rt.address}"))
    postgres_cluster.stop()
    try:
        for _ in range(3):
            assert uac(a, "uac-call-bridged", duration_ms=200).run().ok
        assert a.stop() == 0
        spool = a.data_dir / "call-records.spool"
        assert spool.exists() and spool.read_text().count("\n") >= 3
    finally:
        postgres_cluster.start()
    a.restart()
    calls = listing(a)["calls"]
    assert [(c["status"], c["router"]) for c in calls] == [("ended", "edge-a")] * 3
    assert not (a.data_dir / "call-records.spool").exists()
