"""Webhook delivery against a real HTTP receiver in the test process (issue 12 items 4-6):
the platform's signing scheme, the outbox worker's retries and give-ups, order per call,
bounded concurrency per destination, URL safety, and ``assistant-request`` replies.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from callrouter.domain.models import CallRecord, CallStatus, DeliveryStatus, WebhookDelivery
from callrouter.domain.webhooks import (
    EVENTS,
    AssistantAsk,
    AssistantReply,
    Backoff,
    CallFacts,
    ReplyKind,
    WebhookDirectory,
    WebhookTarget,
    new_delivery,
)
from callrouter.errors import Conflict, NotFound
from callrouter.metrics import Metrics
from callrouter.ports import Store
from callrouter.store import MemoryStore
from callrouter.webhooks import (
    AssistantRequester,
    DeliveryWorker,
    SendFailed,
    WebhookSender,
    new_client,
)
from tests.support.webhook_receiver import Received, Reply, WebhookReceiver

SECRET = "shh"
FAST = Backoff(first=0.05, cap=0.2)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def now() -> datetime:
    return datetime.now(UTC)


def event(url: str, call_id: uuid.UUID | None = None, text: str = "x",
          retry_hours: float = 1.0) -> WebhookDelivery:
    body = json.dumps({"message": {"type": "status-update", "text": text}}).encode()
    return new_delivery(call_id or uuid.uuid4(), url, None, body, now(), retry_hours)


def metric(metrics: Metrics, name: str, event: str = "status-update") -> float:
    series = f'{name}{{event="{event}"}} '
    for line in metrics.render()[0].decode().splitlines():
        if line.startswith(series):
            return float(line.split()[-1])
    raise AssertionError(series)


class Rig:
    """A store, a worker over a real client, and the account's secret."""

    def __init__(self, secret: str | None = SECRET, per_destination: int = 4,
                 allow_private: bool = False, store: Store | None = None,
                 attempt_timeout: float = 5.0) -> None:
        self.store: Store = store or MemoryStore()
        self.metrics = Metrics()
        self.client = new_client(5.0)
        self.sender = WebhookSender(self.client, allow_private=allow_private)
        account = WebhookTarget("http://unused", secret, frozenset(EVENTS))
        self.worker = DeliveryWorker(self.store, self.sender, self.metrics,
                                     lambda: WebhookDirectory(account),
                                     per_destination=per_destination, retry_hours=1.0,
                                     attempt_timeout=attempt_timeout, backoff=FAST,
                                     jitter=lambda: 0.0)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Rig:
        self.task = asyncio.create_task(self.worker.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.aclose()

    async def add(self, *deliveries: WebhookDelivery) -> None:
        record = CallRecord(uuid.uuid4(), CallStatus.ENDED, "", "", None, None, "", None, None,
                            None, None, now(), now())
        await self.store.upsert_calls([record], list(deliveries))
        self.worker.wake()

    async def send_one(self, url: str) -> tuple[WebhookDelivery, WebhookDelivery]:
        """One new event to ``url``, and how it ended."""
        d = event(url)
        await self.add(d)
        return d, await self.settled(d.id)

    async def settled(self, delivery_id: uuid.UUID, timeout: float = 10.0) -> WebhookDelivery:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = await self.store.get_delivery(delivery_id)
            if found is not None and found.status is not DeliveryStatus.PENDING:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"{delivery_id} still pending: {found}")


def scripted(*replies: Reply) -> Callable[[Received], Reply]:
    """Answer with ``replies`` in turn, then 200."""
    queue = list(replies)
    lock = threading.Lock()

    def reply(_: Received) -> Reply:
        with lock:
            return queue.pop(0) if queue else (200, b"", {}, 0.0)

    return reply


@pytest.fixture
def receiver() -> Any:
    hook = WebhookReceiver(secret=SECRET).start()
    yield hook
    hook.stop()


def test_a_delivery_is_signed_by_the_platforms_scheme_and_marked_delivered(
        receiver: WebhookReceiver) -> None:
    async def test() -> None:
        async with Rig() as rig:
            d, done = await rig.send_one(receiver.url)
            assert done.status is DeliveryStatus.DELIVERED and done.attempts == 1
            (got,) = receiver.events()
            assert got.verified and got.body == d.body.encode()
            assert got.headers["content-type"] == "application/json"
            assert got.headers["x-webhook-event"] == "status-update"
            assert got.headers["x-webhook-id"] == str(d.id)
            assert got.headers["x-webhook-signature"].startswith("sha256=")
            assert metric(rig.metrics, "callrouter_webhook_deliveries_total") == 1
    run(test)


def test_a_receiver_with_the_wrong_secret_rejects_every_one_and_they_are_given_up(
        receiver: WebhookReceiver) -> None:
    receiver.secret = "another"

    async def test() -> None:
        async with Rig() as rig:
            deliveries = [event(receiver.url) for _ in range(3)]
            await rig.add(*deliveries)
            for d in deliveries:
                failed = await rig.settled(d.id)
                assert failed.status is DeliveryStatus.FAILED and failed.last_error == "HTTP 401"
            assert not any(r.verified for r in receiver.events())
            listed, total = await rig.store.list_deliveries(DeliveryStatus.FAILED, 10, 0)
            assert total == 3 and {d.id for d in listed} == {d.id for d in deliveries}
            assert metric(rig.metrics, "callrouter_webhook_given_up_total") == 3
    run(test)


