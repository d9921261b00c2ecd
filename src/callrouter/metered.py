"""``MeteredStore``: the store, with every query's latency in the metrics.

The store adapter knows nothing of metrics (adapters import only ports, domain and
errors); the composition root wraps it in this proxy instead. Each coroutine method
of the store is timed under a bounded ``StoreOperation`` label chosen by its name.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from callrouter.metrics import Metrics, StoreOperation
from callrouter.ports import Store

_READS = ("get_", "list_", "find_", "count_", "page_", "route_")


def _operation(name: str) -> StoreOperation:
    if name == "ping":
        return StoreOperation.PING
    if name == "upsert_calls":
        return StoreOperation.BATCH_WRITE
    return StoreOperation.READ if name.startswith(_READS) else StoreOperation.WRITE


class _MeteredStore:
    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return self._timed(attr, _operation(name))

    def _timed(self, method: Callable[..., Awaitable[Any]],
               operation: StoreOperation) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                self._metrics.store_query(operation, time.perf_counter() - started)

        return timed


def metered(store: Store, metrics: Metrics) -> Store:
    return cast(Store, _MeteredStore(store, metrics))
