"""RFC 4475 / RFC 5118 torture messages against the real router.

Every message gets its RFC-expected answer or is dropped, and the router still
answers a valid OPTIONS right after each one (``tests/support/torture.py`` has the
acceptance rule; ``scripts/sip-torture.py`` runs the same against any deployment).
At the end no call slot may be leaked.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support import torture
from tests.support.router import RouterProcess

pytestmark = pytest.mark.sip


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_torture_corpus(router: RouterProcess, transport: str) -> None:
    # The corpus dials users such as "vivekg": a valid INVITE reaches the routing decision
    # and gets its application-level answer (404), as it would in production.
    outcomes = torture.replay("127.0.0.1", router.sip_port, transport, wait_s=0.4)
    failures = [o for o in outcomes if not torture.judge(o).passed]
    assert not failures, torture.format_table(failures)
    assert len(outcomes) >= 60
    deadline = time.monotonic() + 40  # Timer H/J of the last transactions
    while time.monotonic() < deadline:
        sip = httpx.get(f"{router.http_url}/api/v1/health", timeout=2).json()["checks"]["sip"]
        if sip["engine_calls_in_use"] == 0 and sip["active_calls"] == 0:
            break
        time.sleep(0.5)
    assert sip["engine_calls_in_use"] == 0, "a torture message leaked an engine call slot"
