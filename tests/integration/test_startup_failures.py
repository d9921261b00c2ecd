"""Every start-up failure ends the process: non-zero within 5 s, one line on stderr.

Guards issue 9's first item. The router used to print ``the SIP engine failed to start: ``
with an empty reason and hang when the SIP port was taken, and to log uvicorn's bind error
and hang (while the SIP side kept taking INVITEs that stuck at 100 Trying) when the HTTP
port was taken: whatever it had opened (the SQLite thread, the SIP thread) kept the process
alive. Each case here starts ``python -m callrouter serve`` with one thing wrong and
requires it to exit within ``LIMIT_S`` with exactly one stderr line naming the cause and
the address or path.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.postgres import PostgresCluster
from tests.support.router import RouterProcess
from tests.support.sipp import LOOPBACK, free_port

pytestmark = pytest.mark.sip

LIMIT_S = 5.0
NOT_HERE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never an address of this host


@dataclass
class Failure:
    stderr: list[str]
    stdout: str


def fail_to_start(router: RouterProcess, **env: str) -> Failure:
    """Run the router to its exit (killed by pid if it outlives ``LIMIT_S``)."""
    try:
        done = subprocess.run([sys.executable, "-m", "callrouter", "serve"],
                              env=router.env() | env, capture_output=True, timeout=LIMIT_S)
    except subprocess.TimeoutExpired as hung:
        raise AssertionError(f"still running after {LIMIT_S} s; stderr: {hung.stderr!r}") from None
    assert done.returncode != 0
    return Failure(done.stderr.decode().splitlines(), done.stdout.decode())


@contextmanager
def taken(host: str, port: int, kind: int) -> Iterator[None]:
    """Hold ``host:port`` (UDP or a TCP listener) for the length of the block."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        yield


def one_line(failure: Failure, expected: str) -> None:
    assert failure.stderr == [f"callrouter: {expected}"], failure.stdout[-3000:]


@pytest.fixture
def router(tmp_path: Path) -> RouterProcess:
    return RouterProcess(tmp_path / "data")


@pytest.mark.parametrize(("kind", "transport"), [(socket.SOCK_DGRAM, "udp"),
                                                 (socket.SOCK_STREAM, "tcp")])
def test_sip_address_in_use(router: RouterProcess, kind: int, transport: str) -> None:
    with taken(LOOPBACK, router.sip_port, kind):
        failure = fail_to_start(router)
    one_line(failure, f"cannot listen for SIP on {router.sip_address}/{transport}: "
                      "address already in use")


def test_sip_address_not_on_this_host(router: RouterProcess) -> None:
    failure = fail_to_start(router, CALLROUTER_SIP_LISTEN=f"{NOT_HERE}:{router.sip_port}")
    one_line(failure, f"cannot listen for SIP on {NOT_HERE}:{router.sip_port}/udp: "
                      "cannot assign requested address")


def test_http_address_in_use_fails_before_the_sip_engine_starts(router: RouterProcess) -> None:
    """The HTTP socket is bound before the SIP engine starts, so a taken HTTP port never
    leaves a SIP side taking INVITEs it cannot finish (they hung at 100 Trying)."""
    with taken(LOOPBACK, router.http_port, socket.SOCK_STREAM):
        failure = fail_to_start(router, CALLROUTER_LOG_LEVEL="debug")
    one_line(failure, f"cannot listen for HTTP on {LOOPBACK}:{router.http_port}/tcp: "
                      "address already in use")
    assert '"engine.log"' not in failure.stdout  # pjsip never logged: the engine never ran


def test_http_address_not_on_this_host(router: RouterProcess) -> None:
    failure = fail_to_start(router, CALLROUTER_HTTP_LISTEN=f"{NOT_HERE}:{router.http_port}")
    one_line(failure, f"cannot listen for HTTP on {NOT_HERE}:{router.http_port}/tcp: "
                      "cannot assign requested address")


def test_data_directory_that_cannot_be_written(router: RouterProcess, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    data_dir = tmp_path / "a-file" / "data"  # as root, permissions would not stop a write
    failure = fail_to_start(router, CALLROUTER_DATA_DIR=str(data_dir))
    one_line(failure, f"cannot write to the data directory {data_dir}: not a directory")


def _directory(path: Path) -> None:
    path.mkdir(parents=True)


def _garbage(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a database at all\0" * 300)


@pytest.mark.parametrize(("make", "reason"), [(_directory, "unable to open database file"),
                                              (_garbage, "file is not a database")])
def test_database_that_cannot_be_opened(router: RouterProcess, make: Callable[[Path], None],
                                        reason: str) -> None:
    database = router.data_dir / "callrouter.db"
    make(database)
    failure = fail_to_start(router)
    one_line(failure, f"cannot open the database {database}: {reason}")


def test_postgresql_that_cannot_be_reached(router: RouterProcess) -> None:
    port = free_port(socket.SOCK_STREAM)
    url = f"postgresql://router:secret@{LOOPBACK}:{port}/callrouter"
    failure = fail_to_start(router, CALLROUTER_DATABASE_URL=url)
    one_line(failure, f"cannot reach the database postgresql://router@{LOOPBACK}:{port}"
                      "/callrouter: connection refused")


def test_postgresql_database_that_does_not_exist(router: RouterProcess,
                                                 postgres_cluster: PostgresCluster) -> None:
    url = postgres_cluster.base() + "/no_such_database"
    failure = fail_to_start(router, CALLROUTER_DATABASE_URL=url)
    one_line(failure, f"cannot open the database {url}: database \"no_such_database\" "
                      "does not exist")


def _stub_engine(directory: Path, *, with_info: bool) -> Path:
    """A ``pjsua2`` module that fails to import, as when its shared library is missing."""
    directory.mkdir()
    stub = directory / "pjsua2.py"
    stub.write_text('raise ImportError("libpjsua2.so: cannot open shared object file")\n')
    spec = importlib.util.find_spec("pjsua2")
    assert spec is not None and spec.origin is not None
    if with_info:
        shutil.copy(Path(spec.origin).with_name("pjsua2-ENGINE-INFO"), directory)
    return stub


def test_engine_that_cannot_be_loaded(router: RouterProcess, tmp_path: Path) -> None:
    stub = _stub_engine(tmp_path / "engine", with_info=True)
    failure = fail_to_start(router, PYTHONPATH=str(stub.parent))
    one_line(failure, f"cannot load the SIP engine {stub}: "
                      "libpjsua2.so: cannot open shared object file")


def test_engine_that_is_not_the_router_build(router: RouterProcess, tmp_path: Path) -> None:
    stub = _stub_engine(tmp_path / "engine", with_info=False)
    failure = fail_to_start(router, PYTHONPATH=str(stub.parent))
    assert len(failure.stderr) == 1 and str(stub) in failure.stderr[0]

