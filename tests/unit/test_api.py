"""The management API (``http.create_app``) against a real SQLite store on tmp_path.

Every endpoint of ../shared/api.md and every error code the issue lists: 201/200/404/409/
422/400/401/403/429, plus the promises that are easy to break silently — exactly one 201
for concurrent duplicate registrations, data surviving a restart, a trunk password never
in a response, ``agent_id`` accepted and echoed, ``null`` detaching, and the routing
snapshot being refreshed after every change.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from callrouter.crypto import SecretBox
from callrouter.domain.models import CallRecord, CallStatus, EndReason
from callrouter.domain.routing import NumberRemoved, NumberUpserted, RouteChange
from callrouter.errors import CommandRefused, EngineTimeout, NotFound, ValidationError
from callrouter.http import ApiDeps, create_app, routes
from callrouter.management import Management, issue_api_key
from callrouter.ports import ControlCommand, EndCall, TransferCall
from callrouter.store import SqliteStore

pytestmark = pytest.mark.anyio
T0 = datetime(2025, 12, 13, 10, 0, 0, tzinfo=UTC)
NUMBER = "+31850835037"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Clock:
    seconds: float = 1000.0

    def __call__(self) -> float:
        return self.seconds


@dataclass
class Env:
    client: httpx.AsyncClient
    store: SqliteStore
    read_only: dict[str, str]
    clock: Clock
    routing_changes: list[RouteChange] = field(default_factory=list)
    controls: list[tuple[uuid.UUID, ControlCommand]] = field(default_factory=list)
    verdict: Exception | None = None  # what the call's session answers, when not "accepted"
    requests: list[tuple[str, str, int]] = field(default_factory=list)

    async def post(self, path: str, body: Any) -> httpx.Response:
        return await self.client.post(path, json=body)


async def build(tmp_path: Path, rate_limit: int = 1000,
                import_max_bytes: int = 256 * 1024 * 1024) -> tuple[Env, Management]:
    store = SqliteStore(tmp_path / "callrouter.db")
    await store.open()
    clock = Clock()
    env = Env(client=httpx.AsyncClient(), store=store, read_only={}, clock=clock)

    async def on_change(changes: Sequence[RouteChange]) -> None:
        env.routing_changes.extend(changes)

    management = Management(store, SecretBox.load(tmp_path / "secret.key", {}), "NL", on_change,
                            now=lambda: T0)
    rw, _ = await issue_api_key(store, name="rw", read_only=False, now=T0)
    ro, _ = await issue_api_key(store, name="ro", read_only=True, now=T0)
    env.read_only = {"Authorization": f"Bearer {ro}"}
    app = create_app(ApiDeps(
        management=management, store=store, version="9.9.9", health=_health,
        ready=lambda: (False, "sip engine starting"), control=_control(env),
        on_request=lambda route, method, status, _: env.requests.append((route, method, status)),
        rate_limit_per_minute=rate_limit, clock=clock, metrics_app=_metrics,
        import_max_bytes=import_max_bytes))
    env.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                   headers={"Authorization": f"Bearer {rw}"})
    return env, management


async def _health() -> dict[str, dict[str, Any]]:
    return {"database": {"status": "ok", "latency_ms": 0.5}, "sip": {"status": "starting"}}


async def _metrics(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"callrouter_up 1\n"})


def _control(env: Env) -> Any:
    async def control(call_id: uuid.UUID, command: ControlCommand) -> str:
        call = await env.store.get_call(call_id)
        if call is None:
            raise NotFound("call not found")
        if call.status != CallStatus.IN_PROGRESS:
            raise ValidationError("call is not in progress")
        env.controls.append((call_id, command))
        if env.verdict is not None:
            raise env.verdict
        return "transfer requested" if isinstance(command, TransferCall) else "end requested"
    return control


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    made, _ = await build(tmp_path)
    yield made
    await made.client.aclose()
    await made.store.close()


async def make_assistant(env: Env, name: str = "Sales") -> str:
    r = await env.post("/api/v1/assistants", {"name": name, "runtime_uri": "sip:rt@10.0.0.5"})
    assert r.status_code == 201, r.text
    return str(r.json()["assistant"]["id"])


async def make_trunk(env: Env) -> str:
    r = await env.post("/api/v1/sip-trunks", {"name": "carrier", "host": "sip.example.com",
                                              "username": "u", "password": "s3cr3t-pw"})
    assert r.status_code == 201, r.text
    return str(r.json()["trunk"]["id"])


def assert_error(r: httpx.Response, status: int, field: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "message", "details"} and body["message"]
    if field is not None:
        assert field in [d["field"] for d in body["details"]], body


# -- numbers -----------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["+31 85 083 5037", "+31-85-083-5037", "0031850835037",
                                      "085 083 5037"])
async def test_every_spelling_registers_e164_and_a_second_is_409(env: Env, spelling: str) -> None:
    r = await env.post("/api/v1/numbers", {"phone_number": spelling})
    assert r.status_code == 201
    number = r.json()["number"]
    assert number["phone_number"] == NUMBER
    assert number["is_active"] is True and number["assistant_id"] is None
    assert number["created_at"] == "2025-12-13T10:00:00.000Z"
    assert_error(await env.post("/api/v1/numbers", {"phone_number": "+31850835037"}), 409,
                 "phone_number")


async def test_concurrent_duplicate_registration_gives_exactly_one_201(env: Env) -> None:
    spellings = ["+31 85 083 5037", "0031850835037", "085 083 5037", "+31-85-083-5037"] * 3
    results = await asyncio.gather(
        *(env.post("/api/v1/numbers", {"phone_number": s}) for s in spellings))
    assert sorted(r.status_code for r in results) == [201] + [409] * 11
    assert len((await env.client.get("/api/v1/numbers")).json()["numbers"]) == 1


async def test_invalid_number_is_rejected_naming_the_field(env: Env) -> None:
    assert_error(await env.post("/api/v1/numbers", {"phone_number": "12"}), 400, "phone_number")
    assert_error(await env.post("/api/v1/numbers", {"name": "x"}), 422, "phone_number")


async def test_agent_id_is_accepted_and_echoed(env: Env) -> None:
    assistant = await make_assistant(env)
    r = await env.post("/api/v1/numbers", {"phone_number": NUMBER, "agent_id": assistant})
    assert r.status_code == 201
    assert r.json()["number"]["assistant_id"] == assistant == r.json()["number"]["agent_id"]


async def test_conflicting_assistant_id_and_agent_id_is_422(env: Env) -> None:
    a, b = await make_assistant(env, "A"), await make_assistant(env, "B")
    r = await env.post("/api/v1/numbers", {"phone_number": NUMBER, "assistant_id": a,
                                           "agent_id": b})
    assert_error(r, 422, "agent_id")


async def test_unknown_assistant_or_trunk_is_422(env: Env) -> None:
    r = await env.post("/api/v1/numbers", {"phone_number": NUMBER,
                                           "assistant_id": str(uuid.uuid4()),
                                           "transfer_trunk_id": str(uuid.uuid4())})
    assert_error(r, 422, "assistant_id")
    assert "transfer_trunk_id" in [d["field"] for d in r.json()["details"]]
    assert_error(await env.post("/api/v1/numbers", {"phone_number": NUMBER,
                                                    "assistant_id": "not-a-uuid"}),
                 422, "assistant_id")


async def test_get_patch_delete_number_and_null_detaches(env: Env) -> None:
    assistant, trunk = await make_assistant(env), await make_trunk(env)
    created = (await env.post("/api/v1/numbers", {
        "phone_number": NUMBER, "name": "Sales line", "assistant_id": assistant,
        "transfer_trunk_id": trunk})).json()["number"]
    url = f"/api/v1/numbers/{created['id']}"
    assert (await env.client.get(url)).json() == {"number": created}
    r = await env.client.patch(url, json={"assistant_id": None, "is_active": False})
    assert r.status_code == 200
    patched = r.json()["number"]
    assert patched["assistant_id"] is None and patched["agent_id"] is None
    assert patched["transfer_trunk_id"] == trunk and patched["name"] == "Sales line"
    assert patched["is_active"] is False
    r = await env.client.patch(url, json={"agent_id": assistant, "transfer_trunk_id": None})
    assert r.json()["number"]["assistant_id"] == assistant
    assert r.json()["number"]["transfer_trunk_id"] is None
    assert_error(await env.client.patch(url, json={"is_active": None}), 422, "is_active")
    assert (await env.client.delete(url)).json() == {"success": True}
    assert_error(await env.client.get(url), 404)
    assert_error(await env.client.delete(url), 404)
    assert_error(await env.client.patch(url, json={"name": "x"}), 404)


async def test_listing_streams_every_number_and_pages_by_prefix(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the streamed list: the whole table in store batches (here 2) keeps the
    SDK's shape; limit/offset and a phone_number prefix page through it."""
    monkeypatch.setattr(routes, "NUMBER_BATCH", 2)
    numbers = ["+31850835037", "+31850835038", "+31201234567", "+442071234567", "+31850835039"]
    for e164 in numbers:
        assert (await env.post("/api/v1/numbers", {"phone_number": e164})).status_code == 201
    listed = await env.client.get("/api/v1/numbers")
    assert listed.headers["content-type"] == "application/json"
    body = listed.json()
    assert list(body) == ["numbers"]
    assert [n["phone_number"] for n in body["numbers"]] == sorted(numbers)
    assert set(body["numbers"][0]) >= {"id", "assistant_id", "agent_id", "created_at"}
    page = (await env.client.get("/api/v1/numbers", params={
        "phone_number": "3185", "limit": 2, "offset": 1})).json()["numbers"]
    assert [n["phone_number"] for n in page] == ["+31850835038", "+31850835039"]
    plus = await env.client.get("/api/v1/numbers?phone_number=%2B44")
    assert [n["phone_number"] for n in plus.json()["numbers"]] == ["+442071234567"]
    assert (await env.client.get("/api/v1/numbers?phone_number=+44")).json() == plus.json()
    rest = (await env.client.get("/api/v1/numbers", params={"offset": 3})).json()["numbers"]
    assert [n["phone_number"] for n in rest] == sorted(numbers)[3:]
    assert_error(await env.client.get("/api/v1/numbers?phone_number=31x"), 422, "phone_number")
    assert (await env.client.get("/api/v1/numbers?limit=0")).status_code in (400, 422)


