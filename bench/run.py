"""`make bench`: the router against the bare engine, driven by SIPp on loopback.

How it works: each measurement starts a fresh system under test (bench/bare_engine.py, or
the router via ``start_router``), drives it with SIPp and stops it, by pid:

1. reject path: INVITEs to an unknown number (bare engine: ``--mode reject``) at stepped
   rates; the highest rate with zero failed calls, and p50/p99 INVITE -> 404 at that rate;
2. bridged path: short answered calls at stepped rates; the highest rate with zero failures
   (router: each call bridged to a SIPp runtime answering with ``-rtp_echo``);
3. held calls: N calls held with G.711 both ways (bench/scenarios/uac_rtp.xml), N stepped
   up to 2,000 until a step fails. The load is spread so that no SIPp is the limit: one
   caller SIPp per HELD_CALLS_PER_SIPP calls, each with its own media port, and for the
   router as many runtime SIPps (``-rtp_echo``), each the runtime of its own assistant and
   number. Measured over a window once every call is up: CPU and RSS per call of the system
   under test (/proc/<pid>/stat, VmRSS), the generators' CPU (every SIPp process), and the
   echoed audio arriving back at the callers: SIPp 3.6's rtp_stream never reads its media
   socket, so once that socket's queue is full every arriving datagram is a drop counted
   on it (/proc/net/udp, per media port, in the private network namespace the bench
   re-executes itself in with ``unshare -rn``) against the expected 50 packets/s per call;
4. ratios router / bare.

Prints a table and writes docs/benchmarks.md (``--quick``: bench/out/benchmarks-quick.md).
Every SIPp run is bounded in calls and time; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import math
import os
import platform
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import harness as h

from callrouter.config import ENGINE_SLOT_RESERVE

NETNS_FLAG = "CALLROUTER_BENCH_NETNS"
UNKNOWN_NUMBER = "+14155550199"  # never registered: the router rejects it with 404
BRIDGED_NUMBER = "+14155550123"  # registered by provision_router() for the bench assistant
RTP_PACKETS_PER_SECOND = 50  # G.711, 20 ms frames
BARE_RTP = "20000-29999"
ROUTER_RTP = "30000-39999"  # 10,000 ports: 4 per bridged call, so up to 2,500 calls
GOALS = {
    "reject_rate": 1000.0,
    "reject_p99_ms": 20.0,
    "bridged_rate": 200.0,
    "concurrent": 1000.0,
    "reject_ratio": 0.8,
    "held_packets": 0.99,  # echoed packets arriving at the callers / expected
    "held_cpu_ratio": 1.0,  # bare CPU per single-leg call / router CPU per bridged call
    "idle_rss_mb": 150.0,  # MB = 10**6 bytes, the unit of issue 13's goal
}
# Calls per SIPp process in the held step (callers and runtimes alike). One SIPp 3.6 has a
# single rtp_echo thread on one media socket (echoing every call's audio, the socket at the
# kernel's default receive buffer: -buff_size and -rtp_buffsize do not reach it) and one
# rtp_stream playback thread per -rtp_threadtasks calls, all sending on the same 20 ms
# grid. Every 20 ms a burst of one packet per call reaches that socket, and the echo thread
# must be scheduled before the queue is full: 1,000 calls in one runtime SIPp lost 54 % of
# them there, 500 lost 3 %, 200 up to 2 % on a busy machine, 100 none (docs/benchmarks.md).
HELD_CALLS_PER_SIPP = 100


@dataclass(frozen=True)
class Plan:
    reject_rates: tuple[int, ...]
    bridged_rates: tuple[int, ...]
    concurrency: tuple[int, ...]
    step_seconds: int  # traffic per rate step
    bridged_hold_ms: int
    ramp_rate: int  # calls/s while building up the concurrent calls
    window_seconds: int  # CPU / packet measurement window once all calls are up


FULL = Plan((100, 250, 500, 750, 1000, 1250, 1500, 2000), (50, 100, 200, 300, 400, 600),
            (500, 1000, 1500, 2000), 5, 1000, 100, 10)  # fmt: skip
QUICK = Plan((250, 500, 1000), (50, 100, 200), (100, 250), 3, 1000, 100, 3)
# A step whose p99 is above this is overloaded (its queue grows for the whole step): the
# sweep stops there, as it does at the first failed call.
OVERLOAD_P99_MS = 1000.0


# --- systems under test --------------------------------------------------------------------


@dataclass
class Target:
    """A running system under test: where to send calls, which number, what to measure."""

    proc: h.Proc
    address: str
    service: str
    legs: int  # RTP legs per call: 1 for the bare engine's echo, 2 for a router bridge
    # The numbers to spread held calls over (one per runtime SIPp); empty: ``service`` only.
    services: tuple[str, ...] = ()
    # Load generators started with the system (the runtime SIPps), counted as generators.
    generators: list[h.Proc] = field(default_factory=list)
    max_calls: int | None = None  # calls it can hold by its configuration, if limited
    # Where the held step's i-th caller SIPp sends (addresses[i % len]); empty: ``address``.
    addresses: tuple[str, ...] = ()
    metrics_url: str | None = None  # the router's /metrics (which media path its calls use)


Starter = Callable[[str, Path], contextlib.AbstractContextManager[Target]]


class HeldStarter(Protocol):
    """A starter that can spread the runtime side over ``lines`` runtime SIPps."""

    def __call__(
        self, path: str, workdir: Path, lines: int = 1
    ) -> contextlib.AbstractContextManager[Target]: ...


@contextlib.contextmanager
def bare_system(path: str, workdir: Path, lines: int = 1) -> Iterator[Target]:
    mode = "reject" if path == "reject" else "answer"
    slots = engine_limits().get("PJSUA_MAX_CALLS", 2000)
    proc, address = h.start_bare_engine(workdir, mode, BARE_RTP, slots, h.engine_env())
    with h.running(proc):
        yield Target(proc, address, UNKNOWN_NUMBER, legs=1, max_calls=slots)


@contextlib.contextmanager
def router_system(path: str, workdir: Path, lines: int = 1) -> Iterator[Target]:
    """The router with ``lines`` runtime SIPps, each the runtime of its own assistant and
    number (``held_number(i)``; the first is BRIDGED_NUMBER). For held calls (``path``
    "held") the runtimes answer PCMU only, the codec the bench's callers offer: G.711 u-law
    on both legs, so the router may relay the packets (sip.media_relay) rather than
    transcode (the default runtime answers PCMA first)."""
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    sip_port, http_port = h.free_port(), h.free_port(socket.SOCK_STREAM)
    max_calls = router_max_calls()
    with contextlib.ExitStack() as stack:
        runtimes: list[tuple[h.Proc, int]] = []
        for i in range(lines):
            port = h.free_port()
            runtime_dir = workdir if lines == 1 else workdir / f"runtime-{i}"
            scenario = "uas-runtime-answer-pcmu.xml" if path == "held" else RUNTIME_SCENARIO
            proc = stack.enter_context(h.running(start_runtime(runtime_dir, port, scenario)))
            runtimes.append((proc, port))
        key = create_api_key(data_dir)
        extra = {"CALLROUTER_SIP_MAX_CALLS": str(max_calls)}
        router = stack.enter_context(
            h.running(start_router(workdir, sip_port, http_port, ROUTER_RTP, data_dir, extra))
        )
        base = f"http://{h.LOOPBACK}:{http_port}"
        for i, (proc, port) in enumerate(runtimes):
            provision_line(base, key, port, held_number(i), f"bench-{i}")
            assert proc.alive(), proc.tail()
        service = UNKNOWN_NUMBER if path == "reject" else BRIDGED_NUMBER
        yield Target(router, f"{h.LOOPBACK}:{sip_port}", service, legs=2,
                     services=tuple(held_number(i) for i in range(lines)),
                     metrics_url=f"{base}/metrics",
                     generators=[proc for proc, _ in runtimes], max_calls=max_calls)  # fmt: skip


class EchoPool(h.Proc):
    """The "system" of the generators-alone reference: nothing. Its CPU, RSS and drops are
    0; the runtime SIPps count as generators (their echo sockets' drops included)."""

    def __init__(self, runtimes: Sequence[tuple[h.Proc, int]]) -> None:
        first = runtimes[0][0]
        super().__init__("generators", first.popen, first.log)

    def cpu_seconds(self) -> float:
        return 0.0

    def rss_bytes(self) -> int:
        return 0

    def udp_drops(self) -> int:
        return 0


def runtime_media_port(proc: h.Proc) -> int:
    args = [str(a) for a in proc.popen.args]  # type: ignore[union-attr]
    return int(args[args.index("-mp") + 1])


@contextlib.contextmanager
def sipp_system(path: str, workdir: Path, lines: int = 1) -> Iterator[Target]:
    """Generators alone: ``lines`` runtime SIPps that the caller SIPps dial directly, with
    nothing in between; the reference that shows what the load generators deliver."""
    with contextlib.ExitStack() as stack:
        runtimes = []
        for i in range(lines):
            port = h.free_port()
            proc = stack.enter_context(h.running(start_runtime(workdir / f"runtime-{i}", port)))
            runtimes.append((proc, port))
        time.sleep(0.5)
        for proc, _ in runtimes:
            if not proc.alive():
                raise h.BenchError(f"runtime SIPp exited:\n{proc.tail()}")
        yield Target(EchoPool(runtimes), f"{h.LOOPBACK}:{runtimes[0][1]}", BRIDGED_NUMBER,
                     legs=1, generators=[proc for proc, _ in runtimes],
                     addresses=tuple(f"{h.LOOPBACK}:{port}" for _, port in runtimes))  # fmt: skip


def held_number(i: int) -> str:
    """The number of the i-th bench assistant (never UNKNOWN_NUMBER)."""
    return BRIDGED_NUMBER if i == 0 else f"+1415556{i:04d}"


@functools.cache
def engine_limits() -> dict[str, int]:
    """The engine's compiled limits (its ENGINE-INFO: PJSUA_MAX_CALLS, ...), integers only."""
    probe = ("from callrouter.sip.info import read_engine_info as r; "
             "print('\\n'.join(f'{k}={v}' for k, v in r().values.items()))")
    done = subprocess.run([sys.executable, "-c", probe], env=h.engine_env(),
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    out = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def router_max_calls() -> int:
    """The largest sip.max_calls the router accepts with this engine and ROUTER_RTP: two
    engine call slots per bridged call plus the reserve (config.ENGINE_SLOT_RESERVE), and
    four RTP ports per bridged call."""
    slots = engine_limits().get("PJSUA_MAX_CALLS", 2048)
    start, _, end = ROUTER_RTP.partition("-")
    return min((slots - ENGINE_SLOT_RESERVE) // 2, (int(end) - int(start) + 1) // 4)


def start_router(
    workdir: Path, sip_port: int, http_port: int, rtp_ports: str, data_dir: Path,
    extra_env: dict[str, str] | None = None,
) -> h.Proc:
    """``python -m callrouter serve`` on loopback; returns once its health check answers."""
    env = h.engine_env() | (extra_env or {}) | {
        "CALLROUTER_SIP_LISTEN": f"{h.LOOPBACK}:{sip_port}",
        "CALLROUTER_SIP_ADVERTISE": h.LOOPBACK,
        "CALLROUTER_RTP_PORTS": rtp_ports,
        "CALLROUTER_HTTP_LISTEN": f"{h.LOOPBACK}:{http_port}",
        "CALLROUTER_DATA_DIR": str(data_dir),
        "CALLROUTER_LOG_FORMAT": "json",
        "CALLROUTER_LOG_LEVEL": "warning",
        # One SIPp source sends up to thousands of calls a second: that is the load being
        # measured, not a flood to ban (per-source flood control is measured separately).
        "CALLROUTER_SIP_INBOUND_FLOOD_LIMIT": "0",
    }
    proc = h.spawn("router", [sys.executable, "-m", "callrouter", "serve"], workdir, env)
    health = f"http://{h.LOOPBACK}:{http_port}/api/v1/health"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.alive():
        with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=1) as response:
            if response.status == 200:
                return proc
        time.sleep(0.2)
    proc.stop()
    raise h.BenchError(f"router did not become healthy at {health}:\n{proc.tail()}")


RUNTIME_SCENARIO = "uas-runtime-answer.xml"


def start_runtime(workdir: Path, port: int, scenario_name: str = RUNTIME_SCENARIO,
                  ) -> h.Proc:  # fmt: skip
    """The assistant runtime: a SIPp UAS that answers and echoes RTP, bounded to 15 min.
    Its own media port and remote-control port (SIPp's default 8888 would be shared)."""
    scenario = h.REPO / "sipp-scenarios" / scenario_name
    spec = ["-sf", str(scenario)] if scenario.exists() else ["-sn", "uas"]
    argv = ["sipp", *spec, "-i", h.LOOPBACK, "-p", str(port), "-mp", str(h.media_port()),
            "-cp", str(h.free_port()), "-rtp_echo", "-timeout", "900s", "-nostdin",
            "-trace_err"]  # fmt: skip
    return h.spawn("runtime", argv, workdir, dict(os.environ))


def create_api_key(data_dir: Path) -> str:
    """``python -m callrouter keys create --data-dir DIR --json`` -> ``{"key": ...}``."""
    argv = [sys.executable, "-m", "callrouter", "keys", "create", "--data-dir", str(data_dir),
            "--name", "bench", "--json"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise h.BenchError(f"keys create failed ({done.returncode}): {done.stderr[-1000:]}")
    key: str = json.loads(done.stdout)["key"]
    return key


def provision_router(base: str, key: str, runtime_port: int) -> None:
    provision_line(base, key, runtime_port, BRIDGED_NUMBER, "bench")


def provision_line(base: str, key: str, runtime_port: int, phone: str, name: str) -> None:
    """An assistant whose runtime is the SIPp on ``runtime_port``, and ``phone`` for it."""
    runtime_uri = f"sip:runtime@{h.LOOPBACK}:{runtime_port}"
    made = _post(base + "/api/v1/assistants", key, {"name": name, "runtime_uri": runtime_uri})
    assistant = made.get("assistant", made)
    number = {"phone_number": phone, "name": name, "assistant_id": assistant["id"]}
    _post(base + "/api/v1/numbers", key, number)


def _post(url: str, key: str, body: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, Any] = json.load(response)
        return result


# --- measurements ----------------------------------------------------------------------------


@dataclass
class RateStep:
    rate: int
    successful: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None
    # CPU time of the system under test (all its threads) per completed call; a capacity
    # estimate that does not depend on where the latency knee happens to fall in the grid.
    cpu_ms_per_call: float | None = None

    @property
    def overloaded(self) -> bool:
        return self.failed > 0 or self.p99_ms is None or self.p99_ms > OVERLOAD_P99_MS


@dataclass
class RateSweep:
    steps: list[RateStep] = field(default_factory=list)

    @property
    def best(self) -> RateStep | None:
        """The highest sustained rate: zero failed calls and p99 under OVERLOAD_P99_MS."""
        return self.best_within(OVERLOAD_P99_MS + 0.001)

    def best_within(self, p99_ms: float) -> RateStep | None:
        """The highest rate with zero failed calls and a p99 response time under ``p99_ms``."""
        passing = [s for s in self.steps if s.failed == 0 and s.successful > 0
                   and s.p99_ms is not None and s.p99_ms < p99_ms]  # fmt: skip
        return max(passing, key=lambda s: s.rate) if passing else None


def rate_sweep(
    start: Starter, path: str, rates: Sequence[int], plan: Plan, workdir: Path,
    bridged_scenario: Sequence[str] = ("-sn", "uac"), sweep: RateSweep | None = None,
) -> RateSweep:
    """Step the call rate up until a step has failures (each step on a fresh system).
    ``bridged_scenario``: SIPp's arguments for the bridged path (bench/cluster.py passes
    one that follows a proxy's Record-Route). ``sweep``: where the steps go as they are
    measured, so those done are kept when a later one raises."""
    reject = ["-sf", str(h.SCENARIOS / "reject_uac.xml")]
    scenario = reject if path == "reject" else list(bridged_scenario)
    hold_ms = 0 if path == "reject" else plan.bridged_hold_ms
    sweep = RateSweep() if sweep is None else sweep
    for rate in rates:
        step_dir = workdir / f"{path}-{rate}"
        with start(path, step_dir) as target:
            command = h.sipp_command(
                target.address, [*scenario, "-s", target.service], rate=rate,
                calls=rate * plan.step_seconds, limit=rate * 4 + 100, hold_ms=hold_ms,
                timeout_s=plan.step_seconds + hold_ms / 1000 + 20, media_port=h.free_port(),
            )  # fmt: skip
            cpu0 = target.proc.cpu_seconds()
            result = h.run_sipp(command, step_dir / "sipp", plan.step_seconds + 30)
            cpu = target.proc.cpu_seconds() - cpu0
        done = result.successful + result.failed
        step = RateStep(rate, result.successful, result.failed,
                        result.percentile(0.5), result.percentile(0.99),
                        1000 * cpu / done if done else None)  # fmt: skip
        sweep.steps.append(step)
        print(f"  {path:8} {rate:5}/s  ok={step.successful} failed={step.failed} "
              f"p50={_ms(step.p50_ms)} p99={_ms(step.p99_ms)} "
              f"cpu/call={_cpu(step.cpu_ms_per_call)}", flush=True)  # fmt: skip
        if step.overloaded:
            break
    return sweep


@dataclass
class Concurrency:
    calls: int
    successful: int
    failed: int
    cpu_per_call_pct: float  # percent of one core per held call
    rss_per_call_kib: float
    idle_rss_mib: float  # the system under test just started, before the calls
    # Echoed audio arriving back at the caller SIPps' media sockets / the 50 packets/s per
    # call expected there; None outside a private netns (other sockets could share ports).
    packets_ratio: float | None
    dropped_by_target: int  # datagrams dropped at the system under test's own sockets
    sipps: int = 0  # SIPp processes generating the load: callers + runtimes
    generators_cpu_pct: float = 0.0  # all of them together, percent of one core
    busiest_sipp_cpu_pct: float = 0.0  # the busiest single SIPp process
    sipp_cpu_pcts: list[float] = field(default_factory=list)  # each: callers, then runtimes
    # Datagrams the runtime SIPps' echo sockets dropped (receive queue full): the part of a
    # shortfall that is the generators' own, not the system's.
    dropped_by_generators: int = 0
    # Router: its calls whose RTP the engine relays packet by packet (same codec on both
    # legs; callrouter_media_relayed_calls at the end of the window); None: not reported.
    relayed_calls: int | None = None
    worst_caller_ratio: float | None = None  # the lowest packets ratio of one caller SIPp
    # Every UDP datagram that reached a socket in the namespace (/proc/net/snmp) / all the
    # legs' expected packets (both directions of every leg): a cross-check of the above.
    namespace_ratio: float | None = None
    # The bare engine only (one leg, so every other datagram is the callers'): what the
    # callers sent / 50 packets/s per call. None for the router (four flows per call).
    callers_sent_ratio: float | None = None
    # The whole machine's busy CPU over the window (/proc/stat, % of a core, out of
    # 100 x cores): the system under test, the generators, the kernel and anything else.
    machine_busy_pct: float | None = None
    note: str = ""  # why the step was not run

    @property
    def audio_flows(self) -> bool | None:
        if self.note:
            return False
        if self.packets_ratio is None:
            return None
        return (self.failed == 0 and self.successful == self.calls
                and self.packets_ratio >= GOALS["held_packets"] and self.dropped_by_target == 0)


def concurrency(start: HeldStarter, plan: Plan, workdir: Path,
                results: list[Concurrency] | None = None) -> list[Concurrency]:  # fmt: skip
    """Held calls at each N of the plan, stopping after the first N whose audio fails.
    ``results``: where the steps go as they are measured, so those done are kept when a
    later one raises."""
    results = [] if results is None else results
    for n in plan.concurrency:
        result = hold_calls(start, n, plan, workdir / f"concurrent-{n}")
        results.append(result)
        if result.note:
            print(f"  held {n:5}  not run: {result.note}", flush=True)
        else:
            print(f"  held {n:5}  ok={result.successful} failed={result.failed} "
                  f"cpu/call={result.cpu_per_call_pct:.3f}% "
                  f"rss/call={result.rss_per_call_kib:.0f}KiB "
                  f"packets={_ratio(result.packets_ratio)} "
                  f"(worst caller {_ratio(result.worst_caller_ratio)}, "
                  f"namespace {_ratio(result.namespace_ratio)}) "
                  f"drops={result.dropped_by_target} "
                  f"generator drops={result.dropped_by_generators} sipps={result.sipps} "
                  f"generators={result.generators_cpu_pct:.0f}% "
                  f"(busiest {result.busiest_sipp_cpu_pct:.0f}%) "
                  f"callers sent={_ratio(result.callers_sent_ratio)} "
                  f"machine={_num(result.machine_busy_pct, 0)}% "
                  f"relayed={result.relayed_calls} audio={result.audio_flows}",
                  flush=True)  # fmt: skip
        if not result.audio_flows:
            break
    return results


@dataclass
class Caller:
    """One caller SIPp of a held step: its process, directory and media port."""

    popen: subprocess.Popen[bytes]
    workdir: Path
    media_port: int
    calls: int


def hold_calls(start: HeldStarter, n: int, plan: Plan, workdir: Path) -> Concurrency:
    """N calls held with G.711 both ways, spread over ceil(N / HELD_CALLS_PER_SIPP) caller
    SIPps (and as many runtime SIPps behind the router); measured over plan.window_seconds
    once every call is up."""
    sipps = math.ceil(n / HELD_CALLS_PER_SIPP)
    ramp = n / plan.ramp_rate
    settle = 3.0
    hold_ms = int((ramp + settle + plan.window_seconds + 2) * 1000)
    timeout = hold_ms / 1000 + ramp + 30
    workdir.mkdir(parents=True, exist_ok=True)
    with start("held", workdir, lines=sipps) as target:
        if target.max_calls is not None and n > target.max_calls:
            return Concurrency(n, 0, 0, 0.0, 0.0, target.proc.rss_bytes() / 1024 / 1024, None,
                               0, note=f"above the {target.max_calls} calls this build can "
                               "hold (engine PJSUA_MAX_CALLS; the router needs 2 per call)")
        idle_rss = target.proc.rss_bytes()
        services = target.services or (target.service,)
        callers = []
        for i in range(sipps):
            calls = n // sipps + (1 if i < n % sipps else 0)
            caller_dir = workdir / f"caller-{i}"
            caller_dir.mkdir(parents=True, exist_ok=True)
            (caller_dir / "bench-tone.ulaw").write_bytes(ulaw_tone())
            media_port = h.media_port()
            addresses = target.addresses or (target.address,)
            command = h.sipp_command(
                addresses[i % len(addresses)],
                ["-sf", str(h.SCENARIOS / "uac_rtp.xml"), "-s", services[i % len(services)]],
                rate=plan.ramp_rate / sipps, calls=calls, limit=calls, hold_ms=hold_ms,
                timeout_s=timeout, media_port=media_port,
                extra=["-rtp_threadtasks", "50", "-cp", str(h.free_port())],
            )  # fmt: skip
            callers.append(Caller(h.start_sipp(command, caller_dir), caller_dir, media_port,
                                  calls))  # fmt: skip
        time.sleep(ramp + settle)
        generator_pids = [c.popen.pid for c in callers] + [g.pid for g in target.generators]
        before = _held_snapshot(target, generator_pids, callers)
        time.sleep(plan.window_seconds)
        after = _held_snapshot(target, generator_pids, callers)
        rss = target.proc.rss_bytes()
        relayed = relayed_calls(target.metrics_url) if target.metrics_url else None
        results = [h.finish_sipp(c.popen, c.workdir, timeout) for c in callers]
    seconds = after.time - before.time
    private = os.environ.get(NETNS_FLAG) == "1"
    arrived = [after.caller_drops[i] - before.caller_drops[i] for i in range(sipps)]
    expected = [RTP_PACKETS_PER_SECOND * c.calls * seconds for c in callers]
    gen_cpu = [100 * (after.generators[i] - before.generators[i]) / seconds
               for i in range(len(generator_pids))]  # fmt: skip
    all_legs = 2 * target.legs * RTP_PACKETS_PER_SECOND * n * seconds
    udp = after.udp - before.udp
    busy, total = (after.machine[i] - before.machine[i] for i in range(2))
    return Concurrency(
        calls=n, successful=sum(r.successful for r in results),
        failed=sum(r.failed for r in results),
        cpu_per_call_pct=100 * (after.target_cpu - before.target_cpu) / seconds / n,
        rss_per_call_kib=(rss - idle_rss) / 1024 / n,
        idle_rss_mib=idle_rss / 1024 / 1024,
        packets_ratio=sum(arrived) / sum(expected) if private else None,
        dropped_by_target=after.target_drops - before.target_drops,
        sipps=len(generator_pids),
        generators_cpu_pct=sum(gen_cpu),
        busiest_sipp_cpu_pct=max(gen_cpu),
        sipp_cpu_pcts=[round(c, 1) for c in gen_cpu],
        dropped_by_generators=after.runtime_drops - before.runtime_drops,
        relayed_calls=relayed,
        worst_caller_ratio=min(a / e for a, e in zip(arrived, expected, strict=True))
        if private else None,
        namespace_ratio=udp / all_legs if private else None,
        callers_sent_ratio=(udp - sum(arrived)) / sum(expected)
        if private and target.legs == 1 else None,
        machine_busy_pct=100 * (os.cpu_count() or 1) * busy / total if total else None,
    )  # fmt: skip


def relayed_calls(metrics_url: str) -> int | None:
    """The router's ``callrouter_media_relayed_calls`` gauge, if it exports one."""
    with contextlib.suppress(OSError), urllib.request.urlopen(metrics_url, timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("callrouter_media_relayed_calls "):
                return int(float(line.split()[1]))
    return None


@dataclass
class HeldSnapshot:
    time: float
    target_cpu: float
    target_drops: int
    generators: list[float]
    caller_drops: list[int]
    udp: int
    machine: tuple[int, int]  # busy and total jiffies of all CPUs
    runtime_drops: int  # at the runtime SIPps' echo sockets


def _held_snapshot(target: Target, generator_pids: Sequence[int],
                   callers: Sequence[Caller]) -> HeldSnapshot:  # fmt: skip
    return HeldSnapshot(
        time=time.monotonic(), target_cpu=target.proc.cpu_seconds(),
        target_drops=target.proc.udp_drops(),
        generators=[h.cpu_seconds(pid) for pid in generator_pids],
        caller_drops=[h.udp_port_drops(c.media_port) for c in callers], udp=udp_arrivals(),
        machine=machine_jiffies(),
        runtime_drops=sum(h.udp_port_drops(runtime_media_port(g)) for g in target.generators),
    )  # fmt: skip


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far (/proc/stat, all CPUs)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - idle, total


def udp_arrivals() -> int:
    """UDP datagrams that reached a socket in this network namespace, read or not.

    SIPp 3.6's rtp_stream never reads its media socket, so the caller's copies of the echoed
    audio end as RcvbufErrors there; they still prove the system under test sent them.
    """
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    header, values = [row for row in lines if row[0] == "Udp:"][:2]
    row = dict(zip(header[1:], map(int, values[1:]), strict=True))
    return row["InDatagrams"] + row["RcvbufErrors"]


def ulaw_tone(hz: float = 440.0, seconds: float = 1.0, rate: int = 8000) -> bytes:
    """A sine tone, G.711 u-law encoded (ITU-T G.711), for SIPp's rtp_stream."""
    import math

    def encode(sample: int) -> int:
        sign = 0x80 if sample < 0 else 0
        magnitude = min(abs(sample), 32635) + 0x84
        exponent = max(0, magnitude.bit_length() - 8)
        mantissa = (magnitude >> (exponent + 3)) & 0x0F
        return ~(sign | exponent << 4 | mantissa) & 0xFF

    count = int(seconds * rate)
    return bytes(encode(int(8000 * math.sin(2 * math.pi * hz * i / rate))) for i in range(count))


# --- profiling -------------------------------------------------------------------------------


def profile_reject(rate: int, seconds: int, native: bool, workdir: Path) -> str:
    """py-spy on the router while SIPp sends it INVITEs to an unknown number at ``rate``/s.

    Writes the collapsed stacks (``bench/out/profile-reject.txt``: load into speedscope or
    flamegraph.pl) and returns a summary: samples per thread, the functions with the most
    samples of their own, and the router functions with the most samples under them.
    """
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        raise h.BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
    raw = h.BENCH / "out" / "profile-reject.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    step_dir = workdir / f"profile-{rate}"
    with router_system("reject", step_dir) as target:
        command = h.sipp_command(
            target.address, ["-sf", str(h.SCENARIOS / "reject_uac.xml"), "-s", target.service],
            rate=rate, calls=rate * (seconds + 3), limit=rate * 4 + 100, hold_ms=0,
            timeout_s=seconds + 25, media_port=h.free_port(),
        )  # fmt: skip
        sipp = h.start_sipp(command, step_dir / "sipp")
        time.sleep(1)
        cpu0 = target.proc.cpu_seconds()
        spy = [pyspy, "record", "--pid", str(target.proc.pid), "--duration", str(seconds),
               "--rate", "200", "--format", "raw", "--threads", "--nolineno",
               "--output", str(raw), *(["--native"] if native else [])]  # fmt: skip
        done = subprocess.run(spy, capture_output=True, text=True, timeout=seconds + 60)
        cpu = target.proc.cpu_seconds() - cpu0
        result = h.finish_sipp(sipp, step_dir / "sipp", seconds + 30)
    if done.returncode != 0 or not raw.exists():
        raise h.BenchError(f"py-spy failed ({done.returncode}): {done.stderr[-1500:]}")
    header = (f"router, reject path at {rate} calls/s for {seconds} s: ok={result.successful} "
              f"failed={result.failed} p50={_ms(result.percentile(0.5))} "
              f"p99={_ms(result.percentile(0.99))}; router CPU {100 * cpu / seconds:.0f}% "
              f"of a core while sampled")  # fmt: skip
    return header + "\n" + summarise_stacks(raw.read_text())


def summarise_stacks(collapsed: str, top: int = 25) -> str:
    """A text summary of py-spy's collapsed stacks ("frame;frame;... count" per line)."""
    threads: dict[str, int] = {}
    own: dict[str, int] = {}
    under: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads[frames[0]] = threads.get(frames[0], 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames[1:]):
            under[frame] = under.get(frame, 0) + count
    if not total:
        return "no samples"

    def table(title: str, counts: dict[str, int], keep: Callable[[str], bool]) -> list[str]:
        rows = sorted(((n, f) for f, n in counts.items() if keep(f)), reverse=True)[:top]
        return [title, *(f"  {100 * n / total:5.1f}%  {f}" for n, f in rows)]

    lines = [f"{total} samples (threads on CPU only)"]
    lines += table("per thread:", threads, lambda f: True)
    lines += table("own samples (the function itself was running):", own, lambda f: True)
    lines += table("samples under callrouter functions (inclusive):", under,
                   lambda f: "callrouter" in f)  # fmt: skip
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class TargetResults:
    name: str
    reject: RateSweep | None = None
    bridged: RateSweep | None = None
    concurrent: list[Concurrency] = field(default_factory=list)
    error: str | None = None


STEPS = ("reject", "bridged", "held")


def measure(name: str, start: HeldStarter, plan: Plan, workdir: Path,
            steps: Sequence[str] = STEPS) -> TargetResults:  # fmt: skip
    results = TargetResults(name)
    print(f"== {name}", flush=True)
    try:
        if name == "sipp":  # generators alone: only held calls mean anything
            steps = [s for s in steps if s == "held"]
        # Each result is in place before it is measured: a step that raises (a generator
        # that exited, say) leaves the steps done before it in the report.
        if "reject" in steps:
            results.reject = RateSweep()
            rate_sweep(start, "reject", plan.reject_rates, plan, workdir / name,
                       sweep=results.reject)  # fmt: skip
        if "bridged" in steps:
            results.bridged = RateSweep()
            rate_sweep(start, "bridged", plan.bridged_rates, plan, workdir / name,
                       sweep=results.bridged)  # fmt: skip
        if "held" in steps:
            results.concurrent = []
            concurrency(start, plan, workdir / name, results.concurrent)
    except (h.BenchError, OSError, KeyError, subprocess.SubprocessError) as exc:
        results.error = f"{type(exc).__name__}: {exc}"[:1500]
        print(f"  {name}: not measured further: {results.error}", flush=True)
    return results


def enter_private_netns(argv: Sequence[str]) -> None:
    """Re-exec in a new user + network namespace: only our traffic, nothing reachable."""
    if os.environ.get(NETNS_FLAG) is not None or shutil.which("unshare") is None:
        return
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        os.environ[NETNS_FLAG] = "0"
        return
    os.environ[NETNS_FLAG] = "1"
    os.execvp("unshare", ["unshare", "-rn", sys.executable, *argv])


def loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH", b"lo", flags | iff_up))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    enter_private_netns([os.path.abspath(__file__), *(argv or sys.argv[1:])])
    if os.environ.get(NETNS_FLAG) == "1":
        loopback_up()
    plan = plan_of(args)
    started = time.monotonic()
    h.raise_fd_limit()  # inherited by the router, the bare engine and every SIPp
    h.engine_env()  # resolve (or build) the engine once, before any timing starts
    if args.profile:
        with tempfile.TemporaryDirectory(prefix="callrouter-bench-") as tmp:
            workdir = Path(args.keep) if args.keep else Path(tmp)
            summary = profile_reject(args.profile, args.profile_seconds, args.native, workdir)
        print(summary)
        (h.BENCH / "out" / "profile-reject-summary.txt").write_text(summary + "\n")
        print("written: bench/out/profile-reject.txt, bench/out/profile-reject-summary.txt")
        return 0
    with tempfile.TemporaryDirectory(prefix="callrouter-bench-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        starters: dict[str, HeldStarter] = {"sipp": sipp_system, "bare": bare_system,
                                            "router": router_system}  # fmt: skip
        results = [measure(name, starters[name], plan, workdir, args.only)
                   for name in args.targets]  # fmt: skip
    report = render_report(results, plan, args, time.monotonic() - started)
    print(report)
    default = ("bench/out/benchmarks-quick.md" if args.quick else
               "bench/out/benchmarks-partial.md" if set(args.only) != set(STEPS) else
               "docs/benchmarks.md")  # fmt: skip
    output = Path(args.output or h.REPO / default)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report + kept_section(output))
    raw = h.BENCH / "out" / output.with_suffix(".json").name  # bench/out/ is not committed
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(f"written: {output}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--targets", type=lambda s: s.split(","),
                        default=["sipp", "bare", "router"],
                        help="comma-separated: sipp (the held-call generators alone, caller "
                        "SIPps dialling runtime SIPps), bare, router")  # fmt: skip
    parser.add_argument("--only", type=lambda s: s.split(","), default=list(STEPS),
                        help="comma-separated steps: reject,bridged,held (a partial run "
                        "writes bench/out/benchmarks-partial.md unless --output)")
    parser.add_argument("--held", type=lambda s: tuple(int(n) for n in s.split(",")),
                        metavar="N,N,...", help="held-call steps (default 500,1000,1500,2000; "
                        "stops at the first that fails)")
    parser.add_argument("--window", type=int, metavar="S",
                        help="held: seconds measured once every call is up (default 10)")
    parser.add_argument("--output", help="report path (default docs/benchmarks.md)")
    parser.add_argument("--keep", help="keep logs and SIPp files in this directory")
    parser.add_argument("--profile", type=int, metavar="RATE",
                        help="instead of the bench: py-spy on the router's reject path at RATE/s")
    parser.add_argument("--profile-seconds", type=int, default=15, metavar="S")
    parser.add_argument("--native", action="store_true", help="--profile: with C frames")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - {"sipp", "bare", "router"}
    if unknown:
        parser.error(f"unknown targets: {sorted(unknown)}")
    if set(args.only) - set(STEPS):
        parser.error(f"unknown steps: {sorted(set(args.only) - set(STEPS))}")
    return args


# --- the report ------------------------------------------------------------------------------

KEEP_MARKER = "<!-- Everything below this line is written by hand; bench/run.py keeps it. -->"


def kept_section(output: Path) -> str:
    """The hand-written part of an existing report (profile findings), carried over."""
    if not output.exists():
        return ""
    old = output.read_text()
    index = old.find(KEEP_MARKER)
    return "" if index < 0 else "\n" + old[index:]


def render_report(
    results: list[TargetResults], plan: Plan, args: argparse.Namespace, seconds: float
) -> str:
    by_name = {r.name: r for r in results}
    lines = ["# Benchmarks: the router against the bare engine", "",
             f"Generated by `make bench` (`bench/run.py`) in {seconds:.0f} s. SIPp drives "
             "each system on loopback; each step runs on a freshly started system.", "",
             "## Machine", "", "| | |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v} |" for k, v in machine().items()]
    lines += ["", "## Commands", "", "```", *command_lines(args), "```", ""]
    for result in results:
        lines += target_section(result)
    lines += goals_section(by_name.get("bare"), by_name.get("router"))
    return "\n".join(lines) + "\n"


def target_section(result: TargetResults) -> list[str]:
    lines = [f"## {result.name}", ""]
    if result.name == "sipp":
        lines += ["The held-call load generators alone: each caller SIPp dials a runtime SIPp "
                  "(`-rtp_echo`) directly, nothing in between, as many of each as in the router's "
                  "steps. The system's own CPU and RSS are 0 here (the runtimes count as "
                  "generators, their echo sockets' drops under *dropped by generators*).",
                  ""]  # fmt: skip
    if result.error:
        lines += [f"Not (fully) measured: `{result.error.splitlines()[0]}`", ""]
    for label, sweep in (("Reject path (404)", result.reject), ("Bridged path", result.bridged)):
        if sweep is None or not sweep.steps:
            continue
        lines += [f"{label}:", "",
                  "| calls/s | ok | failed | p50 | p99 | CPU per call | sustained |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {s.rate} | {s.successful} | {s.failed} | {_ms(s.p50_ms)} | {_ms(s.p99_ms)} "
                  f"| {_cpu(s.cpu_ms_per_call)} | {_yes(not s.overloaded)} |"
                  for s in sweep.steps]  # fmt: skip
        lines.append("")
    if result.concurrent:
        lines += [
            "Calls held with G.711 both ways (generators: every SIPp process, callers and "
            f"runtimes, {HELD_CALLS_PER_SIPP} calls each):",
            "",
            "| calls | ok | failed | CPU per call (% of a core) | its CPU (% of a core) | "
            "generators' CPU: SIPps, sum (busiest) | machine busy | idle RSS | RSS per call | "
            "packets arrived / expected (worst caller) | dropped by target | "
            "dropped by generators | audio flows |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in result.concurrent:
            if c.note:
                lines.append(f"| {c.calls} | - | - | - | - | - | - | {c.idle_rss_mib:.0f} MiB | - "
                             f"| - | - | - | not run: {c.note} |")  # fmt: skip
                continue
            lines.append(
                f"| {c.calls} | {c.successful} | {c.failed} | {c.cpu_per_call_pct:.3f} | "
                f"{c.cpu_per_call_pct * c.calls:.0f} | {c.sipps}: "
                f"{c.generators_cpu_pct:.0f} ({c.busiest_sipp_cpu_pct:.0f}) | "
                f"{_num(c.machine_busy_pct, 0)} of {100 * (os.cpu_count() or 1)} | "
                f"{c.idle_rss_mib:.0f} MiB | {c.rss_per_call_kib:.0f} KiB | "
                f"{_ratio(c.packets_ratio)} ({_ratio(c.worst_caller_ratio)}) | "
                f"{c.dropped_by_target} | {c.dropped_by_generators} | "
                f"{_yes(c.audio_flows)} |")  # fmt: skip
        lines.append("")
    return lines


def goals_section(bare: TargetResults | None, router: TargetResults | None) -> list[str]:
    r, b = _summary(router), _summary(bare)
    if router and bare:
        add_cpu_rows({"router": r, "bare": b}, {"router": router, "bare": bare})
    lines = ["## Router against bare engine", "",
             "| measurement | router | bare engine | router / bare |", "|---|---|---|---|"]
    for key, label, kind in SUMMARY_ROWS:
        ratio = _ratio_of(r[key], b[key], kind == "cost") if kind else None
        lines.append(f"| {label} | {_num(r[key])} | {_num(b[key])} | {_num(ratio, 2)} |")
    lines += ["", "Ratios are router / bare for rates and bare / router for costs (CPU per "
              "call), so 1.0 means no overhead and lower is worse.", ""]  # fmt: skip
    held, idle_mb = r["held_with_audio"], r["idle_rss_mb"]
    ratio = _ratio_of(r["reject_fast"], b["reject_fast"], False)
    held_ratio = _ratio_of(r["held_cpu_common"], b["held_cpu_common"], True)
    common = r["held_common"]
    rows = [
        ("reject path >= 1000 calls/s with p99 < 20 ms", r["reject_fast"],
         r["reject_fast"] is not None and r["reject_fast"] >= GOALS["reject_rate"]),
        ("bridged path >= 200 calls/s", r["bridged"],
         r["bridged"] is not None and r["bridged"] >= GOALS["bridged_rate"]),
        (">= 1000 concurrent bridged calls held, G.711 both ways, >= 0.99 of the expected "
         "packets arriving", held, held is not None and held >= GOALS["concurrent"]),
        ("router CPU per bridged call <= bare CPU per single-leg call (bare / router >= 1.0) "
         f"at the largest N both hold ({_num(common)})", held_ratio,
         held_ratio is not None and held_ratio >= GOALS["held_cpu_ratio"]),
        ("router / bare call rate >= 0.8 on the reject path (p99 < 20 ms)", ratio,
         ratio is not None and ratio >= GOALS["reject_ratio"]),
        ("idle RSS <= 150 MB (largest of the held steps' just-started routers, MB = 10^6 B)",
         idle_mb, idle_mb is not None and idle_mb <= GOALS["idle_rss_mb"]),
    ]  # fmt: skip
    lines += ["## Goals (router)", "", "| goal | measured | met |", "|---|---|---|"]
    for goal, measured, met in rows:
        verdict = "not measured" if measured is None else ("yes" if met else "**NO**")
        lines.append(f"| {goal} | {_num(measured)} | {verdict} |")
    lines += [
        "",
        "Definitions: a rate step is *sustained* when SIPp saw zero failed calls and the "
        f"p99 response time stayed under {OVERLOAD_P99_MS:.0f} ms (beyond that the queue "
        "grows for the whole step and SIPp's generous timeouts only hide the overload); "
        "the sweep stops at the first step that is not. The bridged response time is "
        "INVITE -> 200 and includes the 200 ms the SIPp runtime waits before answering "
        "(`sipp-scenarios/uas-runtime-answer.xml`). SIPp reports response times in whole "
        "milliseconds (its clock tick), so a p50 of 0 ms means under a millisecond.",
        "",
        f"A held step *holds* when every call was answered and stayed up, at least "
        f"{GOALS['held_packets']:.2f} of the expected echoed packets (50/s per call) arrived "
        "back at the caller SIPps, and the system under test dropped none at its sockets; "
        "the steps stop at the first that does not. The router's CPU per call is per "
        "bridged call (two legs), the bare engine's per single-leg call.",
        "",
    ]  # fmt: skip
    return lines


# (key, label, "rate" | "cost" | None: how the router / bare ratio is formed, if at all)
SUMMARY_ROWS = (
    ("reject", "reject: highest sustained rate (calls/s)", "rate"),
    ("reject_p50", "reject: p50 at that rate (ms)", None),
    ("reject_p99", "reject: p99 at that rate (ms)", None),
    ("reject_fast", "reject: highest rate with zero failures and p99 < 20 ms", "rate"),
    ("reject_cpu", "reject: CPU per call at the highest rate both sustain (ms)", "cost"),
    ("bridged", "bridged: highest sustained rate (calls/s)", "rate"),
    ("bridged_cpu", "bridged: CPU per call at the highest rate both sustain (ms)", "cost"),
    ("held_with_audio", "concurrent calls held with audio flowing (largest N)", "rate"),
    ("held_cpu", "held: CPU per call at that N (% of a core)", "cost"),
    ("held_rss", "held: RSS per call at that N (KiB)", "cost"),
    ("held_common", "held: largest N both hold", None),
    ("held_cpu_common", "held: CPU per call at that N (% of a core; router: bridged call, "
     "bare: single leg)", "cost"),
    ("held_generators", "held: generators' CPU at that N (% of a core, all SIPps)", None),
    ("idle_rss", "idle RSS (MiB)", "cost"),
)


def _summary(result: TargetResults | None) -> dict[str, float | None]:
    out: dict[str, float | None] = {key: None for key, _, _ in SUMMARY_ROWS}
    out["idle_rss_mb"] = None
    if result is None:
        return out
    if result.reject:
        best, fast = result.reject.best, result.reject.best_within(GOALS["reject_p99_ms"])
        out["reject"] = float(best.rate) if best else None
        out["reject_p50"] = best.p50_ms if best else None
        out["reject_p99"] = best.p99_ms if best else None
        out["reject_fast"] = float(fast.rate) if fast else None
    if result.bridged and result.bridged.best:
        out["bridged"] = float(result.bridged.best.rate)
    flowing = [c for c in result.concurrent if c.audio_flows]
    if flowing:
        out["held_with_audio"] = float(flowing[-1].calls)
        out["held_cpu"] = flowing[-1].cpu_per_call_pct
        out["held_rss"] = flowing[-1].rss_per_call_kib
    if result.concurrent:
        idle = max(c.idle_rss_mib for c in result.concurrent)
        out["idle_rss"] = idle
        out["idle_rss_mb"] = idle * 2**20 / 10**6
    return out


def add_cpu_rows(summaries: dict[str, dict[str, float | None]],
                 results: dict[str, TargetResults]) -> None:
    """CPU per call at the highest rate that both systems sustained (same load for both)."""
    for path in ("reject", "bridged"):
        sweeps = {name: getattr(r, path) for name, r in results.items()}
        if any(s is None for s in sweeps.values()) or len(sweeps) < 2:
            continue
        sustained = [{st.rate: st for st in s.steps if not st.overloaded} for s in sweeps.values()]
        common = set.intersection(*(set(s) for s in sustained))
        if common:
            rate = max(common)
            for name, steps in zip(sweeps, sustained, strict=True):
                summaries[name][f"{path}_cpu"] = steps[rate].cpu_ms_per_call
    held = {name: {c.calls: c for c in r.concurrent if c.audio_flows}
            for name, r in results.items()}  # fmt: skip
    both = set.intersection(*(set(steps) for steps in held.values())) if held else set()
    if both:
        n = max(both)
        for name, steps in held.items():
            summaries[name]["held_common"] = float(n)
            summaries[name]["held_cpu_common"] = steps[n].cpu_per_call_pct
            summaries[name]["held_generators"] = steps[n].generators_cpu_pct


def _ratio_of(router: float | None, bare: float | None, cost: bool) -> float | None:
    if router is None or bare is None or router == 0 or bare == 0:
        return None
    return bare / router if cost else router / bare


def _num(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if digits is None:
        digits = 0 if value == int(value) or value >= 100 else (3 if value < 1 else 2)
    return f"{value:.{digits}f}"


def _yes(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def command_lines(args: argparse.Namespace) -> list[str]:
    quick = " --quick" if args.quick else ""
    return [
        f"python bench/run.py{quick} --targets {','.join(args.targets)}",
        "reject:  sipp -sf bench/scenarios/reject_uac.xml -s <unknown number> -r RATE -m RATE*"
        f"{plan_of(args).step_seconds} -d 0 HOST:PORT",
        f"bridged: sipp -sn uac -s <number> -r RATE -d {plan_of(args).bridged_hold_ms} HOST:PORT",
        f"held:    ceil(N/{HELD_CALLS_PER_SIPP}) x sipp -sf bench/scenarios/uac_rtp.xml -s "
        "<number i> -mp <port i> -r RAMP/K -l N/K -m N/K -d HOLD -rtp_threadtasks 50 HOST:PORT",
        "bare engine: python bench/bare_engine.py --listen 127.0.0.1:0 --mode answer|reject",
        "router:  python -m callrouter keys create --data-dir DIR --name bench --json",
        f"         CALLROUTER_RTP_PORTS={ROUTER_RTP} CALLROUTER_SIP_ADVERTISE=127.0.0.1 "
        "CALLROUTER_LOG_FORMAT=json CALLROUTER_LOG_LEVEL=warning "
        "CALLROUTER_SIP_INBOUND_FLOOD_LIMIT=0 python -m callrouter serve",
        "         POST /api/v1/assistants {runtime_uri: sip:runtime@127.0.0.1:RPORT}, "
        "POST /api/v1/numbers",
        "runtime: sipp -sf sipp-scenarios/uas-runtime-answer.xml -rtp_echo -p RPORT -mp MPORT "
        "(held: uas-runtime-answer-pcmu.xml, one per caller SIPp, each the runtime of its own "
        "assistant and number)",
        "held only: python bench/run.py --only held [--held 1000,1500,2000] [--window S]",
        "profile: python bench/run.py --profile 500   (py-spy on the router's reject path)",
    ]


def plan_of(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    if args.held:
        plan = replace(plan, concurrency=args.held)
    if args.window:
        plan = replace(plan, window_seconds=args.window)
    return plan


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    sipp = subprocess.run(["sipp", "-v"], capture_output=True, text=True, timeout=10).stdout
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sipp": next((ln.strip() for ln in sipp.splitlines() if "SIPp" in ln), "unknown"),
        "network": "private namespace (unshare -rn), loopback only"
        if os.environ.get(NETNS_FLAG) == "1" else "host namespace, loopback only",
        "engine": engine_version(),
        "engine limits": ", ".join(f"{k} {v}" for k, v in engine_limits().items()
                                   if k.startswith(("PJSUA_MAX_CALLS", "PJSUA_MAX_CONF",
                                                    "PJ_IOQUEUE_MAX_HANDLES"))),
        "router sip.max_calls": f"{router_max_calls()} (the most this engine and "
                                f"CALLROUTER_RTP_PORTS={ROUTER_RTP} allow)",
        "open files (RLIMIT_NOFILE)": str(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
    }  # fmt: skip


def engine_version() -> str:
    """The pjproject and source of the engine measured (its ENGINE-INFO)."""
    probe = ("from callrouter.sip.info import read_engine_info as r; i = r(); "
             "print(f'pjproject {i.version} ({i.source} {i.source_version})')")
    done = subprocess.run([sys.executable, "-c", probe], env=h.engine_env(),
                          capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or "unknown"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
