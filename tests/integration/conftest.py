"""Fixtures for tests that run the real router (``python -m callrouter serve``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.router import RouterProcess
from tests.support.sipp import stop_all


def _engine_built() -> bool:
    try:
        from callrouter.sip.info import read_engine_info

        read_engine_info()
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `make test` always builds the engine and installs SIPp first; running pytest by hand
    # without them must say why, not fail obscurely.
    missing = [what for what, ok in (("sipp", shutil.which("sipp")), ("engine", _engine_built()))
               if not ok]
    if missing:
        skip = pytest.mark.skip(reason=f"needs {' and '.join(missing)} (run `make test`)")
        for item in items:
            if "sip" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def router_factory(tmp_path: Path) -> Iterator[type[RouterProcess]]:
    started: list[RouterProcess] = []

    def start(sip_host: str = "127.0.0.1", **env: str) -> RouterProcess:
        router = RouterProcess(tmp_path / f"router{len(started)}", env_extra=env,
                               sip_host=sip_host)
        started.append(router)
        return router.start()

    yield start  # type: ignore[misc]
    for router in started:
        router.stop()


@pytest.fixture
def router(router_factory: type[RouterProcess]) -> RouterProcess:
    return router_factory(CALLROUTER_SIP_RING_TIMEOUT_SECONDS="3")  # type: ignore[call-arg]


@pytest.fixture(params=["relay", "switchboard"])
def media_path(request: pytest.FixtureRequest) -> str:
    """Both media paths (issue 13): same-codec legs relayed packet by packet in the
    engine (sip.media_relay, the default), or joined on the audio switchboard. Every test
    that carries media takes it, with ``media_env`` in its router's environment."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _stop_sipp_peers() -> Iterator[None]:
    yield
    stop_all()