async def test_import_is_all_or_nothing_and_names_every_bad_line(env: Env) -> None:
    assistant = await make_assistant(env)
    await env.post("/api/v1/numbers", {"phone_number": "+31850835039"})
    csv_text = (f"phone_number,name,assistant_id\n085 083 5037,a,{assistant}\n"
                f"+31850835038,b,{uuid.uuid4()}\n+31850835039,c,\n0850835037,d,\n12,e,\n")
    r = await env.client.post("/api/v1/numbers/import", content=csv_text.encode())
    assert_error(r, 422)
    assert [(d["field"], d["message"].split(" ")[0]) for d in r.json()["details"]] == [
        ("line 3", "no"), ("line 4", "phone_number"), ("line 5", "phone_number"),
        ("line 6", "phone_number")]
    assert "repeats line 2" in r.json()["details"][2]["message"]
    assert len((await env.client.get("/api/v1/numbers")).json()["numbers"]) == 1
    r = await env.client.post("/api/v1/numbers/import?skip_invalid=true",
                              content=csv_text.encode())
    assert r.status_code == 200, r.text
    assert r.json()["imported"] == 1
    assert [row["line"] for row in r.json()["skipped"]] == [3, 4, 5, 6]
    listed = (await env.client.get("/api/v1/numbers")).json()["numbers"]
    assert {(n["phone_number"], n["assistant_id"]) for n in listed} == {
        ("+31850835037", assistant), ("+31850835039", None)}
    assert env.routing_changes[-1] == NumberUpserted(
        uuid.UUID(listed[0]["id"]), "+31850835037", uuid.UUID(assistant), True)


