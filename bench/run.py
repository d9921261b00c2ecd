"""`make bench`: the router against the bare engine, driven by SIPp on loopback.

How it works: each measurement starts a fresh system under test (bench/bare_engine.py, or
the router via ``start_router``), drives it with SIPp and stops it, by pid:

1. reject path: INVITEs to an unknown number (bare engine: ``--mode reject``) at stepped
   rates; the highest rate with zero failed calls, and p50/p99 INVITE -> 404 at that rate;
2. bridged path: short answered calls at stepped rates; the highest rate with zero failures
   (router: each call bridged to a SIPp runtime answering with ``-rtp_echo``);
3. concurrency: N calls held with G.711 flowing (bench/scenarios/uac_rtp.xml); CPU and RSS
   per call of the system under test (/proc/<pid>/stat, VmRSS), and whether the audio kept
   flowing at each N: UDP datagrams delivered per second against the expected
   50 packets/s per direction per leg (/proc/net/snmp, meaningful in the private network
   namespace the bench re-executes itself in with ``unshare -rn``, where only its own
   traffic exists; RcvbufErrors must stay 0);
4. ratios router / bare.

Prints a table and writes docs/benchmarks.md (``--quick``: bench/out/benchmarks-quick.md).
Every SIPp run is bounded in calls and time; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness as h

NETNS_FLAG = "CALLROUTER_BENCH_NETNS"
UNKNOWN_NUMBER = "+14155550199"  # never registered: the router rejects it with 404
BRIDGED_NUMBER = "+14155550123"  # registered by provision_router() for the bench assistant
RTP_PACKETS_PER_SECOND = 50  # G.711, 20 ms frames
BARE_RTP = "20000-29999"
ROUTER_RTP = "30000-39999"
GOALS = {
    "reject_rate": 1000.0,
    "reject_p99_ms": 20.0,
    "bridged_rate": 200.0,
    "concurrent": 1000.0,
    "reject_ratio": 0.8,
}


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
            (100, 250, 500, 1000), 5, 1000, 200, 5)  # fmt: skip
QUICK = Plan((250, 500, 1000), (50, 100, 200), (100, 250), 3, 1000, 200, 3)
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


Starter = Callable[[str, Path], contextlib.AbstractContextManager[Target]]


@contextlib.contextmanager
def bare_system(path: str, workdir: Path) -> Iterator[Target]:
    mode = "reject" if path == "reject" else "answer"
    proc, address = h.start_bare_engine(workdir, mode, BARE_RTP, 2000, h.engine_env())
    with h.running(proc):
        yield Target(proc, address, UNKNOWN_NUMBER, legs=1)


@contextlib.contextmanager
def router_system(path: str, workdir: Path) -> Iterator[Target]:
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    sip_port, http_port = h.free_port(), h.free_port(socket.SOCK_STREAM)
    runtime_port = h.free_port()
    with contextlib.ExitStack() as stack:
        runtime = stack.enter_context(h.running(start_runtime(workdir, runtime_port)))
        key = create_api_key(data_dir)
        router = stack.enter_context(
            h.running(start_router(workdir, sip_port, http_port, ROUTER_RTP, data_dir))
        )
        provision_router(f"http://{h.LOOPBACK}:{http_port}", key, runtime_port)
        assert runtime.alive(), runtime.tail()
        service = UNKNOWN_NUMBER if path == "reject" else BRIDGED_NUMBER
        yield Target(router, f"{h.LOOPBACK}:{sip_port}", service, legs=2)


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


def start_runtime(workdir: Path, port: int) -> h.Proc:
    """The assistant runtime: a SIPp UAS that answers and echoes RTP, bounded to 15 min."""
    scenario = h.REPO / "sipp-scenarios" / "uas-runtime-answer.xml"
    spec = ["-sf", str(scenario)] if scenario.exists() else ["-sn", "uas"]
    argv = ["sipp", *spec, "-i", h.LOOPBACK, "-p", str(port), "-mp", str(h.free_port()),
            "-rtp_echo", "-timeout", "900s", "-nostdin", "-trace_err"]  # fmt: skip
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
    runtime_uri = f"sip:runtime@{h.LOOPBACK}:{runtime_port}"
    made = _post(base + "/api/v1/assistants", key, {"name": "bench", "runtime_uri": runtime_uri})
    assistant = made.get("assistant", made)
    number = {"phone_number": BRIDGED_NUMBER, "name": "bench", "assistant_id": assistant["id"]}
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
    bridged_scenario: Sequence[str] = ("-sn", "uac"),
) -> RateSweep:
    """Step the call rate up until a step has failures (each step on a fresh system).
    ``bridged_scenario``: SIPp's arguments for the bridged path (bench/cluster.py passes
    one that follows a proxy's Record-Route)."""
    reject = ["-sf", str(h.SCENARIOS / "reject_uac.xml")]
    scenario = reject if path == "reject" else list(bridged_scenario)
    hold_ms = 0 if path == "reject" else plan.bridged_hold_ms
    sweep = RateSweep()
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
    # UDP datagrams that reached a socket (InDatagrams + RcvbufErrors) / expected; None
    # outside a private netns, where other traffic shares the counters.
    packets_ratio: float | None
    dropped_by_target: int  # datagrams dropped at the system under test's own sockets

    @property
    def audio_flows(self) -> bool | None:
        if self.packets_ratio is None:
            return None
        return self.failed == 0 and self.packets_ratio >= 0.95 and self.dropped_by_target == 0


