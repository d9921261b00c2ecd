"""Registration retries (issue 11 item 3): every failed REGISTER is retried with
exponential back-off, none during a drain. Needs the engine module (pjsua2) to import
``sip.registrations``; the accounts here are stand-ins."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from callrouter.ports import Registration, RegistrationState

registrations = pytest.importorskip("callrouter.sip.registrations",
                                    reason="needs the engine module (make engine)")

WANTED = Registration(uuid.uuid4(), "sip:10.0.0.7:5060;transport=udp", "10.0.0.7", "u", "pw",
                      300, "cr00")


class Account:
    def __init__(self) -> None:
        self.wanted = WANTED
        self.sent = 0

    def setRegistration(self, renew: bool) -> None:  # pjsua2 spells it so
        self.sent += 1 if renew else 0


def make() -> tuple[Any, Account, list[float]]:
    clock = [100.0]
    regs = registrations.Registrations(
        base_config=lambda: None, contact=lambda u, t: "", incoming=lambda a, p: None,
        retry_first=30, retry_max=120, keepalive=15, clock=lambda: clock[0])
    account = Account()
    regs._accounts[WANTED.trunk_id] = account
    return regs, account, clock


def test_failures_are_retried_with_doubling_back_off_up_to_the_cap() -> None:
    regs, account, clock = make()
    for delay in (30, 60, 120, 120):
        regs.reported(WANTED, 403, "Forbidden", 0)
        assert regs.status(WANTED.trunk_id).state is RegistrationState.FAILED
        clock[0] += delay - 1
        regs.tick(clock[0])
        sent = account.sent
        clock[0] += 1
        regs.tick(clock[0])
        assert account.sent == sent + 1, f"not retried after {delay} s"
    regs.reported(WANTED, 200, "OK", 300)
    assert regs.status(WANTED.trunk_id).state is RegistrationState.REGISTERED
    regs.reported(WANTED, 408, "Request Timeout", 0)
    clock[0] += 30
    regs.tick(clock[0])
    assert account.sent == 5  # back to the first delay after a success


def test_no_retry_while_draining() -> None:
    regs, account, clock = make()
    regs.reported(WANTED, 503, "Service Unavailable", 0)
    regs.unregister_all()
    regs.reported(WANTED, 503, "Service Unavailable", 0)
    clock[0] += 1000
    regs.tick(clock[0])
    assert account.sent == 0
