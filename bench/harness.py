"""Pieces shared by the bench (bench/run.py) and the engine capacity test.

How it works: every system under test is a child process (``Proc``) whose CPU and RSS
are read from /proc; SIPp runs to completion with a hard timeout and its ``-trace_stat``
CSV (call counts) and ``-trace_rtt`` CSV (one response time per call) are parsed into a
``SippResult``. Nothing here leaves loopback; every wait is bounded; only processes
started here are ever signalled, by pid.
"""

from __future__ import annotations

import contextlib
import csv
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SCENARIOS = BENCH / "scenarios"
BARE_ENGINE = BENCH / "bare_engine.py"
LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    pass


# --- the engine module ----------------------------------------------------------------------


def engine_env(python: str = sys.executable) -> dict[str, str]:
    """Environment in which ``python`` imports the router's built pjsua2 module.

    Order: ``CALLROUTER_ENGINE_DIR`` if set (an explicit override, e.g. to run against
    another build), then the interpreter's own site-packages (``import pjsua2`` works
    there), then ``scripts/build-engine.sh --print-dir`` (which builds the engine if it is
    not cached yet).
    """
    env = dict(os.environ)
    engine_dir = os.environ.get("CALLROUTER_ENGINE_DIR")
    if not engine_dir and _imports_pjsua2(python, env):
        return env
    engine_dir = engine_dir or _built_engine_dir()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (engine_dir, env.get("PYTHONPATH")) if p)
    if not _imports_pjsua2(python, env):
        raise BenchError(f"pjsua2 does not import from {engine_dir}")
    return env


def _imports_pjsua2(python: str, env: dict[str, str]) -> bool:
    probe = [python, "-c", "import pjsua2"]
    return subprocess.run(probe, env=env, capture_output=True, timeout=60).returncode == 0


def _built_engine_dir() -> str:
    script = REPO / "scripts" / "build-engine.sh"
    done = subprocess.run(
        [str(script), "--print-dir"], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"build-engine.sh failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


# --- processes --------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process we started; stopped by its pid only."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise BenchError(f"{self.name}: no VmRSS")

    def udp_drops(self) -> int:
        """Datagrams dropped at this process's own UDP sockets (receive buffer full)."""
        inodes = set()
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        drops = 0
        for table in ("/proc/net/udp", "/proc/net/udp6"):
            for row in Path(table).read_text().splitlines()[1:]:
                cols = row.split()
                if cols[9] in inodes:
                    drops += int(cols[-1])
        return drops

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(5)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid``, all its threads (utime + stime of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def udp_port_drops(port: int) -> int:
    """Datagrams dropped at the UDP sockets bound to local ``port`` (any address) in this
    network namespace: for a socket its process never reads, every datagram that arrives
    once its receive queue is full."""
    drops = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port:
                drops += int(cols[-1])
    return drops


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it): a
    router holding N bridged calls keeps 4 N media sockets open. Returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, 1 << 20) if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def spawn(name: str, argv: Sequence[str], workdir: Path, env: dict[str, str]) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=workdir, env=env,
        )  # fmt: skip
    return Proc(name, popen, log)


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


def wait_for_line(proc: Proc, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.log.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line
        if not proc.alive():
            break
        time.sleep(0.05)
    raise BenchError(f"{proc.name} did not print {prefix!r} in {timeout}s:\n{proc.tail()}")


def start_bare_engine(
    workdir: Path, mode: str, rtp_ports: str, max_calls: int, env: dict[str, str]
) -> tuple[Proc, str]:
    """Start bench/bare_engine.py on a free loopback port; returns it and its HOST:PORT."""
    argv = [
        sys.executable, str(BARE_ENGINE), "--listen", f"{LOOPBACK}:0", "--mode", mode,
        "--rtp-ports", rtp_ports, "--max-calls", str(max_calls),
    ]  # fmt: skip
    proc = spawn(f"bare-{mode}", argv, workdir, env)
    ready = wait_for_line(proc, "READY ", timeout=30)
    return proc, ready.split("sip=", 1)[1].split()[0]


# SIPp binds its -mp port and -mp + 2 (video echo). Media ports come from above Linux's
# default ephemeral range (32768-60999), so no port 0 bind (SIP sockets, free_port) takes
# the +2 between choosing and SIPp's bind; a counter keeps this process from reusing one.
_MEDIA_PORTS = iter(range(61000, 65532, 4))


def media_port() -> int:
    """A port P for SIPp's ``-mp`` with P and P + 2 free on loopback (UDP)."""
    for port in _MEDIA_PORTS:
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 2):
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    s.bind((LOOPBACK, p))
            except OSError:
                continue
            return port
    raise BenchError("no free media port pair left in 61000-65535")


