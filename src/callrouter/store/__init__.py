"""Stores: the SQLite one the router runs on and the in-memory one tests use.

Both implement ``callrouter.ports.Store`` and pass the same contract tests
(``tests/unit/test_store_contract.py``); the integrity rules they share are in
``store.rules``.
"""

from callrouter.store.memory import MemoryStore
from callrouter.store.sqlite import SqliteStore

__all__ = ["MemoryStore", "SqliteStore"]