async def test_import_has_its_own_body_limit(env: Env) -> None:
    """Guards the exemption from http.max_body_bytes (1 MB here): a larger CSV is read."""
    big = b"phone_number\n+31850835037\n" + b"\n" * (1024 * 1024 + 10)
    r = await env.client.post("/api/v1/numbers/import", content=big)
    assert r.status_code == 200, r.text
    assert r.json() == {"imported": 1, "skipped": []}
    assert_error(await env.client.post("/api/v1/numbers/import", content=b"name\nx\n"), 422,
                 "header")
    assert (await env.post("/api/v1/numbers", {"phone_number": "+31850835038",
                                                "name": "x" * (1024 * 1024)})).status_code == 413


async def test_an_import_over_its_limit_is_413(tmp_path: Path) -> None:
    env, _ = await build(tmp_path, import_max_bytes=64)
    try:
        body = b"phone_number\n" + b"+31850835037\n" * 10
        assert (await env.client.post("/api/v1/numbers/import", content=body)).status_code == 413
        assert (await env.client.get("/api/v1/numbers")).json() == {"numbers": []}
    finally:
        await env.client.aclose()
        await env.store.close()


async def test_malformed_id_and_json(env: Env) -> None:
    assert_error(await env.client.get("/api/v1/numbers/not-a-uuid"), 404)
    r = await env.client.post("/api/v1/numbers", content=b"{not json",
                              headers={"Content-Type": "application/json"})
    assert_error(r, 400, "body")


async def test_every_change_refreshes_routing(env: Env) -> None:
    """Guards 'changes apply to the very next INVITE': each change hands its delta on."""
    assistant = await make_assistant(env)
    number = (await env.post("/api/v1/numbers", {"phone_number": NUMBER})).json()["number"]
    await env.client.patch(f"/api/v1/numbers/{number['id']}", json={"assistant_id": assistant})
    await env.client.delete(f"/api/v1/numbers/{number['id']}")
    assert [type(c).__name__ for c in env.routing_changes] == [
        "AssistantUpserted", "NumberUpserted", "NumberUpserted", "NumberRemoved"]
    assert env.routing_changes[-1] == NumberRemoved(NUMBER)
    await env.post("/api/v1/numbers", {"phone_number": "12"})  # refused: no refresh
    assert len(env.routing_changes) == 4


# -- trunks ------------------------------------------------------------------------------

async def test_trunk_docs_spelling_both_envelopes_and_no_password(env: Env) -> None:
    r = await env.post("/api/v1/sip-trunks", {"name": "carrier", "host": "sip.example.com",
                                              "port": 5080, "username": "u",
                                              "password": "s3cr3t-pw"})
    assert r.status_code == 201
    body = r.json()
    assert body["sip_trunk"] == body["trunk"]
    trunk = body["trunk"]
    assert (trunk["host"], trunk["port"], trunk["address"]) == (
        "sip.example.com", 5080, "sip.example.com:5080")
    assert trunk["username"] == trunk["auth_username"] == "u"
    assert trunk["transport"] == "udp"
    assert "password" not in trunk and "auth_password" not in trunk
    get = await env.client.get(f"/api/v1/sip-trunks/{trunk['id']}")
    assert get.json() == body