_GIVEN_PORTS: set[int] = set()


def free_port(kind: socket.SocketKind = socket.SOCK_DGRAM) -> int:
    """A port free on loopback now and never handed out before by this process: the
    kernel's port-0 pick may repeat one it gave a moment ago (released when the probe
    socket closed), and two SIPps told the same port make one of them exit."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


# --- SIPp -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SippResult:
    successful: int
    failed: int
    retransmissions: int
    call_rate: float  # SIPp's cumulative calls/s over the whole run
    response_ms: list[float] = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def percentile(self, q: float) -> float | None:
        if not self.response_ms:
            return None
        if len(self.response_ms) == 1:
            return self.response_ms[0]
        return statistics.quantiles(self.response_ms, n=1000, method="inclusive")[
            round(q * 1000) - 1
        ]


def sipp_command(
    target: str,
    scenario: Sequence[str],
    *,
    rate: float,
    calls: int,
    limit: int,
    hold_ms: int,
    timeout_s: float,
    media_port: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """A bounded SIPp uac run: ``calls`` calls at ``rate``/s, at most ``limit`` at once."""
    return [
        "sipp", *scenario, target, "-i", LOOPBACK, "-p", "0", "-mp", str(media_port),
        "-r", f"{rate:g}", "-rp", "1000", "-l", str(limit), "-m", str(calls),
        "-d", str(hold_ms), "-timeout", f"{int(timeout_s)}s", "-timeout_error",
        "-recv_timeout", "10000", "-nostdin", "-trace_stat", "-stf", "stat.csv", "-fd", "1",
        "-trace_rtt", "-rtt_freq", "1", "-trace_screen", "-screen_file", "screen.log",
        *extra,
    ]  # fmt: skip


def run_sipp(
    command: Sequence[str], workdir: Path, timeout_s: float, env: dict[str, str] | None = None
) -> SippResult:
    """Run SIPp in ``workdir`` until it stops by itself (bounded: killed after the timeout)."""
    return finish_sipp(start_sipp(command, workdir, env), workdir, timeout_s)


def start_sipp(
    command: Sequence[str], workdir: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("*.csv"):
        old.unlink()
    with (workdir / "sipp.log").open("wb") as log:
        return subprocess.Popen(
            list(command), cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip


def finish_sipp(sipp: subprocess.Popen[bytes], workdir: Path, timeout_s: float) -> SippResult:
    try:
        sipp.wait(timeout_s + 15)
    except subprocess.TimeoutExpired:
        sipp.kill()
        sipp.wait(5)
        raise BenchError(f"SIPp did not stop within {timeout_s + 15}s: {sipp.args!r}") from None
    return _parse_sipp(workdir)


def _parse_sipp(workdir: Path) -> SippResult:
    stats = sorted(p for p in workdir.glob("*.csv") if not p.name.endswith("_rtt.csv"))
    if not stats:
        raise BenchError(f"SIPp wrote no statistics:\n{(workdir / 'sipp.log').read_text()[-2000:]}")
    with stats[-1].open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    last = rows[-1]
    rtt: list[float] = []
    for path in workdir.glob("*_rtt.csv"):
        with path.open(newline="") as f:
            rtt += [float(row["response_time_ms"]) for row in csv.DictReader(f, delimiter=";")]
    return SippResult(
        successful=int(last["SuccessfulCall(C)"]),
        failed=int(last["FailedCall(C)"]),
        retransmissions=int(last["Retransmissions(C)"]),
        call_rate=float(last["CallRate(C)"]),
        response_ms=sorted(rtt),
    )