def test_5xx_and_connection_errors_are_retried_with_the_same_id(
        receiver: WebhookReceiver) -> None:
    receiver.reply = scripted((503, b"", {}, 0.0), (500, b"", {}, 0.0))

    async def test() -> None:
        async with Rig() as rig:
            d, done = await rig.send_one(receiver.url)
            assert done.status is DeliveryStatus.DELIVERED and done.attempts == 3
            assert {r.delivery_id for r in receiver.events()} == {str(d.id)}
            assert metric(rig.metrics, "callrouter_webhook_delivery_failures_total") == 2
            nobody = event("http://127.0.0.1:9/closed")  # nothing listens on port 9
            await rig.add(nobody)
            await asyncio.sleep(0.5)
            waiting = await rig.store.get_delivery(nobody.id)
            assert waiting is not None and waiting.status is DeliveryStatus.PENDING
            assert waiting.attempts >= 2 and "Connect" in (waiting.last_error or "")
    run(test)


def test_429_honours_retry_after_and_other_4xx_give_up_at_once(
        receiver: WebhookReceiver) -> None:
    receiver.reply = scripted((429, b"", {"Retry-After": "120"}, 0.0),
                              (404, b"", {}, 0.0))

    async def test() -> None:
        async with Rig() as rig:
            throttled = event(receiver.url)
            await rig.add(throttled)
            await asyncio.sleep(0.3)
            later = await rig.store.get_delivery(throttled.id)
            assert later is not None and later.status is DeliveryStatus.PENDING
            assert later.next_attempt_at >= now() + timedelta(seconds=110)
            gone = event(receiver.url)
            await rig.add(gone)
            failed = await rig.settled(gone.id)
            assert failed.status is DeliveryStatus.FAILED and failed.attempts == 1
            again = await rig.worker.retry(gone.id)  # the API's retry: delivered now
            assert again.status is DeliveryStatus.PENDING
            assert (await rig.settled(gone.id)).status is DeliveryStatus.DELIVERED
            with pytest.raises(Conflict):
                await rig.worker.retry(gone.id)
            with pytest.raises(NotFound):
                await rig.worker.retry(uuid.uuid4())
    run(test)


def test_a_receiver_slower_than_the_attempt_timeout_is_retried_not_waited_for(
        receiver: WebhookReceiver) -> None:
    receiver.reply = scripted((200, b"", {}, 1.5))

    async def test() -> None:
        async with Rig(attempt_timeout=0.3) as rig:
            d, done = await rig.send_one(receiver.url)
            assert done.status is DeliveryStatus.DELIVERED and done.attempts == 2
            assert [r.delivery_id for r in receiver.events()] == [str(d.id)] * 2
    run(test)


def test_retries_stop_when_retry_hours_have_passed(receiver: WebhookReceiver) -> None:
    receiver.reply = lambda _: (503, b"", {}, 0.0)

    async def test() -> None:
        async with Rig() as rig:
            d = event(receiver.url, retry_hours=0.2 / 3600)  # 0.2 s
            await rig.add(d)
            failed = await rig.settled(d.id)
            assert failed.status is DeliveryStatus.FAILED and failed.last_error == "HTTP 503"
    run(test)


def test_events_of_one_call_arrive_in_order_even_when_the_first_is_retried(
        receiver: WebhookReceiver) -> None:
    receiver.reply = scripted((503, b"", {}, 0.0))

    async def test() -> None:
        async with Rig() as rig:
            call_id = uuid.uuid4()
            first, second = event(receiver.url, call_id, "first"), event(receiver.url, call_id,
                                                                         "second")
            await rig.add(first, second)
            await rig.settled(second.id)
            texts = [r.json["message"]["text"] for r in receiver.events()]
            assert texts == ["first", "first", "second"]
    run(test)


def test_a_slow_receiver_gets_at_most_its_share_and_does_not_hold_up_others(
        receiver: WebhookReceiver) -> None:
    slow = WebhookReceiver(secret=SECRET, reply=lambda _: (200, b"", {}, 0.6)).start()
    try:
        async def test() -> None:
            async with Rig(per_destination=2) as rig:
                stuck = [event(slow.url) for _ in range(6)]
                quick = [event(receiver.url) for _ in range(4)]
                await rig.add(*stuck, *quick)
                started = time.monotonic()
                for d in quick:
                    await rig.settled(d.id)
                assert time.monotonic() - started < 0.6 + 0.5  # not behind six slow ones
                for d in stuck:
                    await rig.settled(d.id)
                arrivals = sorted(r.at for r in slow.events())
                # At most two at once: the third request waited for a first reply.
                assert arrivals[2] - arrivals[0] >= 0.5
        run(test)
    finally:
        slow.stop()


