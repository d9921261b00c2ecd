"""The webhook rules without I/O (``domain.webhooks``): signing, replies, URL safety,
back-off, the bodies, and the configuration of the account-level webhook."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from callrouter import config
from callrouter.domain.models import CallRecord, CallStatus, EndReason
from callrouter.domain.webhooks import (
    Backoff,
    CallFacts,
    ReplyKind,
    address_problem,
    destination_problem,
    facts_of,
    new_delivery,
    parse_reply,
    reason_header,
    request_headers,
    restart_ended,
    retry_after_seconds,
    sign,
    status_update_body,
    verify,
)
from callrouter.errors import ConfigError

T0 = datetime(2026, 1, 1, 12, 0, 0, 250000, tzinfo=UTC)


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"message":{"type":"status-update"}}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k", 1700000000, body) == "sha256=" + expected
    assert verify("k", "1700000000", body, "sha256=" + expected)
    assert not verify("other", "1700000000", body, "sha256=" + expected)
    assert not verify("k", "1700000001", body, "sha256=" + expected)
    delivery_id = uuid.uuid4()
    headers = request_headers("status-update", delivery_id, 1700000000, body, "k")
    assert headers == {"Content-Type": "application/json", "X-Webhook-Event": "status-update",
                       "X-Webhook-Timestamp": "1700000000", "X-Webhook-Id": str(delivery_id),
                       "X-Webhook-Signature": "sha256=" + expected}
    assert "X-Webhook-Signature" not in request_headers("status-update", delivery_id, 1, body,
                                                        None)


@pytest.mark.parametrize(("status", "body", "kind"), [
    (200, b"", ReplyKind.SAVED),
    (204, b"", ReplyKind.SAVED),
    (200, b"{}", ReplyKind.SAVED),
    (200, b'{"metadata": {"a": 1}}', ReplyKind.SAVED),
    (200, b'{"assistant_id": "00000000-0000-0000-0000-000000000008"}', ReplyKind.ASSISTANT),
    (200, b'{"assistantId": "00000000-0000-0000-0000-000000000008"}', ReplyKind.ASSISTANT),
    (200, b'{"error": "closed"}', ReplyKind.REFUSED),
    (200, b'{"error": ""}', ReplyKind.INVALID),
    (200, b'{"error": 5}', ReplyKind.INVALID),
    (200, b'{"assistant_id": 5}', ReplyKind.INVALID),
    (200, b'{"max_duration_seconds": "60"}', ReplyKind.INVALID),
    (200, b'{"max_duration_seconds": -1}', ReplyKind.INVALID),
    (200, b'{"max_duration_seconds": true}', ReplyKind.INVALID),
    (200, b"[1, 2]", ReplyKind.INVALID),
    (200, b"\xff\xfe", ReplyKind.INVALID),
    (200, b"<html>", ReplyKind.INVALID),
    (301, b"{}", ReplyKind.HTTP_ERROR),
    (500, b'{"error": "x"}', ReplyKind.HTTP_ERROR),
])
def test_replies(status: int, body: bytes, kind: ReplyKind) -> None:
    assert parse_reply(status, body).kind is kind


def test_reply_fields_and_extras() -> None:
    reply = parse_reply(200, json.dumps({"max_duration_seconds": 90.5, "metadata": {"x": 1},
                                         "foo": "bar"}).encode())
    assert reply.max_duration_seconds == 90
    assert reply.extras == {"metadata": {"x": 1}, "foo": "bar"}
    assert parse_reply(200, b'{"error": "  shut  "}').error == "shut"


def test_reason_header_is_one_quoted_line() -> None:
    assert reason_header('a "b" \\ c') == 'SIP ;cause=603 ;text="a \\"b\\" \\\\ c"'
    assert "\n" not in reason_header("a\r\nb") and len(reason_header("x" * 5000)) < 250


@pytest.mark.parametrize(("url", "allow_private", "refused"), [
    ("https://hooks.example.com/x", False, False),
    ("http://127.0.0.1:8080/x", False, False),
    ("http://[::1]/x", False, False),
    ("http://8.8.8.8/x", False, False),
    ("http://169.254.169.254/latest", True, True),
    ("http://[fe80::1]/x", True, True),
    ("http://[::ffff:169.254.169.254]/x", True, True),
    ("http://10.1.2.3/x", False, True),
    ("http://10.1.2.3/x", True, False),
    ("http://192.168.1.1/x", False, True),
    ("http://100.64.0.1/x", False, True),
    ("http://0.0.0.0/x", True, True),
    ("ftp://hooks.example.com/x", True, True),
    ("hooks.example.com/x", True, True),
    ("http://user:pw@hooks.example.com/x", True, True),
    ("http://hooks.example.com:99999/x", True, True),
    ("http://hooks.example.com/a b", True, True),
])
def test_destinations(url: str, allow_private: bool, refused: bool) -> None:
    assert (destination_problem(url, allow_private) is not None) is refused


def test_link_local_is_refused_even_when_private_is_allowed() -> None:
    problem = address_problem(ipaddress.ip_address("169.254.169.254"), True)
    assert problem is not None and "link-local" in problem


def test_backoff_grows_with_jitter_caps_and_honours_retry_after() -> None:
    backoff = Backoff(first=1.0, cap=60.0)
    assert [backoff.delay(n, 0.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert [backoff.delay(n, 0.999) for n in (1, 2)] == pytest.approx([1.0, 2.0], rel=1e-3)
    assert backoff.delay(100, 0.0) == 30.0
    assert backoff.delay(1, 0.0, retry_after=120.0) == 120.0
    assert backoff.delay(1, 0.0, retry_after=10 ** 9) == 3600.0
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("17", now) == 17.0
    assert retry_after_seconds("Thu, 01 Jan 2026 00:01:00 GMT", now) == 60.0
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None, now) is None


def record(**changes: object) -> CallRecord:
    base = CallRecord(uuid.uuid4(), CallStatus.IN_PROGRESS, "+31201234567", "+31850835037",
                      uuid.uuid4(), uuid.uuid4(), "sip-1", T0, None, None, None, T0, T0)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_status_update_bodies_follow_the_envelope() -> None:
    r = record()
    facts = CallFacts(r.id, r.number_id, r.assistant_phone, "Sales", r.caller_phone,
                      r.assistant_id, extras={"metadata": {"k": "v"}, "type": "ignored"})
    live = json.loads(status_update_body(facts, r, T0))["message"]
    assert live["type"] == "status-update" and live["timestamp"] == "2026-01-01T12:00:00.250Z"
    assert live["call"] == {"id": str(r.id), "type": "inbound_phone_call",
                            "status": "in-progress", "assistant_id": str(r.assistant_id)}
    assert live["phone_number"] == {"id": str(r.number_id), "number": "+31850835037",
                                    "name": "Sales"}
    assert live["customer"] == {"number": "+31201234567"} and live["metadata"] == {"k": "v"}
    ended = replace(r, status=CallStatus.ENDED, end_reason=EndReason.CALLER_HANGUP,
                    ended_at=T0 + timedelta(seconds=42))
    message = json.loads(status_update_body(facts, ended, T0))["message"]
    assert message["call"]["status"] == "ended" and message["duration_seconds"] == 42
    assert message["end_reason"] == "caller_hangup" and "error" not in message
    failed = replace(ended, status=CallStatus.FAILED, end_reason=EndReason.RUNTIME_UNAVAILABLE,
                     error="503 Service Unavailable")
    message = json.loads(status_update_body(facts, failed, T0))["message"]
    assert message["call"]["status"] == "ended-with-error"
    assert message["error"] == "503 Service Unavailable"


def test_a_restart_closes_a_call_with_an_ended_event_where_its_last_one_went() -> None:
    r = record()
    facts = CallFacts(r.id, r.number_id, r.assistant_phone, "Sales", r.caller_phone,
                      r.assistant_id, extras={"metadata": 1})
    last = new_delivery(r.id, "https://a.example/h", r.assistant_id,
                        status_update_body(facts, r, T0), T0, 24)
    assert facts_of(last.body) == facts
    closed = replace(r, status=CallStatus.FAILED, end_reason=EndReason.ROUTER_RESTART,
                     ended_at=T0 + timedelta(seconds=5))
    event = restart_ended(closed, last, T0 + timedelta(minutes=1), 24)
    assert event is not None and event.url == last.url and event.id != last.id
    message = json.loads(event.body)["message"]
    assert message["call"]["status"] == "ended-with-error"
    assert message["end_reason"] == "router_restart" and message["metadata"] == 1
    assert event.expires_at == T0 + timedelta(minutes=1, hours=24)
    assert restart_ended(closed, replace(last, body="not json"), T0, 24) is None


def test_account_webhook_config_from_the_environment() -> None:
    cfg = config.load({"CALLROUTER_WEBHOOKS_URL": "https://hooks.example.com/h",
                       "CALLROUTER_WEBHOOKS_SECRET": "s",
                       "CALLROUTER_WEBHOOKS_EVENTS": "status-update"})
    assert cfg.webhooks.url == "https://hooks.example.com/h" and cfg.webhooks.secret == "s"
    assert cfg.webhooks.events == ("status-update",)
    assert cfg.webhooks.assistant_request_timeout_seconds == 5
    assert cfg.webhooks.retry_hours == 24 and cfg.webhooks.allow_private is False
    for env, words in (({"CALLROUTER_WEBHOOKS_URL": "http://10.0.0.1/"}, "allow_private"),
                       ({"CALLROUTER_WEBHOOKS_URL": "http://169.254.169.254/",
                         "CALLROUTER_WEBHOOKS_ALLOW_PRIVATE": "true"}, "link-local"),
                       ({"CALLROUTER_WEBHOOKS_URL": "gopher://x/"}, "http"),
                       ({"CALLROUTER_WEBHOOKS_EVENTS": "tool-calls"}, "unknown event"),
                       ({"CALLROUTER_WEBHOOKS_ALLOW_PRIVATE": "maybe"}, "true or false")):
        with pytest.raises(ConfigError) as bad:
            config.load(env)
        assert words in str(bad.value)
    private = config.load({"CALLROUTER_WEBHOOKS_URL": "http://10.0.0.1/",
                           "CALLROUTER_WEBHOOKS_ALLOW_PRIVATE": "true"})
    assert private.webhooks.allow_private
