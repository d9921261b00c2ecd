"""Fixtures shared by unit and integration tests: a throw-away PostgreSQL
(``tests.support.postgres``), one cluster for the whole session."""

from tests.support.postgres import postgres_cluster, postgres_url

__all__ = ["postgres_cluster", "postgres_url"]
