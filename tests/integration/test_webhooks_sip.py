"""Signed webhooks against the real router (issue 12): SIPp callers and runtimes, and a
real HTTP receiver in the test process that verifies every signature.

The account-level webhook (``CALLROUTER_WEBHOOKS_URL``/``_SECRET``/``_EVENTS``) points at
the receiver; each test sets how it answers ``assistant-request`` and checks what the
caller heard, the call record, and the ``status-update`` events (in order per call, each
``X-Webhook-Id`` once).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.router import RouterProcess
from tests.support.sipp import Sipp, scenario
from tests.support.webhook_receiver import Received, Replier, Reply, WebhookReceiver

pytestmark = pytest.mark.sip

NUMBER = "+31850835037"
CALLER = "+31201234567"
SECRET = "s3cret-for-tests"


def uac(router: RouterProcess, name: str, **kw: object) -> Sipp:
    keys = {"dialled": NUMBER, "caller": CALLER}
    return Sipp(scenario(name), target=router.sip_address, keys=keys, **kw)  # type: ignore[arg-type]


def runtime(name: str = "uas-runtime-answer", **kw: object) -> Sipp:
    return Sipp(scenario(name), role="uas", **kw).start()  # type: ignore[arg-type]


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver(secret=SECRET).start()
    yield hook
    hook.stop()


def start_router(data_dir: Path, receiver: WebhookReceiver, **env: str) -> RouterProcess:
    return RouterProcess(data_dir, env_extra={
        "CALLROUTER_WEBHOOKS_URL": receiver.url, "CALLROUTER_WEBHOOKS_SECRET": SECRET,
        "CALLROUTER_WEBHOOKS_EVENTS": "assistant-request,status-update",
        "CALLROUTER_WEBHOOKS_ASSISTANT_REQUEST_TIMEOUT_SECONDS": "1",
        "CALLROUTER_SIP_RING_TIMEOUT_SECONDS": "3", **env}).start()


@pytest.fixture
def router(tmp_path: Path, receiver: WebhookReceiver) -> Iterator[RouterProcess]:
    started = start_router(tmp_path / "router", receiver)
    yield started
    started.stop()


def answering(reply: dict[str, object] | bytes, status: int = 200, delay: float = 0.0
              ) -> Replier:
    body = reply if isinstance(reply, bytes) else json.dumps(reply).encode()

    def respond(got: Received) -> Reply:
        if got.event == "assistant-request":
            return status, body, {}, delay
        return 200, b"", {}, 0.0

    return respond


def statuses(receiver: WebhookReceiver, call_id: str) -> list[str]:
    return [r.message["call"]["status"] for r in receiver.events("status-update")
            if r.message["call"]["id"] == call_id]


def wait_statuses(receiver: WebhookReceiver, call_id: str, count: int,
                  timeout: float = 15.0) -> list[Received]:
    receiver.wait_for(lambda _: len(statuses(receiver, call_id)) >= count, timeout)
    return [r for r in receiver.events("status-update") if r.message["call"]["id"] == call_id]


def metric(router: RouterProcess, series: str) -> float:
    for line in httpx.get(f"{router.http_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_saved_assistant_answers_and_status_updates_follow_signed_in_order(
        router: RouterProcess, receiver: WebhookReceiver) -> None:
    receiver.reply = answering({"metadata": {"crm": "42"}})
    rt = runtime()
    assistant = router.add_assistant(f"sip:assistant@{rt.address}")
    number_id = router.add_number(NUMBER, assistant, name="Sales line")
    result = uac(router, "uac-call-bridged", duration_ms=1200).run()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 100, 180, 200, "ACK", "BYE", 200]
    asked = receiver.events("assistant-request")
    assert len(asked) == 1 and asked[0].verified
    message = asked[0].message
    assert message["type"] == "assistant-request" and message["call"]["status"] == "ringing"
    assert message["phone_number"] == {"id": number_id, "number": NUMBER, "name": "Sales line"}
    assert message["customer"] == {"number": CALLER}
    call_id = message["call"]["id"]
    events = wait_statuses(receiver, call_id, 2)
    assert [e.message["call"]["status"] for e in events] == ["in-progress", "ended"]
    assert all(e.verified for e in events)
    assert len({e.delivery_id for e in events}) == 2
    ended = events[1].message
    assert ended["end_reason"] == "caller_hangup" and ended["duration_seconds"] >= 1
    assert ended["started_at"] and ended["ended_at"]
    assert ended["metadata"] == {"crm": "42"}  # echoed from the assistant-request reply
    record = router.wait_for_call(lambda c: c["id"] == call_id and c["status"] == "ended")
    assert record["assistant_id"] == assistant


def test_error_reply_refuses_the_call_603_with_reason(
        router: RouterProcess, receiver: WebhookReceiver) -> None:
    receiver.reply = answering({"error": "Out of office hours"})
    # Refused before the runtime is dialled: nothing listens at the assistant's runtime.
    router.add_number(NUMBER, router.add_assistant("sip:assistant@127.0.0.1:9"))
    result = uac(router, "uac-invite-603-reason").run()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 100, 180, 603, "ACK"]
    reason = next(m for m in result.messages if m.first_line.startswith("SIP/2.0 603"))
    assert 'text="Out of office hours"' in reason.headers["reason"]
    record = router.wait_for_call(lambda c: c["status"] == "failed")
    assert record["end_reason"] == "rejected_by_webhook"
    assert record["error"] == "Out of office hours"


def test_reply_naming_another_assistant_routes_to_it(
        router: RouterProcess, receiver: WebhookReceiver) -> None:
    saved_rt, other_rt = runtime(), runtime()
    router.add_number(NUMBER, router.add_assistant(f"sip:saved@{saved_rt.address}"))
    other = router.add_assistant(f"sip:other@{other_rt.address}", name="Other")
    receiver.reply = answering({"assistant_id": other})
    assert uac(router, "uac-call-bridged", duration_ms=300).run().ok
    invite = other_rt.wait().messages[0]
    assert invite.headers["x-assistant-id"] == other
    record = router.wait_for_call(lambda c: c["status"] == "ended")
    assert record["assistant_id"] == other


@pytest.mark.parametrize(("reply", "status", "delay", "outcome"), [
    (b"not json at all", 200, 0.0, "invalid"),
    ({}, 500, 0.0, "http_error"),
    ({}, 200, 2.5, "timeout"),  # slower than the 1 s timeout: the caller does not wait
    ({}, 200, 0.6, "saved"),  # slow, but in time: its answer counts
])
def test_a_failed_or_slow_assistant_request_uses_the_saved_assistant(
        router: RouterProcess, receiver: WebhookReceiver, reply: dict[str, object] | bytes,
        status: int, delay: float, outcome: str) -> None:
    receiver.reply = answering(reply, status, delay)
    rt = runtime()
    router.add_number(NUMBER, router.add_assistant(f"sip:assistant@{rt.address}"))
    result = uac(router, "uac-call-bridged", duration_ms=300).run()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 100, 180, 200, "ACK", "BYE", 200]
    series = f'callrouter_webhook_assistant_requests_total{{outcome="{outcome}"}}'
    assert metric(router, series) == 1


def test_unassigned_number_is_asked_and_480_without_an_answer(
        router: RouterProcess, receiver: WebhookReceiver) -> None:
    rt = runtime()
    assistant = router.add_assistant(f"sip:assistant@{rt.address}")
    router.add_number(NUMBER)  # no assistant: only the account webhook is asked
    receiver.reply = answering(b"garbage")
    assert uac(router, "uac-invite-480").run().sequence() == ["INVITE", 100, 180, 480, "ACK"]
    receiver.reply = answering({"assistant_id": assistant})
    assert uac(router, "uac-call-bridged", duration_ms=300).run().ok
    unknown = uac(router, "uac-invite-404")
    unknown.keys["dialled"] = "+31850000000"
    assert unknown.run().sequence() == ["INVITE", 100, 404, "ACK"]  # never asked
    assert len(receiver.events("assistant-request")) == 2


def test_caller_cancelling_while_the_webhook_thinks(
        router: RouterProcess, receiver: WebhookReceiver) -> None:
    receiver.reply = answering({}, delay=0.9)
    rt = runtime()
    router.add_number(NUMBER, router.add_assistant(f"sip:assistant@{rt.address}"))
    result = uac(router, "uac-call-cancel").run()  # CANCEL 0.5 s after the 180
    assert result.ok, result.explain()
    record = router.wait_for_call(lambda c: c["status"] == "ended")
    assert record["end_reason"] == "caller_cancelled"
    events = wait_statuses(receiver, record["id"], 1)
    assert [e.message["call"]["status"] for e in events] == ["ended"]
    assert events[0].message["end_reason"] == "caller_cancelled"
    time.sleep(1.0)  # the late reply changes nothing
    assert [c["status"] for c in router.calls()] == ["ended"]


def test_failed_call_reports_ended_with_error(
        router: RouterProcess, receiver: WebhookReceiver) -> None:
    rt = runtime("uas-runtime-refuse")
    router.add_number(NUMBER, router.add_assistant(f"sip:assistant@{rt.address}"))
    result = uac(router, "uac-invite-runtime-fail").run()
    assert result.ok, result.explain()
    record = router.wait_for_call(lambda c: c["status"] == "failed")
    events = wait_statuses(receiver, record["id"], 1)
    message = events[0].message
    assert message["call"]["status"] == "ended-with-error"
    assert message["end_reason"] == "runtime_unavailable" and message["error"]


def test_transferred_call_reports_in_progress_then_ended_transferred(
        router: RouterProcess, receiver: WebhookReceiver) -> None:
    rt, desk = runtime(), runtime()
    router.add_number(NUMBER, router.add_assistant(f"sip:assistant@{rt.address}"))
    caller = uac(router, "uac-call-bridged", duration_ms=3000, timeout_s=20)
    caller.start()
    call = router.wait_for_call(lambda c: c["status"] == "in-progress")
    response = router.api("POST", f"/calls/{call['id']}/control",
                          json={"type": "transfer", "destination": f"sip:desk@{desk.address}"})
    assert response.status_code == 200, response.text
    assert caller.wait().ok
    events = wait_statuses(receiver, call["id"], 2)
    assert [e.message["call"]["status"] for e in events] == ["in-progress", "ended"]
    assert events[1].message["end_reason"] == "transferred"


def test_receiver_down_then_up_gets_every_event_once_in_order(
        router: RouterProcess, receiver: WebhookReceiver) -> None:
    rt = runtime(calls=2)
    router.add_number(NUMBER, router.add_assistant(f"sip:assistant@{rt.address}"))
    receiver.stop()  # assistant-request fails (saved assistant), status-updates wait
    for _ in range(2):
        assert uac(router, "uac-call-bridged", duration_ms=300).run().ok
    pending = router.api("GET", "/webhooks/deliveries?status=pending").json()
    assert pending["pagination"]["total"] >= 1
    time.sleep(1.5)
    receiver.start()  # same port
    calls = [c["id"] for c in router.calls()]
    for call_id in calls:
        events = wait_statuses(receiver, call_id, 2, timeout=30)
        assert [e.message["call"]["status"] for e in events] == ["in-progress", "ended"]
    ids = [r.delivery_id for r in receiver.events("status-update")]
    assert len(ids) == len(set(ids)) == 4
    assert router.api("GET", "/webhooks/deliveries?status=pending").json()[
        "pagination"]["total"] == 0


def restarted(first: RouterProcess) -> RouterProcess:
    """The same router again: same data directory, ports and key."""
    second = RouterProcess(first.data_dir, env_extra=first.env_extra,
                           http_port=first.http_port, sip_port=first.sip_port)
    second.key = first.key
    return second.start()


def test_restart_with_a_backlog_resumes_delivery(
        tmp_path: Path, receiver: WebhookReceiver) -> None:
    first = start_router(tmp_path / "r", receiver)
    rt = runtime()
    first.add_number(NUMBER, first.add_assistant(f"sip:assistant@{rt.address}"))
    receiver.stop()
    assert uac(first, "uac-call-bridged", duration_ms=300).run().ok
    call_id = first.calls()[0]["id"]
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0
    receiver.start()
    second = restarted(first)
    try:
        events = wait_statuses(receiver, call_id, 2, timeout=30)
        assert [e.message["call"]["status"] for e in events] == ["in-progress", "ended"]
        assert all(e.verified for e in events)
    finally:
        second.stop()


def test_a_call_closed_by_a_restart_after_a_crash_reports_ended_with_error(
        tmp_path: Path, receiver: WebhookReceiver) -> None:
    first = start_router(tmp_path / "r", receiver)
    rt = runtime()
    first.add_number(NUMBER, first.add_assistant(f"sip:assistant@{rt.address}"))
    caller = uac(first, "uac-call-bridged", duration_ms=20000, timeout_s=30)
    caller.start()
    call = first.wait_for_call(lambda c: c["status"] == "in-progress")
    wait_statuses(receiver, call["id"], 1)
    first.signal(signal.SIGKILL)  # a crash: nothing is closed on the way out
    first.wait(10)
    caller.stop()
    second = restarted(first)
    try:
        events = wait_statuses(receiver, call["id"], 2, timeout=30)
        assert [e.message["call"]["status"] for e in events] == [
            "in-progress", "ended-with-error"]
        assert events[1].message["end_reason"] == "router_restart"
        assert events[1].verified
    finally:
        second.stop()