async def test_trunk_older_address_spelling(env: Env) -> None:
    r = await env.post("/api/v1/sip-trunks", {
        "name": "sdk", "address": "[2001:db8::1]:5061", "transport": "TCP",
        "provider": "acme", "auth_username": "sdk-user", "auth_password": "pw"})
    assert r.status_code == 201, r.text
    trunk = r.json()["sip_trunk"]
    assert (trunk["host"], trunk["port"], trunk["transport"]) == ("2001:db8::1", 5061, "tcp")
    assert trunk["address"] == "[2001:db8::1]:5061" and trunk["username"] == "sdk-user"
    listed = (await env.client.get("/api/v1/sip-trunks")).json()
    assert listed == {"trunks": [trunk]}


SDK_TRUNK = {"name": "Acme", "provider": "acme", "outbound_address": "sip.acme.example:5080",
             "inbound_addresses": ["192.0.2.10", "198.51.100.0/24", "In.Acme.Example"],
             "outbound_number": "+31 85 083 5037", "auth_username": "acme-user",
             "auth_password": "s3cr3t-pw"}


async def test_trunk_sdk_shape(env: Env) -> None:
    """Guards issue 11 item 1: the SDK's create body is accepted and every SDK name is in
    the answer (the router used to answer 422 'host or address is required')."""
    r = await env.post("/api/v1/sip-trunks", SDK_TRUNK)
    assert r.status_code == 201, r.text
    trunk = r.json()["trunk"]
    assert trunk["outbound_address"] == "sip.acme.example:5080"
    assert trunk["inbound_addresses"] == ["192.0.2.10", "198.51.100.0/24", "in.acme.example"]
    assert trunk["outbound_number"] == "+31850835037"
    assert (trunk["provider"], trunk["auth_username"]) == ("acme", "acme-user")
    assert (trunk["register"], trunk["register_expires"], trunk["inbound_auth"]) == (
        False, 300, False)
    assert trunk["registration"] is None and "s3cr3t-pw" not in r.text
    assert {"id", "name", "created_at", "updated_at"} <= trunk.keys()


async def test_trunk_inbound_only_and_sip_uri_address(env: Env) -> None:
    r = await env.post("/api/v1/sip-trunks", {"name": "in", "inbound_addresses": ["10.1.2.3"]})
    assert r.status_code == 201, r.text
    assert r.json()["trunk"]["outbound_address"] is None
    r = await env.post("/api/v1/sip-trunks", {
        "name": "uri", "outbound_address": "sip:gw@10.0.0.5:5070;transport=tcp"})
    trunk = r.json()["trunk"]
    assert (trunk["host"], trunk["port"], trunk["transport"]) == ("10.0.0.5", 5070, "tcp")


async def test_trunk_patch_sdk_fields(env: Env) -> None:
    trunk = (await env.post("/api/v1/sip-trunks", SDK_TRUNK)).json()["trunk"]
    url = f"/api/v1/sip-trunks/{trunk['id']}"
    r = await env.client.patch(url, json={"inbound_addresses": ["10.9.9.9/32"],
                                          "outbound_number": None, "register": True,
                                          "register_expires": 120})
    assert r.status_code == 200, r.text
    patched = r.json()["trunk"]
    assert patched["inbound_addresses"] == ["10.9.9.9/32"] and patched["outbound_number"] is None
    assert (patched["register"], patched["register_expires"]) == (True, 120)
    assert patched["outbound_address"] == "sip.acme.example:5080"
    assert (await env.client.get(url)).json()["trunk"] == patched
    # inbound-only is fine while inbound addresses remain; registration needs a registrar
    assert_error(await env.client.patch(url, json={"outbound_address": None}), 422, "register")
    assert_error(await env.client.patch(url, json={"auth_password": None}), 422, "register")


async def test_trunk_sdk_validation(env: Env) -> None:
    base = {"name": "x", "outbound_address": "gw.example"}
    for body, name in (
        ({"name": "x"}, "outbound_address"),
        ({**base, "inbound_addresses": ["10.0.0.300"]}, "inbound_addresses"),
        ({**base, "inbound_addresses": ["not a host"]}, "inbound_addresses"),
        ({**base, "inbound_addresses": "10.0.0.1"}, "inbound_addresses"),
        ({**base, "outbound_number": "12"}, "outbound_number"),
        ({**base, "register": True}, "register"),
        ({**base, "inbound_auth": True, "auth_username": "u"}, "inbound_auth"),
        ({**base, "register_expires": 5}, "register_expires"),
        ({**base, "outbound_address": "sip:gw.example;transport=sctp"}, "outbound_address"),
    ):
        assert_error(await env.post("/api/v1/sip-trunks", body), 422, name)


async def test_trunk_tls_is_refused_with_the_reason(env: Env) -> None:
    """Guards issue 11 item 6: no promise the router cannot keep."""
    for body in ({"name": "t", "host": "h", "transport": "tls"},
                 {"name": "t", "outbound_address": "sips:gw.example"}):
        r = await env.post("/api/v1/sip-trunks", body)
        assert_error(r, 422, "transport")
        assert "no SIP over TLS" in r.text
    trunk = await make_trunk(env)
    assert_error(await env.client.patch(f"/api/v1/sip-trunks/{trunk}",
                                        json={"transport": "tls"}), 422, "transport")


