"""Trunks as the live allow-list (issue 11 item 2): the pure network derivation, the
keeper that hands the SIP side a whole policy on every change, and the trunk on the call
record and the ``call.routed`` line."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from structlog.testing import capture_logs

from callrouter.domain import trunknets
from callrouter.domain.models import Trunk, TrunkTransport
from callrouter.domain.trunknets import TrunkNetwork
from callrouter.ports import Accepted, RegistrationStatus, TrunkPolicy
from callrouter.providers import Providers
from callrouter.store.memory import MemoryStore
from tests.unit.test_service import invite, make_service

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def trunk(**changes: object) -> Trunk:
    base = Trunk(id=uuid.uuid4(), name="acme", host="", port=5060,
                 transport=TrunkTransport.UDP, provider="acme", username=None,
                 has_password=False, is_active=True, created_at=T0, updated_at=T0,
                 inbound_addresses=("192.0.2.10",))
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(("entry", "canonical"), [
    ("192.0.2.7", "192.0.2.7"), (" 10.1.2.3/8 ", "10.0.0.0/8"), ("[2001:DB8::1]", "2001:db8::1"),
    ("2001:db8::/32", "2001:db8::/32"), ("Sip.Provider.Example.", "sip.provider.example"),
])
def test_inbound_entries_are_stored_canonical(entry: str, canonical: str) -> None:
    assert trunknets.canonical(entry) == canonical


@pytest.mark.parametrize("entry", ["", "10.0.0.300", "10.0.0", "a b", "10.0.0.0/33", "x/24", 7])
def test_bad_inbound_entries_are_refused(entry: object) -> None:
    with pytest.raises(ValueError):
        trunknets.canonical(entry)


def test_networks_come_from_active_trunks_and_resolved_names() -> None:
    a = trunk(inbound_addresses=("192.0.2.10", "10.0.0.0/8", "gw.example"))
    b = trunk(inbound_addresses=("198.51.100.1",), is_active=False)
    reg = trunk(inbound_addresses=(), host="reg.example", register=True)
    resolved = {"gw.example": ("203.0.113.5", "2001:db8::5"), "reg.example": ("203.0.113.9",)}
    assert trunknets.names_to_resolve([a, b, reg]) == {"gw.example", "reg.example"}
    assert set(trunknets.trunk_networks([a, b, reg], resolved)) == {
        TrunkNetwork("192.0.2.10", 32, a.id), TrunkNetwork("10.0.0.0", 8, a.id),
        TrunkNetwork("203.0.113.5", 32, a.id), TrunkNetwork("2001:db8::5", 128, a.id),
        TrunkNetwork("203.0.113.9", 32, reg.id)}


class FakeSip:
    def __init__(self) -> None:
        self.policies: list[TrunkPolicy] = []

    def apply_trunks(self, policy: TrunkPolicy) -> None:
        self.policies.append(policy)

    def registration(self, trunk_id: uuid.UUID) -> RegistrationStatus | None:
        return None

    def registration_statuses(self) -> list[RegistrationStatus]:
        return []


def test_every_change_hands_the_sip_side_a_whole_policy() -> None:
    """Guards 'live': create, deactivate and delete each publish before returning, and a
    host name is resolved before its trunk is applied."""
    store = MemoryStore()
    answers = {"gw.example": ("203.0.113.5",)}
    asked: list[str] = []

    async def resolve(name: str) -> tuple[str, ...]:
        asked.append(name)
        if name not in answers:
            raise OSError("no such host")
        return answers[name]

    async def scenario() -> None:
        providers = Providers(store, lambda b: b.decode(), resolve=resolve)
        await providers.load()
        sip = FakeSip()
        providers.attach(sip)
        assert sip.policies == [TrunkPolicy()]
        t = await store.create_trunk(trunk(inbound_addresses=("gw.example", "nowhere.example")),
                                     None)
        await providers.changed(t, False)
        assert asked == ["gw.example", "nowhere.example"]
        assert [n.address for n in sip.policies[-1].networks] == ["203.0.113.5"]
        await providers.changed(replace(t, is_active=False), False)
        assert sip.policies[-1].networks == ()
        await providers.changed(t, False)
        await providers.changed(t, True)
        assert sip.policies[-1] == TrunkPolicy()

    asyncio.run(scenario())


def test_registration_and_inbound_auth_carry_the_decrypted_password() -> None:
    store = MemoryStore()

    async def scenario() -> TrunkPolicy:
        await store.create_trunk(trunk(host="10.0.0.7", port=5070, username="u",
                                           has_password=True, register=True,
                                           register_expires=120, inbound_auth=True),
                                     b"pw")
        providers = Providers(store, lambda b: b.decode() + "!")
        await providers.load()
        return providers.policy()

    policy = asyncio.run(scenario())
    (reg,) = policy.registrations
    assert (reg.registrar, reg.domain, reg.username, reg.password, reg.expires) == (
        "sip:10.0.0.7:5070;transport=udp", "10.0.0.7", "u", "pw!", 120)
    assert reg.contact_user.startswith("cr") and len(reg.contact_user) == 22
    assert [(a.username, a.password) for a in policy.inbound_auth] == [("u", "pw!")]
    assert TrunkNetwork("10.0.0.7", 32, reg.trunk_id) in policy.networks  # the registrar


def test_the_trunk_is_on_the_record_and_the_routed_line() -> None:
    service, records, _, _ = make_service()
    trunk_id = uuid.uuid4()
    with capture_logs() as logs:
        bridged = service.on_invite(replace(invite("sip:+31850835037@r"), trunk_id=trunk_id))
        rejected = service.on_invite(invite("sip:+31999999999@r"))
    assert isinstance(bridged, Accepted) and rejected is not None
    assert [r.trunk_id for r in records] == [trunk_id, None]
    assert [e.get("trunk_id") for e in logs] == [str(trunk_id), None]


def test_an_invite_to_a_registration_contact_routes_on_to() -> None:
    service, records, _, _ = make_service()
    routed = replace(invite("sip:cr0123@router"), to_header="<sip:+31850835037@provider>",
                     via_registration=True, trunk_id=uuid.uuid4())
    assert isinstance(service.on_invite(routed), Accepted)
    assert records[0].assistant_phone == "+31850835037"


def test_host_names_are_re_resolved_and_a_failure_keeps_the_last_answer() -> None:
    """Guards 'refreshed periodically': a changed answer is published, a failed lookup
    keeps the addresses the name had."""
    store = MemoryStore()
    answers: list[tuple[str, ...] | Exception] = [
        ("203.0.113.5",), ("203.0.113.6",), OSError("timeout")]

    async def resolve(name: str) -> tuple[str, ...]:
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def scenario() -> list[TrunkPolicy]:
        await store.create_trunk(trunk(inbound_addresses=("gw.example",)), None)
        providers = Providers(store, lambda b: b.decode(), resolve=resolve,
                              refresh_seconds=0.01)
        await providers.load()
        sip = FakeSip()
        providers.attach(sip)
        task = asyncio.create_task(providers.run())
        await asyncio.sleep(0.1)
        task.cancel()
        return sip.policies

    policies = asyncio.run(scenario())
    assert [[n.address for n in p.networks] for p in policies] == [
        ["203.0.113.5"], ["203.0.113.6"]]  # published once per change, kept after the failure
