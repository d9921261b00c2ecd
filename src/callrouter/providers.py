"""Providers: keeps the SIP side's view of the trunks current (the asyncio side).

How it works: ``Providers`` holds every stored trunk (loaded at start, then told of each
change by ``Management`` before the API answers) and the addresses the host names among
their ``inbound_addresses`` (and registrars) last resolved to. From those it builds one
``ports.TrunkPolicy`` — the guard's trunk networks (``domain.trunknets``), the digest
credentials of ``inbound_auth`` trunks, the wanted registrations — and hands it to the
SIP side whole (``ProviderControl.apply_trunks``), which swaps the guard's table at once:
the next INVITE after the API's 2xx is judged by it, and a deleted or deactivated trunk
closes its door then. New host names are resolved before the change is applied; all of
them again every ``trunks.resolve_interval_seconds``, a name that fails to resolve keeps
its last answer (and is logged). Passwords are decrypted here, on the asyncio side, only
for trunks that register or challenge.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable

import structlog

from callrouter.domain import trunknets
from callrouter.domain.models import Trunk
from callrouter.ports import (
    InboundAuth,
    ProviderControl,
    Registration,
    RegistrationStatus,
    Store,
    TrunkPolicy,
)

log = structlog.get_logger("callrouter.trunks")

Resolver = Callable[[str], Awaitable[tuple[str, ...]]]
RESOLVE_TIMEOUT = 5.0


async def resolve_host(name: str) -> tuple[str, ...]:
    """Every address ``name`` resolves to (A and AAAA); ``OSError`` when none."""
    loop = asyncio.get_running_loop()
    found = await asyncio.wait_for(
        loop.getaddrinfo(name, None, type=socket.SOCK_DGRAM), RESOLVE_TIMEOUT)
    return tuple(sorted({str(info[4][0]) for info in found}))


class Providers:
    def __init__(self, store: Store, decrypt: Callable[[bytes], str], *,
                 resolve: Resolver = resolve_host, refresh_seconds: float = 300.0) -> None:
        self._store = store
        self._decrypt = decrypt
        self._resolve = resolve
        self._refresh = refresh_seconds
        self._trunks: dict[uuid.UUID, Trunk] = {}
        self._passwords: dict[uuid.UUID, str] = {}
        self._resolved: dict[str, tuple[str, ...]] = {}
        self._contact_users: dict[uuid.UUID, str] = {}
        self.sip: ProviderControl | None = None

    async def load(self) -> None:
        """Every stored trunk, anew (at start, and on a full reload of a shared
        database's changes): trunks gone from the store are forgotten."""
        trunks = await self._store.list_trunks()
        for gone in self._trunks.keys() - {t.id for t in trunks}:
            self._forget(gone)
        for trunk in trunks:
            await self._remember(trunk)
        fresh = trunknets.names_to_resolve(self._trunks.values()) - self._resolved.keys()
        await self._resolve_names(fresh)
        self._publish()

    async def refresh(self, trunk_ids: Iterable[uuid.UUID]) -> None:
        """Trunks another router (or this one) wrote or deleted, from the change feed:
        each read back from the store, then one new policy."""
        for trunk_id in set(trunk_ids):
            trunk = await self._store.get_trunk(trunk_id)
            if trunk is None:
                self._forget(trunk_id)
            else:
                await self._remember(trunk)
        fresh = trunknets.names_to_resolve(self._trunks.values()) - self._resolved.keys()
        await self._resolve_names(fresh)
        self._publish()

    def attach(self, sip: ProviderControl) -> None:
        """From now on every change reaches ``sip``; the current policy at once."""
        self.sip = sip
        self._publish()

    async def changed(self, trunk: Trunk, deleted: bool) -> None:
        """``Management``'s hook: a trunk was written (or deleted)."""
        if deleted:
            self._forget(trunk.id)
        else:
            await self._remember(trunk)
            fresh = trunknets.names_to_resolve([trunk]) - self._resolved.keys()
            await self._resolve_names(fresh)
        self._publish()

    async def run(self) -> None:
        """Re-resolve every host name periodically; publish when an answer changed."""
        while True:
            await asyncio.sleep(self._refresh)
            before = dict(self._resolved)
            await self._resolve_names(trunknets.names_to_resolve(self._trunks.values()))
            if self._resolved != before:
                log.info("trunk.addresses_changed", names=sorted(
                    n for n in self._resolved if self._resolved[n] != before.get(n)))
                self._publish()

    def registration(self, trunk_id: uuid.UUID) -> RegistrationStatus | None:
        return None if self.sip is None else self.sip.registration(trunk_id)

    def policy(self) -> TrunkPolicy:
        trunks = list(self._trunks.values())
        active = [t for t in trunks if t.is_active]
        return TrunkPolicy(
            networks=trunknets.trunk_networks(trunks, self._resolved),
            inbound_auth=tuple(InboundAuth(t.id, t.username or "", self._passwords[t.id])
                               for t in active if t.inbound_auth and t.id in self._passwords),
            registrations=tuple(self._registration(t) for t in active
                                if t.register and t.host and t.id in self._passwords))

    # ---- helpers --------------------------------------------------------------------

    def _registration(self, trunk: Trunk) -> Registration:
        host = f"[{trunk.host}]" if ":" in trunk.host else trunk.host
        return Registration(
            trunk_id=trunk.id, registrar=f"sip:{trunk.address};transport={trunk.transport}",
            domain=host, username=trunk.username or "", password=self._passwords[trunk.id],
            expires=trunk.register_expires, contact_user=self._contact_user(trunk.id),
            transport=str(trunk.transport))

    def _contact_user(self, trunk_id: uuid.UUID) -> str:
        """The user of the Contact the router registers: random per trunk and process, so
        an INVITE to it (let through the allow-list for the registration's sake) cannot
        be guessed by anyone who did not receive the binding."""
        if trunk_id not in self._contact_users:
            self._contact_users[trunk_id] = "cr" + secrets.token_hex(10)
        return self._contact_users[trunk_id]

    async def _remember(self, trunk: Trunk) -> None:
        self._trunks[trunk.id] = trunk
        self._passwords.pop(trunk.id, None)
        if (trunk.register or trunk.inbound_auth) and trunk.has_password:
            secret = await self._store.get_trunk_password(trunk.id)
            if secret is not None:
                self._passwords[trunk.id] = self._decrypt(secret)

    def _forget(self, trunk_id: uuid.UUID) -> None:
        self._trunks.pop(trunk_id, None)
        self._passwords.pop(trunk_id, None)
        self._contact_users.pop(trunk_id, None)

    async def _resolve_names(self, names: Iterable[str]) -> None:
        wanted = sorted(names)
        answers = await asyncio.gather(*(self._resolve(n) for n in wanted),
                                       return_exceptions=True)
        for name, answer in zip(wanted, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("trunk.resolve_failed", name=name, error=str(answer) or
                            type(answer).__name__, kept=list(self._resolved.get(name, ())))
            else:
                self._resolved[name] = answer

    def _publish(self) -> None:
        if self.sip is not None:
            self.sip.apply_trunks(self.policy())