async def test_trunk_validation(env: Env) -> None:
    assert_error(await env.post("/api/v1/sip-trunks", {"name": "x"}), 422, "outbound_address")
    assert_error(await env.post("/api/v1/sip-trunks", {"host": "h"}), 422, "name")
    assert_error(await env.post("/api/v1/sip-trunks", {"name": "x", "host": "a",
                                                       "address": "b:5060"}), 422, "address")
    assert_error(await env.post("/api/v1/sip-trunks", {"name": "x", "host": "h",
                                                       "port": 70000}), 422, "port")
    assert_error(await env.post("/api/v1/sip-trunks", {"name": "x", "host": "h",
                                                       "transport": "sctp"}), 422, "transport")


async def test_trunk_password_is_encrypted_at_rest_and_never_returned(env: Env) -> None:
    """Guards the secret: not in any response body, not stored in plain text."""
    trunk = await make_trunk(env)
    await env.client.patch(f"/api/v1/sip-trunks/{trunk}", json={"name": "renamed"})
    bodies = [(await env.client.get(p)).text for p in
              ("/api/v1/sip-trunks", f"/api/v1/sip-trunks/{trunk}", "/openapi.json")]
    assert all("s3cr3t-pw" not in b for b in bodies)
    stored = await env.store.get_trunk_password(uuid.UUID(trunk))
    assert stored is not None and b"s3cr3t-pw" not in stored


async def test_trunk_patch_changes_fields_and_password_null_clears_it(env: Env) -> None:
    trunk = await make_trunk(env)
    url = f"/api/v1/sip-trunks/{trunk}"
    r = await env.client.patch(url, json={"address": "10.0.0.9:5070", "transport": "tcp"})
    assert r.status_code == 200, r.text
    assert r.json()["trunk"]["address"] == "10.0.0.9:5070"
    assert r.json()["trunk"]["transport"] == "tcp" and r.json()["trunk"]["username"] == "u"
    assert await env.store.get_trunk_password(uuid.UUID(trunk)) is not None  # kept
    await env.client.patch(url, json={"auth_password": None})
    assert await env.store.get_trunk_password(uuid.UUID(trunk)) is None
    assert_error(await env.client.patch(url, json={"name": None}), 422, "name")
    assert_error(await env.client.patch(f"/api/v1/sip-trunks/{uuid.uuid4()}", json={}), 404)


async def test_trunk_in_use_cannot_be_deleted(env: Env) -> None:
    trunk = await make_trunk(env)
    number = (await env.post("/api/v1/numbers", {"phone_number": NUMBER,
                                                 "transfer_trunk_id": trunk})).json()["number"]
    assert_error(await env.client.delete(f"/api/v1/sip-trunks/{trunk}"), 409)
    await env.client.patch(f"/api/v1/numbers/{number['id']}", json={"transfer_trunk_id": None})
    assert (await env.client.delete(f"/api/v1/sip-trunks/{trunk}")).json() == {"success": True}
    assert_error(await env.client.get(f"/api/v1/sip-trunks/{trunk}"), 404)


# -- assistants --------------------------------------------------------------------------

async def test_assistant_crud(env: Env) -> None:
    given_id = str(uuid.uuid4())
    r = await env.post("/api/v1/assistants", {"id": given_id, "name": "Support"})
    assert r.status_code == 201
    assert r.json()["assistant"]["id"] == given_id
    assert r.json()["assistant"]["runtime_uri"] is None
    assert_error(await env.post("/api/v1/assistants", {"id": given_id, "name": "Again"}), 409)
    url = f"/api/v1/assistants/{given_id}"
    r = await env.client.patch(url, json={"runtime_uri": "sips:rt@runtime.example:5061"})
    assert r.json()["assistant"]["runtime_uri"] == "sips:rt@runtime.example:5061"
    assert r.json()["assistant"]["name"] == "Support"
    assert (await env.client.get(url)).json() == r.json()
    assert (await env.client.get("/api/v1/assistants")).json() == {
        "assistants": [r.json()["assistant"]]}
    assert (await env.client.delete(url)).json() == {"success": True}
    assert_error(await env.client.get(url), 404)


async def test_assistant_validation(env: Env) -> None:
    assert_error(await env.post("/api/v1/assistants", {"name": "x", "runtime_uri": "http://x"}),
                 422, "runtime_uri")
    assert_error(await env.post("/api/v1/assistants", {"name": " "}), 422, "name")
    assistant = await make_assistant(env)
    assert_error(await env.client.patch(f"/api/v1/assistants/{assistant}", json={"name": None}),
                 422, "name")


