"""`python bench/flood.py`: the router under a flood of INVITEs, and its memory after.

How it works: starts the router (``python -m callrouter serve``, configured as
tests/support/router.py does) on free loopback ports with a fresh data directory and
per-source flood control off (``--flood-limit 0``, the default here: one SIPp source is
the flood being measured), reads its VmRSS from /proc, sends ``--invites`` INVITEs to a
number nobody registered at ``--rate`` per second from one SIPp
(bench/scenarios/reject_uac.xml: each must be answered 404), reads VmRSS right after and
again after ``--idle`` seconds of quiet, for each of ``--rounds`` floods. Then it stops
the router (by pid) and counts the call records written: rows, and the database's size
with its WAL. Everything stays on 127.0.0.1; SIPp is bounded by ``-m`` and a timeout.
See docs/benchmarks.md, "Memory after a flood".
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import harness as h

UNKNOWN_NUMBER = "+14155550199"  # never registered: every INVITE is answered 404
MB = 1024 * 1024


@dataclass(frozen=True)
class Round:
    sent: int
    answered: int  # SIPp calls that got their 404
    failed: int
    seconds: float
    rss_before: int
    rss_after: int
    rss_idle: int


@dataclass(frozen=True)
class Router:
    proc: h.Proc
    sip: str
    http: str
    data_dir: Path


@contextlib.contextmanager
def router(workdir: Path, flood_limit: int, log_level: str,
           extra: dict[str, str]) -> Iterator[Router]:
    data_dir = workdir / "data"
    sip_port, http_port = h.free_port(), h.free_port(socket.SOCK_STREAM)
    env = h.engine_env() | {
        "CALLROUTER_SIP_LISTEN": f"{h.LOOPBACK}:{sip_port}",
        "CALLROUTER_SIP_ADVERTISE": h.LOOPBACK,
        "CALLROUTER_RTP_PORTS": "30000-31999",
        "CALLROUTER_HTTP_LISTEN": f"{h.LOOPBACK}:{http_port}",
        "CALLROUTER_DATA_DIR": str(data_dir),
        "CALLROUTER_LOG_FORMAT": "json",
        "CALLROUTER_LOG_LEVEL": log_level,
        "CALLROUTER_SIP_MAX_CALLS": "50",
        "CALLROUTER_SIP_INBOUND_FLOOD_LIMIT": str(flood_limit),
    } | extra
    proc = h.spawn("router", [sys.executable, "-m", "callrouter", "serve"], workdir, env)
    with h.running(proc):
        base = f"http://{h.LOOPBACK}:{http_port}"
        _wait_healthy(proc, base)
        yield Router(proc, f"{h.LOOPBACK}:{sip_port}", base, data_dir)


def _wait_healthy(proc: h.Proc, base: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.alive():
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(base + "/api/v1/health", timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise h.BenchError(f"the router did not become healthy:\n{proc.tail()}")


def flood(target: Router, invites: int, rate: int, idle: float, workdir: Path) -> Round:
    scenario = ["-sf", str(h.SCENARIOS / "reject_uac.xml"), "-s", UNKNOWN_NUMBER]
    timeout = invites / rate + 30
    command = h.sipp_command(target.sip, scenario, rate=rate, calls=invites,
                             limit=rate * 4 + 100, hold_ms=0, timeout_s=timeout,
                             media_port=h.free_port())
    before = target.proc.rss_bytes()
    started = time.monotonic()
    result = h.run_sipp(command, workdir, timeout)
    seconds = time.monotonic() - started
    after = target.proc.rss_bytes()
    time.sleep(idle)
    return Round(invites, result.successful, result.failed, seconds, before, after,
                 target.proc.rss_bytes())


def metric(base: str, series: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    return 0.0


def records(data_dir: Path) -> tuple[int, int]:
    """(call records, bytes of the database with its WAL), read after the router stopped."""
    database = data_dir / "callrouter.db"
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = int(db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
    size = sum(p.stat().st_size for p in data_dir.glob("callrouter.db*"))
    return rows, size


def report(rounds: Sequence[Round], counted: float, rows: int, size: int) -> str:
    lines = ["| flood | INVITEs | answered 404 | failed | s | RSS before | right after "
             "| after idle |", "|---|---|---|---|---|---|---|---|"]
    for n, r in enumerate(rounds, 1):
        lines.append(f"| {n} | {r.sent} | {r.answered} | {r.failed} | {r.seconds:.1f} "
                     f"| {r.rss_before / MB:.0f} MB | {r.rss_after / MB:.0f} MB "
                     f"| {r.rss_idle / MB:.0f} MB |")
    lines.append(f"\nINVITEs the router counted: {counted:.0f}; call records written: "
                 f"{rows} ({size / MB:.2f} MB with the WAL)")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--invites", type=int, default=10_000, help="INVITEs per flood")
    parser.add_argument("--rate", type=int, default=1700, help="INVITEs per second")
    parser.add_argument("--idle", type=float, default=60.0,
                        help="seconds of quiet before the last RSS reading")
    parser.add_argument("--rounds", type=int, default=1, help="floods, one after another")
    parser.add_argument("--flood-limit", type=int, default=0,
                        help="sip.inbound.flood_limit for the router (0: off)")
    parser.add_argument("--log-level", default="info", help="the router's log.level")
    parser.add_argument("--set", action="append", default=[], metavar="VAR=VALUE",
                        help="another environment variable for the router, e.g. "
                             "CALLROUTER_CALLS_REJECTED_RECORDS_PER_SECOND=100000")
    parser.add_argument("--keep", help="keep the router's data, log and SIPp files here")
    args = parser.parse_args(argv)
    if args.invites <= 0 or args.rate <= 0 or args.rounds <= 0 or args.idle < 0:
        parser.error("--invites, --rate and --rounds must be positive, --idle >= 0")
    if any("=" not in item or not item.startswith("CALLROUTER_") for item in args.set):
        parser.error("--set takes CALLROUTER_NAME=VALUE")
    args.extra = dict(item.split("=", 1) for item in args.set)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="callrouter-flood-"))
    try:
        with router(workdir, args.flood_limit, args.log_level, args.extra) as target:
            rounds = [flood(target, args.invites, args.rate, args.idle, workdir / f"sipp-{n}")
                      for n in range(args.rounds)]
            counted = metric(target.http, "callrouter_sip_invites_received_total")
        print(report(rounds, counted, *records(target.data_dir)), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
