"""The reject path's rate with INVITEs held for a slow ``assistant-request`` webhook beside
it, against the same router without them, in one run (issue 12 item 2: the SIP thread
never waits on HTTP, so held INVITEs must not slow the other calls down).

How it works: one router on loopback whose account webhook (``CALLROUTER_WEBHOOKS_URL``)
is a receiver in this process that answers every ``assistant-request`` after ``--slow``
seconds with ``{"error": "busy"}`` (so each held INVITE ends 603 without media). At each
rate, SIPp first sends INVITEs to an unknown number (404, never asked) alone, then again
while a second SIPp keeps ``--held-rate`` INVITEs a second to the webhooked number held
(ringing) for ``--slow`` seconds each. Both runs report INVITE -> final response p50/p99
and failures; the summary compares the highest rate with no failures and p99 under
20 ms. Every SIPp run is bounded in calls and time; all traffic stays on 127.0.0.1.

``python bench/webhooks.py [--rates 250,500,1000] [--seconds 5] [--slow 3] [--held-rate 20]
[--repeat 3]`` (each rate: alone and beside held INVITEs, alternated ``--repeat`` times)
writes bench/out/webhooks.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import harness as h
import run as r

HELD_NUMBER = r.BRIDGED_NUMBER  # provisioned with an assistant: asked, then refused 603
CALLER = "+31201234567"
P99_GOAL_MS = 20.0


@contextlib.contextmanager
def slow_receiver(delay: float) -> Iterator[str]:
    """An HTTP webhook receiver answering after ``delay`` seconds; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            time.sleep(delay)
            body = json.dumps({"error": "busy"}).encode()
            with contextlib.suppress(OSError):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer((h.LOOPBACK, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{h.LOOPBACK}:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class Step:
    rate: int
    alone: r.RateStep
    beside_held: r.RateStep
    held_ok: int
    held_failed: int


def reject_step(address: str, rate: int, seconds: int, workdir: Path) -> r.RateStep:
    command = h.sipp_command(
        address, ["-sf", str(h.SCENARIOS / "reject_uac.xml"), "-s", r.UNKNOWN_NUMBER],
        rate=rate, calls=rate * seconds, limit=rate * 4 + 100, hold_ms=0,
        timeout_s=seconds + 20, media_port=h.free_port())
    result = h.run_sipp(command, workdir, seconds + 30)
    return r.RateStep(rate, result.successful, result.failed, result.percentile(0.5),
                      result.percentile(0.99))


def held_command(address: str, held_rate: int, seconds: float, slow: float) -> list[str]:
    scenario = h.REPO / "sipp-scenarios" / "uac-invite-603-reason.xml"
    calls = int(held_rate * seconds)
    return h.sipp_command(
        address, ["-sf", str(scenario)], rate=held_rate, calls=calls,
        limit=int(held_rate * (slow + 2)) + 50, hold_ms=0, timeout_s=seconds + slow + 30,
        media_port=h.free_port(),
        extra=["-key", "dialled", HELD_NUMBER, "-key", "caller", CALLER])


def combined(runs: Sequence[r.RateStep]) -> r.RateStep:
    """Repeated runs at one rate: calls summed, the median run's p50 and p99."""
    def median(values: list[float | None]) -> float | None:
        known = sorted(v for v in values if v is not None)
        return known[len(known) // 2] if known else None

    return r.RateStep(runs[0].rate, sum(x.successful for x in runs), sum(x.failed for x in runs),
                      median([x.p50_ms for x in runs]), median([x.p99_ms for x in runs]))


def measure(rates: Sequence[int], seconds: int, slow: float, held_rate: int, repeat: int,
            workdir: Path) -> list[Step]:
    steps = []
    with slow_receiver(slow) as url, contextlib.ExitStack() as stack:
        data_dir = workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        sip_port, http_port = h.free_port(), h.free_port(socket.SOCK_STREAM)
        runtime_port = h.free_port()
        runtime = stack.enter_context(h.running(r.start_runtime(workdir, runtime_port)))
        key = r.create_api_key(data_dir)
        env = {"CALLROUTER_WEBHOOKS_URL": url, "CALLROUTER_WEBHOOKS_EVENTS": "assistant-request",
               "CALLROUTER_WEBHOOKS_ASSISTANT_REQUEST_TIMEOUT_SECONDS": str(slow + 2)}
        router = stack.enter_context(h.running(r.start_router(
            workdir, sip_port, http_port, r.ROUTER_RTP, data_dir, env)))
        r.provision_router(f"http://{h.LOOPBACK}:{http_port}", key, runtime_port)
        assert runtime.alive(), runtime.tail()
        address = f"{h.LOOPBACK}:{sip_port}"
        for rate in rates:
            alones, besides, held_ok, held_failed = [], [], 0, 0
            for turn in range(repeat):  # alternated, so drifting background load hits both
                step_dir = workdir / f"rate-{rate}-{turn}"
                alones.append(reject_step(address, rate, seconds, step_dir / "alone"))
                held_dir = step_dir / "held"
                held_dir.mkdir(parents=True, exist_ok=True)
                background = h.start_sipp(
                    held_command(address, held_rate, seconds + slow + 2, slow), held_dir)
                time.sleep(slow + 0.5)  # the held INVITEs build up to held_rate * slow at once
                besides.append(reject_step(address, rate, seconds, step_dir / "beside"))
                held = h.finish_sipp(background, held_dir, seconds + 2 * slow + 40)
                held_ok, held_failed = held_ok + held.successful, held_failed + held.failed
            alone, beside = combined(alones), combined(besides)
            step = Step(rate, alone, beside, held_ok, held_failed)
            steps.append(step)
            print(f"  {rate:5}/s  alone: ok={alone.successful} failed={alone.failed} "
                  f"p99={r._ms(alone.p99_ms)}   beside {int(held_rate * slow)} held: "
                  f"ok={beside.successful} failed={beside.failed} p99={r._ms(beside.p99_ms)}"
                  f"   (held calls ok={held_ok} failed={held_failed})", flush=True)
            assert router.alive(), router.tail()
    return steps


def best(steps: Sequence[Step], which: str, p99_ms: float) -> int | None:
    passing = [s.rate for s in steps
               if (run := getattr(s, which)).failed == 0 and run.successful > 0
               and run.p99_ms is not None and run.p99_ms < p99_ms]
    return max(passing) if passing else None


def report(steps: Sequence[Step], args: argparse.Namespace) -> str:
    lines = [f"reject path (404) alone vs beside INVITEs held {args.slow:g} s for a slow "
             f"assistant-request webhook ({args.held_rate}/s, about "
             f"{int(args.held_rate * args.slow)} held at once); {args.seconds} s per run, "
             f"{args.repeat} runs of each per rate, alternated (median p50/p99)", "",
             "| rate /s | alone ok/failed | alone p50 / p99 ms | beside held ok/failed "
             "| beside p50 / p99 ms | held calls ok/failed |",
             "|---|---|---|---|---|---|"]
    for s in steps:
        lines.append(
            f"| {s.rate} | {s.alone.successful}/{s.alone.failed} | "
            f"{r._ms(s.alone.p50_ms)} / {r._ms(s.alone.p99_ms)} | "
            f"{s.beside_held.successful}/{s.beside_held.failed} | "
            f"{r._ms(s.beside_held.p50_ms)} / {r._ms(s.beside_held.p99_ms)} | "
            f"{s.held_ok}/{s.held_failed} |")
    lines.append("")
    for label, p99 in (("sustained (no failures, p99 < 1 s, as `make bench`)",
                        r.OVERLOAD_P99_MS), (f"no failures and p99 < {P99_GOAL_MS:g} ms",
                                             P99_GOAL_MS)):
        alone, beside = best(steps, "alone", p99), best(steps, "beside_held", p99)
        ratio = beside / alone if alone and beside else None
        lines.append(f"highest rate, {label}: alone {alone}, beside held INVITEs {beside}"
                     + (f" (ratio {ratio:.2f}; goal >= 0.90)" if ratio else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="250,500,1000")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--slow", type=float, default=3.0)
    parser.add_argument("--held-rate", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3,
                        help="alone/beside runs per rate, alternated (median p99 reported)")
    args = parser.parse_args(argv)
    rates = [int(x) for x in args.rates.split(",")]
    out = h.BENCH / "out"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="callrouter-bench-webhooks-") as tmp:
        steps = measure(rates, args.seconds, args.slow, args.held_rate, args.repeat, Path(tmp))
    text = report(steps, args)
    (out / "webhooks.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