async def test_assistant_webhook_fields_and_the_secret_is_never_returned(env: Env) -> None:
    r = await env.post("/api/v1/assistants", {
        "name": "Hooked", "webhook_url": "https://hooks.example.com/a",
        "webhook_secret": "top-secret"})
    assert r.status_code == 201, r.text
    body = r.json()["assistant"]
    assert body["webhook_url"] == "https://hooks.example.com/a"
    assert body["webhook_events"] == ["assistant-request", "status-update"]
    assert body["has_webhook_secret"] is True
    url = f"/api/v1/assistants/{body['id']}"
    r = await env.client.patch(url, json={"webhook_events": ["status-update"]})
    assert r.json()["assistant"]["webhook_events"] == ["status-update"]
    assert r.json()["assistant"]["has_webhook_secret"] is True  # kept
    for response in (r, await env.client.get(url), await env.client.get("/api/v1/assistants")):
        assert "top-secret" not in response.text
    r = await env.client.patch(url, json={"webhook_secret": None, "webhook_url": None})
    assert r.json()["assistant"]["has_webhook_secret"] is False
    assert r.json()["assistant"]["webhook_url"] is None


@pytest.mark.parametrize(("body", "field"), [
    ({"webhook_url": "ftp://hooks.example.com/"}, "webhook_url"),
    ({"webhook_url": "http://169.254.169.254/latest/meta-data"}, "webhook_url"),
    ({"webhook_url": "http://10.0.0.5/hook"}, "webhook_url"),
    ({"webhook_url": "http://user:pw@hooks.example.com/"}, "webhook_url"),
    ({"webhook_events": ["call-started"]}, "webhook_events"),
    ({"webhook_events": "status-update"}, "webhook_events"),
])
async def test_assistant_webhook_validation_names_the_field(
        env: Env, body: dict[str, Any], field: str) -> None:
    assert_error(await env.post("/api/v1/assistants", {"name": "x", **body}), 422, field)
    assistant = await make_assistant(env)
    assert_error(await env.client.patch(f"/api/v1/assistants/{assistant}", json=body), 422,
                 field)


async def test_webhook_deliveries_are_listed_by_status(env: Env) -> None:
    r = await env.client.get("/api/v1/webhooks/deliveries", params={"status": "failed"})
    assert r.status_code == 200
    assert r.json() == {"deliveries": [], "pagination": {"total": 0, "limit": 100,
                                                         "offset": 0}}
    assert_error(await env.client.get("/api/v1/webhooks/deliveries",
                                      params={"status": "lost"}), 422, "status")
    r = await env.client.post(f"/api/v1/webhooks/deliveries/{uuid.uuid4()}/retry")
    assert r.status_code == 503  # no delivery worker in this app


async def test_assistant_in_use_cannot_be_deleted(env: Env) -> None:
    assistant = await make_assistant(env)
    await env.post("/api/v1/numbers", {"phone_number": NUMBER, "assistant_id": assistant})
    assert_error(await env.client.delete(f"/api/v1/assistants/{assistant}"), 409)


# -- calls -------------------------------------------------------------------------------

def record(created: datetime, status: CallStatus = CallStatus.ENDED) -> CallRecord:
    ended = status == CallStatus.ENDED
    return CallRecord(
        id=uuid.uuid4(), status=status, caller_phone="+31612345678", assistant_phone=NUMBER,
        number_id=None, assistant_id=uuid.uuid4(), sip_call_id="abc@host",
        started_at=created, ended_at=created + timedelta(seconds=61.5) if ended else None,
        end_reason=EndReason.CALLER_HANGUP if ended else None, error=None,
        created_at=created, updated_at=created)


async def test_calls_list_filters_and_pagination(env: Env) -> None:
    calls = [record(T0 + timedelta(minutes=i)) for i in range(3)]
    live = record(T0 + timedelta(hours=1), CallStatus.IN_PROGRESS)
    await env.store.upsert_calls([*calls, live])
    body = (await env.client.get("/api/v1/calls", params={"limit": 2, "offset": 1})).json()
    assert body["pagination"] == {"total": 4, "limit": 2, "offset": 1}
    assert [c["id"] for c in body["calls"]] == [str(calls[2].id), str(calls[1].id)]
    only = (await env.client.get("/api/v1/calls", params={"status": "in-progress"})).json()
    assert [c["id"] for c in only["calls"]] == [str(live.id)]
    window = {"start_date": "2025-12-13T10:00:30Z", "end_date": "2025-12-13T10:01:30"}
    assert [c["id"] for c in (await env.client.get("/api/v1/calls", params=window)
                              ).json()["calls"]] == [str(calls[1].id)]


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"offset": -1}, "offset"),
    ({"status": "ringing"}, "status"), ({"start_date": "yesterday"}, "start_date"),
    ({"start_date": "2025-12-14T00:00:00Z", "end_date": "2025-12-13T00:00:00Z"}, "end_date"),
])
async def test_calls_query_validation(env: Env, params: dict[str, Any], field: str) -> None:
    assert_error(await env.client.get("/api/v1/calls", params=params), 422, field)


async def test_call_detail_is_bare_and_under_call(env: Env) -> None:
    call = record(T0)
    await env.store.upsert_calls([call])
    body = (await env.client.get(f"/api/v1/calls/{call.id}")).json()
    inner = body.pop("call")
    assert body == inner
    assert inner["phone_number"] == inner["assistant_phone"] == NUMBER
    assert inner["agent_id"] == inner["assistant_id"] == str(call.assistant_id)
    assert inner["duration_seconds"] == 61 and inner["direction"] == "inbound"
    assert inner["ended_at"] == "2025-12-13T10:01:01.500Z"
    assert_error(await env.client.get(f"/api/v1/calls/{uuid.uuid4()}"), 404)


