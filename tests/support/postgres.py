"""A throw-away PostgreSQL for the tests: one cluster per test session, a fresh database
per test.

The cluster is ``scripts/pg-local.sh`` (the same script ``make cluster`` uses) in a new
directory under /tmp, on a free loopback port; it is stopped and removed when the
session ends. Tests that need PostgreSQL take ``postgres_url`` (a new empty database)
or ``postgres_cluster`` (to make databases, or stop and start the server). Without
Debian's ``postgresql`` package (``make test`` installs it) they are skipped, saying so.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "pg-local.sh"


def postgres_installed() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))


@dataclass
class PostgresCluster:
    directory: Path
    url: str  # the maintenance database (postgres)

    def base(self) -> str:
        return self.url.rsplit("/", 1)[0]

    def sql(self, statement: str, database: str = "postgres") -> str:
        done = subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-qAtc", statement,
                               f"{self.base()}/{database}"],
                              capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql {statement!r}: {done.stderr.strip()}")
        return done.stdout.strip()

    def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.sql(f"CREATE DATABASE {name}")
        return f"{self.base()}/{name}"

    def drop_database(self, url: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def stop(self) -> None:
        subprocess.run([str(SCRIPT), "stop", str(self.directory)], check=True, timeout=90)

    def start(self) -> None:
        """Start again on the same port (after ``stop``): the URLs stay valid."""
        subprocess.run([str(SCRIPT), "start", str(self.directory)], check=True, timeout=90,
                       stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    if not postgres_installed():
        pytest.skip("needs PostgreSQL (Debian's postgresql package; `make test` installs it)")
    directory = Path(tempfile.mkdtemp(prefix="callrouter-pg-"))
    try:
        started = subprocess.run([str(SCRIPT), "start", str(directory)], capture_output=True,
                                 text=True, timeout=120, check=False)
        if started.returncode != 0:
            raise RuntimeError(f"pg-local.sh start failed: {started.stderr.strip()}")
        cluster = PostgresCluster(directory, started.stdout.strip().splitlines()[-1])
        yield cluster
        cluster.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    url = postgres_cluster.new_database()
    yield url
    postgres_cluster.drop_database(url)
