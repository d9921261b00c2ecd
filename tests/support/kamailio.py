"""Run deploy/kamailio/kamailio.cfg in front of routers on loopback (tests, bench, make cluster).

``KamailioProcess`` writes the dispatcher list and the provider allow-list into its own
directory, starts ``kamailio -DD -E`` with the config's defines (``-A NAME=VALUE``) as an
operator would, waits until it answers OPTIONS, and stops it by its pid.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.sipp import LOOPBACK, free_sip_port
from tests.support.sipwire import options

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "kamailio" / "kamailio.cfg"
KAMAILIO = "kamailio"


@dataclass
class KamailioProcess:
    workdir: Path
    routers: Sequence[str]  # host:port of each router
    allowed: Sequence[str] = ("127.0.0.0/8",)  # provider networks
    port: int = field(default_factory=free_sip_port)
    ping_interval: int = 1
    branch_timeout_ms: int = 1000
    workers: int = 2
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "kamailio.log"

    def command(self) -> list[str]:
        dispatcher = self.workdir / "dispatcher.list"
        dispatcher.write_text("".join(f"1 sip:{r} 0 0\n" for r in self.routers))
        allowed = self.workdir / "allowed-sources.list"
        lines = []
        for net in self.allowed:
            address, _, prefix = net.partition("/")
            lines.append(f"1 {address} {prefix or 32} 0\n")
        allowed.write_text("".join(lines))
        return [KAMAILIO, "-DD", "-E", "-f", str(CONFIG), "-m", "64", "-M", "8",
                "-Y", str(self.workdir),
                "-A", f"LISTEN=udp:{self.address}",
                "-A", f'DISPATCHER_LIST="{dispatcher}"',
                "-A", f'ALLOWED_SOURCES="{allowed}"',
                "-A", f"PING_INTERVAL={self.ping_interval}",
                "-A", f"BRANCH_TIMEOUT_MS={self.branch_timeout_ms}",
                "-A", f"WORKERS={self.workers}"]

    def start(self, timeout: float = 10.0) -> KamailioProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kamailio exited {self.proc.returncode}:\n{self.logs()}")
            if options(LOOPBACK, self.port, 0.5, to_user=False) is not None:
                return self  # Kamailio answers OPTIONS to itself: 200, or 503 (no router up)
        self.stop()
        raise RuntimeError(f"kamailio did not answer OPTIONS:\n{self.logs()}")

    def wait_probed(self) -> None:
        """One probe interval and a little: every router has answered an OPTIONS probe (a
        router is taken as up until its first probe says otherwise)."""
        time.sleep(self.ping_interval + 0.5)

    def wait_routers_up(self, timeout: float = 10.0) -> None:
        """Until Kamailio's own OPTIONS answer says some router is up (200), and every router
        has been probed."""
        deadline = time.monotonic() + timeout
        self.wait_probed()
        while time.monotonic() < deadline:
            if options(LOOPBACK, self.port, 0.5, to_user=False) == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"no router came up behind kamailio:\n{self.logs()[-3000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # the main process stops its children
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
