"""Drain on SIGTERM, forced stop on a second signal, and recovery after a crash."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime

import httpx
import pytest

from tests.integration.test_router_sip import NUMBER, assign, runtime, uac
from tests.support.router import RouterProcess

pytestmark = pytest.mark.sip


def _wait_active(router: RouterProcess, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sip = httpx.get(f"{router.http_url}/api/v1/health", timeout=2).json()["checks"]["sip"]
        if sip["active_calls"] == count:
            return
        time.sleep(0.05)
    raise AssertionError(f"active calls never reached {count}")


def test_sigterm_drains_new_calls_get_503_active_call_finishes(
        router_factory: type[RouterProcess]) -> None:
    router = router_factory(CALLROUTER_DRAIN_TIMEOUT_SECONDS="20")  # type: ignore[call-arg]
    rt = runtime("uas-runtime-answer", calls=2)
    assign(router, rt)
    long_call = uac(router, "uac-call-bridged", duration_ms=3000).start()
    _wait_active(router, 1)
    router.signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the signal is handled asynchronously
        ready = httpx.get(f"{router.http_url}/api/v1/ready", timeout=2).status_code
        if ready == 503:
            break
        time.sleep(0.05)
    assert ready == 503
    refused = uac(router, "uac-invite-503").run()
    assert refused.sequence() == ["INVITE", 100, 503, "ACK"], refused.explain()
    # A balancer's OPTIONS probe sees the drain too (Kamailio takes the router out).
    probe = uac(router, "uac-options-503-draining").run()
    assert probe.ok, probe.explain()
    assert probe.sequence() == ["OPTIONS", 503]
    assert long_call.wait().ok  # the active call ran to its own BYE
    assert router.wait(15) == 0
    assert router.events("router.stopped")


def test_drain_timeout_ends_calls_as_router_shutdown(
        router_factory: type[RouterProcess]) -> None:
    router = router_factory(CALLROUTER_DRAIN_TIMEOUT_SECONDS="1")  # type: ignore[call-arg]
    rt = runtime("uas-runtime-answer")
    assign(router, rt)
    caller = uac(router, "uac-call-remote-bye", timeout_s=20).start()
    _wait_active(router, 1)
    router.signal(signal.SIGTERM)
    result = caller.wait()
    assert result.sequence()[-2:] == ["BYE", 200], result.explain()
    assert "BYE" in rt.wait().sequence("received")
    assert router.wait(15) == 0
    ended = router.events("call.ended")
    assert [e["end_reason"] for e in ended] == ["router_shutdown"]


def test_crash_leaves_no_open_record_after_restart(router_factory: type[RouterProcess]) -> None:
    router = router_factory()
    rt = runtime("uas-runtime-answer")
    assign(router, rt)
    caller = uac(router, "uac-call-remote-bye", timeout_s=8).start()
    _wait_active(router, 1)
    time.sleep(0.3)  # let the in-progress record reach the database
    router.signal(signal.SIGKILL)
    router.wait(5)
    caller.stop()
    router.restart()
    calls = router.calls()
    assert [(c["status"], c["end_reason"]) for c in calls] == [("failed", "router_restart")]
    assert calls[0]["assistant_phone"] == NUMBER


HEARTBEAT_SECONDS = 1.0  # callrouter.app.HEARTBEAT_SECONDS (not imported: it loads pjsua2)


def test_crash_recovery_ends_a_call_at_the_last_heartbeat(
        router_factory: type[RouterProcess]) -> None:
    """Guards true durations after a crash: a call left open by SIGKILL is closed at the
    router's last heartbeat, so its duration does not include the downtime until the
    restart (it used to end at the restart time)."""
    router = router_factory()
    assign(router, runtime("uas-runtime-answer"))
    caller = uac(router, "uac-call-remote-bye", timeout_s=10).start()
    answered = router.wait_for_call(lambda c: c["status"] == "in-progress", timeout=15)
    time.sleep(2.5)  # talk time: heartbeats, not the answer, must bound the record
    killed_at = datetime.now(UTC)
    router.signal(signal.SIGKILL)
    router.wait(5)
    caller.stop()
    router.restart()
    [call] = router.calls()
    ended_at = datetime.fromisoformat(call["ended_at"])
    assert (call["status"], call["end_reason"]) == ("failed", "router_restart")
    assert call["started_at"] == answered["started_at"]
    assert ended_at <= killed_at, "the downtime was counted as call time"
    assert (killed_at - ended_at).total_seconds() <= HEARTBEAT_SECONDS + 1.0
