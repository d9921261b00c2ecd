"""Changes reach routing as deltas: Management -> RouteChange -> CallService.routes.

The service tier with the in-memory store: every write through ``Management`` is seen by
the very next ``on_invite``, without a rebuild, and a full rebuild never loses a change
made while it runs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from callrouter.crypto import SecretBox
from callrouter.domain import session as s
from callrouter.domain.models import PhoneNumber
from callrouter.domain.routing import NumberUpserted, Policy, RouteChange, RuntimePool
from callrouter.management import (
    AssistantChanges,
    AssistantInput,
    Management,
    NumberChanges,
    NumberInput,
)
from callrouter.metrics import Metrics
from callrouter.ports import Accepted, InboundInvite, NumberQuery, Rejected, RouteRow
from callrouter.service import CallService
from callrouter.store.memory import MemoryStore

pytestmark = pytest.mark.anyio
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _service() -> CallService:
    return CallService(
        policy=Policy(max_calls=10), timing=s.Timing(ring_timeout=5, max_duration=60),
        pool=RuntimePool(()), default_region="NL", metrics=Metrics(),
        record=lambda _: None, wall=lambda: T0, clock=lambda: 100.0)


def _management(store: MemoryStore, service: CallService, tmp_path: Path) -> Management:
    async def changed(changes: Sequence[RouteChange]) -> None:
        await service.apply_route_changes(changes, store)

    return Management(store, SecretBox.load(tmp_path / "secret.key", {}), "NL", changed, lambda: T0)


def _invite(e164: str) -> InboundInvite:
    return InboundInvite("c@p", f"sip:{e164}@r", f"<sip:{e164}@r>", "<sip:0201234567@p>;tag=1",
                         "127.0.0.1:5062", 100.0)


def _code(service: CallService, e164: str) -> int:
    answer = service.on_invite(_invite(e164))
    return 100 if isinstance(answer, Accepted) else answer.code


async def test_every_write_is_seen_by_the_next_invite(tmp_path: Path) -> None:
    store, service = MemoryStore(), _service()
    await service.reload_routes(store)
    mgmt = _management(store, service, tmp_path)
    number = await mgmt.create_number(NumberInput("085 083 5037"))
    assert _code(service, "+31850835037") == 480  # registered, no assistant
    assistant = await mgmt.create_assistant(AssistantInput("A", None))
    await mgmt.update_number(number.id, NumberChanges(assistant_id=assistant.id))
    assert _code(service, "+31850835037") == 503  # no runtime anywhere yet
    await mgmt.update_assistant(assistant.id, AssistantChanges(runtime_uri="sip:rt@10.0.0.1"))
    answer = service.on_invite(_invite("+31850835037"))
    assert isinstance(answer, Accepted)
    assert answer.reaction.commands == (s.DialRuntime(0, f"sip:{assistant.id}@10.0.0.1"),)
    await mgmt.update_number(number.id, NumberChanges(is_active=False))
    assert _code(service, "+31850835037") == 480
    await mgmt.delete_number(number.id)
    assert _code(service, "+31850835037") == 404
    await mgmt.delete_assistant(assistant.id)
    assert len(service.routes) == 0


class _SlowStore(MemoryStore):
    """Lets a change happen between the batches of a full rebuild."""

    def __init__(self) -> None:
        super().__init__()
        self.between_batches: asyncio.Event = asyncio.Event()
        self.go_on: asyncio.Event = asyncio.Event()

    async def route_rows(self, after: str, limit: int) -> Sequence[RouteRow]:
        rows = await super().route_rows(after, limit)
        if after:
            self.between_batches.set()
            await self.go_on.wait()
        return rows


async def test_a_change_during_a_rebuild_is_not_lost(tmp_path: Path) -> None:
    store, service = _SlowStore(), _service()
    mgmt = _management(store, service, tmp_path)
    for i in range(3):
        await mgmt.create_number(NumberInput(f"+3185083503{i}"))
    rebuild = asyncio.create_task(service.reload_routes(store, batch=1))
    await store.between_batches.wait()
    added = await mgmt.create_number(NumberInput("+31850835039"))
    await mgmt.delete_number((await store.page_numbers(NumberQuery()))[0].id)
    store.go_on.set()
    await rebuild
    assert _code(service, "+31850835039") == 480
    assert _code(service, "+31850835030") == 404
    assert len(service.routes) == 3 and added.phone_number == "+31850835039"


async def test_a_growing_overlay_is_compacted_off_the_request() -> None:
    service = _service()
    service.compact_routes_at = 4  # config numbers.route_compaction_at
    for i in range(6):
        service.apply_route_change(NumberUpserted(uuid.UUID(int=i), f"+3185083503{i}", None,
                                                  True))
    assert service._compacting is not None
    await service._compacting
    assert service.routes.pending < 4 and len(service.routes) == 6
    assert isinstance(service.on_invite(_invite("+31850835035")), Rejected)


async def test_a_bulk_batch_is_a_rebuild_from_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    from callrouter import service as service_module

    monkeypatch.setattr(service_module, "BULK_REBUILD_AT", 2)
    store, service = MemoryStore(), _service()
    numbers = [PhoneNumber(uuid.UUID(int=i), f"+3185083503{i}", "", None, None, True, T0, T0)
               for i in range(3)]
    for n in numbers:
        await store.create_number(n)
    await service.apply_route_changes([_upserted(n) for n in numbers[:2]], store)
    assert len(service.routes) == 2  # a small batch: the deltas given, nothing else
    await service.apply_route_changes([_upserted(n) for n in numbers], store)
    assert len(service.routes) == 3 and _code(service, "+31850835032") == 480


def _upserted(n: PhoneNumber) -> RouteChange:
    return NumberUpserted(n.id, n.phone_number, n.assistant_id, n.is_active)
