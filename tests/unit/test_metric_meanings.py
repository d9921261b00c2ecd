"""What each call metric family means, pinned one test per family.

The in-memory tier with a fake SIP side: the real ``CallService`` and ``Metrics`` behind
the real ``CallAdapter``, with ``FakeStack`` playing the caller and the runtimes, and an
injected clock. Each test drives whole calls and reads the family back from the
exposition text, as a scrape would. Guards issue 9 item 6: a bridged call that later
failed was counted twice in the routing decisions (and its ring time observed as decision
latency), and responses were counted when the service asked for them, not when sent.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from callrouter.domain import session as s
from callrouter.domain.models import Assistant, PhoneNumber
from callrouter.domain.routing import Policy, RuntimePool
from callrouter.errors import EngineError
from callrouter.metrics import Metrics
from callrouter.service import CallService
from callrouter.sip.adapter import CallAdapter
from callrouter.sip.fake import FakeStack
from callrouter.sip.stack import Headers, Leg, LegKind
from callrouter.store.memory import MemoryStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ASSISTANT = uuid.UUID(int=7)
NUMBER = "+31850835037"
UNKNOWN = "+31850835099"
TIMING = s.Timing(ring_timeout=5, max_duration=600)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RefusingStack(FakeStack):
    """A stack whose engine refuses to send some response codes (pjsua2 raises)."""

    refused_codes: frozenset[int] = frozenset()

    def answer(self, leg: Leg, code: int, reason: str = "",
               retry_after: int | None = None, headers: Headers = ()) -> None:
        if code in self.refused_codes:
            raise EngineError(f"pjsua2 would not send {code}")
        super().answer(leg, code, reason, retry_after, headers)


class Router:
    """The service behind the adapter, on a fake stack, with a hand-moved clock."""

    def __init__(self, sip: FakeStack | None = None) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.service = CallService(
            policy=Policy(max_calls=10), timing=TIMING,
            pool=RuntimePool(("sip:pool@10.0.0.9",)), default_region="NL",
            metrics=self.metrics, record=lambda _: None, wall=self.wall, clock=self.clock)
        asyncio.run(self._seed())
        self.sip = sip or FakeStack()
        self.adapter = CallAdapter(self.service, self.sip, self.clock)

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.clock.now)

    async def _seed(self) -> None:
        store = MemoryStore()
        await store.create_assistant(Assistant(ASSISTANT, "A", "sip:rt@10.0.0.1", T0, T0))
        await store.create_number(PhoneNumber(uuid.UUID(int=1), NUMBER, "", ASSISTANT,
                                              None, True, T0, T0))
        await self.service.reload_routes(store)

    def later(self, seconds: float) -> None:
        self.clock.now += seconds
        self.adapter.tick()

    def runtime(self, attempt: int = -1) -> Leg:
        return self.sip.legs(LegKind.RUNTIME)[attempt]

    def answered_call(self, ring: float = 0.0, answer: float = 0.0,
                      ack: float = 0.0) -> Leg:
        """A caller whose call the runtime rang, answered and the caller ACKed, with the
        given seconds before each step."""
        caller = self.sip.invite(NUMBER)
        self.later(ring)
        self.sip.ring(self.runtime())
        self.later(answer)
        self.sip.pick_up(self.runtime())
        self.later(ack)
        self.sip.pick_up(caller)
        return caller

    def value(self, name: str, **labels: str) -> float:
        """One sample of the scrape (0 when the series is absent)."""
        body = self.metrics.render()[0].decode()
        return next((sample.value for family in text_string_to_metric_families(body)
                     for sample in family.samples
                     if sample.name == name and sample.labels == labels), 0.0)


def test_invites_received_counts_every_initial_invite_once_whatever_becomes_of_it() -> None:
    router = Router()
    router.sip.invite(UNKNOWN)
    router.sip.hang_up(router.answered_call())
    assert router.value("callrouter_sip_invites_received_total") == 2


def test_routing_decisions_count_each_call_once_when_decided() -> None:
    """Guards the double count: a bridged call that later fails (every runtime refused)
    or is cancelled stays one ``bridged`` decision; its ending goes to calls_ended."""
    router = Router()
    router.sip.invite(NUMBER)
    router.sip.refuse(router.runtime(), 486, "Busy Here")
    router.sip.refuse(router.runtime(), 500)  # the pool's fallback: the caller gets 503
    caller = router.sip.invite(NUMBER)
    router.sip.hang_up(caller)  # the caller gives up before anyone answered (CANCEL)
    router.sip.invite(UNKNOWN)
    decisions = "callrouter_routing_decisions_total"
    assert router.value(decisions, outcome="bridged") == 2
    assert router.value(decisions, outcome="unknown_number") == 1
    assert router.value(decisions, outcome="runtime_unavailable") == 0
    assert router.value(decisions, outcome="caller_cancelled") == 0
    ended = "callrouter_calls_ended_total"
    assert router.value(ended, reason="runtime_unavailable") == 1
    assert router.value(ended, reason="caller_cancelled") == 1


def test_decision_latency_is_invite_to_decision_never_ring_time() -> None:
    """Guards the decision histogram against ring and failover time: one observation
    per decision, taken when the decision is made."""
    router = Router()
    router.sip.invite(NUMBER)
    router.later(TIMING.ring_timeout)  # no answer: the fallback runtime is dialled
    router.later(1.0)
    router.sip.refuse(router.runtime(), 503)
    router.sip.invite(UNKNOWN)
    assert router.value("callrouter_call_setup_decision_seconds_count") == 2
    assert router.value("callrouter_call_setup_decision_seconds_sum") == 0.0


def test_responses_are_counted_when_the_engine_took_them_not_when_asked_for() -> None:
    """Guards the responses family: a response the session asked for but the engine
    refused to send (pjsua2 raised) is not counted; pjsua's own 100 Trying is."""
    sip = RefusingStack()
    sip.refused_codes = frozenset({180})
    router = Router(sip)
    caller = router.sip.invite(NUMBER)
    router.sip.ring(router.runtime())  # the session asks for 180; the engine refuses
    router.sip.pick_up(router.runtime())
    router.sip.pick_up(caller)
    router.sip.hang_up(caller)
    router.sip.invite(UNKNOWN)
    sent = "callrouter_sip_responses_sent_total"
    assert router.value(sent, code="100") == 2
    assert router.value(sent, code="180") == 0
    assert router.value(sent, code="200") == 1
    assert router.value(sent, code="404") == 1


