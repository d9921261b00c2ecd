"""The API while the database is unreachable (issue 10 item 4): what needs the database
answers 503 ``database_unavailable`` with a clear message, never a bare 500; health is
200 ``degraded`` while the SIP side is up (liveness), 503 only when SIP is down."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from callrouter.crypto import SecretBox
from callrouter.domain.models import ApiKey, PhoneNumber
from callrouter.domain.routing import RouteChange
from callrouter.errors import StoreUnavailable
from callrouter.http import ApiDeps, create_app
from callrouter.management import Management, issue_api_key
from callrouter.ports import ControlCommand, NumberQuery
from callrouter.store import MemoryStore

pytestmark = pytest.mark.anyio
T0 = datetime(2025, 12, 13, 10, 0, tzinfo=UTC)
AWAY = "the database is unreachable (connection refused); calls are still routed"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class AwayStore(MemoryStore):
    """The methods named in ``away`` raise ``StoreUnavailable``."""

    away: frozenset[str] = frozenset()

    async def find_api_key(self, key_hash: bytes) -> ApiKey | None:
        self._check("find_api_key")
        return await super().find_api_key(key_hash)

    async def page_numbers(self, query: NumberQuery) -> Sequence[PhoneNumber]:
        self._check("page_numbers")
        return await super().page_numbers(query)

    async def create_number(self, number: PhoneNumber) -> PhoneNumber:
        self._check("create_number")
        return await super().create_number(number)

    def _check(self, method: str) -> None:
        if method in self.away:
            raise StoreUnavailable(AWAY)


class Checks:
    def __init__(self) -> None:
        self.database: dict[str, Any] = {"status": "ok", "latency_ms": 0.4}
        self.sip: dict[str, Any] = {"status": "ok"}

    async def __call__(self) -> dict[str, dict[str, Any]]:
        return {"database": self.database, "sip": self.sip}


async def _no_changes(changes: Sequence[RouteChange]) -> None:
    return None


async def _no_control(call_id: uuid.UUID, command: ControlCommand) -> str:
    return ""


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, AwayStore, Checks]]:
    store = AwayStore()
    checks = Checks()
    management = Management(store, SecretBox.load(tmp_path / "secret.key", {}), "NL",
                            _no_changes, now=lambda: T0)
    token, _ = await issue_api_key(store, name="rw", read_only=False, now=T0)
    app = create_app(ApiDeps(management=management, store=store, version="1", health=checks,
                             ready=lambda: (True, "ready"), control=_no_control))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        yield client, store, checks


async def test_requests_needing_the_database_get_503_naming_the_cause(
        api: tuple[httpx.AsyncClient, AwayStore, Checks]) -> None:
    client, store, _ = api
    assert (await client.get("/api/v1/numbers")).status_code == 200
    for away in ({"page_numbers", "create_number"},  # the key checks out, the work fails
                 {"find_api_key"}):  # the key itself cannot be checked
        store.away = frozenset(away)
        for response in (
                await client.get("/api/v1/numbers"),
                await client.post("/api/v1/numbers", json={"phone_number": "+31850835037"})):
            assert response.status_code == 503, response.text
            assert response.json()["error"] == "database_unavailable"
            assert response.json()["message"] == AWAY


async def test_health_is_degraded_not_down_while_sip_serves(
        api: tuple[httpx.AsyncClient, AwayStore, Checks]) -> None:
    client, _, checks = api
    checks.database = {"status": "down", "error": AWAY, "spooled_call_records": 3}
    health = await client.get("/api/v1/health")
    assert (health.status_code, health.json()["status"]) == (200, "degraded")
    assert health.json()["checks"]["database"]["spooled_call_records"] == 3
    assert (await client.get("/api/v1/ready")).status_code == 200
    checks.sip = {"status": "down"}
    assert (await client.get("/api/v1/health")).status_code == 503