def concurrency(start: Starter, plan: Plan, workdir: Path) -> list[Concurrency]:
    results = []
    for n in plan.concurrency:
        result = hold_calls(start, n, plan, workdir / f"concurrent-{n}")
        results.append(result)
        print(f"  held {n:5}  ok={result.successful} failed={result.failed} "
              f"cpu/call={result.cpu_per_call_pct:.3f}% rss/call={result.rss_per_call_kib:.0f}KiB "
              f"packets={_ratio(result.packets_ratio)} drops={result.dropped_by_target} "
              f"audio={result.audio_flows}",
              flush=True)  # fmt: skip
    return results


def hold_calls(start: Starter, n: int, plan: Plan, workdir: Path) -> Concurrency:
    ramp = n / plan.ramp_rate
    settle = 2.0
    hold_ms = int((ramp + settle + plan.window_seconds + 2) * 1000)
    workdir.mkdir(parents=True, exist_ok=True)
    tone = workdir / "sipp" / "bench-tone.ulaw"
    with start("bridged", workdir) as target:
        idle_rss = target.proc.rss_bytes()
        command = h.sipp_command(
            target.address, ["-sf", str(h.SCENARIOS / "uac_rtp.xml"), "-s", target.service],
            rate=plan.ramp_rate, calls=n, limit=n, hold_ms=hold_ms,
            timeout_s=hold_ms / 1000 + ramp + 30, media_port=h.free_port(),
            extra=["-rtp_threadtasks", "50"],
        )  # fmt: skip
        tone.parent.mkdir(parents=True, exist_ok=True)
        tone.write_bytes(ulaw_tone())
        sipp = h.start_sipp(command, tone.parent)
        time.sleep(ramp + settle)
        cpu0, udp0, t0 = target.proc.cpu_seconds(), udp_arrivals(), time.monotonic()
        drops0 = target.proc.udp_drops()
        time.sleep(plan.window_seconds)
        cpu1, udp1, t1 = target.proc.cpu_seconds(), udp_arrivals(), time.monotonic()
        drops = target.proc.udp_drops() - drops0
        rss = target.proc.rss_bytes()
        result = h.finish_sipp(sipp, tone.parent, hold_ms / 1000 + ramp + 30)
    expected = 2 * target.legs * RTP_PACKETS_PER_SECOND * n * (t1 - t0)
    private = os.environ.get(NETNS_FLAG) == "1"
    return Concurrency(
        calls=n, successful=result.successful, failed=result.failed,
        cpu_per_call_pct=100 * (cpu1 - cpu0) / (t1 - t0) / n,
        rss_per_call_kib=(rss - idle_rss) / 1024 / n,
        idle_rss_mib=idle_rss / 1024 / 1024,
        packets_ratio=(udp1 - udp0) / expected if private else None,
        dropped_by_target=drops,
    )  # fmt: skip


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