def test_first_response_is_invite_to_the_first_response_after_100_trying() -> None:
    """Guards the first-response histogram: observed once per INVITE, when the router's
    first own response (a refusal, or 180 for a bridged call) was taken by the engine."""
    router = Router()
    router.sip.invite(UNKNOWN)  # answered 404 at once
    router.sip.hang_up(router.answered_call(ring=2.0, answer=3.0))  # 180 after 2 s
    first = "callrouter_call_setup_first_response_seconds"
    assert router.value(f"{first}_count") == 2
    assert router.value(f"{first}_sum") == pytest.approx(2.0)


def test_answer_time_is_invite_to_the_call_in_progress() -> None:
    router = Router()
    router.sip.hang_up(router.answered_call(ring=1.0, answer=2.0, ack=0.5))
    router.sip.invite(UNKNOWN)
    assert router.value("callrouter_call_setup_answer_seconds_count") == 1
    assert router.value("callrouter_call_setup_answer_seconds_sum") == pytest.approx(3.5)


def test_runtime_answer_time_is_the_answering_attempt_from_its_own_invite() -> None:
    router = Router()
    caller = router.sip.invite(NUMBER)
    router.later(TIMING.ring_timeout)  # the first runtime never answers: fallback dialled
    router.later(1.5)
    router.sip.pick_up(router.runtime())
    router.sip.pick_up(caller)
    assert router.value("callrouter_runtime_answer_seconds_count") == 1
    assert router.value("callrouter_runtime_answer_seconds_sum") == pytest.approx(1.5)


def test_calls_active_holds_bridged_calls_from_decision_to_end() -> None:
    router = Router()
    router.sip.invite(UNKNOWN)
    assert router.value("callrouter_calls_active") == 0
    caller = router.answered_call()
    assert router.value("callrouter_calls_active") == 1
    router.sip.hang_up(caller)
    assert router.value("callrouter_calls_active") == 0


def test_calls_ended_counts_each_bridged_call_once_by_end_reason() -> None:
    router = Router()
    router.sip.invite(UNKNOWN)  # a rejected INVITE is a routing decision, not a call
    router.sip.hang_up(router.answered_call())
    router.answered_call()
    router.sip.hang_up(router.runtime())
    ended = "callrouter_calls_ended_total"
    assert router.value(ended, reason="caller_hangup") == 1
    assert router.value(ended, reason="assistant_hangup") == 1
    assert router.value(ended, reason="rejected_unknown_number") == 0


def test_call_duration_is_answer_to_hang_up_for_answered_calls_only() -> None:
    router = Router()
    caller = router.answered_call(ring=1.0, answer=1.0)
    router.later(42.0)
    router.sip.hang_up(caller)
    router.sip.invite(NUMBER)
    router.sip.refuse(router.runtime(), 486)
    router.sip.refuse(router.runtime(), 486)
    assert router.value("callrouter_call_duration_seconds_count") == 1
    assert router.value("callrouter_call_duration_seconds_bucket", le="60.0") == 1
    assert router.value("callrouter_call_duration_seconds_bucket", le="30.0") == 0
