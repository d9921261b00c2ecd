"""`make bench-numbers`: the number table at operator scale (issue 14).

How it works: for each size (default 100,000 and 1,000,000 numbers) a fresh data dir gets
an API key (``callrouter keys create``) and the numbers, written straight into SQLite
(the import path is measured on its own). Then, each time with a fresh router on
loopback:

1. idle: the router on an empty number table; its RSS is the baseline;
2. start: spawn -> ``/api/v1/health`` 200 with N numbers; RSS above idle, per number;
3. changes: POST, PATCH and DELETE of numbers one at a time on one keep-alive connection;
   p50/p99 per verb;
4. SIP while changes stream: OPTIONS over UDP at 50/s for ``--seconds``, first alone, then
   while POST/PATCH/DELETE stream at 100/s on another thread; p50/p99/max round trip.

Writes the figures into docs/benchmarks.md (its own section between the "numbers bench"
markers, below the hand-written part's marker, so ``bench/run.py`` keeps it) and prints
them as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import harness as h

BEGIN = "<!-- numbers bench: begin (bench/number_table.py writes this section) -->"
END = "<!-- numbers bench: end -->"
KEEP_MARKER = "<!-- Everything below this line is written by hand; bench/run.py keeps it. -->"
STAMP = "2026-01-01T00:00:00.000000Z"
COMPACTION_AT = 250


def seed(db: Path, count: int) -> str:
    """``count`` numbers (+1 555 ...), every tenth without an assistant; returns the
    assistant id the rest point at."""
    assistant = str(uuid.uuid4())
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("INSERT INTO assistants (id, name, runtime_uri, created_at, updated_at) "
                     "VALUES (?, 'bench', NULL, ?, ?)", (assistant, STAMP, STAMP))
        rows = ((str(uuid.uuid4()), f"+1555{i:07d}", "", None if i % 10 == 0 else assistant,
                 None, 1, STAMP, STAMP) for i in range(count))
        conn.executemany("INSERT INTO numbers (id, phone_number, name, assistant_id, "
                         "transfer_trunk_id, is_active, created_at, updated_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.commit()
    return assistant


def create_key(data_dir: Path) -> str:
    argv = [sys.executable, "-m", "callrouter", "keys", "create", "--data-dir", str(data_dir),
            "--name", "bench", "--json"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    key: str = json.loads(done.stdout)["key"]
    return key


class Router:
    def __init__(self, workdir: Path, data_dir: Path) -> None:
        self.sip_port, self.http_port = h.free_port(), h.free_port(socket.SOCK_STREAM)
        env = h.engine_env() | {
            "CALLROUTER_SIP_LISTEN": f"{h.LOOPBACK}:{self.sip_port}",
            "CALLROUTER_SIP_ADVERTISE": h.LOOPBACK,
            "CALLROUTER_RTP_PORTS": "40000-40999",
            "CALLROUTER_SIP_MAX_CALLS": "100",
            "CALLROUTER_HTTP_LISTEN": f"{h.LOOPBACK}:{self.http_port}",
            "CALLROUTER_DATA_DIR": str(data_dir),
            "CALLROUTER_LOG_LEVEL": "warning",
            "CALLROUTER_HTTP_RATE_LIMIT_PER_MINUTE": "1000000",
            "CALLROUTER_SIP_INBOUND_FLOOD_LIMIT": "0",
            # Low enough that the route table's overlay is compacted several times while
            # changes stream (default 4096 would take two minutes at 100 changes/s).
            "CALLROUTER_NUMBERS_ROUTE_COMPACTION_AT": str(COMPACTION_AT),
        }
        self.started = time.monotonic()
        self.proc = h.spawn("router", [sys.executable, "-m", "callrouter", "serve"], workdir, env)
        self.healthy_after = self._wait_healthy()

    def _wait_healthy(self) -> float:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.alive():
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection(h.LOOPBACK, self.http_port, timeout=1)
                conn.request("GET", "/api/v1/health")
                if conn.getresponse().status == 200:
                    return time.monotonic() - self.started
            time.sleep(0.05)
        self.proc.stop()
        raise h.BenchError(f"router not healthy:\n{self.proc.tail()}")


@contextlib.contextmanager
def router(workdir: Path, data_dir: Path) -> Iterator[Router]:
    r = Router(workdir, data_dir)
    with h.running(r.proc):
        yield r


def _connect(port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(h.LOOPBACK, port, timeout=30)
    conn.connect()
    # http.client sends the body apart from the headers: without this, Nagle and the
    # server's delayed ACK add 40 ms to every request, which is not the router's time.
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


class Api:
    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.conn = _connect(port)
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: Any = None) -> tuple[float, dict[str, Any]]:
        try:
            return self._call(method, path, body)
        except (ConnectionError, http.client.HTTPException):  # idle keep-alive closed
            self.conn.close()
            self.conn = _connect(self.port)
            return self._call(method, path, body)

    def _call(self, method: str, path: str, body: Any) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        self.conn.request(method, "/api/v1" + path,
                          None if body is None else json.dumps(body), self.headers)
        response = self.conn.getresponse()
        data = response.read()
        took = time.perf_counter() - started
        if response.status >= 300:
            raise h.BenchError(f"{method} {path}: {response.status} {data[:300]!r}")
        return took, json.loads(data)


def change_cycle(api: Api, assistant: str, prefix: str, i: int) -> dict[str, float]:
    """One POST, PATCH and DELETE of a new number; the latency of each."""
    posted, made = api.call("POST", "/numbers", {"phone_number": f"+3185{prefix}{i:06d}",
                                                  "assistant_id": assistant})
    number_id = made["number"]["id"]
    patched, _ = api.call("PATCH", f"/numbers/{number_id}", {"is_active": False})
    deleted, _ = api.call("DELETE", f"/numbers/{number_id}")
    return {"POST": posted, "PATCH": patched, "DELETE": deleted}


def changes(api: Api, assistant: str, count: int) -> dict[str, dict[str, float]]:
    took: dict[str, list[float]] = {"POST": [], "PATCH": [], "DELETE": []}
    for i in range(count):
        for verb, seconds in change_cycle(api, assistant, "6", i).items():
            took[verb].append(seconds)
    return {verb: percentiles(values) for verb, values in took.items()}


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50_ms": round(pick(0.5), 2), "p99_ms": round(pick(0.99), 2),
            "max_ms": round(ordered[-1] * 1000, 2), "n": len(ordered)}


def options_probe(port: int, seconds: float, rate: float) -> dict[str, float]:
    """OPTIONS at ``rate``/s from one UDP socket; round trip of each (lost: counted)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((h.LOOPBACK, 0))
    sock.settimeout(1.0)
    local = sock.getsockname()[1]
    took, lost = [], 0
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
        branch = f"z9hG4bK{uuid.uuid4().hex[:16]}"
        message = (f"OPTIONS sip:{h.LOOPBACK}:{port} SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP {h.LOOPBACK}:{local};branch={branch};rport\r\n"
                   f"Max-Forwards: 70\r\nFrom: <sip:bench@{h.LOOPBACK}:{local}>;tag={n}\r\n"
                   f"To: <sip:{h.LOOPBACK}:{port}>\r\nCall-ID: {branch}@bench\r\n"
                   f"CSeq: 1 OPTIONS\r\nContact: <sip:bench@{h.LOOPBACK}:{local}>\r\n"
                   "Accept: application/sdp\r\nContent-Length: 0\r\n\r\n").encode()
        started = time.perf_counter()
        sock.sendto(message, (h.LOOPBACK, port))
        try:
            while branch.encode() not in sock.recv(65535):
                pass
            took.append(time.perf_counter() - started)
        except TimeoutError:
            lost += 1
        time.sleep(max(0.0, 1 / rate - (time.perf_counter() - started)))
    sock.close()
    return {**percentiles(took), "lost": lost}


