"""assistant-request on the SIP side, without pjsua2 (issue 12 item 2): the INVITE is held
(180) while the asyncio side asks, the decision comes back as a value, and the caller may
give up meanwhile. ``status-update`` events go with the records (item 3).

The real ``CallService`` and ``CallAdapter`` run over ``sip.fake.FakeStack``; the webhook
is a list of ``AssistantAsk`` values the test answers with ``adapter.resume``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from callrouter.domain import session as s
from callrouter.domain.models import (
    Assistant,
    CallRecord,
    CallStatus,
    EndReason,
    PhoneNumber,
)
from callrouter.domain.routing import Policy, RuntimePool
from callrouter.domain.webhooks import (
    EVENTS,
    AssistantAsk,
    AssistantReply,
    ReplyKind,
    StatusEvent,
    WebhookDirectory,
    WebhookTarget,
    hooks_of,
    parse_reply,
    status_update_body,
)
from callrouter.metrics import Metrics
from callrouter.service import CallService
from callrouter.sip.adapter import CallAdapter
from callrouter.sip.fake import FakeStack
from callrouter.sip.stack import LegKind
from callrouter.store.memory import MemoryStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SAVED = uuid.UUID(int=7)
OTHER = uuid.UUID(int=8)
NUMBER_ID = uuid.UUID(int=1)
UNASSIGNED_ID = uuid.UUID(int=2)
ACCOUNT = WebhookTarget("http://127.0.0.1:9/hook", "secret", frozenset(EVENTS))


def clock() -> float:
    return 100.0  # these tests never need time to pass


@dataclass
class Harness:
    adapter: CallAdapter
    sip: FakeStack
    service: CallService
    metrics: Metrics
    asks: list[AssistantAsk] = field(default_factory=list)
    records: list[CallRecord] = field(default_factory=list)
    events: list[tuple[CallRecord, StatusEvent]] = field(default_factory=list)

    def answer(self, reply: AssistantReply) -> None:
        self.adapter.resume(self.asks[-1].call_id, reply)
        self.adapter.tick()

    def statuses(self) -> list[str]:
        return [json.loads(status_update_body(e.facts, r, T0))["message"]["call"]["status"]
                for r, e in self.events]

    def count(self, outcome: str) -> float:
        series = f'callrouter_webhook_assistant_requests_total{{outcome="{outcome}"}} '
        for line in self.metrics.render()[0].decode().splitlines():
            if line.startswith(series):
                return float(line.split()[-1])
        raise AssertionError(series)


def harness(account: WebhookTarget | None = ACCOUNT) -> Harness:
    metrics = Metrics()
    h = Harness(None, FakeStack(), None, metrics)  # type: ignore[arg-type]
    service = CallService(
        policy=Policy(max_calls=10), timing=s.Timing(ring_timeout=5, max_duration=600),
        pool=RuntimePool(()), default_region="NL", metrics=metrics,
        record=h.records.append, notify=lambda r, e: h.events.append((r, e)),
        wall=lambda: T0, clock=clock)
    store = MemoryStore()

    async def seed() -> None:
        await store.create_assistant(Assistant(SAVED, "Saved", "sip:saved@10.0.0.1", T0, T0))
        await store.create_assistant(Assistant(OTHER, "Other", "sip:other@10.0.0.2", T0, T0))
        await store.create_number(PhoneNumber(NUMBER_ID, "+31850835037", "", SAVED, None,
                                              True, T0, T0))
        await store.create_number(PhoneNumber(UNASSIGNED_ID, "+31850835038", "", None, None,
                                              True, T0, T0))
        await service.reload_routes(store)

    asyncio.run(seed())
    service.webhooks = WebhookDirectory(account, {
        SAVED: hooks_of(SAVED, "sip:saved@10.0.0.1", None, (), None),
        OTHER: hooks_of(OTHER, "sip:other@10.0.0.2", None, (), None)})
    service.ask = h.asks.append
    h.service = service
    h.adapter = CallAdapter(service, h.sip, clock)
    return h


def runtime_targets(h: Harness) -> list[str]:
    return [d.target for d in h.sip.dialled]


def test_the_invite_rings_while_held_and_the_saved_assistant_takes_it_on_empty_reply() -> None:
    h = harness()
    caller = h.sip.invite()
    assert h.sip.asked("answer", caller) == [180]  # held: ringing, nothing dialled yet
    assert h.sip.dialled == [] and len(h.asks) == 1
    ask = h.asks[0]
    assert ask.target == ACCOUNT and ask.facts.assistant_id == SAVED
    assert ask.facts.number == "+31850835037" and ask.facts.caller == "+31201234567"
    h.answer(parse_reply(200, b"{}"))
    assert runtime_targets(h) == [f"sip:{SAVED}@10.0.0.1"]
    assert h.count("saved") == 1


def test_a_reply_naming_another_assistant_dials_its_runtime_and_caps_the_call() -> None:
    h = harness()
    caller = h.sip.invite()
    h.answer(parse_reply(200, json.dumps({"assistant_id": str(OTHER),
                                          "max_duration_seconds": 60,
                                          "metadata": {"crm": 1}}).encode()))
    (runtime,) = h.sip.legs(LegKind.RUNTIME)
    assert runtime_targets(h) == [f"sip:{OTHER}@10.0.0.2"]
    h.sip.ring(runtime)
    h.sip.pick_up(runtime)
    h.sip.pick_up(caller)
    assert h.service.active[h.asks[0].call_id].session.next_deadline() == 160.0
    assert h.statuses() == ["in-progress"]
    record, event = h.events[0]
    assert record.assistant_id == OTHER and event.facts.extras == {"metadata": {"crm": 1}}
    body = json.loads(status_update_body(event.facts, record, T0))["message"]
    assert body["metadata"] == {"crm": 1} and body["call"]["assistant_id"] == str(OTHER)


def test_an_unknown_assistant_falls_back_to_the_saved_one_and_is_counted() -> None:
    h = harness()
    h.sip.invite()
    h.answer(parse_reply(200, json.dumps({"assistant_id": str(uuid.uuid4())}).encode()))
    assert runtime_targets(h) == [f"sip:{SAVED}@10.0.0.1"]
    assert h.count("unknown_assistant") == 1


def test_an_error_reply_refuses_603_with_a_reason_header_and_records_it() -> None:
    h = harness()
    caller = h.sip.invite()
    h.answer(parse_reply(200, b'{"error": "Closed \\"today\\"\\r\\nX-Evil: 1"}'))
    assert h.sip.asked("answer", caller) == [180, 603]
    (reason,) = h.sip.answer_headers[caller]
    assert reason[0] == "Reason"
    assert reason[1] == 'SIP ;cause=603 ;text="Closed \\"today\\"  X-Evil: 1"'
    assert "\r" not in reason[1] and "\n" not in reason[1]
    closed = h.records[-1]
    assert closed.status is CallStatus.FAILED
    assert closed.end_reason is EndReason.REJECTED_BY_WEBHOOK
    assert closed.error == 'Closed "today"\r\nX-Evil: 1'
    assert h.sip.dialled == [] and h.events == []


def test_timeouts_and_bad_replies_use_the_saved_assistant_or_480_when_unassigned() -> None:
    for reply in (AssistantReply(ReplyKind.TIMEOUT), parse_reply(502, b""),
                  parse_reply(200, b"<html>")):
        h = harness()
        h.sip.invite()
        h.answer(reply)
        assert runtime_targets(h) == [f"sip:{SAVED}@10.0.0.1"], reply
        h = harness()
        caller = h.sip.invite("+31850835038")
        assert h.asks[0].facts.assistant_id is None  # the account webhook is asked
        h.answer(reply)
        assert h.sip.asked("answer", caller) == [180, 480]
        assert h.records[-1].end_reason is EndReason.REJECTED_UNASSIGNED


def test_unknown_numbers_and_numbers_without_a_subscriber_are_not_held() -> None:
    h = harness()
    unknown = h.sip.invite("+31859999999")
    assert h.sip.asked("answer", unknown) == [404] and h.asks == []
    quiet = harness(account=None)
    caller = quiet.sip.invite()
    assert quiet.asks == [] and len(quiet.sip.dialled) == 1
    assert quiet.sip.asked("answer", caller) == []
    only_status = harness(WebhookTarget(ACCOUNT.url, None, frozenset({"status-update"})))
    only_status.sip.invite()
    assert only_status.asks == [] and len(only_status.sip.dialled) == 1


def test_an_assistants_own_webhook_is_asked_instead_of_the_account() -> None:
    h = harness()
    own = hooks_of(SAVED, "sip:saved@10.0.0.1", "https://a.example/hook", ("status-update",),
                   "k")
    h.service.set_assistant_hooks(SAVED, own)
    h.sip.invite()  # its own webhook does not want assistant-request: not asked at all
    assert h.asks == [] and len(h.sip.dialled) == 1
    caller, runtime = h.sip.callers[0], h.sip.legs(LegKind.RUNTIME)[0]
    h.sip.pick_up(runtime)
    h.sip.pick_up(caller)
    h.sip.hang_up(caller)
    assert h.statuses() == ["in-progress", "ended"]
    assert {e.target.url for _, e in h.events} == {"https://a.example/hook"}


def test_the_caller_cancelling_while_held_ends_the_call_and_a_late_reply_is_ignored() -> None:
    h = harness()
    caller = h.sip.invite()
    h.sip.refuse(caller, 487)  # CANCEL: pjsip answers 487 itself
    assert h.records[-1].end_reason is None  # the record closed with its event
    (record, _event), = h.events
    assert record.end_reason is EndReason.CALLER_CANCELLED
    assert h.statuses() == ["ended"]
    h.answer(parse_reply(200, b"{}"))  # the reply arrives after all
    assert h.sip.dialled == [] and h.sip.asked("answer", caller) == [180]
    h.adapter.tick()
    assert h.adapter.legs_in_use == 0


def test_other_calls_flow_while_one_is_held() -> None:
    h = harness()
    held = h.sip.invite()
    unknown = h.sip.invite("+31859999999")
    assert h.sip.asked("answer", unknown) == [404]
    h.answer(AssistantReply(ReplyKind.SAVED))
    assert h.sip.asked("answer", held) == [180]
    assert len(h.sip.dialled) == 1


def test_status_updates_for_answered_transferred_and_failed_calls() -> None:
    h = harness()
    caller = h.sip.invite()
    h.answer(AssistantReply(ReplyKind.SAVED))
    runtime = h.sip.legs(LegKind.RUNTIME)[0]
    h.sip.pick_up(runtime)
    h.sip.pick_up(caller)
    call_id = h.asks[0].call_id
    future = h.adapter.submit(call_id, s.TransferRequested("sip:desk@pbx"))
    h.adapter.tick()
    assert future.result() is None
    h.sip.pick_up(h.sip.legs(LegKind.TARGET)[0])
    h.sip.hang_up(caller)
    assert h.statuses() == ["in-progress", "ended"]
    assert h.events[-1][0].end_reason is EndReason.TRANSFERRED

    failing = harness()
    failing.sip.invite()
    failing.answer(AssistantReply(ReplyKind.SAVED))
    failing.sip.refuse(failing.sip.legs(LegKind.RUNTIME)[0], 503)
    assert failing.statuses() == ["ended-with-error"]
    record, event = failing.events[0]
    body = json.loads(status_update_body(event.facts, record, T0))["message"]
    assert body["end_reason"] == "runtime_unavailable" and "503" in body["error"]


def test_an_engine_stop_closes_held_invites() -> None:
    h = harness()
    h.sip.invite()
    h.service.abandon_all(EndReason.ROUTER_SHUTDOWN)
    (record, _), = h.events
    assert record.end_reason is EndReason.ROUTER_SHUTDOWN
    assert h.service.on_decided(h.asks[0].call_id, AssistantReply(ReplyKind.SAVED),
                                0.0) is None


def test_a_failure_while_deciding_answers_500_and_closes_the_record() -> None:
    h = harness()
    caller = h.sip.invite()

    def broken(call_id: uuid.UUID, reply: AssistantReply, now: float) -> None:
        raise RuntimeError("boom")

    h.service.on_decided = broken  # type: ignore[assignment,method-assign]
    h.answer(AssistantReply(ReplyKind.SAVED))
    assert h.sip.asked("answer", caller) == [180, 500]
    assert h.events[-1][0].end_reason is EndReason.ERROR