def test_sender_refuses_link_local_always_and_private_unless_allowed() -> None:
    async def test() -> None:
        client = new_client(1.0)

        async def metadata(host: str, port: int) -> list[str]:
            return ["169.254.169.254"]

        async def private(host: str, port: int) -> list[str]:
            return ["10.1.2.3"]

        try:
            for resolve, allow in ((metadata, True), (metadata, False), (private, False)):
                sender = WebhookSender(client, allow_private=allow, resolve=resolve)
                with pytest.raises(SendFailed) as refused:
                    await sender.post("http://hooks.example.com/x", "status-update",
                                      uuid.uuid4(), b"{}", None)
                assert refused.value.permanent
        finally:
            await client.aclose()
    run(test)


def test_no_redirects_and_replies_read_only_up_to_64_kib(receiver: WebhookReceiver) -> None:
    receiver.reply = scripted((302, b"", {"Location": "http://169.254.169.254/"}, 0.0),
                              (200, b"x" * (300 * 1024), {}, 0.0))

    async def test() -> None:
        client = new_client(5.0)
        sender = WebhookSender(client, allow_private=False)
        try:
            moved = await sender.post(receiver.url, "status-update", uuid.uuid4(), b"{}", SECRET)
            assert moved.status == 302
            big = await sender.post(receiver.url, "status-update", uuid.uuid4(), b"{}", SECRET)
            assert big.status == 200 and len(big.body) == 64 * 1024
        finally:
            await client.aclose()
        assert len(receiver.events()) == 2  # the redirect was not followed
    run(test)


def ask(url: str) -> AssistantAsk:
    facts = CallFacts(uuid.uuid4(), None, "+31850835037", "", "+31201234567", None)
    return AssistantAsk(facts.call_id, WebhookTarget(url, SECRET, frozenset(EVENTS)), facts,
                        now())


def test_assistant_request_replies_timeouts_and_garbage(receiver: WebhookReceiver) -> None:
    async def test() -> None:
        client = new_client(5.0)
        replies: list[tuple[uuid.UUID, AssistantReply]] = []
        requester = AssistantRequester(
            WebhookSender(client, allow_private=False), MemoryStore(), Metrics(),
            asyncio.get_running_loop(), lambda c, r: replies.append((c, r)), timeout=0.5)
        try:
            for reply, kind in (((200, b'{"assistant_id": "not-a-uuid"}', {}, 0.0),
                                 ReplyKind.INVALID),
                                ((200, b'{"error": "no"}', {}, 0.0), ReplyKind.REFUSED),
                                ((200, b"{}", {}, 1.5), ReplyKind.TIMEOUT),
                                ((500, b"{}", {}, 0.0), ReplyKind.HTTP_ERROR)):
                receiver.reply = lambda _, r=reply: r  # type: ignore[misc]
                sent = ask(receiver.url)
                started = time.monotonic()
                requester.ask(sent)
                while len(replies) < 1:
                    await asyncio.sleep(0.01)
                assert time.monotonic() - started < 1.0  # never beyond the timeout
                (call_id, answer), = replies
                replies.clear()
                assert call_id == sent.call_id and answer.kind is kind, answer
            got = receiver.events("assistant-request")
            assert got and all(r.verified for r in got)
            assert got[0].message["call"]["status"] == "ringing"
        finally:
            await requester.close()
            await client.aclose()
    run(test)


def test_a_restarted_worker_resumes_the_backlog(tmp_path: Any,
                                               receiver: WebhookReceiver) -> None:
    from callrouter.store import SqliteStore

    async def test() -> None:
        path = tmp_path / "callrouter.db"
        receiver.stop()
        store = SqliteStore(path)
        await store.open()
        backlog = [event(receiver.url) for _ in range(3)]
        async with Rig(store=store) as rig:
            await rig.add(*backlog)
            await asyncio.sleep(0.3)  # the receiver is down: attempts fail, stay pending
        await store.close()
        receiver.start()
        reopened = SqliteStore(path)
        await reopened.open()
        async with Rig(store=reopened) as rig:
            for d in backlog:
                assert (await rig.settled(d.id)).status is DeliveryStatus.DELIVERED
        await reopened.close()
        assert sorted(r.delivery_id for r in receiver.events()) == sorted(
            str(d.id) for d in backlog)
    run(test)


def test_two_workers_sharing_an_outbox_send_each_event_once(
        receiver: WebhookReceiver) -> None:
    """Guards several routers on one database: each attempt claims its event first."""
    async def test() -> None:
        store = MemoryStore()
        backlog = [event(receiver.url) for _ in range(20)]
        async with Rig(store=store) as one, Rig(store=store) as two:
            await one.add(*backlog)
            two.worker.wake()
            for d in backlog:
                assert (await one.settled(d.id)).status is DeliveryStatus.DELIVERED
        assert sorted(r.delivery_id for r in receiver.events()) == sorted(
            str(d.id) for d in backlog)
    run(test)
