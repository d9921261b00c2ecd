"""Run SIPp from tests, bounded, and read back what happened.

How to use it::

    from tests.support.sipp import RtpCounter, Sipp, free_media_port, scenario

    runtime = Sipp(scenario("uas-runtime-answer"), role="uas", rtp_echo=True).start()
    caller = Sipp(scenario("uac-call-bridged"), target=runtime.address,
                  keys={"dialled": "+31850835037", "caller": "+31201234567"}, duration_ms=2000)
    with RtpCounter([caller.media_port, runtime.media_port]) as rtp:
        result = caller.run()
    assert result.ok and result.successful == 1
    assert result.sequence() == ["INVITE", 100, 180, 200, "ACK", "BYE", 200]
    assert rtp.count(runtime.media_port) > 0 and rtp.count(caller.media_port) > 0
    assert runtime.wait().ok

How it works: every SIPp gets its own free loopback SIP port (``-p``), media port (``-mp``,
SIPp also binds ``-mp + 2``) and control port (``-cp``), and writes ``-trace_msg``,
``-trace_stat`` and ``-trace_err`` files into a private temporary directory. Every run is
bounded twice: SIPp's own ``-timeout`` (it quits by itself) and a subprocess deadline a few
seconds later, after which the process group that this module started is killed by pid.

The result carries SIPp's exit code (0: every call passed, 1: some failed, 99: no call
processed, 255/254: fatal), the cumulative successful and failed call counters from the
statistics CSV, and the SIP trace as an ordered list of :class:`Message` (sent and received,
retransmissions included), so tests can assert whole sequences.

RTP: SIPp 3.6 counts no RTP. :class:`RtpCounter` watches the loopback interface with a raw
``AF_PACKET`` socket (needs ``CAP_NET_RAW``, i.e. root, as in CI; ``RtpCounter.available()``
says whether it can) and counts RTP datagrams by destination port, per payload type, without
taking part in the media path, so it works the same with or without the router in the middle.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import os
import re
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SIPP = os.environ.get("SIPP", "sipp")
SCENARIO_DIR = Path(__file__).resolve().parents[2] / "sipp-scenarios"
LOOPBACK = "127.0.0.1"

# SIPp exit codes (sipp(1), "EXIT STATUS").
EXIT_ALL_PASSED = 0
EXIT_SOME_FAILED = 1
EXIT_NO_CALL = 99

_GRACE_S = 5.0
LIVE: set[Sipp] = set()  # started and not yet stopped


def stop_all() -> None:
    """Stop every SIPp still running (a test fixture calls this after each test)."""
    for peer in list(LIVE):
        peer.stop()


def scenario(name: str) -> Path:
    """Path of a scenario in sipp-scenarios/, with or without the .xml suffix."""
    path = SCENARIO_DIR / (name if name.endswith(".xml") else f"{name}.xml")
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def free_port(kind: int = socket.SOCK_DGRAM, host: str = LOOPBACK) -> int:
    """A port that is free right now on ``host`` for ``kind`` (UDP by default)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_udp_port(host: str = LOOPBACK) -> int:
    return free_port(socket.SOCK_DGRAM, host)


def free_sip_port(host: str = LOOPBACK) -> int:
    """A port free for both UDP and TCP, as a SIP listener needs (SIPp binds one or the other)."""
    for _ in range(50):
        port = free_port(socket.SOCK_STREAM, host)
        if _bindable(port, socket.SOCK_DGRAM, host):
            return port
    raise OSError("no port free for both UDP and TCP")


def free_media_port(host: str = LOOPBACK) -> int:
    """An even port P with P, P+1, P+2 and P+3 free over UDP (SIPp binds P and P+2 for -mp)."""
    for _ in range(100):
        port = free_udp_port(host) & ~1
        if port + 3 < 65536 and all(_bindable(port + i, socket.SOCK_DGRAM, host) for i in range(4)):
            return port
    raise OSError("no free media port range")


def _bindable(port: int, kind: int, host: str) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class Message:
    """One SIP message from SIPp's -trace_msg log."""

    direction: str  # "sent" or "received"
    first_line: str
    call_id: str
    cseq: str
    headers: dict[str, str] = field(default_factory=dict, compare=False)  # lower-case names

    @property
    def kind(self) -> str | int:
        """The method of a request ("INVITE") or the status code of a response (200)."""
        head = self.first_line.split(" ", 2)
        if head[0].startswith("SIP/"):
            return int(head[1])
        return head[0]


