"""`make bench` (cluster part): one router alone against Kamailio + two routers, on this box.

How it works: the same rate sweeps as bench/run.py (each step on a freshly started
system, SIPp on loopback, the highest rate with zero failed calls and p99 under 1 s):

- ``router``: one router, as in bench/run.py;
- ``cluster``: deploy/kamailio/kamailio.cfg in front of two routers (each with its own
  SQLite store, provisioned identically), SIPp sending to Kamailio.

The bridged path uses bench/scenarios/uac_rr.xml (SIPp's uac following the Record-Route)
for both systems, so its figures differ slightly from bench/run.py's (`-sn uac`).
CPU per call is that of every process of the system under test (Kamailio's workers
included). On one machine both routers and Kamailio share the same cores, so the cluster
cannot be faster than the router alone once the cores are busy: what it shows is the
balancer's own cost per call, and (docs/benchmarks.md) where the ceiling would move with a
second machine. Writes the "Cluster" section of docs/benchmarks.md (``--output``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import harness as h
import run as r

KAMAILIO_CFG = h.REPO / "deploy" / "kamailio" / "kamailio.cfg"
CLUSTER_RTP = ("30000-34999", "35000-39999")
REJECT_RATES = (250, 500, 750, 1000, 1500, 2000)
BRIDGED_RATES = (50, 100, 200, 300, 400)
QUICK_REJECT, QUICK_BRIDGED = (250, 500), (50, 100)
# SIPp's uac, following the Record-Route (its built-in one sends ACK and BYE past a proxy).
BRIDGED_SCENARIO = ("-sf", str(h.SCENARIOS / "uac_rr.xml"))
# Every cluster system started, in order (one per rate step): its CPU split.
GROUPS: list[tuple[str, Group]] = []
SECTION_START = "<!-- cluster: written by bench/cluster.py -->"
SECTION_END = "<!-- /cluster -->"


@dataclass
class Group:
    """The processes of one system under test, measured together (duck-types ``h.Proc``).
    Every reading is kept per process, so a step's CPU splits into Kamailio's and the
    routers' (``kamailio_share``)."""

    procs: list[h.Proc]
    readings: list[list[float]] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        reading = []
        for proc in self.procs:
            total = 0.0
            for pid in [proc.pid, *_children(proc.pid)]:
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / h.CLK_TCK
            reading.append(total)
        self.readings.append(reading)
        return sum(reading)

    def kamailio_share(self) -> float | None:
        """Kamailio's part of the CPU between the first and the last reading."""
        if len(self.readings) < 2:
            return None
        deltas = [b - a for a, b in zip(self.readings[0], self.readings[-1], strict=True)]
        return deltas[0] / sum(deltas) if sum(deltas) > 0 else None

    def alive(self) -> bool:
        return all(p.alive() for p in self.procs)

    def tail(self) -> str:
        return "\n".join(p.tail(1500) for p in self.procs)


