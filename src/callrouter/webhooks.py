"""Webhook delivery, on the asyncio loop: the signed POST, ``assistant-request`` for held
INVITEs, and the worker that empties the ``status-update`` outbox.

How it works:

- ``WebhookSender.post`` sends one signed request (``domain.webhooks.request_headers``).
  The host is resolved first and every address is checked (link-local never, private only
  with ``webhooks.allow_private``); a plain-HTTP request then goes to the checked address
  itself (the Host header keeps the name), so a DNS answer cannot change between the
  check and the connection (HTTPS connects by name: its certificate check is the guard).
  Redirects are never followed, and the reply is read up to 64 KiB. Every failure is a
  ``SendFailed``, never an exception that escapes.
- ``AssistantRequester.ask`` is called on the SIP thread for a held INVITE; it only
  schedules the request on the loop. The reply (or the timeout, after
  ``webhooks.assistant_request_timeout_seconds``) goes back to the SIP thread through
  ``resume`` (``CallControl.resume``): the SIP thread never waits on HTTP.
- ``DeliveryWorker`` takes due events from the outbox (the store gives at most the first
  pending event of each call, so events of a call arrive in order), at most
  ``max_concurrency_per_destination`` at once per scheme/host/port, so a slow receiver
  holds up only its own events. A 2xx delivers; a connection error, a timeout, 429 or
  5xx is retried with exponential back-off and jitter (``Retry-After`` honoured) until
  ``webhooks.retry_hours`` after the event; any other status gives up. Each outcome is
  stored before the next event of the call is taken, so a restart resumes where it
  stopped, and an event is re-sent with the same ``X-Webhook-Id`` if the router stopped
  between sending it and storing that it was delivered. Each attempt first claims its
  event (``Store.claim_delivery``: its next attempt moves past the attempt's timeout), so
  routers sharing one outbox never send an event at the same time; after a crash the
  claim runs out and the event is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import random
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import httpx
import structlog

from callrouter.domain.models import DeliveryStatus, WebhookDelivery
from callrouter.domain.webhooks import (
    ASSISTANT_REQUEST,
    MAX_RESPONSE_BYTES,
    AssistantAsk,
    AssistantReply,
    Backoff,
    ReplyKind,
    WebhookDirectory,
    address_problem,
    assistant_request_body,
    destination_key,
    expires,
    parse_reply,
    request_headers,
    retry_after_seconds,
)
from callrouter.errors import Conflict, NotFound, StoreError
from callrouter.metrics import Metrics
from callrouter.ports import Store

log = structlog.get_logger("callrouter.webhooks")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SendFailed(Exception):
    """The request got no HTTP answer (``permanent``: it never will, as configured)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes  # at most MAX_RESPONSE_BYTES
    retry_after: str | None


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class WebhookSender:
    """One signed POST; see the module docstring."""

    def __init__(self, client: httpx.AsyncClient, *, allow_private: bool,
                 resolve: Resolver | None = None) -> None:
        self._client = client
        self._allow_private = allow_private
        self._resolve = resolve or _resolve

    async def post(self, url: str, event: str, delivery_id: uuid.UUID, body: bytes,
                   secret: str | None) -> Answer:
        target = await self._checked(url)
        headers = request_headers(event, delivery_id, int(time.time()), body, secret)
        headers["Host"] = urlsplit(url).netloc.rpartition("@")[2]
        try:
            async with self._client.stream("POST", target, content=body, headers=headers,
                                           follow_redirects=False) as response:
                return Answer(response.status_code, await _capped(response),
                              response.headers.get("Retry-After"))
        except httpx.HTTPError as exc:
            raise SendFailed(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc

    async def _checked(self, url: str) -> str:
        """Every address of the URL's host checked. A plain-HTTP URL is returned with the
        host replaced by the checked address (the ``Host`` header keeps the name), so the
        connection goes where the check looked; HTTPS keeps the name: TLS verifies that
        host's certificate, which an address the name was re-pointed to cannot present."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            resolved = await self._resolve(host, port)
        except OSError as exc:
            raise SendFailed(f"cannot resolve {host}: {exc}") from exc
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolved]
        if not addresses:
            raise SendFailed(f"{host} has no address")
        for address in addresses:
            problem = address_problem(address, self._allow_private)
            if problem is not None:
                raise SendFailed(f"refused destination {host}: {problem}", permanent=True)
        if parts.scheme == "https":
            return url
        first = addresses[0]
        literal = f"[{first}]" if first.version == 6 else str(first)
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


async def _capped(response: httpx.Response) -> bytes:
    """The reply body up to ``MAX_RESPONSE_BYTES``; the rest is never read."""
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk[:MAX_RESPONSE_BYTES - size])
        size += len(chunks[-1])
        if size >= MAX_RESPONSE_BYTES:
            break
    return b"".join(chunks)


def new_client(timeout: float) -> httpx.AsyncClient:
    """The one client for every webhook: no redirects, no environment proxies."""
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False,
                             limits=httpx.Limits(max_connections=256,
                                                 max_keepalive_connections=64))


class AssistantRequester:
    """Sends ``assistant-request`` for held INVITEs; see the module docstring."""

    def __init__(self, sender: WebhookSender, store: Store, metrics: Metrics,
                 loop: asyncio.AbstractEventLoop,
                 resume: Callable[[uuid.UUID, AssistantReply], None], timeout: float) -> None:
        self._sender = sender
        self._store = store
        self._metrics = metrics
        self._loop = loop
        self._resume = resume
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()

    def ask(self, ask: AssistantAsk) -> None:
        """Any thread (the SIP thread): schedule the request, never wait for it."""
        self._loop.call_soon_threadsafe(self._start, ask)

    def _start(self, ask: AssistantAsk) -> None:
        task = self._loop.create_task(self._run(ask), name="assistant-request")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, ask: AssistantAsk) -> None:
        reply = AssistantReply(ReplyKind.HTTP_ERROR, detail="the request failed")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._request(ask)
        except TimeoutError:
            reply = AssistantReply(ReplyKind.TIMEOUT,
                                   detail=f"no reply within {self._timeout:g} s")
        except SendFailed as exc:
            reply = AssistantReply(ReplyKind.HTTP_ERROR, detail=exc.message)
        except StoreError as exc:
            reply = AssistantReply(ReplyKind.HTTP_ERROR, detail=exc.message)
        except asyncio.CancelledError:
            reply = AssistantReply(ReplyKind.TIMEOUT, detail="the router is stopping")
            raise
        finally:
            ok = reply.kind not in (ReplyKind.TIMEOUT, ReplyKind.HTTP_ERROR)
            self._metrics.webhook_attempt(ASSISTANT_REQUEST, ok, time.perf_counter() - started)
            self._resume(ask.call_id, reply)

    async def _request(self, ask: AssistantAsk) -> AssistantReply:
        facts = ask.facts
        if facts.number_id is not None:
            number = await self._store.get_number(facts.number_id)
            facts = dataclasses.replace(facts, number_name=number.name if number else "")
        body = assistant_request_body(facts, ask.at)
        answer = await self._sender.post(ask.target.url, ASSISTANT_REQUEST, uuid.uuid4(), body,
                                         ask.target.secret)
        return parse_reply(answer.status, answer.body)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


DEFAULT_BACKOFF = Backoff()


class DeliveryWorker:
    """Empties the status-update outbox; see the module docstring."""

    BATCH = 256  # due events read per round
    IDLE = 30.0  # seconds between rounds with nothing due (a wake-up comes sooner)
    LEASE_MARGIN = 5.0  # an attempt's claim lasts its timeout and this (a crash: retried)

    def __init__(self, store: Store, sender: WebhookSender, metrics: Metrics,
                 directory: Callable[[], WebhookDirectory], *, per_destination: int,
                 retry_hours: float, attempt_timeout: float = 10.0,
                 backoff: Backoff = DEFAULT_BACKOFF,
                 wall: Callable[[], datetime] = _utcnow,
                 jitter: Callable[[], float] = random.random) -> None:
        self._store = store
        self._sender = sender
        self._metrics = metrics
        self._directory = directory
        self._per_destination = per_destination
        self._retry_hours = retry_hours
        self._attempt_timeout = attempt_timeout
        self._backoff = backoff
        self._wall = wall
        self._jitter = jitter
        self._wakeup = asyncio.Event()
        self._inflight: dict[uuid.UUID, WebhookDelivery] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy: Counter[str] = Counter()

    def wake(self) -> None:
        """New events, or a finished attempt: look again now (on the loop)."""
        self._wakeup.set()

    async def run(self) -> None:
        try:
            while True:
                self._wakeup.clear()
                wait = self.IDLE
                try:
                    wait = await self.round()
                except StoreError as exc:
                    log.error("webhook.outbox_failed", error=exc.message)
                    wait = 1.0
                if not self._wakeup.is_set():
                    # asyncio.timeout, not wait_for: a stop (cancel) is never swallowed.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wakeup.wait()
        finally:
            await self.close()

    async def round(self) -> float:
        """Start what is due and may start; seconds until the next event is due."""
        now = self._wall()
        calls = {d.call_id for d in self._inflight.values()}
        due = await self._store.due_deliveries(now, self.BATCH)
        for delivery in due:
            key = destination_key(delivery.url)
            if delivery.id in self._inflight or (delivery.call_id in calls and
                                                 delivery.call_id is not None):
                continue
            if self._busy[key] >= self._per_destination:
                continue  # that receiver is slow: its events wait, the others go on
            self._busy[key] += 1
            calls.add(delivery.call_id)
            self._inflight[delivery.id] = delivery
            task = asyncio.create_task(self._deliver(delivery, key), name="webhook-delivery")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._metrics.webhook_backlog(
            "status-update", await self._store.count_deliveries(DeliveryStatus.PENDING))
        if due:
            return self.IDLE  # attempts are under way: each one's end wakes the worker
        upcoming = await self._store.next_delivery_at()
        if upcoming is None:
            return self.IDLE
        return min(self.IDLE, max(0.05, (upcoming - self._wall()).total_seconds()))

    async def _deliver(self, delivery: WebhookDelivery, key: str) -> None:
        try:
            # Taken for this attempt (routers sharing the outbox never both send it); the
            # outcome replaces the lease, a crash leaves it to run out and be retried.
            lease = self._wall() + timedelta(seconds=self._attempt_timeout + self.LEASE_MARGIN)
            if not await self._store.claim_delivery(delivery, lease):
                return
            await self._attempt(dataclasses.replace(delivery, next_attempt_at=lease))
        except StoreError as exc:
            log.error("webhook.outcome_not_stored", delivery_id=str(delivery.id),
                      error=exc.message)  # still pending: tried again
        finally:
            self._busy[key] -= 1
            self._inflight.pop(delivery.id, None)
            self.wake()

    async def _attempt(self, delivery: WebhookDelivery) -> None:
        now = self._wall()
        if now >= delivery.expires_at:
            await self._give_up(delivery, now, delivery.last_error or "retry_hours passed")
            return
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._attempt_timeout):  # a dripping reply included
                answer = await self._sender.post(delivery.url, delivery.event, delivery.id,
                                                 delivery.body.encode(), self._secret(delivery))
        except TimeoutError:
            self._metrics.webhook_attempt(delivery.event, False, time.perf_counter() - started)
            await self._retry(delivery, f"no reply within {self._attempt_timeout:g} s", None)
            return
        except SendFailed as exc:
            self._metrics.webhook_attempt(delivery.event, False, time.perf_counter() - started)
            if exc.permanent:
                await self._give_up(delivery, self._wall(), exc.message)
            else:
                await self._retry(delivery, exc.message, None)
            return
        ok = 200 <= answer.status < 300
        self._metrics.webhook_attempt(delivery.event, ok, time.perf_counter() - started)
        now = self._wall()
        if ok:
            await self._store.update_delivery(dataclasses.replace(
                delivery, status=DeliveryStatus.DELIVERED, attempts=delivery.attempts + 1,
                last_error=None, updated_at=now))
        elif answer.status == 429 or answer.status >= 500:
            await self._retry(delivery, f"HTTP {answer.status}",
                              retry_after_seconds(answer.retry_after, now))
        else:
            await self._give_up(dataclasses.replace(delivery, attempts=delivery.attempts + 1),
                                now, f"HTTP {answer.status}")

    def _secret(self, delivery: WebhookDelivery) -> str | None:
        """Signed with the current secret of whoever the event was meant for."""
        directory = self._directory()
        if delivery.assistant_id is None:
            return directory.account.secret if directory.account else None
        hooks = directory.assistants.get(delivery.assistant_id)
        return hooks.target.secret if hooks is not None and hooks.target is not None else None

    async def _retry(self, delivery: WebhookDelivery, error: str,
                     retry_after: float | None) -> None:
        attempts = delivery.attempts + 1
        now = self._wall()
        delay = self._backoff.delay(attempts, self._jitter(), retry_after)
        due = now + timedelta(seconds=delay)
        failed = dataclasses.replace(delivery, attempts=attempts, last_error=error)
        if due >= delivery.expires_at:
            await self._give_up(failed, now, error)
            return
        await self._store.update_delivery(dataclasses.replace(
            failed, next_attempt_at=due, updated_at=now))
        log.info("webhook.retry", delivery_id=str(delivery.id), webhook_event=delivery.event,
                 attempts=attempts, error=error, in_seconds=round(delay, 1))

    async def _give_up(self, delivery: WebhookDelivery, now: datetime, error: str) -> None:
        await self._store.update_delivery(dataclasses.replace(
            delivery, status=DeliveryStatus.FAILED, last_error=error, updated_at=now))
        self._metrics.webhook_given_up(delivery.event)
        log.warning("webhook.given_up", delivery_id=str(delivery.id), webhook_event=delivery.event,
                    call_id=str(delivery.call_id), url=delivery.url,
                    attempts=delivery.attempts, error=error)

    async def retry(self, delivery_id: uuid.UUID) -> WebhookDelivery:
        """The API's retry: due now, with a fresh ``retry_hours``."""
        delivery = await self._store.get_delivery(delivery_id)
        if delivery is None:
            raise NotFound(f"webhook delivery {delivery_id} not found")
        if delivery.status is DeliveryStatus.DELIVERED:
            raise Conflict("the event was delivered already")
        now = self._wall()
        again = dataclasses.replace(delivery, status=DeliveryStatus.PENDING, next_attempt_at=now,
                                    expires_at=expires(now, self._retry_hours), updated_at=now)
        await self._store.update_delivery(again)
        self.wake()
        return again

    async def close(self) -> None:
        """Stop the attempts under way; they stay pending and are sent again next time."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
