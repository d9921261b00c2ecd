"""MeteredStore times every store coroutine under a bounded operation label."""

from __future__ import annotations

import asyncio
import uuid

from callrouter.metered import metered
from callrouter.metrics import Metrics
from callrouter.store.memory import MemoryStore


def _count(metrics: Metrics, operation: str) -> float:
    body = metrics.render()[0].decode()
    prefix = f'callrouter_store_query_seconds_count{{operation="{operation}"}} '
    return next(float(line.split()[-1]) for line in body.splitlines() if line.startswith(prefix))


def test_queries_are_timed_by_kind() -> None:
    metrics = Metrics()
    store = metered(MemoryStore(), metrics)

    async def use() -> None:
        await store.open()
        await store.list_numbers()
        await store.get_call(uuid.uuid4())
        await store.upsert_calls([])
        await store.ping()

    asyncio.run(use())
    assert _count(metrics, "read") == 2
    assert _count(metrics, "batch_write") == 1
    assert _count(metrics, "ping") == 1
    assert _count(metrics, "write") == 1  # open()