async def test_call_control(env: Env) -> None:
    live, done = record(T0, CallStatus.IN_PROGRESS), record(T0)
    await env.store.upsert_calls([live, done])
    url = f"/api/v1/calls/{live.id}/control"
    r = await env.post(url, {"type": "transfer", "destination": "085 083 5037"})
    assert r.json() == {"success": True, "message": "transfer requested"}
    assert env.controls[-1][1] == TransferCall(NUMBER, None)
    assert (await env.post(url, {"type": "end-call"})).status_code == 200
    assert env.controls[-1][1] == EndCall()
    assert_error(await env.post(url, {"type": "transfer"}), 422, "destination")
    assert_error(await env.post(url, {"type": "transfer", "destination": "x"}), 422,
                 "destination")
    assert_error(await env.post(url, {"type": "hold"}), 422, "type")
    assert_error(await env.post(f"/api/v1/calls/{done.id}/control", {"type": "end-call"}), 400)
    assert_error(await env.post(f"/api/v1/calls/{uuid.uuid4()}/control",
                                {"type": "end-call"}), 404)


async def test_control_answers_with_the_sessions_verdict_in_the_error_shape(env: Env) -> None:
    """Guards issue 9 item 3: the endpoint answered 200 before the SIP thread had looked
    at the command; a refusal by the call's state is 409 and a missing verdict 504, both
    as ``{"error", "message", "details"}`` with the reason in the message."""
    live = record(T0, CallStatus.IN_PROGRESS)
    await env.store.upsert_calls([live])
    url = f"/api/v1/calls/{live.id}/control"
    env.verdict = CommandRefused("a transfer to sip:desk@pbx is still ringing")
    refused = await env.post(url, {"type": "transfer", "destination": "sip:desk@pbx"})
    assert_error(refused, 409)
    assert refused.json()["error"] == "command_refused"
    assert refused.json()["message"] == "a transfer to sip:desk@pbx is still ringing"
    env.verdict = EngineTimeout("the SIP engine did not answer within 2 s")
    late = await env.post(url, {"type": "end-call"})
    assert_error(late, 504)
    assert late.json()["error"] == "engine_timeout" and "did not answer" in late.json()["message"]


async def test_control_limit_is_10_per_minute_per_call(env: Env) -> None:
    live, other = record(T0, CallStatus.IN_PROGRESS), record(T0, CallStatus.IN_PROGRESS)
    await env.store.upsert_calls([live, other])
    url = f"/api/v1/calls/{live.id}/control"
    codes = [(await env.post(url, {"type": "end-call"})).status_code for _ in range(11)]
    assert codes == [200] * 10 + [429]
    r = await env.post(url, {"type": "end-call"})
    assert_error(r, 429)
    assert int(r.headers["Retry-After"]) >= 1
    assert (await env.post(f"/api/v1/calls/{other.id}/control",
                           {"type": "end-call"})).status_code == 200
    env.clock.seconds += 60
    assert (await env.post(url, {"type": "end-call"})).status_code == 200


# -- access ------------------------------------------------------------------------------