def options_while_changing(r: Router, key: str, assistant: str, seconds: float,
                           rate: float) -> dict[str, Any]:
    api = Api(r.http_port, key)
    stop = threading.Event()
    done: list[float] = []

    def stream() -> None:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            for seconds_taken in change_cycle(api, assistant, "7", i).values():
                done.append(seconds_taken)
            i += 1
            time.sleep(max(0.0, 3 / rate - (time.monotonic() - started)))

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        sip = options_probe(r.sip_port, seconds, 50)
    finally:
        stop.set()
        thread.join(30)
    return {"options": sip, "changes_per_second": round(len(done) / seconds, 1),
            "changes": percentiles(done)}


def import_csv(r: Router, key: str, rows: int, workdir: Path) -> dict[str, Any]:
    """``callrouter numbers import`` of ``rows`` new numbers (+31858...), timed, with
    OPTIONS probed throughout."""
    path = workdir / f"import-{rows}.csv"
    with path.open("w") as f:
        f.write("phone_number,name,is_active\n")
        f.writelines(f"+31858{i:06d},bulk {i},true\n" for i in range(rows))
    env = dict(os.environ) | {"CALLROUTER_API_URL": f"http://{h.LOOPBACK}:{r.http_port}",
                              "CALLROUTER_API_KEY": key}
    sip: dict[str, Any] = {}
    started = time.monotonic()
    cli = subprocess.Popen([sys.executable, "-m", "callrouter", "numbers", "import", str(path)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    probe = threading.Thread(target=lambda: sip.update(_probe_until(r.sip_port, cli)))
    probe.start()
    out, _ = cli.communicate(timeout=1800)
    took = time.monotonic() - started
    probe.join(30)
    if cli.returncode != 0:
        raise h.BenchError(f"import failed ({cli.returncode}): {out[-500:]}")
    return {"rows": rows, "seconds": round(took, 1), "mb": round(path.stat().st_size / 2**20, 1),
            "options_during": sip, "said": out.strip()}


def _probe_until(port: int, proc: subprocess.Popen[str]) -> dict[str, float]:
    results: list[dict[str, float]] = []
    while proc.poll() is None:
        results.append(options_probe(port, 2.0, 50))
    worst = max(results, key=lambda x: x.get("max_ms", 0)) if results else {"n": 0}
    return {"p99_ms_worst_2s": worst.get("p99_ms", 0), "max_ms": worst.get("max_ms", 0),
            "lost": sum(x.get("lost", 0) for x in results)}


def run_size(count: int, workdir: Path, seconds: float, cycles: int,
             do_import: bool) -> dict[str, Any]:
    data_dir = workdir / f"data-{count}"
    data_dir.mkdir(parents=True)
    key = create_key(data_dir)
    with router(workdir / "idle", data_dir) as idle:
        time.sleep(2)
        idle_rss = idle.proc.rss_bytes()
    started = time.monotonic()
    assistant = seed(data_dir / "callrouter.db", count)
    seeded = time.monotonic() - started
    with router(workdir / f"router-{count}", data_dir) as r:
        healthy = r.healthy_after
        time.sleep(2)
        rss = r.proc.rss_bytes()
        api = Api(r.http_port, key)
        verbs = changes(api, assistant, cycles)
        quiet = options_probe(r.sip_port, seconds, 50)
        busy = options_while_changing(r, key, assistant, seconds, 100)
        listed = list_all(r.http_port, key)
        imported = import_csv(r, key, count, workdir) if do_import else None
    return {"import": imported, "numbers": count, "seed_seconds": round(seeded, 1),
            "healthy_seconds": round(healthy, 2), "idle_rss_mb": round(idle_rss / 2**20, 1),
            "rss_mb": round(rss / 2**20, 1),
            "rss_bytes_per_number": round((rss - idle_rss) / count, 1),
            "changes": verbs, "options_quiet": quiet, "options_while_changing": busy,
            "list_all": listed}


def list_all(port: int, key: str) -> dict[str, float]:
    conn = http.client.HTTPConnection(h.LOOPBACK, port, timeout=300)
    started = time.perf_counter()
    conn.request("GET", "/api/v1/numbers", headers={"Authorization": f"Bearer {key}"})
    response = conn.getresponse()
    first = None
    size = 0
    while chunk := response.read(1 << 16):
        first = first or time.perf_counter() - started
        size += len(chunk)
    return {"seconds": round(time.perf_counter() - started, 2),
            "first_byte_ms": round((first or 0) * 1000, 1), "mb": round(size / 2**20, 1)}


def render(results: Sequence[dict[str, Any]]) -> str:
    lines = [BEGIN, "", "## Number table at scale (bench/number_table.py)", "",
             f"Machine: {os.cpu_count()} CPUs visible; loopback; router with SQLite. "
             "OPTIONS at 50/s; changes streamed as POST+PATCH+DELETE cycles.", "",
             f"The route table's compaction threshold is {COMPACTION_AT} here (default 4096), "
             "so compactions happen while the OPTIONS are measured. Import: "
             "`callrouter numbers import` of as many new rows as the table holds, OPTIONS "
             "probed throughout (worst 2-second window).", "",
             "| numbers | healthy (s) | RSS idle / loaded (MB) | bytes/number | "
             "POST p50/p99 (ms) | PATCH p50/p99 | DELETE p50/p99 | OPTIONS quiet p50/p99/max | "
             "OPTIONS during changes p50/p99/max (changes/s) | GET all (s, MB) | "
             "import (rows, s; OPTIONS p99/max ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, q, b = r["changes"], r["options_quiet"], r["options_while_changing"]
        o = b["options"]
        lines.append(
            f"| {r['numbers']:,} | {r['healthy_seconds']} | {r['idle_rss_mb']} / {r['rss_mb']} "
            f"| {r['rss_bytes_per_number']} "
            f"| {c['POST']['p50_ms']} / {c['POST']['p99_ms']} "
            f"| {c['PATCH']['p50_ms']} / {c['PATCH']['p99_ms']} "
            f"| {c['DELETE']['p50_ms']} / {c['DELETE']['p99_ms']} "
            f"| {q['p50_ms']} / {q['p99_ms']} / {q['max_ms']} "
            f"| {o['p50_ms']} / {o['p99_ms']} / {o['max_ms']} ({b['changes_per_second']}) "
            f"| {r['list_all']['seconds']}, {r['list_all']['mb']} | {_import_cell(r['import'])} |")
    lines += ["", "Raw figures:", "", "```json",
              *(json.dumps(r, separators=(",", ":")) for r in results), "```", "", END, ""]
    return "\n".join(lines)


def _import_cell(imported: dict[str, Any] | None) -> str:
    if not imported:
        return "-"
    sip = imported["options_during"]
    return (f"{imported['rows']:,}, {imported['seconds']}; "
            f"{sip.get('p99_ms_worst_2s')} / {sip.get('max_ms')}")


def write_report(output: Path, section: str) -> None:
    """Replace the numbers section, or append it: below ``KEEP_MARKER``, where
    ``bench/run.py`` (which rewrites everything above it) carries it over."""
    old = output.read_text() if output.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        marker = "" if KEEP_MARKER in old else "\n" + KEEP_MARKER + "\n"
        new = old.rstrip("\n") + "\n" + marker + "\n" + section
    output.write_text(new)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cycles", type=int, default=300, help="POST+PATCH+DELETE cycles")
    parser.add_argument("--no-import", action="store_true", help="skip the CSV import run")
    parser.add_argument("--output", type=Path, default=h.REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    random.seed(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="callrouter-numbers-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            result = run_size(size, Path(tmp), args.seconds, args.cycles, not args.no_import)
            print(json.dumps(result), flush=True)
            results.append(result)
    write_report(args.output, render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
