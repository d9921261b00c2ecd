"""Stores: SQLite (the default), PostgreSQL (shared by several routers) and the in-memory
one tests use.

All implement ``callrouter.ports.Store`` and pass the same contract tests
(``tests/unit/test_store_contract.py``); the integrity rules they share are in
``store.rules``, the row mapping of both SQL stores in ``store.rows``.
"""

from pathlib import Path

from callrouter.store.memory import MemoryStore
from callrouter.store.postgres import PostgresStore
from callrouter.store.sqlite import SqliteStore

__all__ = ["MemoryStore", "PostgresStore", "SqliteStore", "make_store"]


def make_store(database_url: str, sqlite_path: Path, *, timeout: float = 5.0,
               pool_size: int = 10) -> PostgresStore | SqliteStore:
    """PostgreSQL when ``database_url`` is set (config ``store.database_url``), else the
    SQLite file ``sqlite_path``: one choice for the router and the ``keys create`` CLI."""
    if database_url:
        return PostgresStore(database_url, timeout=timeout, pool_size=pool_size)
    return SqliteStore(sqlite_path)