@pytest.mark.parametrize("auth", [None, "Bearer", "Bearer cr_wrong", "Basic abc"])
async def test_missing_or_unknown_key_is_401(env: Env, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    env.client.headers.pop("Authorization")
    for path in ("/api/v1/numbers", "/api/v1/calls", "/api/v1/does-not-exist"):
        r = await env.client.get(path, headers=headers)
        assert_error(r, 401)
        assert r.headers["WWW-Authenticate"] == "Bearer"
    r = await env.client.post("/api/v1/numbers", content=b"{bad", headers=headers)
    assert_error(r, 401)  # auth is checked before the body is looked at


async def test_open_endpoints_need_no_key(env: Env) -> None:
    env.client.headers.pop("Authorization")
    health = await env.client.get("/api/v1/health")
    assert health.status_code == 200
    assert health.json() == {"status": "degraded", "version": "9.9.9", "checks": {
        "database": {"status": "ok", "latency_ms": 0.5}, "sip": {"status": "starting"}}}
    ready = await env.client.get("/api/v1/ready")
    assert ready.status_code == 503
    assert ready.json() == {"status": "not_ready", "reason": "sip engine starting"}
    metrics = await env.client.get("/metrics")
    assert metrics.text == "callrouter_up 1\n"
    assert (await env.client.get("/openapi.json")).status_code == 200


async def test_read_only_key_reads_but_gets_403_on_writes(env: Env) -> None:
    assert (await env.client.get("/api/v1/numbers", headers=env.read_only)).status_code == 200
    r = await env.client.post("/api/v1/numbers", json={"phone_number": NUMBER},
                              headers=env.read_only)
    assert_error(r, 403)
    assert "X-RateLimit-Limit" in r.headers
    assert (await env.client.get("/api/v1/numbers")).json() == {"numbers": []}


async def test_rate_limit_429_with_headers(tmp_path: Path) -> None:
    env, _ = await build(tmp_path, rate_limit=3)
    try:
        responses = [await env.client.get("/api/v1/numbers") for _ in range(4)]
        assert [r.status_code for r in responses] == [200, 200, 200, 429]
        assert [r.headers["X-RateLimit-Remaining"] for r in responses] == ["2", "1", "0", "0"]
        assert all(r.headers["X-RateLimit-Limit"] == "3" for r in responses)
        assert_error(responses[-1], 429)
        assert responses[-1].headers["Retry-After"] == responses[-1].headers["X-RateLimit-Reset"]
        other = await env.client.get("/api/v1/numbers", headers=env.read_only)
        assert other.status_code == 200  # the budget is per key
        env.clock.seconds += 60
        assert (await env.client.get("/api/v1/numbers")).status_code == 200
        assert_error(await env.client.get(f"/api/v1/numbers/{uuid.uuid4()}"), 404)
    finally:
        await env.client.aclose()
        await env.store.close()


async def test_rate_limit_headers_on_error_responses(env: Env) -> None:
    r = await env.client.get(f"/api/v1/numbers/{uuid.uuid4()}")
    assert r.status_code == 404 and "X-RateLimit-Remaining" in r.headers


# -- restart, OpenAPI, metrics hook ------------------------------------------------------

async def test_numbers_survive_a_restart(tmp_path: Path) -> None:
    first, _ = await build(tmp_path)
    assistant = await make_assistant(first)
    created = (await first.post("/api/v1/numbers", {"phone_number": NUMBER,
                                                    "assistant_id": assistant})).json()
    await first.client.aclose()
    await first.store.close()
    second, _ = await build(tmp_path)  # same data dir: same database and secret key
    try:
        listed = (await second.client.get("/api/v1/numbers")).json()
        assert listed == {"numbers": [created["number"]]}
    finally:
        await second.client.aclose()
        await second.store.close()


async def test_openapi_documents_the_served_shapes(env: Env) -> None:
    spec = (await env.client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    number_props = set(schemas["NumberView"]["properties"])
    assert {"agent_id", "assistant_id", "transfer_trunk_id", "is_active"} <= number_props
    assert "password" not in schemas["TrunkView"]["properties"]
    assert set(schemas["TrunkEnvelope"]["properties"]) == {"sip_trunk", "trunk"}
    create = spec["paths"]["/api/v1/numbers"]["post"]["responses"]
    assert "201" in create and "409" in create
    assert "bearer" in str(spec["components"]["securitySchemes"]).lower()
    served = (await env.post("/api/v1/numbers", {"phone_number": NUMBER})).json()["number"]
    assert set(served) == number_props


# -- request body limit ------------------------------------------------------------------

LIMIT = 1024 * 1024  # http.max_body_bytes' default


@dataclass
class CountedBody:
    """A streamed request body that counts how many bytes the server pulled from it."""

    size: int
    chunk: int = 64 * 1024
    pulled: int = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.pulled < self.size:
            self.pulled += self.chunk
            yield b" " * self.chunk


def assert_too_large(r: httpx.Response) -> None:
    assert_error(r, 413)
    assert str(LIMIT) in r.json()["message"]


async def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(env: Env) -> None:
    """Guards against reading and parsing a huge body only to refuse it: a Content-Length
    over http.max_body_bytes is answered 413 without taking a byte of the body."""
    body = CountedBody(10 * LIMIT)
    r = await env.client.post("/api/v1/numbers", content=body,
                              headers={"Content-Length": str(body.size)})
    assert_too_large(r)
    assert body.pulled == 0
    assert env.requests[-1] == ("/api/v1/numbers", "POST", 413)


async def test_a_chunked_body_is_read_only_up_to_the_limit(env: Env) -> None:
    """Guards the limit for bodies without Content-Length: reading stops past the limit."""
    body = CountedBody(10 * LIMIT)
    r = await env.client.post("/api/v1/numbers", content=body)
    assert_too_large(r)
    assert body.pulled <= LIMIT + body.chunk


async def test_a_body_at_the_limit_is_served(env: Env) -> None:
    """The limit is inclusive: a body of exactly http.max_body_bytes is parsed and served."""
    payload = b'{"phone_number": "' + NUMBER.encode() + b'"}'
    padded = payload.ljust(LIMIT)  # JSON whitespace up to exactly the limit
    r = await env.client.post("/api/v1/numbers", content=padded,
                              headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text


async def test_requests_are_reported_by_route_template(env: Env) -> None:
    await env.client.get(f"/api/v1/numbers/{uuid.uuid4()}")
    await env.client.get("/nowhere")
    assert env.requests[-2:] == [("/api/v1/numbers/{number_id}", "GET", 404),
                                 ("unmatched", "GET", 404)]


async def test_outbound_call_route_checks_its_body_and_says_when_it_cannot(env: Env) -> None:
    assert_error(await env.post("/api/v1/calls/outbound", {"number_id": str(uuid.uuid4())}),
                 422, "destination")
    r = await env.post("/api/v1/calls/outbound", {
        "destination": "+31612345678", "number_id": str(uuid.uuid4()),
        "assistant_override": {"firstMessage": "hi"}, "first_message": "hi"})
    assert r.status_code == 503, r.text  # this router was built without a SIP side