@dataclass(frozen=True)
class SippResult:
    returncode: int
    successful: int
    failed: int
    messages: tuple[Message, ...]
    errors: str
    workdir: Path

    @property
    def ok(self) -> bool:
        return self.returncode == EXIT_ALL_PASSED and self.failed == 0

    def sequence(self, direction: str | None = None, *, dedupe: bool = True) -> list[str | int]:
        """Methods and status codes in wire order; retransmissions folded away by default.

        A retransmission is the same first line and CSeq in the same direction and call as a
        message already seen; pass ``dedupe=False`` to keep them.
        """
        seen: set[tuple[str, str, str, str]] = set()
        out: list[str | int] = []
        for msg in self.messages:
            if direction and msg.direction != direction:
                continue
            key = (msg.direction, msg.call_id, msg.cseq, msg.first_line)
            if dedupe and key in seen:
                continue
            seen.add(key)
            out.append(msg.kind)
        return out

    def explain(self) -> str:
        """A short text for assertion messages."""
        return (f"rc={self.returncode} ok={self.successful} failed={self.failed} "
                f"seq={self.sequence()} errors={self.errors[-1500:]!r} dir={self.workdir}")


_ENTRY = re.compile(r"^-{20,} .*\n(?P<how>.*message (?P<dir>sent|received).*)\n\n", re.M)


def parse_messages(log: str) -> tuple[Message, ...]:
    """Parse a SIPp -trace_msg log into messages, in the order they were logged."""
    marks = list(_ENTRY.finditer(log))
    out = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(log)
        text = log[mark.end():end].replace("\r", "")
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            continue
        headers = _headers(lines[1:])
        out.append(Message(mark["dir"], lines[0].strip(), headers.get("call-id", ""),
                           headers.get("cseq", ""), headers))
    return tuple(out)


def _headers(lines: Iterable[str]) -> dict[str, str]:
    compact = {"i": "call-id"}
    found: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or " " in name.strip():
            continue
        key = compact.get(name.strip().lower(), name.strip().lower())
        found.setdefault(key, " ".join(value.split()))
    return found


def parse_stats(path: Path) -> tuple[int, int]:
    """(successful, failed) cumulative counters from the last row of a -trace_stat CSV."""
    if not path.is_file():
        return 0, 0
    rows = list(csv.DictReader(path.read_text().splitlines(), delimiter=";"))
    if not rows:
        return 0, 0
    last = rows[-1]
    return int(last.get("SuccessfulCall(C)") or 0), int(last.get("FailedCall(C)") or 0)


class _ControlPortTaken(RuntimeError):
    """SIPp could not bind its control port: someone took it after it was chosen."""


