"""Which networks a trunk's calls may come from: the pure part of the trunk allow-list.

A trunk's ``inbound_addresses`` are IP addresses, CIDRs or host names. ``canonical``
checks and spells one entry as it is stored. ``trunk_networks`` turns the active trunks
into the ``TrunkNetwork`` entries the engine's guard module matches INVITEs against
(in addition to the static ``sip.inbound.allowed_sources``): IPs and CIDRs as they are,
host names through ``resolved`` (what the service's resolver last found for them), and
for a registration trunk the registrar's resolved addresses too, since a provider
delivers calls to a registration from its registrar. The guard answers "which trunk"
for every allowed INVITE; the service puts that trunk on the call record.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from callrouter.domain.models import Trunk

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


@dataclass(frozen=True, order=True)
class TrunkNetwork:
    """One network the guard allows for ``trunk_id``: ``address``/``prefix``."""

    address: str
    prefix: int
    trunk_id: uuid.UUID


def canonical(entry: object) -> str:
    """An IP (``192.0.2.7``, ``2001:db8::1``), a CIDR (host bits cleared:
    ``192.0.2.0/24``) or a host name (lower case); ``ValueError`` naming the entry else."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"{entry!r} is not an IP address, CIDR or host name")
    text = entry.strip()
    try:
        if "/" in text:
            return str(ipaddress.ip_network(text, strict=False))
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    if "/" in text or ":" in text or not _HOSTNAME.fullmatch(text) or text.replace(
            ".", "").isdigit():
        raise ValueError(f"{text!r} is not an IP address, CIDR or host name")
    return text.lower().rstrip(".")


def is_host_name(entry: str) -> bool:
    """Whether a canonical entry needs resolving (it is neither an IP nor a CIDR)."""
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return True
    return False


def names_to_resolve(trunks: Iterable[Trunk]) -> set[str]:
    """The host names the active trunks' allow-lists depend on."""
    names: set[str] = set()
    for trunk in trunks:
        if not trunk.is_active:
            continue
        names.update(e for e in trunk.inbound_addresses if is_host_name(e))
        if trunk.register and trunk.host and is_host_name(trunk.host):
            names.add(trunk.host.lower())
    return names


def trunk_networks(trunks: Iterable[Trunk],
                   resolved: Mapping[str, tuple[str, ...]]) -> tuple[TrunkNetwork, ...]:
    """The guard's trunk allow-list: every active trunk's networks, sorted."""
    found: set[TrunkNetwork] = set()
    for trunk in trunks:
        if not trunk.is_active:
            continue
        entries = list(trunk.inbound_addresses)
        if trunk.register and trunk.host:
            entries.append(trunk.host.lower())
        for entry in entries:
            addresses = resolved.get(entry, ()) if is_host_name(entry) else (entry,)
            for address in addresses:
                net = ipaddress.ip_network(address, strict=False)
                found.add(TrunkNetwork(str(net.network_address), net.prefixlen, trunk.id))
    return tuple(sorted(found))
