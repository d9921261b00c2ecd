"""Outbound calls (issue 11 item 4), without pjsua2: the API's request resolved against
the store, carried to the SIP thread as a value, the customer dialled through the trunk
with its credentials and caller id, then the runtime with ``X-Direction: outbound``, then
both bridged; capacity and drain apply; bad input is a 422 naming the field."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import replace

import pytest

from callrouter.domain import session as s
from callrouter.domain.models import (
    CallRecord,
    CallStatus,
    EndReason,
    PhoneNumber,
    Trunk,
    TrunkTransport,
)
from callrouter.domain.webhooks import (
    StatusEvent,
    WebhookDirectory,
    WebhookTarget,
    status_update_body,
)
from callrouter.errors import EngineUnavailable, ValidationError
from callrouter.outbound import OutboundDialer, OutboundRequest
from callrouter.sip.stack import LegKind
from callrouter.store.memory import MemoryStore
from tests.unit.test_engine_adapter import ASSISTANT, T0, Harness, harness

NUMBER_ID = uuid.UUID(int=1)
TRUNK = Trunk(id=uuid.UUID(int=99), name="acme", host="gw.example", port=5080,
              transport=TrunkTransport.TCP, provider="acme", username="acme-user",
              has_password=True, is_active=True, created_at=T0, updated_at=T0)


async def seeded(trunk: Trunk | None = TRUNK) -> MemoryStore:
    from callrouter.domain.models import Assistant

    store = MemoryStore()
    await store.create_assistant(Assistant(ASSISTANT, "A", "sip:rt@10.0.0.1", T0, T0))
    if trunk is not None:
        await store.create_trunk(trunk, b"pw")
    await store.create_number(PhoneNumber(NUMBER_ID, "+31850835037", "", ASSISTANT,
                                          trunk.id if trunk else None, True, T0, T0))
    return store


async def place(h: Harness, store: MemoryStore, request: OutboundRequest) -> uuid.UUID:
    h.service.control = h.adapter  # type: ignore[assignment]
    dialer = OutboundDialer(h.service, store, lambda b: b.decode() + "!", "NL")
    task = asyncio.ensure_future(dialer.place(request))
    while not task.done():
        h.adapter.tick()  # the SIP thread's loop
        await asyncio.sleep(0)
    return task.result()


def test_an_outbound_call_dials_the_customer_then_the_runtime_then_bridges() -> None:
    h = harness()
    store = asyncio.run(seeded())
    call_id = asyncio.run(place(h, store, OutboundRequest("+31612345678", NUMBER_ID)))
    (customer,) = h.sip.dialled
    assert customer.leg.kind is LegKind.CUSTOMER
    assert customer.target == "sip:+31612345678@gw.example:5080;transport=tcp"
    assert (customer.credentials, customer.caller_id) == (("acme-user", "pw!"), "+31850835037")
    assert customer.headers == ()  # nothing of ours towards the provider
    h.sip.ring(customer.leg)
    h.sip.pick_up(customer.leg)
    runtime = h.sip.dialled[-1]
    assert runtime.leg.kind is LegKind.RUNTIME
    headers = dict(runtime.headers)
    assert headers["X-Direction"] == "outbound" and headers["X-Call-Id"] == str(call_id)
    assert headers["X-Dialled-Number"] == "+31612345678"
    h.sip.pick_up(runtime.leg)
    assert h.sip.bridges == [(customer.leg, runtime.leg)]
    record = h.records[-1]
    assert (record.direction, record.status, record.trunk_id) == (
        "outbound", CallStatus.IN_PROGRESS, TRUNK.id)
    assert (record.caller_phone, record.assistant_phone) == ("+31612345678", "+31850835037")
    assert record.sip_call_id == f"dialled-{customer.leg.handle}@router"
    h.sip.hang_up(customer.leg)
    assert h.records[-1].end_reason is EndReason.CALLER_HANGUP
    assert h.sip.asked("hangup", runtime.leg)


def test_an_outbound_call_sends_its_status_updates_as_an_outbound_phone_call() -> None:
    """Guards issue 12's events on issue 11's calls: in-progress on answer, ended on hang-up,
    ``call.type`` outbound_phone_call, the destination as the customer."""
    h = harness()
    events: list[tuple[CallRecord, StatusEvent]] = []
    h.service.notify = lambda record, event: events.append((record, event))
    h.service.webhooks = WebhookDirectory(
        WebhookTarget("http://127.0.0.1:9/hook", None, frozenset({"status-update"})))
    store = asyncio.run(seeded())
    call_id = asyncio.run(place(h, store, OutboundRequest("+31612345678", NUMBER_ID)))
    customer = h.sip.dialled[0].leg
    h.sip.pick_up(customer)
    h.sip.pick_up(h.sip.dialled[-1].leg)
    h.sip.hang_up(customer)
    bodies = [json.loads(status_update_body(e.facts, r, T0))["message"] for r, e in events]
    assert [b["call"]["status"] for b in bodies] == ["in-progress", "ended"]
    assert {b["call"]["type"] for b in bodies} == {"outbound_phone_call"}
    assert {b["call"]["id"] for b in bodies} == {str(call_id)}
    assert bodies[0]["customer"]["number"] == "+31612345678"
    assert bodies[0]["phone_number"]["number"] == "+31850835037"
    assert events[-1][0].direction == "outbound" and events[-1][0].trunk_id == TRUNK.id


def test_end_call_works_on_an_outbound_call_and_a_busy_customer_fails_it() -> None:
    h = harness()
    store = asyncio.run(seeded(replace(TRUNK, outbound_number="+31850000000")))
    asyncio.run(place(h, store, OutboundRequest("+31612345678", NUMBER_ID)))
    assert h.sip.dialled[0].caller_id == "+31850000000"  # the trunk's caller id wins
    h.sip.refuse(h.sip.dialled[0].leg, 486, "Busy Here")
    assert (h.records[-1].status, h.records[-1].end_reason) == (
        CallStatus.FAILED, EndReason.CUSTOMER_BUSY)
    asyncio.run(place(h, store, OutboundRequest("+31612345678", NUMBER_ID)))
    customer = h.sip.dialled[-1].leg
    h.sip.pick_up(customer)
    h.sip.pick_up(h.sip.dialled[-1].leg)
    future = h.adapter.submit(h.records[-1].id, s.EndRequested(EndReason.ENDED_BY_API))
    h.adapter.tick()
    assert future.result() is None
    assert h.records[-1].end_reason is EndReason.ENDED_BY_API
    assert h.sip.asked("hangup", customer)


def test_capacity_and_drain_apply_to_outbound_calls() -> None:
    h = harness()
    store = asyncio.run(seeded())
    h.service.draining = True
    with pytest.raises(EngineUnavailable, match="draining"):
        asyncio.run(place(h, store, OutboundRequest("+31612345678", NUMBER_ID)))
    assert h.sip.dialled == [] and h.records == []


@pytest.mark.parametrize(("request_", "field"), [
    (OutboundRequest("0612345678", NUMBER_ID), "destination"),
    (OutboundRequest("+1", NUMBER_ID), "destination"),
    (OutboundRequest("+31612345678", None), "number_id"),
    (OutboundRequest("+31612345678", uuid.uuid4()), "number_id"),
    (OutboundRequest("+31612345678", NUMBER_ID, uuid.uuid4()), "assistant_id"),
])
def test_bad_requests_name_the_field(request_: OutboundRequest, field: str) -> None:
    h = harness()
    store = asyncio.run(seeded())
    with pytest.raises(ValidationError) as caught:
        asyncio.run(place(h, store, request_))
    assert [d.field for d in caught.value.details] == [field]


def test_a_number_without_a_trunk_is_refused() -> None:
    h = harness()
    store = asyncio.run(seeded(trunk=None))
    with pytest.raises(ValidationError) as caught:
        asyncio.run(place(h, store, OutboundRequest("+31612345678", NUMBER_ID)))
    assert [d.field for d in caught.value.details] == ["number_id"]


def test_the_adapter_asks_the_stack_which_trunk_an_invite_came_in_on() -> None:
    """Issue 11 items 2 and 3, below pjsua2: by source address, or as the Contact user of
    a registration (then the dialled number is the one in To)."""
    h = harness()
    by_address, by_registration = uuid.uuid4(), uuid.uuid4()
    h.sip.trunk_sources["192.0.2.10"] = str(by_address)
    h.sip.registration_users["cr0a1b"] = str(by_registration)
    h.sip.invite(source="192.0.2.10:5060")
    h.sip.invite(source="203.0.113.9:5060", request_user="cr0a1b")
    h.sip.invite(source="127.0.0.1:5062")
    assert [(r.trunk_id, r.assistant_phone) for r in h.records] == [
        (by_address, "+31850835037"), (by_registration, "+31850835037"),
        (None, "+31850835037")]