def _children(pid: int) -> list[int]:
    """Kamailio forks its workers: every direct child of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def start_kamailio(workdir: Path, port: int, routers: Sequence[str]) -> h.Proc:
    dispatcher = workdir / "dispatcher.list"
    dispatcher.write_text("".join(f"1 sip:{a} 0 0\n" for a in routers))
    allowed = workdir / "allowed-sources.list"
    allowed.write_text("1 127.0.0.0 8 0\n")
    argv = ["kamailio", "-DD", "-E", "-f", str(KAMAILIO_CFG), "-m", "256", "-M", "16",
            "-Y", str(workdir), "-A", f"LISTEN=udp:{h.LOOPBACK}:{port}",
            "-A", f'DISPATCHER_LIST="{dispatcher}"', "-A", f'ALLOWED_SOURCES="{allowed}"',
            "-A", "PING_INTERVAL=1", "-A", "WORKERS=4",
            # One SIPp source is the whole load here: the flood limit must not count it.
            "-A", "PIKE_REQS=1000000"]  # fmt: skip
    proc = h.spawn("kamailio", argv, workdir, dict(os.environ))
    time.sleep(2.5)  # the first OPTIONS probes (every second) have found both routers
    if not proc.alive():
        raise h.BenchError(f"kamailio exited:\n{proc.tail()}")
    return proc


@contextlib.contextmanager
def cluster_system(path: str, workdir: Path) -> Iterator[r.Target]:
    runtime_port = h.free_port()
    with contextlib.ExitStack() as stack:
        runtime = stack.enter_context(h.running(r.start_runtime(workdir, runtime_port)))
        routers: list[h.Proc] = []
        addresses = []
        for name, rtp in zip(("a", "b"), CLUSTER_RTP, strict=True):
            data_dir = workdir / f"data-{name}"
            data_dir.mkdir(parents=True, exist_ok=True)
            sip_port, http_port = h.free_port(), h.free_port(socket.SOCK_STREAM)
            key = r.create_api_key(data_dir)
            router = stack.enter_context(h.running(
                r.start_router(workdir / f"router-{name}", sip_port, http_port, rtp, data_dir)))
            r.provision_router(f"http://{h.LOOPBACK}:{http_port}", key, runtime_port)
            routers.append(router)
            addresses.append(f"{h.LOOPBACK}:{sip_port}")
        port = h.free_port()
        kamailio = stack.enter_context(h.running(start_kamailio(workdir, port, addresses)))
        assert runtime.alive(), runtime.tail()
        service = r.UNKNOWN_NUMBER if path == "reject" else r.BRIDGED_NUMBER
        group = Group([kamailio, *routers])
        GROUPS.append((path, group))
        yield r.Target(group, f"{h.LOOPBACK}:{port}", service, legs=2)  # type: ignore[arg-type]


def sweep_all(plan: r.Plan, workdir: Path) -> dict[str, dict[str, r.RateSweep]]:
    out: dict[str, dict[str, r.RateSweep]] = {}
    for name, start in (("router", r.router_system), ("cluster", cluster_system)):
        print(f"{name}:", flush=True)
        out[name] = {
            "reject": r.rate_sweep(start, "reject", plan.reject_rates, plan, workdir / name),
            "bridged": r.rate_sweep(start, "bridged", plan.bridged_rates, plan, workdir / name,
                                    bridged_scenario=BRIDGED_SCENARIO),
        }
    return out


def render(results: dict[str, dict[str, r.RateSweep]], plan: r.Plan, seconds: float) -> str:
    lines = [SECTION_START, "## Cluster: Kamailio + two routers against one router",
             "", f"Generated by `make bench` (`bench/cluster.py`) in {seconds:.0f} s on the "
             f"machine above; {plan.step_seconds} s per step, bridged calls held "
             f"{plan.bridged_hold_ms} ms (bench/scenarios/uac_rr.xml: SIPp's uac following "
             "the Record-Route, for both systems). `cluster` is deploy/kamailio/kamailio.cfg "
             "in front of two routers on the same box (SIPp -> Kamailio -> router -> runtime); "
             "CPU per call counts every process of the system (Kamailio's workers too).", "",
             "| system | path | highest rate, 0 failed, p99 < 1 s | p50 | p99 | CPU per call |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, sweeps in results.items():
        for path, sweep in sweeps.items():
            best = sweep.best
            if best is None:
                lines.append(f"| {name} | {path} | none of {[s.rate for s in sweep.steps]} | | | |")
                continue
            lines.append(f"| {name} | {path} | {best.rate}/s | {r._ms(best.p50_ms)} | "
                         f"{r._ms(best.p99_ms)} | {r._cpu(best.cpu_ms_per_call)} |")
    lines += ["", "Every step (Kamailio's share: its part of the cluster's CPU in that step):",
              "", "| system | path | calls/s | ok | failed | p50 | p99 | CPU per call | "
              "Kamailio's share |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    shares = {path: [g.kamailio_share() for p, g in GROUPS if p == path]
              for path in ("reject", "bridged")}  # fmt: skip
    for name, sweeps in results.items():
        for path, sweep in sweeps.items():
            for i, s in enumerate(sweep.steps):
                share = shares[path][i] if name == "cluster" and i < len(shares[path]) else None
                lines.append(f"| {name} | {path} | {s.rate} | {s.successful} | {s.failed} | "
                             f"{r._ms(s.p50_ms)} | {r._ms(s.p99_ms)} | "
                             f"{r._cpu(s.cpu_ms_per_call)} | "
                             f"{'' if share is None else f'{share:.0%}'} |")
    lines += ["", SECTION_END]
    return "\n".join(lines) + "\n"


def write_section(output: Path, section: str) -> None:
    """Replace the cluster section of ``output``, or append it. It lives below bench/run.py's
    KEEP_MARKER, in the part run.py carries over, so neither bench erases the other."""
    text = output.read_text() if output.exists() else ""
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        text = head + section.rstrip("\n") + rest.split(SECTION_END, 1)[1]
    else:
        if r.KEEP_MARKER not in text:
            text = text.rstrip("\n") + ("\n\n" if text else "") + r.KEEP_MARKER + "\n"
        text = text.rstrip("\n") + "\n\n" + section
    output.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two steps per path")
    parser.add_argument("--output", help="report (default docs/benchmarks.md; --quick: "
                        "bench/out/cluster-quick.md)")
    parser.add_argument("--keep", help="keep logs and SIPp files in this directory")
    args = parser.parse_args(argv)
    if subprocess.run(["sh", "-c", "command -v kamailio"], capture_output=True).returncode:
        print("bench/cluster.py: kamailio is not installed (make deps)", file=sys.stderr)
        return 1
    r.enter_private_netns([os.path.abspath(__file__), *(argv or sys.argv[1:])])
    if os.environ.get(r.NETNS_FLAG) == "1":
        r.loopback_up()
    base = r.QUICK if args.quick else r.FULL
    plan = r.Plan(QUICK_REJECT if args.quick else REJECT_RATES,
                  QUICK_BRIDGED if args.quick else BRIDGED_RATES, (), base.step_seconds,
                  base.bridged_hold_ms, base.ramp_rate, base.window_seconds)
    started = time.monotonic()
    h.engine_env()
    with tempfile.TemporaryDirectory(prefix="callrouter-bench-cluster-") as tmp:
        results = sweep_all(plan, Path(args.keep) if args.keep else Path(tmp))
    section = render(results, plan, time.monotonic() - started)
    print(section)
    output = Path(args.output or h.REPO / ("bench/out/cluster-quick.md" if args.quick
                                           else "docs/benchmarks.md"))  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    write_section(output, section)
    print(f"written: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
