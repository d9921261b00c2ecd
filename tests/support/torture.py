"""Replay the RFC 4475 / RFC 5118 torture corpus at a SIP server and judge each answer.

How it works: :func:`load_cases` reads ``MANIFEST.tsv`` from the corpus directory
(``$CALLROUTER_TORTURE_DIR``, default ``<repo>/../shared/torture``), keeping the RFC 5118
``wire/`` copies (CRLF, correct Content-Length) and leaving out the ``archive/`` ones.
:func:`replay` sends each file as it is on the wire, apart from what the corpus README says
must change for replies to come back and be told apart:

1. the top Via's branch gets a fresh id per send (pjsip matches server transactions on
   method + branch, and RFC 4475 reuses ``z9hG4bKkdjuw``), except a bare ``z9hG4bK``
   (``badbranch``, whose point it is) and RFC 2543 branches;
2. over UDP the sender binds the port its top Via names (pjsip answers the source address at
   the Via port); when that port is taken, ``;rport`` is added to the top Via instead;
3. replies are attributed by branch, not Call-ID (RFC 5118 files share Call-IDs);
4. the UDP-framing files (``dblreq``, ``clerr``, ``ncl``, ``mcl01``) and ``inv2543`` (no
   Content-Length) are not sent over TCP.

A non-2xx final answer to an INVITE is ACKed. After every file a valid OPTIONS must get 200:
the server has to keep serving whatever it was sent. :func:`verdict` applies the acceptance
rule to one outcome; tests and ``scripts/sip-torture.py`` share it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.sipfuzz import split_stream

REPO = Path(__file__).resolve().parents[2]
UDP_FRAMING = frozenset({"dblreq.dat", "clerr.dat", "ncl.dat", "mcl01.dat", "inv2543.dat"})
_BRANCH = re.compile(rb"(branch=z9hG4bK)([^;,\s]+)", re.I)
_STATUS = re.compile(rb"^SIP/2\.0 (\d{3})", re.M)


def corpus_dir() -> Path:
    return Path(os.environ.get("CALLROUTER_TORTURE_DIR", REPO.parent / "shared" / "torture"))


@dataclass(frozen=True)
class Case:
    """One MANIFEST row."""

    file: str
    section: str
    title: str
    klass: str
    expected: str
    path: Path

    @property
    def name(self) -> str:
        return Path(self.file).name


@dataclass(frozen=True)
class Outcome:
    case: Case
    transport: str
    status: int | None  # final status (or the last provisional one); None: nothing came back
    options_status: int | None  # the follow-up OPTIONS
    skipped: str = ""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


def load_cases(directory: Path | None = None) -> list[Case]:
    directory = directory or corpus_dir()
    with open(directory / "MANIFEST.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [Case(r["file"], r["section"], r["title"], r["class"], r["expected"],
                 directory / r["file"])
            for r in rows if r["corpus"] != "rfc5118-archive"]


def expectation(case: Case) -> str:
    """What the acceptance rule wants for this case: answer, reject, drop or any.

    - answer: a valid request; it must get an application-level answer that is not 400
      (a 404/405/415/420/501/200 ... from the router), or a silent drop where the manifest
      allows one;
    - reject: an invalid request; 4xx/5xx (505 for the version) or a silent drop;
    - drop: a response with no transaction; nothing may come back;
    - any: must not break the server (only the follow-up OPTIONS counts).
    """
    klass, expected = case.klass.lower(), case.expected.lower()
    if "response" in klass:
        return "drop"
    if klass.startswith("invalid") or (klass == "application" and expected.startswith("400")):
        return "reject"
    if klass.startswith(("valid", "compat", "application")):
        return "answer"
    return "any"


def verdict(case: Case, status: int | None, options_status: int | None,
            skipped: str = "") -> Verdict:
    """Judge one replayed file (see :func:`expectation` for the rule per case)."""
    if skipped:
        return Verdict(True, f"skipped: {skipped}")
    if options_status != 200:
        return Verdict(False, f"follow-up OPTIONS got {options_status}, not 200")
    want, text = expectation(case), case.expected.lower()
    if want == "drop":
        return Verdict(status is None, "stray response dropped" if status is None
                       else f"a response must be dropped, got {status}")
    if want == "reject":
        ok = status is None or status >= 400 or "liberal" in text
        return Verdict(ok, "rejected or dropped" if ok else f"invalid request accepted: {status}")
    if want == "answer":
        if status is None:
            ok = "drop" in text
            return Verdict(ok, "dropped (allowed)" if ok else "valid request got no answer")
        ok = status >= 200 and (status != 400 or "400" in text)
        return Verdict(ok, f"answered {status}" if ok else f"valid request got {status}")
    return Verdict(True, "server kept serving")


def judge(outcome: Outcome) -> Verdict:
    return verdict(outcome.case, outcome.status, outcome.options_status, outcome.skipped)


def replay(host: str, port: int, transport: str = "udp", cases: list[Case] | None = None,
           wait_s: float = 1.0) -> list[Outcome]:
    """Send every case to host:port and collect the outcomes (see the module docstring)."""
    if transport not in ("udp", "tcp"):
        raise ValueError(f"transport must be udp or tcp, not {transport!r}")
    outcomes = []
    for case in cases if cases is not None else load_cases():
        if transport == "tcp" and case.name in UDP_FRAMING:
            outcomes.append(Outcome(case, transport, None, None, "UDP framing test"))
            continue
        status = _send_case(host, port, transport, case.path.read_bytes(), wait_s)
        outcomes.append(Outcome(case, transport, status, options(host, port, transport)))
    return outcomes


def options(host: str, port: int, transport: str = "udp", wait_s: float = 2.0) -> int | None:
    """Send one valid OPTIONS; return the final status, or None when none came back."""
    branch = "z9hG4bK" + uuid.uuid4().hex
    with _channel(host, port, transport, None) as chan:
        local = f"{_host_for_uri(chan.local[0])}:{chan.local[1]}"
        message = (
            f"OPTIONS sip:{_host_for_uri(host)}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport.upper()} {local};branch={branch};rport\r\n"
            f"From: <sip:torture@{local}>;tag={uuid.uuid4().hex[:8]}\r\n"
            f"To: <sip:{_host_for_uri(host)}:{port}>\r\n"
            f"Call-ID: {uuid.uuid4().hex}@torture\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            f"Contact: <sip:torture@{local}>\r\nAccept: application/sdp\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        chan.send(message)
        reply = chan.await_final(branch.encode(), wait_s)
    return _status(reply) if reply else None


def _send_case(host: str, port: int, transport: str, raw: bytes, wait_s: float) -> int | None:
    raw, branch = _fresh_branch(raw)
    via_port = _top_via_port(raw) if transport == "udp" else None
    if via_port is not None and not _udp_port_free(via_port):
        raw, via_port = _add_rport(raw), None
    with _channel(host, port, transport, via_port) as chan:
        chan.send(raw)
        reply = chan.await_final(branch, wait_s, _call_key(raw) if branch is None else None)
        if reply and raw.startswith(b"INVITE ") and (_status(reply) or 0) >= 300:
            chan.send(_ack_for(raw, reply))
    return _status(reply) if reply else None


class _Channel:
    """A UDP socket or TCP connection that collects replies for one request."""

    def __init__(self, sock: socket.socket, target: tuple[str, int], transport: str) -> None:
        self.sock, self.target, self.transport = sock, target, transport
        self.local: tuple[str, int] = sock.getsockname()[:2]
        self._buffer = b""

    def send(self, data: bytes) -> None:
        if self.transport == "udp":
            self.sock.sendto(data, self.target)
        else:
            with contextlib.suppress(OSError):
                self.sock.sendall(data)

    def await_final(self, branch: bytes | None, wait_s: float,
                    call_key: bytes | None = None) -> bytes | None:
        """The first final reply for ``branch`` (or Call-ID+CSeq), else the last provisional."""
        best = None
        until = time.monotonic() + wait_s
        while (left := until - time.monotonic()) > 0:
            message = self._next(left)
            if message is None:
                break
            if not message.startswith(b"SIP/2.0 ") or not _belongs(message, branch, call_key):
                continue
            best = message
            if (_status(message) or 0) >= 200:
                break
        return best

    def _next(self, timeout: float) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            if self.transport == "udp":
                return self.sock.recvfrom(65535)[0]
            return self._next_stream()
        except (TimeoutError, ConnectionError, OSError):
            return None

    def _next_stream(self) -> bytes | None:
        while True:
            message, self._buffer = split_stream(self._buffer)
            if message is not None:
                return message
            chunk = self.sock.recv(65535)
            if not chunk:
                return None
            self._buffer += chunk


@contextlib.contextmanager
def _channel(host: str, port: int, transport: str, bind_port: int | None) -> Iterator[_Channel]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    local_host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(family, kind) as sock:
        sock.bind((local_host, bind_port or 0))
        if transport == "tcp":
            sock.settimeout(3.0)
            sock.connect((host, port))
        yield _Channel(sock, (host, port), transport)


def _fresh_branch(raw: bytes) -> tuple[bytes, bytes | None]:
    """Give the top Via (the first branch in the message) a unique branch id."""
    match = _BRANCH.search(raw)
    if match is None:
        return raw, None
    branch = b"z9hG4bK" + uuid.uuid4().hex.encode()
    return raw[:match.start()] + b"branch=" + branch + raw[match.end():], branch


def _header_block(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[:end]


def _top_via(raw: bytes) -> re.Match[bytes] | None:
    return re.search(rb"^(?:via|v)[ \t]*:[ \t]*SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*\w+[ \t]+"
                     rb"(\[[^\]]*\]|[^\s:;,]+)(?::(\d+))?", _header_block(raw), re.I | re.M)


def _top_via_port(raw: bytes) -> int:
    """The port pjsip will answer to: the top Via's, 5060 when it names none (RFC 3261 18.2.2)."""
    via = _top_via(raw)
    return int(via.group(2)) if via and via.group(2) else 5060