def measure(name: str, start: Starter, plan: Plan, workdir: Path) -> TargetResults:
    results = TargetResults(name)
    print(f"== {name}", flush=True)
    try:
        results.reject = rate_sweep(start, "reject", plan.reject_rates, plan, workdir / name)
        results.bridged = rate_sweep(start, "bridged", plan.bridged_rates, plan, workdir / name)
        results.concurrent = concurrency(start, plan, workdir / name)
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
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
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
        starters: dict[str, Starter] = {"bare": bare_system, "router": router_system}
        results = [measure(name, starters[name], plan, workdir) for name in args.targets]
    report = render_report(results, plan, args, time.monotonic() - started)
    print(report)
    output = Path(args.output or h.REPO / ("bench/out/benchmarks-quick.md" if args.quick
                                           else "docs/benchmarks.md"))  # fmt: skip
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
    parser.add_argument("--targets", type=lambda s: s.split(","), default=["bare", "router"],
                        help="comma-separated: bare,router")  # fmt: skip
    parser.add_argument("--output", help="report path (default docs/benchmarks.md)")
    parser.add_argument("--keep", help="keep logs and SIPp files in this directory")
    parser.add_argument("--profile", type=int, metavar="RATE",
                        help="instead of the bench: py-spy on the router's reject path at RATE/s")
    parser.add_argument("--profile-seconds", type=int, default=15, metavar="S")
    parser.add_argument("--native", action="store_true", help="--profile: with C frames")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - {"bare", "router"}
    if unknown:
        parser.error(f"unknown targets: {sorted(unknown)}")
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
    if result.error:
        lines += [f"Not (fully) measured: `{result.error.splitlines()[0]}`", ""]
    for label, sweep in (("Reject path (404)", result.reject), ("Bridged path", result.bridged)):
        if sweep is None:
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
            "Calls held with G.711 flowing:",
            "",
            "| calls | ok | failed | CPU per call (% of a core) | idle RSS | RSS per call | "
            "packets arrived / expected | dropped by target | audio flows |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {c.calls} | {c.successful} | {c.failed} | {c.cpu_per_call_pct:.3f} | "
                  f"{c.idle_rss_mib:.0f} MiB | {c.rss_per_call_kib:.0f} KiB | "
                  f"{_ratio(c.packets_ratio)} | "
                  f"{c.dropped_by_target} | {_yes(c.audio_flows)} |"
                  for c in result.concurrent]  # fmt: skip
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
    held = r["held_with_audio"]
    ratio = _ratio_of(r["reject_fast"], b["reject_fast"], False)
    rows = [
        ("reject path >= 1000 calls/s with p99 < 20 ms", r["reject_fast"],
         r["reject_fast"] is not None and r["reject_fast"] >= GOALS["reject_rate"]),
        ("bridged path >= 200 calls/s", r["bridged"],
         r["bridged"] is not None and r["bridged"] >= GOALS["bridged_rate"]),
        (">= 1000 concurrent bridged calls, audio both ways", held,
         held is not None and held >= GOALS["concurrent"]),
        ("router / bare call rate >= 0.8 on the reject path (p99 < 20 ms)", ratio,
         ratio is not None and ratio >= GOALS["reject_ratio"]),
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
)


def _summary(result: TargetResults | None) -> dict[str, float | None]:
    out: dict[str, float | None] = {key: None for key, _, _ in SUMMARY_ROWS}
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
        "held:    sipp -sf bench/scenarios/uac_rtp.xml -r RAMP -l N -m N -d HOLD HOST:PORT",
        "bare engine: python bench/bare_engine.py --listen 127.0.0.1:0 --mode answer|reject",
        "router:  python -m callrouter keys create --data-dir DIR --name bench --json",
        f"         CALLROUTER_RTP_PORTS={ROUTER_RTP} CALLROUTER_SIP_ADVERTISE=127.0.0.1 "
        "CALLROUTER_LOG_FORMAT=json CALLROUTER_LOG_LEVEL=warning "
        "CALLROUTER_SIP_INBOUND_FLOOD_LIMIT=0 python -m callrouter serve",
        "         POST /api/v1/assistants {runtime_uri: sip:runtime@127.0.0.1:RPORT}, "
        "POST /api/v1/numbers",
        "runtime: sipp -sf sipp-scenarios/uas-runtime-answer.xml -rtp_echo -p RPORT",
        "profile: python bench/run.py --profile 500   (py-spy on the router's reject path)",
    ]


def plan_of(args: argparse.Namespace) -> Plan:
    return QUICK if args.quick else FULL


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