@dataclass(eq=False)
class Sipp:
    """One SIPp process: a uac towards ``target`` or a uas listening on ``port``.

    ``keys`` become ``-key name value``; ``calls`` is ``-m``, ``rate`` ``-r`` (calls per
    second), ``limit`` ``-l``; ``duration_ms`` is ``-d`` (the length of ``<pause/>``);
    ``transport`` is SIPp's ``-t`` (``u1`` UDP, ``t1`` TCP); ``timeout_s`` bounds the run.
    """

    scenario: Path
    role: str = "uac"
    target: str | None = None
    keys: Mapping[str, str] = field(default_factory=dict)
    calls: int = 1
    rate: float | None = None
    limit: int | None = None
    duration_ms: int | None = None
    transport: str = "u1"
    rtp_echo: bool = False
    timeout_s: float = 15.0
    recv_timeout_ms: int | None = None
    extra_args: Sequence[str] = ()
    host: str = LOOPBACK
    port: int = 0
    media_port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _workdir: Path | None = field(default=None, init=False, repr=False)
    _deadline: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.role not in ("uac", "uas"):
            raise ValueError(f"role must be uac or uas, not {self.role!r}")
        if self.role == "uac" and not self.target:
            raise ValueError("a uac needs a target host:port")
        self.port = self.port or free_sip_port(self.host)
        self.media_port = self.media_port or free_media_port(self.host)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self, workdir: Path) -> list[str]:
        name = self.scenario.stem
        cmd = [SIPP, "-sf", str(self.scenario)]
        if self.role == "uac":
            cmd.append(str(self.target))
        cmd += ["-i", self.host, "-p", str(self.port), "-mi", self.host,
                "-mp", str(self.media_port), "-cp", str(free_udp_port()),
                "-t", self.transport, "-m", str(self.calls), "-nostdin",
                "-timeout", f"{self.timeout_s:g}s", "-timeout_error",
                "-trace_msg", "-message_file", str(workdir / f"{name}.msg.log"),
                "-trace_stat", "-stf", str(workdir / f"{name}.csv"),
                "-trace_err", "-error_file", str(workdir / f"{name}.err.log")]
        for key, value in self.keys.items():
            cmd += ["-key", key, value]
        options: list[tuple[str, object | None]] = [
            ("-r", self.rate), ("-l", self.limit), ("-d", self.duration_ms),
            ("-recv_timeout", self.recv_timeout_ms)]
        for flag, value in options:
            if value is not None:
                cmd += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        if self.rtp_echo:
            cmd.append("-rtp_echo")
        return [*cmd, *self.extra_args]

    def start(self) -> Sipp:
        """Start in the background; a uas is listening when this returns."""
        if self._proc is not None:
            raise RuntimeError("already started")
        for attempt in range(3):
            self._workdir = Path(tempfile.mkdtemp(prefix=f"sipp-{self.scenario.stem}-"))
            self._deadline = time.monotonic() + self.timeout_s + _GRACE_S
            with (self._workdir / "stderr.log").open("wb") as stderr:
                self._proc = subprocess.Popen(
                    self.command(self._workdir), cwd=self._workdir, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
            LIVE.add(self)
            if self.role != "uas":
                return self
            try:
                self._await_listening()
                return self
            except _ControlPortTaken:
                # The control port (-cp) was free when chosen and taken before SIPp bound
                # it (another process's ephemeral port); command() picks a new one.
                self.stop()
                self._proc = None
                if attempt == 2:
                    raise
        return self

    def run(self) -> SippResult:
        """Start, wait for the end, return the result."""
        return self.start().wait()

    def wait(self) -> SippResult:
        """Wait until SIPp exits (killed at its deadline) and collect the result."""
        proc, workdir = self._require_started()
        try:
            returncode = proc.wait(timeout=max(0.1, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            returncode = proc.wait()
        LIVE.discard(self)
        return self._collect(returncode, workdir)

    def stop(self) -> None:
        """Kill the process group this object started (SIPp and any pcap-play children)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait()  # reap it
        LIVE.discard(self)

    def _require_started(self) -> tuple[subprocess.Popen[bytes], Path]:
        if self._proc is None or self._workdir is None:
            raise RuntimeError("not started")
        return self._proc, self._workdir

    def _await_listening(self) -> None:
        proc, workdir = self._require_started()
        kind = "tcp" if self.transport.startswith("t") else "udp"
        until = time.monotonic() + 5.0
        while time.monotonic() < until:
            if proc.poll() is not None:
                said = (workdir / "stderr.log").read_text()
                kind_ = _ControlPortTaken if "remote control socket" in said else RuntimeError
                raise kind_(f"sipp exited early: {said}")
            if _is_listening(kind, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"sipp not listening on {self.address} after 5 s")

    def _collect(self, returncode: int, workdir: Path) -> SippResult:
        name = self.scenario.stem
        successful, failed = parse_stats(workdir / f"{name}.csv")
        msg_log = workdir / f"{name}.msg.log"
        messages = parse_messages(msg_log.read_text(errors="replace")) if msg_log.exists() else ()
        errors = "".join(p.read_text(errors="replace")
                         for p in (workdir / f"{name}.err.log", workdir / "stderr.log")
                         if p.exists())
        return SippResult(returncode, successful, failed, messages, errors, workdir)


def _is_listening(kind: str, port: int) -> bool:
    """Whether something listens on a local port, from /proc/net (no probe traffic)."""
    hexport = f":{port:04X}"
    wanted_state = "0A" if kind == "tcp" else "07"  # LISTEN, or UDP's unconnected state
    for table in (f"/proc/net/{kind}", f"/proc/net/{kind}6"):
        with contextlib.suppress(FileNotFoundError), open(table) as fh:
            for line in fh.readlines()[1:]:
                cols = line.split()
                if cols[1].endswith(hexport) and cols[3] == wanted_state:
                    return True
    return False


_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4


@dataclasses.dataclass(frozen=True)
class RtpHeader:
    ssrc: int
    seq: int
    ts: int
    pt: int
    marker: bool


class RtpCounter:
    """Count RTP datagrams on the loopback interface, by destination UDP port.

    A passive observer (raw ``AF_PACKET`` socket on ``lo``): it sees the packets that any
    process sends to the watched ports, whoever owns them. Each packet is counted once (the
    outgoing copy the kernel also shows on ``lo`` is skipped).
    """

    def __init__(self, ports: Iterable[int], interface: str = "lo") -> None:
        self.ports = frozenset(ports)
        self.interface = interface
        self._by_port: dict[int, collections.Counter[int]] = collections.defaultdict(
            collections.Counter)
        self._events: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        self._event_stamps: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
        self._headers: dict[int, list[RtpHeader]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def available(interface: str = "lo") -> bool:
        """Whether this process may open a raw packet socket (CAP_NET_RAW)."""
        try:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL)) as s:
                s.bind((interface, 0))
        except (PermissionError, OSError, AttributeError):
            return False
        return True

    def __enter__(self) -> RtpCounter:
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        self._sock.bind((self.interface, 0))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, name="rtp-counter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()

    def count(self, port: int, payload_type: int | None = None) -> int:
        """RTP packets seen towards ``port`` (of one payload type, if given)."""
        with self._lock:
            counter = self._by_port.get(port, collections.Counter())
            return counter[payload_type] if payload_type is not None else sum(counter.values())

    def payload_types(self, port: int) -> dict[int, int]:
        with self._lock:
            return dict(self._by_port.get(port, {}))

    def headers(self, port: int) -> list[RtpHeader]:
        """Every RTP packet's header towards ``port``, in the order they were seen."""
        with self._lock:
            return list(self._headers.get(port, []))

    def events(self, port: int, payload_type: int = 101) -> list[int]:
        """RFC 4733 event codes seen towards ``port``, once per event (0-9, 10 '*', 11 '#')."""
        with self._lock:
            return list(self._events.get((port, payload_type), []))

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] != _PACKET_OUTGOING:
                self._account(frame)

    def _account(self, frame: bytes) -> None:
        parsed = _udp_payload(frame)
        if parsed is None:
            return
        port, payload = parsed
        if port not in self.ports or len(payload) < 12 or payload[0] >> 6 != 2:
            return
        pt = payload[1] & 0x7F
        seq, ts, ssrc = struct.unpack("!HII", payload[2:12])
        with self._lock:
            self._by_port[port][pt] += 1
            self._headers[port].append(RtpHeader(ssrc, seq, ts, pt, bool(payload[1] & 0x80)))
            if len(payload) >= 16:
                self._note_event((port, pt), payload)

    def _note_event(self, key: tuple[int, int], payload: bytes) -> None:
        # RFC 4733 §2.3: event, E|R|volume, duration; one event spans many packets that share
        # the RTP timestamp, so a new timestamp marks a new key press.
        timestamp = struct.unpack("!I", payload[4:8])[0]
        if timestamp not in self._event_stamps[key]:
            self._event_stamps[key].add(timestamp)
            self._events[key].append(payload[12])


def _udp_payload(frame: bytes) -> tuple[int, bytes] | None:
    """(destination port, payload) of a UDP datagram in an Ethernet frame from ``lo``."""
    ethertype = struct.unpack("!H", frame[12:14])[0]
    ip = frame[14:]
    if ethertype == 0x0800 and len(ip) >= 20 and ip[9] == 17:
        udp = ip[(ip[0] & 0x0F) * 4:]
    elif ethertype == 0x86DD and len(ip) >= 40 and ip[6] == 17:
        udp = ip[40:]
    else:
        return None
    if len(udp) < 8:
        return None
    return struct.unpack("!H", udp[2:4])[0], udp[8:]
