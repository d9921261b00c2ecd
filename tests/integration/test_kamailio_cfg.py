"""deploy/kamailio/kamailio.cfg against stub routers: which answers fail over, which reach the
caller, the allow-list and the no-router answer. (The real routers: test_cluster.py.)"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support import torture
from tests.support.kamailio import KamailioProcess
from tests.support.sipp import Sipp, SippResult, free_udp_port, scenario

pytestmark = [pytest.mark.skipif(shutil.which("kamailio") is None,
                                 reason="needs kamailio (make deps installs it)"),
              pytest.mark.skipif(shutil.which("sipp") is None, reason="needs SIPp")]

KEYS = {"dialled": "+31850835037", "caller": "+31201234567"}


def invites(stub: torture.StubServer) -> int:
    return sum(1 for m in stub.received if m.startswith(b"INVITE "))


@pytest.fixture
def stubs(request: pytest.FixtureRequest) -> Iterator[list[torture.StubServer]]:
    with ExitStack() as stack:
        yield [stack.enter_context(torture.StubServer(**kw)) for kw in request.param]


def edge(tmp_path: Path, stubs: list[torture.StubServer], **kw: object) -> KamailioProcess:
    routers = [f"127.0.0.1:{s.port}" for s in stubs]
    return KamailioProcess(tmp_path / "kamailio", routers, **kw).start()  # type: ignore[arg-type]


def run(k: KamailioProcess, name: str, calls: int = 4, **kw: object) -> SippResult:
    return Sipp(scenario(name), target=k.address, keys=KEYS, calls=calls, rate=10,
                **kw).run()  # type: ignore[arg-type]


@pytest.mark.parametrize("stubs", [[{"invite_status": 404}, {"invite_status": 404}]],
                         indirect=True)
def test_calls_spread_and_answers_pass_through(tmp_path: Path,
                                               stubs: list[torture.StubServer]) -> None:
    k = edge(tmp_path, stubs)
    try:
        k.wait_routers_up()
        result = run(k, "uac-invite-404")
        assert result.ok and result.successful == 4, result.explain()
        assert [invites(s) for s in stubs] == [2, 2]
        probe = run(k, "uac-options", calls=1)  # to a number: a router answers it
        assert probe.ok, probe.explain()
    finally:
        k.stop()


@pytest.mark.parametrize(("stubs", "reached_caller"), [
    # No room on the first router: never seen by the caller while the other has room.
    ([{"invite_status": 503, "invite_reason": "Draining"}, {"invite_status": 404}], 0),
    ([{"invite_status": 503, "invite_reason": "Over Capacity"}, {"invite_status": 404}], 0),
    # Any other 503 (the runtimes failed) reaches the caller as a 503, not remapped to 500.
    ([{"invite_status": 503, "invite_reason": "Service Unavailable"}, {"invite_status": 404}],
     2),
], indirect=["stubs"])
def test_only_a_no_room_503_fails_over(tmp_path: Path, stubs: list[torture.StubServer],
                                       reached_caller: int) -> None:
    k = edge(tmp_path, stubs)
    try:
        k.wait_routers_up()
        result = run(k, "uac-invite-404")
        codes = [c for c in result.sequence("received") if isinstance(c, int) and c >= 300]
        assert codes.count(503) == reached_caller, result.explain()
        assert codes.count(404) == 4 - reached_caller, result.explain()
    finally:
        k.stop()


@pytest.mark.parametrize("stubs", [[{"invite_status": 404}]], indirect=True)
def test_a_silent_router_is_skipped_after_the_branch_timeout(
        tmp_path: Path, stubs: list[torture.StubServer]) -> None:
    # The second "router" is a port nobody listens on: a crashed router.
    dead = f"127.0.0.1:{free_udp_port()}"
    k = KamailioProcess(tmp_path / "kamailio", [f"127.0.0.1:{stubs[0].port}", dead],
                        ping_interval=30).start()  # no probe marks it down before the calls
    try:
        result = run(k, "uac-invite-404", timeout_s=15)
        assert result.ok and result.successful == 4, result.explain()  # none lost
        assert invites(stubs[0]) == 4
        assert "408 Request Timeout, trying the next" in k.logs()
    finally:
        k.stop()


@pytest.mark.parametrize("stubs", [[{"invite_status": 404}]], indirect=True)
def test_sources_off_the_allow_list_are_dropped(tmp_path: Path,
                                                stubs: list[torture.StubServer]) -> None:
    k = KamailioProcess(tmp_path / "kamailio", [f"127.0.0.1:{stubs[0].port}"],
                        allowed=("127.0.0.1/32",)).start()
    try:
        k.wait_routers_up()
        outsider = run(k, "uac-invite-404", calls=1, timeout_s=3, host="127.0.0.2")
        assert not outsider.ok and outsider.sequence("received") == [], outsider.explain()
        assert invites(stubs[0]) == 0
    finally:
        k.stop()


@pytest.mark.parametrize("stubs", [[{"invite_status": 404, "options_status": 503}]],
                         indirect=True)
def test_no_router_up_gets_503_with_retry_after(tmp_path: Path,
                                                stubs: list[torture.StubServer]) -> None:
    k = edge(tmp_path, stubs)  # the only router answers its probes 503: draining
    try:
        k.wait_probed()
        result = run(k, "uac-invite-503", calls=1)
        assert result.ok, result.explain()  # 503 with Retry-After, from Kamailio itself
        assert invites(stubs[0]) == 0
    finally:
        k.stop()
