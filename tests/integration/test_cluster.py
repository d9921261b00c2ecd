"""Two routers behind Kamailio (deploy/kamailio/kamailio.cfg) on loopback, driven by SIPp.

Each test runs twice: over one PostgreSQL (the number made through router B only, so router
A routing calls shows the change reached it), and with a SQLite store per router,
provisioned identically through each API. Kamailio probes both routers with OPTIONS every
second and gives a router one second to answer an INVITE before it tries the other.

- calls spread over both routers;
- SIGTERM on router A under a steady call rate: zero failed calls at the caller, A's calls
  in progress complete, new calls go to B (A answers OPTIONS and INVITEs 503 "Draining");
- kill -9 of router A: B takes every new call; A closes its own open records when it
  comes back.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_postgres_cluster import wait_until
from tests.integration.test_router_sip import CALLER, NUMBER, runtime
from tests.support.kamailio import KamailioProcess
from tests.support.router import RouterProcess, free_rtp_range
from tests.support.sipp import Sipp, free_sip_port, scenario

pytestmark = [pytest.mark.sip,
              pytest.mark.skipif(shutil.which("kamailio") is None,
                                 reason="needs kamailio (make deps installs it)")]


class Cluster:
    """``store``: "postgres" (one database: provisioned once, through router B) or "sqlite"
    (each router its own file, provisioned identically through each API)."""

    def __init__(self, tmp_path: Path, store: str, database_url: str | None) -> None:
        self.tmp_path = tmp_path
        self.runtime = runtime("uas-runtime-answer", calls=1000, timeout_s=90)
        self.routers: list[RouterProcess] = []
        for name in ("a", "b"):
            env = {"CALLROUTER_DRAIN_TIMEOUT_SECONDS": "20",
                   "CALLROUTER_NODE_NAME": f"router-{name}"}
            if database_url:
                env |= {"CALLROUTER_DATABASE_URL": database_url,
                        "CALLROUTER_SECRETS_KEY_FILE": str(tmp_path / "shared.key")}
            router = RouterProcess(tmp_path / name, rtp_ports=free_rtp_range_for(name),
                                   env_extra=env)
            self.routers.append(router.start())
            if store == "sqlite":
                assistant = router.add_assistant(f"sip:assistant@{self.runtime.address}")
                router.add_number(NUMBER, assistant)
        if store == "postgres":
            self.b.key = self.a.key  # one database, one set of keys: A's first start made it
            assistant = self.b.add_assistant(f"sip:assistant@{self.runtime.address}")
            self.b.add_number(NUMBER, assistant)  # made through B; A routes it too (NOTIFY)
        self.kamailio = KamailioProcess(tmp_path / "kamailio",
                                        [r.sip_address for r in self.routers]).start()
        self.kamailio.wait_routers_up()

    @property
    def a(self) -> RouterProcess:
        return self.routers[0]

    @property
    def b(self) -> RouterProcess:
        return self.routers[1]

    def callers(self, calls: int, rate: float, duration_ms: int, **kw: Any) -> Sipp:
        # Never a router's SIP port, even a killed router's: Kamailio still sends that
        # router's share of INVITEs (and its OPTIONS probes) there until it marks it down,
        # and a caller SIPp bound to it would receive its own INVITEs back (a CI flake).
        routers = {r.sip_address for r in self.routers}
        port = next(p for p in (free_sip_port() for _ in range(50))
                    if f"127.0.0.1:{p}" not in routers)
        return Sipp(scenario("uac-call-bridged"), target=self.kamailio.address,
                    keys={"dialled": NUMBER, "caller": CALLER}, calls=calls, rate=rate,
                    duration_ms=duration_ms, port=port, **kw)

    def stop(self) -> None:
        self.kamailio.stop()
        for router in self.routers:
            if router.proc is not None and router.proc.poll() is None:
                router.signal(signal.SIGTERM)
                time.sleep(0.2)
                router.signal(signal.SIGTERM)  # a second signal skips the drain: tear down now
            router.stop()
        self.runtime.stop()


def free_rtp_range_for(name: str) -> str:
    """Two routers in one test process need RTP ranges of their own."""
    start, end = (int(p) for p in free_rtp_range().split("-"))
    offset = 0 if name == "a" else 2000
    return f"{start + offset}-{end + offset}"


@pytest.fixture(params=["postgres", "sqlite"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    c = Cluster(tmp_path, request.param, url)
    try:
        yield c
    finally:
        c.stop()


def bridged(router: RouterProcess) -> set[str]:
    """SIP Call-IDs of the calls this router bridged (from its log, which outlives it)."""
    return {e["sip_call_id"] for e in router.events("call.routed") if e["outcome"] == "bridged"}


def active_calls(router: RouterProcess) -> int:
    health = httpx.get(f"{router.http_url}/api/v1/health", timeout=2).json()
    return int(health["checks"]["sip"]["active_calls"])


def test_drain_under_load_loses_no_call(cluster: Cluster) -> None:
    calls = 40
    load = cluster.callers(calls, rate=4, duration_ms=1500, timeout_s=60).start()
    wait_until(lambda: len(bridged(cluster.a)) >= 3 and len(bridged(cluster.b)) >= 3, 15,
               "both routers to bridge calls")
    before = bridged(cluster.a)
    assert active_calls(cluster.a) > 0  # A has calls in progress when it is told to stop
    cluster.a.signal(signal.SIGTERM)
    drained_at = time.monotonic()
    assert cluster.a.wait(30) == 0  # A's calls ran to their own end, then A stopped
    result = load.wait()

    assert result.ok, result.explain()  # zero failed calls at the caller
    assert result.successful == calls
    on_a, on_b = bridged(cluster.a), bridged(cluster.b)
    assert on_a.isdisjoint(on_b)
    assert len(on_a | on_b) == calls  # every call bridged exactly once
    # A took no new call once it drained: it bridged at most what had reached it by then
    # (plus what was already on its way during the signal's handling).
    assert len(on_a - before) <= 2, (len(before), len(on_a))
    ended_on_a = [e for e in cluster.a.events("call.ended")]
    assert len(ended_on_a) == len(on_a)
    assert all(e["end_reason"] == "caller_hangup" for e in ended_on_a), ended_on_a
    # B kept taking calls after A drained.
    assert len(on_b) > calls // 2
    assert time.monotonic() - drained_at < 60


def test_kill_9_b_takes_the_calls_and_a_closes_its_records_on_return(
        cluster: Cluster) -> None:
    # Two long calls: round robin puts one on each router.
    long_calls = cluster.callers(2, rate=10, duration_ms=20_000, timeout_s=40).start()
    wait_until(lambda: active_calls(cluster.a) == 1 and active_calls(cluster.b) == 1, 10,
               "one long call on each router")
    # A call is active at once, its record is written up to the recorder's batch window
    # later: killed before that, A would have no record to close on return.
    wait_until(lambda: any(c["router"] == "router-a" for c in cluster.a.calls()), 5,
               "A's record of its call")
    assert cluster.a.proc is not None
    cluster.a.proc.kill()  # SIGKILL: no drain, no record closed
    cluster.a.proc.wait(5)

    short = cluster.callers(12, rate=4, duration_ms=500, timeout_s=40).run()
    assert short.ok, short.explain()  # the caller never saw A's death
    assert short.successful == 12
    wait_until(lambda: len(bridged(cluster.b)) == 13, 5, "B to bridge every new call")

    # A comes back on the same data directory: the call it held is closed, as its own.
    cluster.a.restart()
    listed = cluster.a.calls()  # over PostgreSQL: every router's calls
    mine = [c for c in listed if c["router"] == "router-a"]
    assert [c for c in mine if c["status"] in ("connecting", "in-progress")] == []
    restarted = [c for c in listed if c["end_reason"] == "router_restart"]
    assert len(restarted) == 1 and restarted[0]["router"] == "router-a", listed
    # B's long call is untouched by A's return: still up, and still open in the records.
    assert active_calls(cluster.b) == 1
    theirs = [c for c in cluster.b.calls() if c["router"] == "router-b"]
    assert [c["status"] for c in theirs if c["status"] == "in-progress"] == ["in-progress"]
    long_calls.stop()
