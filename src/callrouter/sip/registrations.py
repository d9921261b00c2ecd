"""Registration trunks: one pjsua2 account per trunk with ``register: true``.

How it works: ``Registrations.apply`` (on the SIP thread) brings the accounts in line
with the wanted ``ports.Registration`` values: a new trunk gets an account that sends
REGISTER at once (``registerOnAdd``), a changed one is re-created (pjsua re-registers),
a removed one is shut down, which unregisters (expires 0) first. pjsua refreshes the
binding before it expires. A failed REGISTER, whatever the answer (pjsua itself would
give up after a 401/403/404), is retried here with exponential back-off: first after
``trunks.register_retry_seconds``, doubling up to ``register_retry_max_seconds``
(``tick`` runs on the SIP thread's loop); none during a drain. pjsua sends a CRLF
keep-alive over UDP every
``trunks.keepalive_seconds`` (RFC 5626 s4.4.1; over TCP pjsip's transport sends CRLFCRLF
pings itself). The Contact carries the registration's own user, which the guard knows,
so the provider's INVITEs to it pass the allow-list from any of its addresses.
``onRegState`` turns into a ``RegistrationStatus`` per trunk, read by the API and the
metrics from any thread (a dict swapped by assignment).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pjsua2 as pj
import structlog

from callrouter.ports import Registration, RegistrationState, RegistrationStatus

log = structlog.get_logger("callrouter.sip")


class _RegAccount(pj.Account):  # type: ignore[misc]
    def __init__(self, owner: Registrations, wanted: Registration) -> None:
        super().__init__()
        self.owner = owner
        self.wanted = wanted

    def onRegState(self, prm: pj.OnRegStateParam) -> None:
        self.owner.reported(self.wanted, int(prm.code), str(prm.reason), int(prm.expiration))

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        # pjsua hands an INVITE to the account whose user is in the Request-URI.
        self.owner.incoming(self, prm)


class Registrations:
    """The registration accounts (SIP thread only, but ``status`` from anywhere)."""

    def __init__(self, *, base_config: Callable[[], Any], contact: Callable[[str, str], str],
                 incoming: Callable[[Any, Any], None], retry_first: int, retry_max: int,
                 keepalive: int, clock: Callable[[], float],
                 now: Callable[[], datetime] | None = None) -> None:
        self._base_config = base_config  # the router's own account settings
        self._contact = contact  # (user, transport) -> Contact URI on our transport
        self.incoming = incoming
        self._retry = (retry_first, retry_max)
        self._keepalive = keepalive
        self._now = now or (lambda: datetime.now(UTC))
        self._accounts: dict[uuid.UUID, _RegAccount] = {}
        self._status: dict[uuid.UUID, RegistrationStatus] = {}
        self._clock = clock
        self._retries: dict[uuid.UUID, tuple[float, int]] = {}  # trunk -> (due, delay)
        self._stopping = False

    def status(self, trunk_id: uuid.UUID) -> RegistrationStatus | None:
        return self._status.get(trunk_id)

    def statuses(self) -> list[RegistrationStatus]:
        return list(self._status.values())

    def apply(self, wanted: tuple[Registration, ...]) -> None:
        by_trunk = {r.trunk_id: r for r in wanted}
        for trunk_id, account in list(self._accounts.items()):
            if by_trunk.get(trunk_id) != account.wanted:
                self._remove(trunk_id)
        for trunk_id, registration in by_trunk.items():
            if trunk_id not in self._accounts:
                self._add(registration)

    def tick(self, now: float) -> None:
        """Send the REGISTERs whose back-off is over (the SIP thread's loop)."""
        for trunk_id, (due, delay) in list(self._retries.items()):
            if due > now:
                continue
            account = self._accounts.get(trunk_id)
            del self._retries[trunk_id]
            if account is None or self._stopping:
                continue
            self._retries[trunk_id] = (float("inf"), delay)  # in flight: its answer decides
            try:
                account.setRegistration(True)
            except pj.Error as exc:
                log.warning("trunk.registration_failed", trunk_id=str(trunk_id),
                            error=exc.reason or exc.title, retry_seconds=delay)
                self._retries[trunk_id] = (now + delay, delay)

    def unregister_all(self) -> None:
        """Drain: expires 0 to every registrar; the accounts stay until ``close``."""
        self._stopping = True
        self._retries.clear()
        for account in self._accounts.values():
            try:
                account.setRegistration(False)
            except pj.Error as exc:
                log.warning("trunk.unregister_failed", trunk_id=str(account.wanted.trunk_id),
                            error=exc.reason or exc.title)

    def close(self) -> None:
        for trunk_id in list(self._accounts):
            self._remove(trunk_id)

    def reported(self, wanted: Registration, code: int, reason: str, expiration: int) -> None:
        if self._accounts.get(wanted.trunk_id) is None:
            return  # an account being removed reports its unregistration
        status = _status(code, reason, expiration, self._now())
        previous = self._status.get(wanted.trunk_id)
        self._status = {**self._status, wanted.trunk_id: status}
        self._back_off(wanted.trunk_id, failed=status.state is RegistrationState.FAILED)
        if previous is None or previous.state is not status.state or previous.code != code:
            level = log.info if status.state is not RegistrationState.FAILED else log.warning
            level("trunk.registration", trunk_id=str(wanted.trunk_id), state=str(status.state),
                  code=code, reason=reason, expires_seconds=expiration,
                  registrar=wanted.registrar)

    def _back_off(self, trunk_id: uuid.UUID, *, failed: bool) -> None:
        if not failed or self._stopping:
            self._retries.pop(trunk_id, None)
            return
        first, most = self._retry
        previous = self._retries.get(trunk_id)
        delay = first if previous is None else min(previous[1] * 2, most)
        self._retries[trunk_id] = (self._clock() + delay, delay)

    def _add(self, wanted: Registration) -> None:
        account = _RegAccount(self, wanted)
        self._accounts[wanted.trunk_id] = account
        self._status = {**self._status, wanted.trunk_id:
                        RegistrationStatus(RegistrationState.UNREGISTERED, reason="registering")}
        try:
            account.create(self._config(wanted), False)
        except pj.Error as exc:
            self._accounts.pop(wanted.trunk_id, None)
            self._status = {**self._status, wanted.trunk_id: RegistrationStatus(
                RegistrationState.FAILED, None, None, exc.reason or exc.title)}
            log.warning("trunk.registration_failed", trunk_id=str(wanted.trunk_id),
                        error=exc.reason or exc.title, registrar=wanted.registrar)

    def _remove(self, trunk_id: uuid.UUID) -> None:
        account = self._accounts.pop(trunk_id)
        self._retries.pop(trunk_id, None)
        self._status = {k: v for k, v in self._status.items() if k != trunk_id}
        try:
            account.shutdown()  # pjsua sends REGISTER with expires 0 first
        except pj.Error as exc:
            log.warning("trunk.unregister_failed", trunk_id=str(trunk_id),
                        error=exc.reason or exc.title)

    def _config(self, wanted: Registration) -> Any:
        acfg = self._base_config()
        acfg.idUri = f"sip:{wanted.username}@{wanted.domain}"
        reg = acfg.regConfig
        reg.registrarUri = wanted.registrar
        reg.registerOnAdd = True
        reg.timeoutSec = wanted.expires
        reg.retryIntervalSec = 0  # retries are ours (tick), for every kind of failure
        reg.dropCallsOnFail = False
        acfg.sipConfig.authCreds.append(
            pj.AuthCredInfo("digest", "*", wanted.username, 0, wanted.password))
        acfg.sipConfig.contactForced = self._contact(wanted.contact_user, wanted.transport)
        acfg.natConfig.udpKaIntervalSec = self._keepalive
        acfg.natConfig.udpKaData = "\r\n"
        return acfg


def _status(code: int, reason: str, expiration: int, now: datetime) -> RegistrationStatus:
    if 200 <= code < 300 and expiration > 0:
        return RegistrationStatus(RegistrationState.REGISTERED, code,
                                  now + timedelta(seconds=expiration), reason)
    if 200 <= code < 300:
        return RegistrationStatus(RegistrationState.UNREGISTERED, code, None, reason)
    # pjsua reports no answer as 408 and a transport failure as 503 (or 0 before sending).
    return RegistrationStatus(RegistrationState.FAILED, code or 503, None, reason)
