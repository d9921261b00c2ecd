"""The engine accounts that answer digest challenges for trunk users.

One account per (trunk host, username), created on first use. The password is the
trunk's current one on every dial: when it differs from the account's, the account is
updated in place (pjsua2 ``Account.modify``), so a changed password applies to the next
transfer without a restart and calls already up keep their account.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from callrouter.sip.stack import Credentials

A = TypeVar("A")


def trunk_host(target: str) -> str:
    """``sip:+31201234567@pbx.example:5060;transport=udp`` -> ``pbx.example:5060``."""
    return target.split("@")[-1].split(";")[0]


class TrunkAccounts(Generic[A]):
    def __init__(self, create: Callable[[str, str, str], A],
                 update: Callable[[A, str, str, str], None]) -> None:
        self._create = create  # (host, username, password) -> account
        self._update = update  # (account, host, username, password)
        self._accounts: dict[tuple[str, str], tuple[A, str]] = {}

    def get(self, target: str, credentials: Credentials) -> A:
        username, password = credentials
        key = (trunk_host(target), username)
        known = self._accounts.get(key)
        if known is None:
            account = self._create(*key, password)
        elif known[1] != password:
            account = known[0]
            self._update(account, *key, password)
        else:
            return known[0]
        self._accounts[key] = (account, password)
        return account

    def all(self) -> list[A]:
        return [account for account, _ in self._accounts.values()]
