"""Stores: SQLite (the default), PostgreSQL (shared by several routers) and the in-memory
one tests use.

All implement ``callrouter.ports.Store`` and pass the same contract tests
(``tests/unit/test_store_contract.py``); the integrity rules they share are in
``store.rules``, the row mapping of both SQL stores in ``store.rows``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from callrouter.store.memory import MemoryStore
from callrouter.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from callrouter.store.postgres import PostgresStore

__all__ = ["MemoryStore", "PostgresStore", "SqliteStore", "make_store"]


def __getattr__(name: str) -> Any:
    # asyncpg is imported only by routers (and tests) that use PostgreSQL: an import
    # costs a SQLite router's start time for nothing.
    if name == "PostgresStore":
        from callrouter.store.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_store(database_url: str, sqlite_path: Path, *, timeout: float = 5.0,
               pool_size: int = 10) -> PostgresStore | SqliteStore:
    """PostgreSQL when ``database_url`` is set (config ``store.database_url``), else the
    SQLite file ``sqlite_path``: one choice for the router and the ``keys create`` CLI."""
    if database_url:
        from callrouter.store.postgres import PostgresStore

        return PostgresStore(database_url, timeout=timeout, pool_size=pool_size)
    return SqliteStore(sqlite_path)