def _add_rport(raw: bytes) -> bytes:
    via = _top_via(raw)
    if via is None:
        return raw
    return raw[:via.end()] + b";rport" + raw[via.end():]


def _udp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _call_key(raw: bytes) -> bytes:
    head = _header_block(raw)
    call_id = re.search(rb"^(?:call-id|i)[ \t]*:[ \t]*(\S+)", head, re.I | re.M)
    cseq = re.search(rb"^cseq[ \t]*:[ \t]*(\d+)", head, re.I | re.M)
    number = str(int(cseq.group(1))).encode() if cseq else b""  # "0009" and "9" match
    return (call_id.group(1) if call_id else b"") + b"|" + number


def _belongs(reply: bytes, branch: bytes | None, call_key: bytes | None) -> bool:
    if branch is not None:
        top = _BRANCH.search(reply)
        return top is not None and top.group(0).lower() == b"branch=" + branch.lower()
    return call_key is not None and _call_key(reply) == call_key


def _status(reply: bytes) -> int | None:
    match = _STATUS.match(reply)
    return int(match.group(1)) if match else None


def _ack_for(request: bytes, reply: bytes) -> bytes:
    """ACK for a non-2xx final answer (RFC 3261 17.1.1.3): same Via, To from the answer."""
    head = _header_block(request)
    ruri = head.split(b"\r\n", 1)[0].split(b" ")[1]
    via = re.search(rb"^(?:via|v)[ \t]*:.*$", head, re.I | re.M)
    pick = {name: re.search(rb"^(?:" + name + rb")[ \t]*:.*$", src, re.I | re.M)
            for name, src in ((rb"from|f", head), (rb"call-id|i", head), (rb"to|t", reply))}
    cseq = re.search(rb"^cseq[ \t]*:[ \t]*(\d+)", head, re.I | re.M)
    lines = [b"ACK " + ruri + b" SIP/2.0"] + [m.group(0).rstrip(b"\r")
                                               for m in (via, *pick.values()) if m]
    lines += [b"CSeq: " + (cseq.group(1) if cseq else b"1") + b" ACK", b"Max-Forwards: 70",
              b"Content-Length: 0"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _host_for_uri(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def format_table(outcomes: list[Outcome]) -> str:
    """file | section | expected | got | OPTIONS | verdict, one line per outcome."""
    rows = [("file", "section", "expected", "got", "OPTIONS", "verdict")]
    for outcome in outcomes:
        judged = judge(outcome)
        got = "skipped" if outcome.skipped else str(outcome.status or "dropped")
        rows.append((outcome.case.file, outcome.case.section,
                     f"{expectation(outcome.case)}: {outcome.case.expected[:48]}", got,
                     str(outcome.options_status or "-"),
                     ("PASS " if judged.passed else "FAIL ") + judged.reason))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  "
                     + row[5] for row in rows)


class StubServer:
    """A tiny stateless SIP answerer on loopback UDP and TCP, the test double for the tools.

    Requests it cannot read are dropped, like pjsip does; responses are dropped; a version
    other than SIP/2.0 gets 505; OPTIONS ``options_status`` (200; 503 with Retry-After, as
    a draining router); INVITE 100 then ``invite_status`` (with Retry-After on 503); ACK
    nothing; anything else 405 with Allow. Answers go back to the source address (or the
    TCP connection).
    """

    ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS"

    def __init__(self, invite_status: int = 404, host: str = "127.0.0.1",
                 options_status: int = 200, invite_reason: str = "Stub") -> None:
        self.invite_status, self.host = invite_status, host
        self.options_status, self.invite_reason = options_status, invite_reason
        self.port = 0
        self.received: list[bytes] = []
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> StubServer:
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((self.host, 0))
        self.port = tcp.getsockname()[1]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((self.host, self.port))
        tcp.listen(16)
        for sock in (udp, tcp):
            sock.settimeout(0.1)
        self._socks = [udp, tcp]
        for target in (self._serve_udp, self._serve_tcp):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        for sock in self._socks:
            sock.close()

    def answers(self, request: bytes) -> list[bytes]:
        head = _header_block(request).decode("utf-8", "replace")
        first = head.split("\r\n", 1)[0].split(" ")
        if len(first) != 3 or first[0].startswith("SIP/"):
            return []
        keep = [line for line in head.split("\r\n")[1:]
                if re.match(r"(via|v|from|f|to|t|call-id|i|cseq)[ \t]*:", line, re.I)]
        if not any(line.lower().startswith(("cseq", "call-id", "i:")) for line in keep):
            return []

        def reply(code: int, reason: str, extra: str = "") -> bytes:
            return (f"SIP/2.0 {code} {reason}\r\n" + "\r\n".join(keep) + "\r\n" + extra
                    + "Content-Length: 0\r\n\r\n").encode()

        method, version = first[0], first[2]
        if version != "SIP/2.0":
            return [reply(505, "Version Not Supported")]
        if method == "ACK":
            return []
        if method == "OPTIONS" and self.options_status == 503:  # draining
            return [reply(503, "Draining", "Retry-After: 5\r\n")]
        if method == "OPTIONS":
            return [reply(self.options_status, "OK", f"Allow: {self.ALLOW}\r\n")]
        if method == "INVITE":
            extra = "Retry-After: 5\r\n" if self.invite_status == 503 else ""
            return [reply(100, "Trying"), reply(self.invite_status, self.invite_reason, extra)]
        return [reply(405, "Method Not Allowed", f"Allow: {self.ALLOW}\r\n")]

    def _serve_udp(self) -> None:
        udp = self._socks[0]
        while not self._stop.is_set():
            try:
                data, peer = udp.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            self.received.append(data)
            for answer in self.answers(data):
                udp.sendto(answer, peer)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socks[1].accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            conn.settimeout(0.1)
            while not self._stop.is_set():
                message, buffer = split_stream(buffer)
                if message is not None:
                    self.received.append(message)
                    for answer in self.answers(message):
                        conn.sendall(answer)
                    continue
                try:
                    chunk = conn.recv(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
