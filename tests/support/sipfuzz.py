"""Generate SIP messages from the families that break parsers (issue 8).

How to use it::

    from tests.support import sipfuzz

    ctx = sipfuzz.Context(host="127.0.0.1", port=5060, transport="udp")
    for message in sipfuzz.generate(ctx, ["sizes", "delayed-offer"]):
        send(message.data)  # then check the server still answers OPTIONS

Each family is a function ``family(ctx) -> Iterator[(name, bytes)]``, listed in
:data:`FAMILIES`. This module is pure: it builds bytes and parses replies, it never opens a
socket (``tests/integration/test_fuzz_survival.py`` and ``scripts/sip-fuzz.py`` do the I/O).

Deterministic: the same :class:`Context` gives the same bytes, message for message. The only
randomness is :class:`random.Random` with fixed seeds. Branches, Call-IDs and tags are hashes
of ``ctx.salt``, the family and the message's position in it, so every message has its own
transaction and dialog ids (pass another salt to send the same bytes again to a server that
still remembers the last run's transactions). Ids have a fixed length: sizes never depend on
the salt.

Requests go to ``ctx.host:ctx.port``; INVITEs dial :data:`UNKNOWN_NUMBER`, so a server that
reads one answers it at the routing decision (404 on callrouter) without placing a call. The
top Via names ``ctx.sent_by`` with ``;rport``: answers to UDP go back to the sending socket
(RFC 3581), answers to TCP on the connection.

Counts that do not fit in one UDP datagram (5,000 Via headers) shrink to the largest count
that fits when ``ctx.transport`` is ``udp``, and the message name says the count used. The
``sizes`` family always yields its 70,000 and 200,000 byte messages: a sender skips what
exceeds :data:`UDP_MAX_PAYLOAD` over UDP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

UDP_MAX_PAYLOAD = 65_507  # 65,535 - 8 (UDP header) - 20 (IPv4 header)
SIZES = (3_999, 4_000, 4_001, 4_500, 5_000, 8_192, 16_384, 32_768, 65_000, 65_507,
         70_000, 200_000)
CUT_LIMITS = (4_000, 16_384)  # pjsip's default PJSIP_MAX_PKT_LEN; callrouter's default limit
UNKNOWN_NUMBER = "+15555550100"
CALLER_NUMBER = "+15555550199"
CRLF = b"\r\n"
SEED = 8  # issue 8; every random choice comes from random.Random(SEED + k)

Case = tuple[str, bytes]


@dataclass(frozen=True)
class Ids:
    branch: str
    call_id: str
    tag: str


@dataclass
class Context:
    """Where the messages go, and the salt of their ids."""

    host: str = "127.0.0.1"
    port: int = 5060
    transport: str = "udp"
    sent_by: str = ""  # host:port for the top Via and Contact; default: loopback, port 9
    salt: str = "sipfuzz"
    family: str = ""
    _serial: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.transport = self.transport.lower()
        if self.transport not in ("udp", "tcp"):
            raise ValueError(f"transport must be udp or tcp, not {self.transport!r}")
        if not self.sent_by:
            self.sent_by = "[::1]:9" if ":" in self.host else "127.0.0.1:9"

    def for_family(self, family: str) -> Context:
        """A copy whose ids restart: a family's bytes do not depend on the ones before it."""
        return dataclasses.replace(self, family=family)

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def sent_by_host(self) -> str:
        return self.sent_by.rsplit(":", 1)[0]

    @property
    def via_transport(self) -> str:
        return self.transport.upper()

    def ids(self) -> Ids:
        self._serial += 1
        digest = hashlib.sha256(f"{self.salt}/{self.family}/{self._serial}".encode()).hexdigest()
        return Ids("z9hG4bK" + digest[:20], digest[20:40] + "@sipfuzz", digest[40:50])

    def fits(self, data: bytes) -> bool:
        return self.transport == "tcp" or len(data) <= UDP_MAX_PAYLOAD


@dataclass(frozen=True)
class FuzzMessage:
    family: str
    name: str
    data: bytes

    @property
    def label(self) -> str:
        return f"{self.family}/{self.name}"


@dataclass
class Parts:
    """A message being built: start line, header lines, body (no Content-Length yet).

    ``lengths`` are the Content-Length lines to write: None means one correct line.
    """

    start: bytes
    headers: list[bytes]
    body: bytes = b""
    lengths: list[bytes] | None = None

    def index(self, name: str) -> int:
        wanted = name.lower().encode()
        for i, line in enumerate(self.headers):
            if line.split(b":", 1)[0].strip().lower() == wanted:
                return i
        raise KeyError(name)

    def set(self, name: str, line: bytes | str) -> Parts:
        """Replace the first header called ``name`` (or add one)."""
        raw = line.encode() if isinstance(line, str) else line
        try:
            self.headers[self.index(name)] = raw
        except KeyError:
            self.headers.append(raw)
        return self

    def add(self, *lines: bytes | str, at: int | None = None) -> Parts:
        raw = [line.encode() if isinstance(line, str) else line for line in lines]
        where = len(self.headers) if at is None else at
        self.headers[where:where] = raw
        return self

    def drop(self, name: str) -> Parts:
        wanted = name.lower().encode()
        self.headers = [h for h in self.headers if h.split(b":", 1)[0].strip().lower() != wanted]
        return self

    def render(self) -> bytes:
        lengths = self.lengths
        if lengths is None:
            lengths = [b"Content-Length: %d" % len(self.body)]
        return CRLF.join([self.start, *self.headers, *lengths]) + CRLF + CRLF + self.body


# ---- building blocks ------------------------------------------------------------------------


def sdp(extra: Iterable[str] = (), *, media: Sequence[str] | None = None) -> bytes:
    """A G.711 audio offer; ``extra`` lines go after the session lines, ``media`` replaces
    the m= section."""
    session = ["v=0", "o=sipfuzz 1 1 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0"]
    if media is None:
        media = ["m=audio 9 RTP/AVP 8 0 101", "a=rtpmap:8 PCMA/8000", "a=rtpmap:0 PCMU/8000",
                 "a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-15", "a=sendrecv"]
    return ("\r\n".join([*session, *extra, *media]) + "\r\n").encode()


def request(ctx: Context, method: str = "INVITE", *, user: str = UNKNOWN_NUMBER,
            body: bytes | None = None, content_type: str = "application/sdp",
            cseq_method: str | None = None, ids: Ids | None = None) -> Parts:
    """A valid request; INVITE carries an SDP offer unless ``body`` is given."""
    ids = ids or ctx.ids()
    uri = f"sip:{ctx.hostport}" if method == "REGISTER" else f"sip:{user}@{ctx.hostport}"
    to = f"sip:{CALLER_NUMBER}@{ctx.hostport}" if method == "REGISTER" else uri
    headers = [
        f"Via: SIP/2.0/{ctx.via_transport} {ctx.sent_by};branch={ids.branch};rport",
        "Max-Forwards: 70",
        f'From: "sipfuzz" <sip:{CALLER_NUMBER}@{ctx.sent_by_host}>;tag={ids.tag}',
        f"To: <{to}>",
        f"Call-ID: {ids.call_id}",
        f"CSeq: 1 {cseq_method or method}",
        f"Contact: <sip:sipfuzz@{ctx.sent_by};transport={ctx.transport}>",
    ]
    if method == "REGISTER":
        headers.append("Expires: 60")
    if body is None:
        body = sdp() if method == "INVITE" else b""
    if body:
        headers.append(f"Content-Type: {content_type}")
    return Parts(f"{method} {uri} SIP/2.0".encode(), [h.encode() for h in headers], body)


def response(ctx: Context, status: str = "200 OK", method: str = "INVITE", *,
             body: bytes = b"", ids: Ids | None = None) -> Parts:
    """A response to a transaction the server never started."""
    ids = ids or ctx.ids()
    headers = [
        f"Via: SIP/2.0/{ctx.via_transport} {ctx.hostport};branch={ids.branch}",
        f"From: <sip:{UNKNOWN_NUMBER}@{ctx.hostport}>;tag={ids.tag}",
        f'To: "sipfuzz" <sip:{CALLER_NUMBER}@{ctx.sent_by_host}>;tag=r{ids.tag}',
        f"Call-ID: {ids.call_id}",
        f"CSeq: 1 {method}",
        f"Contact: <sip:sipfuzz@{ctx.sent_by};transport={ctx.transport}>",
    ]
    if body:
        headers.append("Content-Type: application/sdp")
    return Parts(f"SIP/2.0 {status}".encode(), [h.encode() for h in headers], body)


def filler(n: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz0123456789") -> str:
    """``n`` token characters (a fixed, non-repeating-looking pattern)."""
    reps = n // len(alphabet) + 1
    return (alphabet * reps)[:n]


def exact(build: Callable[[int], bytes], size: int) -> bytes:
    """``build(pad)`` for the pad that makes exactly ``size`` bytes (the length grows with
    the pad, one for one apart from Content-Length digits)."""
    pad = 0
    for _ in range(10):
        data = build(pad)
        if len(data) == size:
            return data
        pad += size - len(data)
        if pad < 0:
            raise ValueError(f"cannot build {size} bytes: the smallest is {len(build(0))}")
    raise ValueError(f"could not hit exactly {size} bytes")


def shrink_to_fit(ctx: Context, build: Callable[[int], bytes], count: int) -> tuple[int, bytes]:
    """``(n, build(n))`` for the largest ``n <= count`` whose message fits the transport."""
    data = build(count)
    if ctx.fits(data):
        return count, data
    low, high = 1, count - 1  # build(high + 1) does not fit
    while low < high:
        mid = (low + high + 1) // 2
        if ctx.fits(build(mid)):
            low = mid
        else:
            high = mid - 1
    return low, build(low)


def _pad_lines(n: int, prefix: str = "a=x-fuzz-pad:", width: int = 78) -> str:
    """SDP attribute lines of exactly ``n`` bytes, CRLFs included (``n`` is 0 or at least one
    empty line long)."""
    minimum = len(prefix) + 2
    if 0 < n < minimum:
        raise ValueError(f"cannot pad {n} bytes with {prefix!r} lines")
    lines = []
    while n > 0:
        if n <= width:
            take = n
        elif n - width < minimum:
            take = n - minimum  # leave exactly one empty line
        else:
            take = width
        lines.append(prefix + filler(take - minimum) + "\r\n")
        n -= take
    return "".join(lines)


def _counted(ctx: Context, label: str, want: int,
             make: Callable[[int, Ids], bytes]) -> Case:
    """``label.format(n)`` and ``make(n, ids)`` for the largest ``n <= want`` that fits."""
    ids = ctx.ids()
    count, data = shrink_to_fit(ctx, lambda n: make(n, ids), want)
    return label.format(count), data


# ---- families -------------------------------------------------------------------------------


def padded_request(ctx: Context, size: int, method: str = "INVITE",
                   pad: str = "header") -> bytes:
    """A valid request of exactly ``size`` bytes, padded with an ``X-Fuzz-Padding`` header or
    (``pad="sdp"``, INVITE) with SDP attribute lines."""
    ids = ctx.ids()
    if pad == "header":
        return exact(lambda n: request(ctx, method, ids=ids).add(
            f"X-Fuzz-Padding: {filler(n)}").render(), size)
    if pad != "sdp":
        raise ValueError(f"pad must be header or sdp, not {pad!r}")

    def build(n: int) -> bytes:
        lines = _pad_lines(n)
        body = sdp([lines[:-2]] if lines else [])
        return request(ctx, method, ids=ids, body=body).render()

    return exact(build, size)


def sizes(ctx: Context) -> Iterator[Case]:
    """Whole messages at and around every buffer limit, and INVITEs cut inside a header there.

    Every size in :data:`SIZES`, padded three ways (an INVITE's long header, its long SDP, an
    OPTIONS' long header); then INVITEs whose cut at each of :data:`CUT_LIMITS` bytes falls
    inside the request line, a header, the Content-Length digits or the blank line."""
    for size in SIZES:
        yield f"invite-header-{size}", padded_request(ctx, size)
        yield f"invite-sdp-{size}", padded_request(ctx, size, pad="sdp")
        yield f"options-header-{size}", padded_request(ctx, size, "OPTIONS")
    for limit in CUT_LIMITS:
        yield from _cuts_at(ctx, limit)


# Where a cut at the limit falls: (name, marker, offset past the marker's start, pad where).
_CUT_POINTS = (
    ("request-uri", b" SIP/2.0\r\n", -10, "uri"),
    ("request-version", b" SIP/2.0\r\n", 5, "uri"),
    ("via-branch", b";branch=", 12, "header"),
    ("from-tag", b";tag=", 4, "header"),
    ("to-uri", b"\r\nTo: ", 10, "header"),
    ("call-id", b"\r\nCall-ID: ", 15, "header"),
    ("cseq-method", b"\r\nCSeq: ", 11, "header"),
    ("content-type", b"\r\nContent-Type: ", 20, "header"),
    ("content-length-name", b"\r\nContent-Length", 9, "header"),
    ("content-length-digits", b"\r\nContent-Length: ", 19, "header"),
    ("before-blank-line", b"\r\n\r\n", 2, "header"),
    ("inside-blank-line", b"\r\n\r\n", 3, "header"),
    ("body-start", b"\r\n\r\n", 4, "header"),
)


def _cuts_at(ctx: Context, limit: int) -> Iterator[Case]:
    for point, marker, offset, where in _CUT_POINTS:
        ids = ctx.ids()

        def build(pad: int, ids: Ids = ids, where: str = where) -> bytes:
            parts = request(ctx, ids=ids)
            if where == "uri":
                uri = f"sip:{UNKNOWN_NUMBER}@{ctx.hostport};x-fuzz-padding={filler(pad)}"
                parts.start = f"INVITE {uri} SIP/2.0".encode()
            else:  # the first header, so every target header comes after it
                parts.add(f"X-Fuzz-Padding: {filler(pad)}", at=0)
            return parts.render()

        pad = 0
        for _ in range(10):
            data = build(pad)
            at = data.find(marker) + offset
            if at == limit:
                break
            pad += limit - at
        else:
            raise ValueError(f"cannot place the cut {point} at {limit}")
        yield f"cut{limit}-{point}-{len(data)}", data


def long_values(ctx: Context) -> Iterator[Case]:
    """Very long header values and parameters, and very many headers."""
    parts = request(ctx)
    ids_branch = parts.headers[0].split(b"branch=")[1].split(b";")[0]
    yield "via-branch-10k", parts.set("Via", parts.headers[0].replace(
        ids_branch, ids_branch + filler(10_240).encode())).render()
    parts = request(ctx)
    yield "via-host-10k", parts.set("Via", f"Via: SIP/2.0/{ctx.via_transport} "
                                          f"{filler(10_240)}.example.com;rport;branch=z9hG4bK"
                                          f"{ctx.ids().branch[7:]}").render()
    parts = request(ctx)
    yield "to-display-20k-quoted", parts.set(
        "To", f'To: "{filler(20_480, "abc def ")}" <sip:{UNKNOWN_NUMBER}@{ctx.hostport}>'
    ).render()
    parts = request(ctx)
    escaped = '\\"' * 10_240  # backslash, quote
    yield "to-display-20k-escapes", parts.set(
        "To", f'To: "{escaped}" <sip:{UNKNOWN_NUMBER}@{ctx.hostport}>').render()
    parts = request(ctx)
    tag = parts.headers[parts.index("From")].rsplit(b"tag=", 1)[1].decode()
    yield "from-display-20k-token", parts.set(
        "From", f"From: {filler(20_480, 'abc ')} <sip:{CALLER_NUMBER}@{ctx.sent_by_host}>;"
                f"tag={tag}").render()
    params = "".join(f";p{i}=v{i}" for i in range(1000))
    parts = request(ctx)
    parts.start = f"INVITE sip:{UNKNOWN_NUMBER}@{ctx.hostport}{params} SIP/2.0".encode()
    yield "request-uri-1000-params", parts.render()
    parts = request(ctx)
    parts.start = (f"INVITE sip:{UNKNOWN_NUMBER}@{ctx.hostport}?"
                   + "&".join(f"h{i}=v{i}" for i in range(1000)) + " SIP/2.0").encode()
    yield "request-uri-1000-headers", parts.render()
    parts = request(ctx)
    yield "to-uri-1000-params", parts.set(
        "To", f"To: <sip:{UNKNOWN_NUMBER}@{ctx.hostport}{params}>").render()
    parts = request(ctx)
    yield "to-1000-header-params", parts.set(
        "To", f"To: <sip:{UNKNOWN_NUMBER}@{ctx.hostport}>{params}").render()
    parts = request(ctx)
    yield "via-1000-params", parts.set("Via", parts.headers[0] + params.encode()).render()
    parts = request(ctx)
    yield "contact-1000-params", parts.set(
        "Contact", f"Contact: <sip:sipfuzz@{ctx.sent_by}{params}>{params}").render()
    parts = request(ctx)
    parts.start = f"INVITE sip:{'1' * 10_240}@{ctx.hostport} SIP/2.0".encode()
    yield "request-uri-user-10k", parts.render()
    parts = request(ctx)
    yield "call-id-10k", parts.set("Call-ID", f"Call-ID: {filler(10_240)}@sipfuzz").render()
    parts = request(ctx)
    yield "from-tag-10k", parts.set(
        "From", f"From: <sip:{CALLER_NUMBER}@{ctx.sent_by_host}>;tag={filler(10_240)}").render()
    parts = request(ctx)
    yield "cseq-20-digits", parts.set("CSeq", "CSeq: 99999999999999999999 INVITE").render()
    parts = request(ctx)
    yield "cseq-2pow32", parts.set("CSeq", "CSeq: 4294967296 INVITE").render()
    parts = request(ctx)
    yield "max-forwards-20-digits", parts.set("Max-Forwards",
                                              "Max-Forwards: 99999999999999999999").render()
    parts = request(ctx)
    yield "expires-20-digits", parts.add("Expires: 99999999999999999999").render()
    parts = request(ctx)
    yield "header-name-10k", parts.add(f"X-{filler(10_240)}: 1").render()
    parts = request(ctx)
    yield "subject-30k", parts.add(f"Subject: {filler(30_720, 'lorem ipsum ')}").render()

    yield from _many_headers(ctx)


def _many_headers(ctx: Context) -> Iterator[Case]:
    def vias(n: int, ids: Ids, comma: bool = False, method: str = "INVITE") -> bytes:
        extra = [f"SIP/2.0/{ctx.via_transport} 10.{i // 65536 % 256}.{i // 256 % 256}."
                 f"{i % 256}:5060;branch=z9hG4bK{i}" for i in range(n)]
        lines = ["Via: " + ",".join(extra)] if comma else [f"Via: {v}" for v in extra]
        return request(ctx, method, ids=ids).add(*lines, at=1).render()

    yield _counted(ctx, "via-{}-headers", 5000, vias)
    yield _counted(ctx, "via-{}-comma-list", 5000, lambda n, ids: vias(n, ids, comma=True))
    yield _counted(ctx, "options-via-{}-headers", 5000,
                   lambda n, ids: vias(n, ids, method="OPTIONS"))

    def routes(n: int, ids: Ids, name: str = "Record-Route", comma: bool = False) -> bytes:
        entries = [f"<sip:p{i}.example.com;lr>" for i in range(n)]
        lines = [f"{name}: " + ",".join(entries)] if comma else [f"{name}: {e}" for e in entries]
        return request(ctx, ids=ids).add(*lines).render()

    yield _counted(ctx, "record-route-{}-headers", 3000, routes)
    yield _counted(ctx, "record-route-{}-comma-list", 3000,
                   lambda n, ids: routes(n, ids, comma=True))
    yield _counted(ctx, "route-{}-headers", 3000, lambda n, ids: routes(n, ids, name="Route"))

    def lines(method: str, make: Callable[[int], str]) -> Callable[[int, Ids], bytes]:
        return lambda n, ids: request(ctx, method, ids=ids).add(
            *(make(i) for i in range(n))).render()

    def one_list(method: str, name: str, item: Callable[[int], str]
                 ) -> Callable[[int, Ids], bytes]:
        return lambda n, ids: request(ctx, method, ids=ids).add(
            f"{name}: " + ",".join(item(j) for j in range(n))).render()

    yield _counted(ctx, "headers-{}-distinct", 10_000, lines("INVITE", lambda i: f"X-F{i}: {i}"))
    yield _counted(ctx, "headers-{}-same-name", 10_000, lines("INVITE", lambda i: "X-F: 1"))
    yield _counted(ctx, "options-headers-{}-distinct", 10_000,
                   lines("OPTIONS", lambda i: f"X-F{i}: {i}"))
    yield _counted(ctx, "contact-{}-headers", 3000,
                   lines("INVITE", lambda i: f"Contact: <sip:c{i}@127.0.0.1>"))
    yield _counted(ctx, "require-{}-unknown-tags", 5000,
                   one_list("INVITE", "Require", lambda j: f"x{j}"))
    yield _counted(ctx, "supported-{}-tags", 5000,
                   one_list("INVITE", "Supported", lambda j: f"x{j}"))
    yield _counted(ctx, "options-allow-{}-methods", 5000,
                   one_list("OPTIONS", "Allow", lambda j: f"M{j}"))
    yield _counted(ctx, "options-accept-{}-types", 5000,
                   one_list("OPTIONS", "Accept", lambda j: f"a/b{j};q=0.{j % 10}"))


def sdp_nesting(ctx: Context) -> Iterator[Case]:
    """SDP with thousands of m= lines, rtpmap lines, formats and attributes; odd values."""
    def invite(body: bytes, ids: Ids) -> bytes:
        return request(ctx, ids=ids, body=body).render()

    def counted(label: str, want: int, make: Callable[[int], bytes]) -> Case:
        return _counted(ctx, label, want, lambda n, ids: invite(make(n), ids))

    yield counted("m-lines-{}", 1000, lambda n: sdp(media=[
        f"m=audio {40000 + 2 * i} RTP/AVP 0" for i in range(n)]))
    yield counted("m-lines-{}", 5000, lambda n: sdp(media=[
        f"m=audio {40000 + 2 * (i % 1000)} RTP/AVP 0" for i in range(n)]))
    yield counted("m-lines-with-attributes-{}", 2000, lambda n: sdp(media=[
        line for i in range(n) for line in (f"m=audio {10000 + 2 * (i % 20000)} RTP/AVP 8 101",
                                            "a=rtpmap:8 PCMA/8000",
                                            "a=rtpmap:101 telephone-event/8000", "a=sendrecv")]))
    yield counted("m-lines-mixed-types-{}", 1000, lambda n: sdp(media=[
        f"m={('audio', 'video', 'text', 'application', 'message', 'x')[i % 6]} {9 + 2 * i} "
        f"{('RTP/AVP', 'RTP/SAVP', 'UDP/TLS/RTP/SAVPF', 'udp', 'TCP/MSRP')[i % 5]} {i % 128}"
        for i in range(n)]))
    yield counted("rtpmap-{}", 5000, lambda n: sdp(media=[
        "m=audio 9 RTP/AVP " + " ".join(str(pt) for pt in range(96, 128)),
        *(f"a=rtpmap:{96 + i % 32} X{i}/8000" for i in range(n))]))
    yield counted("formats-{}", 10_000, lambda n: sdp(media=[
        "m=audio 9 RTP/AVP " + " ".join(str(i % 128) for i in range(n))]))
    yield counted("session-attributes-{}", 5000, lambda n: sdp(
        [f"a=x-fuzz-{i}:{i}" for i in range(n)]))
    yield counted("media-attributes-{}", 5000, lambda n: sdp(media=[
        "m=audio 9 RTP/AVP 0", *(f"a=x-fuzz-{i}" for i in range(n))]))
    yield counted("fmtp-{}", 3000, lambda n: sdp(media=[
        "m=audio 9 RTP/AVP 0 101", "a=rtpmap:101 telephone-event/8000",
        *(f"a=fmtp:101 0-{i}" for i in range(n))]))
    yield counted("connection-lines-{}", 3000, lambda n: sdp(media=[
        "m=audio 9 RTP/AVP 0", *(f"c=IN IP4 10.0.{i // 256 % 256}.{i % 256}" for i in range(n))]))
    yield counted("bandwidth-lines-{}", 3000, lambda n: sdp(media=[
        "m=audio 9 RTP/AVP 0", *(f"b=AS:{i}" for i in range(n))]))
    yield counted("sessions-{}", 1000, lambda n: b"".join(sdp() for _ in range(n)))
    yield counted("candidates-{}", 2000, lambda n: sdp(media=[
        "m=audio 9 RTP/AVP 0", *(f"a=candidate:{i} 1 udp {2**31 - i} 10.0.0.{i % 256} "
                                 f"{1024 + i} typ host" for i in range(n))]))
    yield counted("crypto-{}", 2000, lambda n: sdp(media=[
        "m=audio 9 RTP/SAVP 0", *(f"a=crypto:{i} AES_CM_128_HMAC_SHA1_80 inline:"
                                  f"{filler(40)}" for i in range(n))]))
    ids = ctx.ids()
    yield "attribute-value-30k", invite(sdp([f"a=x-fuzz:{filler(30_720)}"]), ids)
    odd = {
        "port-65536": ["m=audio 65536 RTP/AVP 0"],
        "port-negative": ["m=audio -1 RTP/AVP 0"],
        "port-count-huge": ["m=audio 9/4294967295 RTP/AVP 0"],
        "payload-type-999": ["m=audio 9 RTP/AVP 999", "a=rtpmap:999 X/8000"],
        "payload-type-negative": ["m=audio 9 RTP/AVP -1", "a=rtpmap:-1 X/8000"],
        "no-formats": ["m=audio 9 RTP/AVP"],
        "rtpmap-no-rate": ["m=audio 9 RTP/AVP 96", "a=rtpmap:96 PCMA"],
        "rtpmap-rate-zero": ["m=audio 9 RTP/AVP 96", "a=rtpmap:96 PCMA/0"],
        "rtpmap-rate-huge": ["m=audio 9 RTP/AVP 96", "a=rtpmap:96 PCMA/99999999999999999999"],
        "rtpmap-channels-huge": ["m=audio 9 RTP/AVP 96", "a=rtpmap:96 PCMA/8000/4294967295"],
        "telephone-event-only": ["m=audio 9 RTP/AVP 101", "a=rtpmap:101 telephone-event/8000"],
        "bad-connection": ["m=audio 9 RTP/AVP 0", "c=IN IP4 999.999.999.999"],
        "connection-ip6-garbage": ["m=audio 9 RTP/AVP 0", "c=IN IP6 ::::::zz"],
        "connection-missing-address": ["m=audio 9 RTP/AVP 0", "c=IN IP4"],
        "ptime-zero": ["m=audio 9 RTP/AVP 0", "a=ptime:0"],
        "ptime-huge": ["m=audio 9 RTP/AVP 0", "a=ptime:99999999999999999999"],
        "rtcp-port-huge": ["m=audio 9 RTP/AVP 0", "a=rtcp:99999999 IN IP4 127.0.0.1"],
        "empty-lines": ["m=audio 9 RTP/AVP 0", "", "", "a=sendrecv"],
        "line-without-equals": ["m=audio 9 RTP/AVP 0", "garbage"],
    }
    for label, media in odd.items():
        yield label, invite(sdp(media=media), ctx.ids())
    for label, body in (("version-only", b"v=0\r\n"), ("no-version", sdp()[5:]),
                        ("empty-body-with-type", b""), ("binary", bytes(range(256)) * 4),
                        ("no-final-crlf", sdp().rstrip(CRLF))):
        parts = request(ctx, body=body)
        if not body:
            parts.add("Content-Type: application/sdp")
        yield label, parts.render()


def _multipart(parts: Sequence[tuple[str, bytes]], boundary: str, *, close: bool = True) -> bytes:
    out = [f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + body + CRLF
           for content_type, body in parts]
    return b"".join(out) + (f"--{boundary}--\r\n".encode() if close else b"")


def multipart(ctx: Context) -> Iterator[Case]:
    """multipart/mixed bodies: valid, nested deep, never closed, thousands of parts, odd."""
    def invite(body: bytes, content_type: str, ids: Ids | None = None) -> bytes:
        return request(ctx, ids=ids, body=body, content_type=content_type).render()

    text = ("text/plain", b"hello\r\n")
    mixed = 'multipart/mixed;boundary="{}"'
    yield "valid-sdp-and-text", invite(_multipart([("application/sdp", sdp()), text], "b1"),
                                       mixed.format("b1"))
    yield "valid-no-sdp", invite(_multipart([text], "b1"), mixed.format("b1"))

    def nested(depth: int) -> bytes:
        # level L: --nL, the part holding level L-1 (the SDP at L=0), a text part, --nL--
        opening, closing = [], []
        for level in range(depth):
            inner = mixed.format(f"n{level - 1}") if level else "application/sdp"
            opening.append(f"--n{level}\r\nContent-Type: {inner}\r\n\r\n".encode())
            closing.append(f"\r\n--n{level}\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
                           f"\r\n--n{level}--\r\n".encode())
        return b"".join(reversed(opening)) + sdp() + b"".join(closing)

    done: set[str] = set()
    for depth in (10, 100, 1000, 5000):
        label, data = _counted(ctx, "nested-{}", depth,
                               lambda n, ids: invite(nested(n), mixed.format(f"n{n - 1}"), ids))
        if label not in done:  # over UDP the deepest ones shrink to the same depth
            done.add(label)
            yield label, data
    yield "boundary-never-closes", invite(
        _multipart([("application/sdp", sdp()), text], "b1", close=False), mixed.format("b1"))
    yield "boundary-never-opens", invite(b"no boundary here\r\n", mixed.format("b1"))
    yield "nested-unclosed", invite(
        _multipart([(mixed.format("in"), _multipart([("application/sdp", sdp())], "in",
                                                      close=False))], "out", close=False),
        mixed.format("out"))
    sdp_part = [("application/sdp", sdp())]
    for want in (1000, 10_000):
        yield _counted(ctx, "parts-{}", want, lambda n, ids: invite(
            _multipart(sdp_part + [text] * (n - 1), "b1"), mixed.format("b1"), ids))
    yield _counted(ctx, "sdp-parts-{}", 1000, lambda n, ids: invite(
        _multipart(sdp_part * n, "b1"), mixed.format("b1"), ids))
    yield _counted(ctx, "empty-parts-{}", 20_000, lambda n, ids: invite(
        b"--b1\r\n" * n, mixed.format("b1"), ids))
    odd = {
        "no-boundary-param": (_multipart(sdp_part, "b1"), "multipart/mixed"),
        "empty-boundary": (_multipart(sdp_part, ""), 'multipart/mixed;boundary=""'),
        "boundary-200-chars": (_multipart(sdp_part, filler(200)),
                               mixed.format(filler(200))),
        "boundary-10k": (_multipart(sdp_part, filler(10_240)), mixed.format(filler(10_240))),
        "boundary-unquoted-spaces": (_multipart(sdp_part, "a b"), "multipart/mixed;boundary=a b"),
        "boundary-is-dashes": (_multipart(sdp_part, "--"), 'multipart/mixed;boundary="--"'),
        "two-boundary-params": (_multipart(sdp_part, "b1"),
                                "multipart/mixed;boundary=b2;boundary=b1"),
        "only-close-delimiter": (b"--b1--\r\n", mixed.format("b1")),
        "part-without-headers": (b"--b1\r\n\r\n" + sdp() + b"\r\n--b1--\r\n", mixed.format("b1")),
        "part-without-blank-line": (b"--b1\r\nContent-Type: application/sdp\r\n" + sdp()
                                    + b"--b1--\r\n", mixed.format("b1")),
        "part-content-length-wrong": (b"--b1\r\nContent-Type: application/sdp\r\n"
                                      b"Content-Length: 99999\r\n\r\n" + sdp() + b"\r\n--b1--\r\n",
                                      mixed.format("b1")),
        "part-type-multipart-no-boundary": (_multipart([("multipart/mixed", sdp())], "b1"),
                                            mixed.format("b1")),
        "part-type-empty": (_multipart([("", sdp())], "b1"), mixed.format("b1")),
        "alternative": (_multipart(sdp_part, "b1"), 'multipart/alternative;boundary="b1"'),
        "related": (_multipart(sdp_part, "b1"), 'multipart/related;boundary="b1"'),
        "lf-delimiters": (_multipart(sdp_part, "b1").replace(CRLF, b"\n"), mixed.format("b1")),
        "boundary-inside-sdp": (_multipart([("application/sdp", sdp(["a=x:--b1"]))], "b1"),
                                mixed.format("b1")),
    }
    for label, (body, content_type) in odd.items():
        yield label, invite(body, content_type)


def content_length(ctx: Context) -> Iterator[Case]:
    """Content-Length negative, too large, too small, huge, not a number, twice, missing."""
    body_len = len(sdp())
    values = {
        "negative-1": "-1",
        "negative-99999": "-99999",
        "zero-with-body": "0",
        "smaller-by-1": str(body_len - 1),
        "half": str(body_len // 2),
        "larger-by-1": str(body_len + 1),
        "larger-by-1000": str(body_len + 1000),
        "larger-than-udp": "70000",
        "huge-20-digits": "99999999999999999999",
        "2pow31": "2147483648",
        "2pow32": "4294967296",
        "2pow32-plus-body": str(2**32 + body_len),
        "2pow64": "18446744073709551616",
        "non-numeric": "abc",
        "digits-then-letters": f"{body_len}abc",
        "empty": "",
        "spaces": "   ",
        "plus-sign": f"+{body_len}",
        "hex": hex(body_len),
        "float": f"{body_len}.0",
        "leading-zeros": f"{body_len:020d}",
        "space-inside": f"{str(body_len)[:1]} {str(body_len)[1:]}",
    }
    for label, value in values.items():
        parts = request(ctx)
        parts.lengths = [f"Content-Length: {value}".encode()]
        yield f"invite-{label}", parts.render()
    for label, value in (("negative-1", "-1"), ("larger-by-100", "100"),
                         ("huge-20-digits", "99999999999999999999"), ("non-numeric", "x")):
        parts = request(ctx, "OPTIONS")
        parts.lengths = [f"Content-Length: {value}".encode()]
        yield f"options-{label}", parts.render()
    twice = {
        "two-equal": [f"Content-Length: {body_len}", f"Content-Length: {body_len}"],
        "two-different": [f"Content-Length: {body_len}", "Content-Length: 5"],
        "two-one-negative": ["Content-Length: -1", f"Content-Length: {body_len}"],
        "compact-and-long": [f"l: {body_len}", "Content-Length: 3"],
        "compact-huge": ["l: 99999999999999999999"],
        "comma-list": [f"Content-Length: {body_len}, {body_len}"],
        "missing": [],
    }
    for label, lines in twice.items():
        parts = request(ctx)
        parts.lengths = [line.encode() for line in lines]
        yield f"invite-{label}", parts.render()
    first = request(ctx)
    second = request(ctx, "OPTIONS").render()
    first.lengths = [f"Content-Length: {body_len + len(second) // 2}".encode()]
    yield "larger-swallows-next-request", first.render() + second
    first = request(ctx, "OPTIONS")
    first.lengths = [b"Content-Length: 0"]
    first.body = b"trailing bytes after a zero-length body\r\n"
    yield "zero-then-trailing-garbage", first.render()


def truncated(ctx: Context) -> Iterator[Case]:
    """Prefix cuts of a valid INVITE and OPTIONS: in the request line, mid header, mid body.
    Every cut is of a fresh copy (its own ids), so none looks like a retransmission."""
    full = request(ctx).render()  # where to cut; the ids have a fixed length
    head_end = full.index(b"\r\n\r\n")
    line_end = full.index(CRLF)
    named = {
        "1-byte": 1,
        "mid-method": 3,
        "after-method": 7,
        "mid-request-uri": line_end // 2,
        "before-version": line_end - 7,
        "request-line-no-crlf": line_end,
        "request-line-cr-only": line_end + 1,
        "after-request-line": line_end + 2,
        "mid-via-name": line_end + 4,
        "after-via-colon": line_end + 6,
        "mid-via-value": full.index(b";branch=") + 4,
        "mid-call-id": full.index(b"Call-ID: ") + 12,
        "mid-content-length-digits": full.index(b"Content-Length: ") + 17,
        "header-line-cr-only": full.index(b"\r\nCSeq") + 1,
        "headers-without-blank-line": head_end + 2,
        "inside-blank-line": head_end + 3,
        "headers-only": head_end + 4,
        "mid-body": head_end + 4 + (len(full) - head_end - 4) // 2,
        "body-minus-1": len(full) - 1,
    }
    for tenth in range(1, 10):
        named[f"at-{tenth * 10}pct-{len(full) * tenth // 10}"] = len(full) * tenth // 10
    for label, cut in named.items():
        yield f"invite-{label}", request(ctx).render()[:cut]
    options = len(request(ctx, "OPTIONS").render())
    for label, cut in (("mid-request-line", 20), ("mid-headers", options // 2),
                       ("no-blank-line", options - 2), ("blank-line-cr-only", options - 1)):
        yield f"options-{label}", request(ctx, "OPTIONS").render()[:cut]


def nul_bytes(ctx: Context) -> Iterator[Case]:
    """NUL bytes in the request line, header names, header values, the body; only NULs."""
    def patched(old: bytes, new: bytes, method: str = "INVITE", count: int = 1) -> bytes:
        data = request(ctx, method).render()
        assert old in data, old
        return data.replace(old, new, count)

    yield "method", patched(b"INVITE sip", b"INV\x00ITE sip")
    yield "before-method", b"\x00" + request(ctx).render()
    yield "request-uri", patched(b"@", b"\x00@")
    yield "version", patched(b" SIP/2.0\r\n", b" SIP/2.0\x00\r\n")
    yield "request-line-all-nul", b"\x00" * 40 + CRLF + request(ctx).render().split(CRLF, 1)[1]
    yield "header-name-call-id", patched(b"Call-ID:", b"Call\x00-ID:")
    yield "header-name-via", patched(b"Via:", b"V\x00ia:")
    yield "header-name-only-nul", patched(b"Max-Forwards: 70", b"\x00: 70")
    yield "via-value", patched(b";branch=", b";bra\x00nch=")
    yield "call-id-value", patched(b"@sipfuzz", b"@sip\x00fuzz")
    yield "to-display", patched(b"<sip:", b"\x00<sip:")
    yield "cseq-number", patched(b"CSeq: 1", b"CSeq: \x001")
    yield "content-length-value", patched(b"Content-Length: ", b"Content-Length: \x00")
    yield "instead-of-cr", patched(b"\r\nTo:", b"\x00\nTo:")
    yield "instead-of-lf", patched(b"\r\nTo:", b"\r\x00To:")
    yield "before-blank-line", patched(b"\r\n\r\n", b"\r\n\x00\r\n")
    body = sdp()
    mid = len(body) // 2
    yield "sdp-middle", request(ctx, body=body[:mid] + b"\x00" + body[mid + 1:]).render()
    yield "sdp-all-nul", request(ctx, body=b"\x00" * len(body)).render()
    yield "sdp-line-start", request(ctx, body=body.replace(b"\r\nm=", b"\r\n\x00m=")).render()
    yield "options-body-nul", request(ctx, "OPTIONS", body=b"\x00" * 100,
                                      content_type="text/plain").render()
    yield "options-header-value", patched(b"Max-Forwards: 70", b"Max-Forwards: 7\x000", "OPTIONS")
    yield "only-nul-1000", b"\x00" * 1000
    yield "only-nul-then-crlf", b"\x00" * 100 + CRLF + CRLF


def line_endings(ctx: Context) -> Iterator[Case]:
    """Bare LF, bare CR, mixed line ends, keep-alives (RFC 5626), folding, no blank line."""
    def invite() -> bytes:
        return request(ctx).render()

    def options() -> bytes:
        return request(ctx, "OPTIONS").render()

    def head_body() -> tuple[bytes, bytes]:
        head, body = invite().split(b"\r\n\r\n", 1)
        return head, body

    yield "invite-bare-lf", invite().replace(CRLF, b"\n")
    yield "invite-bare-cr", invite().replace(CRLF, b"\r")
    yield "options-bare-lf", options().replace(CRLF, b"\n")
    yield "options-bare-cr", options().replace(CRLF, b"\r")
    lines = invite().split(CRLF)
    yield "invite-mixed-alternating", b"".join(
        line + (CRLF, b"\n", b"\r")[i % 3] for i, line in enumerate(lines[:-1])) + lines[-1]
    head, body = head_body()
    yield "invite-lf-headers-crlf-blank", head.replace(CRLF, b"\n") + b"\r\n\r\n" + body
    head, body = head_body()
    yield "invite-crlf-headers-lf-blank", head + b"\n\n" + body
    yield "invite-cr-cr-lf", invite().replace(CRLF, b"\r\r\n")
    yield "invite-lf-cr", invite().replace(CRLF, b"\n\r")
    head, body = head_body()
    yield "invite-lf-body-crlf-headers", head + b"\r\n\r\n" + body.replace(CRLF, b"\n")
    yield "keepalive-crlfcrlf", b"\r\n\r\n"
    yield "keepalive-crlf", b"\r\n"
    yield "keepalive-lf-lf", b"\n\n"
    yield "keepalive-1000-crlf", CRLF * 1000
    yield "keepalive-then-options", b"\r\n\r\n" + request(ctx, "OPTIONS").render()
    yield "keepalive-then-invite", b"\r\n\r\n" + request(ctx).render()
    yield "request-then-keepalive", request(ctx, "OPTIONS").render() + b"\r\n\r\n"
    for n in (1, 10, 1000):
        yield f"leading-crlf-{n}", CRLF * n + request(ctx, "OPTIONS").render()
    yield "leading-lf-10", b"\n" * 10 + request(ctx, "OPTIONS").render()
    yield "leading-spaces", b"   " + request(ctx, "OPTIONS").render()
    parts = request(ctx)
    subject = "Subject: " + "\r\n ".join(f"fold{i}" for i in range(3))
    yield "folded-subject", parts.add(subject).render()
    parts = request(ctx)
    via = parts.headers[0].replace(b";branch", b"\r\n\t;branch")
    yield "folded-via", parts.set("Via", via).render()
    parts = request(ctx)
    yield "folded-to-name-value", parts.set(
        "To", f"To:\r\n <sip:{UNKNOWN_NUMBER}@{ctx.hostport}>").render()
    parts = request(ctx)
    yield "folded-1000-times", parts.add(
        "Subject: " + "\r\n ".join(f"f{i}" for i in range(1000))).render()
    parts = request(ctx)
    yield "fold-before-first-header", parts.add(" continuation", at=0).render()
    parts = request(ctx)
    yield "fold-lf-only", parts.add("Subject: a\n b").render()
    parts = request(ctx)
    yield "fold-empty-continuation", parts.add("Subject: a\r\n \r\n b").render()
    yield "options-no-blank-line", options()[:-2]
    head, body = head_body()
    yield "invite-no-blank-line", head + CRLF + body
    head, body = head_body()
    yield "invite-two-blank-lines", head + b"\r\n\r\n\r\n" + body
    parts = request(ctx)
    yield "header-without-colon", parts.add("X-No-Colon").render()
    parts = request(ctx)
    yield "header-only-spaces", parts.add("   ").render()
    parts = request(ctx)
    yield "space-before-colon", parts.add("Subject   :   x").render()
    yield "trailing-whitespace", request(ctx).render().replace(CRLF, b" \t\r\n", 8)


def delayed_offer(ctx: Context) -> Iterator[Case]:
    """Body-less INVITEs (RFC 3261 s13.2.1 delayed offer) to an unknown number."""
    yield "invite-no-body", request(ctx, body=b"").render()
    parts = request(ctx, body=b"")
    parts.lengths = []
    yield "invite-no-body-no-content-length", parts.render()
    yield "invite-no-body-content-type", request(ctx, body=b"").add(
        "Content-Type: application/sdp").render()
    yield "invite-no-body-phone-headers", request(ctx, body=b"").add(
        "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, PRACK, UPDATE, INFO",
        "Supported: timer, 100rel, replaces", "Session-Expires: 1800",
        "Min-SE: 90", "P-Asserted-Identity: <sip:+15555550199@127.0.0.1>").render()
    yield "invite-no-body-require-100rel", request(ctx, body=b"").add(
        "Require: 100rel").render()
    parts = request(ctx, body=b"")
    parts.start = f"INVITE sip:{UNKNOWN_NUMBER}@{ctx.hostport};user=phone SIP/2.0".encode()
    yield "invite-no-body-user-phone", parts.render()
    parts = request(ctx, body=b"")
    parts.start = f"INVITE tel:{UNKNOWN_NUMBER} SIP/2.0".encode()
    yield "invite-no-body-tel-uri", parts.render()
    yield "invite-no-body-unknown-user", request(ctx, user="nobody", body=b"").render()
    yield "invite-empty-multipart", request(
        ctx, body=_multipart([("text/plain", b"x")], "b1"),
        content_type='multipart/mixed;boundary="b1"').render()


def responses(ctx: Context) -> Iterator[Case]:
    """Responses nobody asked for, and malformed status lines."""
    for status, method, body in (("100 Trying", "INVITE", b""), ("180 Ringing", "INVITE", b""),
                                 ("183 Session Progress", "INVITE", sdp()),
                                 ("200 OK", "INVITE", sdp()), ("200 OK", "INVITE", b""),
                                 ("200 OK", "BYE", b""), ("200 OK", "OPTIONS", b""),
                                 ("200 OK", "REGISTER", b""), ("202 Accepted", "REFER", b""),
                                 ("401 Unauthorized", "INVITE", b""),
                                 ("404 Not Found", "INVITE", b""),
                                 ("487 Request Terminated", "INVITE", b""),
                                 ("503 Service Unavailable", "INVITE", b""),
                                 ("603 Decline", "INVITE", b"")):
        label = f"{status.split()[0]}-{method.lower()}" + ("-sdp" if body else "")
        yield label, response(ctx, status, method, body=body).render()
    bad_lines = {
        "code-4-digits": b"SIP/2.0 2000 OK",
        "code-2-digits": b"SIP/2.0 20 OK",
        "code-missing": b"SIP/2.0 OK",
        "code-negative": b"SIP/2.0 -200 OK",
        "code-099": b"SIP/2.0 099 Low",
        "code-700": b"SIP/2.0 700 High",
        "code-999": b"SIP/2.0 999 Max",
        "code-letters": b"SIP/2.0 2OO OK",
        "version-3": b"SIP/3.0 200 OK",
        "version-lowercase": b"sip/2.0 200 ok",
        "version-only": b"SIP/2.0",
        "double-space": b"SIP/2.0  200 OK",
        "tabs": b"SIP/2.0\t200\tOK",
        "no-reason-no-space": b"SIP/2.0 200",
        "reason-10k": b"SIP/2.0 200 " + filler(10_240, "ok ").encode(),
        "reason-nul": b"SIP/2.0 200 O\x00K",
        "reason-utf8": "SIP/2.0 200 Très bien".encode(),
        "http-status": b"HTTP/1.1 200 OK",
    }
    for label, line in bad_lines.items():
        parts = response(ctx)
        parts.start = line
        yield f"status-{label}", parts.render()
    yield "no-via", response(ctx).drop("Via").render()
    yield "no-cseq", response(ctx).drop("CSeq").render()
    yield "no-call-id", response(ctx).drop("Call-ID").render()
    yield "cseq-method-mismatch", response(ctx).set("CSeq", "CSeq: 1 BYE").render()
    parts = response(ctx, body=sdp())
    parts.lengths = [b"Content-Length: 99999"]
    yield "content-length-larger", parts.render()
    yield _counted(ctx, "via-{}-headers", 5000, lambda n, ids: response(ctx, ids=ids).add(
        *(f"Via: SIP/2.0/UDP 10.0.0.{i % 256}:5060;branch=z9hG4bK{i}" for i in range(n)),
        at=1).render())


def methods(ctx: Context) -> Iterator[Case]:
    """Every method the router knows or refuses, unknown methods, garbage request lines."""
    for method in ("INVITE", "OPTIONS", "BYE", "CANCEL", "ACK", "REGISTER", "PRACK", "UPDATE",
                   "INFO", "MESSAGE", "REFER", "SUBSCRIBE", "NOTIFY", "PUBLISH"):
        yield method.lower(), request(ctx, method).render()
    yield "invite-cseq-bye", request(ctx, cseq_method="BYE").render()
    yield "bye-with-sdp", request(ctx, "BYE", body=sdp()).render()
    yield "ack-with-sdp", request(ctx, "ACK", body=sdp()).render()
    yield "cancel-with-sdp", request(ctx, "CANCEL", body=sdp()).render()
    for label, method in (("unknown-foo", "FOO"), ("lowercase-invite", "invite"),
                          ("mixedcase-invite", "Invite"), ("method-1000-chars", filler(1000)),
                          ("method-numeric", "12345"), ("method-symbols", "INV@ITE"),
                          ("method-control-char", "INV\x01ITE"), ("method-utf8", "ÍNVITE"),
                          ("method-http-get", "GET")):
        parts = request(ctx, cseq_method=method)
        parts.start = f"{method} sip:{UNKNOWN_NUMBER}@{ctx.hostport} SIP/2.0".encode()
        yield label, parts.render()
    uri = f"sip:{UNKNOWN_NUMBER}@{ctx.hostport}"
    request_lines = {
        "empty-method": f" {uri} SIP/2.0",
        "two-spaces": f"INVITE  {uri}  SIP/2.0",
        "tabs": f"INVITE\t{uri}\tSIP/2.0",
        "no-version": f"INVITE {uri}",
        "no-uri": "INVITE SIP/2.0",
        "version-1": f"INVITE {uri} SIP/1.0",
        "version-2-1": f"INVITE {uri} SIP/2.1",
        "version-garbage": f"INVITE {uri} SIP/x.y",
        "http-version": f"INVITE {uri} HTTP/1.1",
        "uri-unknown-scheme": "INVITE foo:bar SIP/2.0",
        "uri-star": "INVITE * SIP/2.0",
        "uri-empty-sip": "INVITE sip: SIP/2.0",
        "uri-in-brackets": f"INVITE <{uri}> SIP/2.0",
        "uri-with-space": f"INVITE sip:{UNKNOWN_NUMBER} @{ctx.hostport} SIP/2.0",
        "uri-bad-port": f"INVITE sip:{UNKNOWN_NUMBER}@{ctx.host}:99999999 SIP/2.0",
        "uri-ipv6-unclosed": f"INVITE sip:{UNKNOWN_NUMBER}@[::1 SIP/2.0",
        "uri-percent-nul": f"INVITE sip:%00{UNKNOWN_NUMBER}@{ctx.hostport} SIP/2.0",
        "uri-percent-bad": f"INVITE sip:%zz%@{ctx.hostport} SIP/2.0",
        "sips-over-plain": f"INVITE sips:{UNKNOWN_NUMBER}@{ctx.hostport} SIP/2.0",
        "tel-uri": f"INVITE tel:{UNKNOWN_NUMBER} SIP/2.0",
        "tel-uri-garbage": "INVITE tel:+1;;;=;phone-context= SIP/2.0",
    }
    for label, line in request_lines.items():
        parts = request(ctx)
        parts.start = line.encode()
        yield f"request-line-{label}", parts.render()
    for label, method in (("no-via", "Via"), ("no-from", "From"), ("no-to", "To"),
                          ("no-call-id", "Call-ID"), ("no-cseq", "CSeq"),
                          ("no-max-forwards", "Max-Forwards"), ("no-contact", "Contact")):
        yield f"invite-{label}", request(ctx).drop(method).render()
    yield "invite-max-forwards-0", request(ctx).set("Max-Forwards", "Max-Forwards: 0").render()
    yield "invite-no-headers", f"INVITE {uri} SIP/2.0\r\n\r\n".encode()
    yield "http-get", b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    yield "http-post-json", (b"POST /api/v1/calls HTTP/1.1\r\nHost: localhost\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    yield "tls-client-hello", bytes.fromhex(
        "16030100a5010000a10303") + bytes(range(32)) + b"\x00\x00\x02\x13\x01\x01\x00" + bytes(64)
    yield "stun-binding", bytes.fromhex("000100002112a442") + bytes(12)
    rng = random.Random(SEED)
    for size in (1, 16, 1000, 10_000, 60_000):
        yield f"random-bytes-{size}", rng.randbytes(size)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ:;<>@=\"' \r\n\t/."
    for size in (100, 5000):
        yield f"random-text-{size}", "".join(rng.choice(alphabet) for _ in range(size)).encode()


_SPECIALS = (b"\x00", b"\r", b"\n", b"\r\n", b":", b";", b",", b"<", b">", b"\"", b"\\", b"%",
             b"\xff", b" ", b"=", b"@", b"SIP/2.0", b"\r\n\r\n", b"Content-Length: 9999\r\n")


def mutations(ctx: Context, count: int = 120) -> Iterator[Case]:
    """Seeded random mutations of valid INVITEs and OPTIONS (byte flips, cuts, repeats)."""
    rng = random.Random(SEED + 1)
    for i in range(count):
        data = bytearray(request(ctx, "INVITE" if i % 3 else "OPTIONS").render())
        ops = []
        for _ in range(rng.randint(1, 6)):
            op = rng.choice(("flip", "delete", "repeat", "insert", "swap-lines"))
            pos = rng.randrange(len(data))
            if op == "flip":
                data[pos] = rng.randrange(256)
            elif op == "delete":
                del data[pos:pos + rng.randint(1, 40)]
            elif op == "repeat":
                span = bytes(data[pos:pos + rng.randint(1, 60)])
                data[pos:pos] = span * rng.randint(1, 200)
            elif op == "insert":
                data[pos:pos] = rng.choice(_SPECIALS)
            else:
                lines = bytes(data).split(CRLF)
                a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
                lines[a], lines[b] = lines[b], lines[a]
                data = bytearray(CRLF.join(lines))
            ops.append(op)
            if not data:
                data = bytearray(b"\r\n")
        yield f"{i:03d}-{'+'.join(ops)}", bytes(data)


Family = Callable[[Context], Iterator[Case]]

FAMILIES: dict[str, Family] = {
    "sizes": sizes,
    "long-values": long_values,
    "sdp": sdp_nesting,
    "multipart": multipart,
    "content-length": content_length,
    "truncated": truncated,
    "nul-bytes": nul_bytes,
    "line-endings": line_endings,
    "delayed-offer": delayed_offer,
    "responses": responses,
    "methods": methods,
    "mutations": mutations,
}


def generate(ctx: Context, families: Iterable[str] | None = None) -> Iterator[FuzzMessage]:
    """Every message of the chosen families (all by default), family by family."""
    for name in families if families is not None else FAMILIES:
        if name not in FAMILIES:
            raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
        for label, data in FAMILIES[name](ctx.for_family(name)):
            yield FuzzMessage(name, label, data)


# ---- reading replies (pure) -----------------------------------------------------------------

_STATUS = re.compile(rb"SIP/2\.0 (\d{3})")
_HEADER = r"^(?:{})[ \t]*:.*$"


def status_of(reply: bytes) -> int | None:
    """The status code of a response, None for anything else."""
    match = _STATUS.match(reply)
    return int(match.group(1)) if match else None


def split_stream(buffer: bytes) -> tuple[bytes | None, bytes]:
    """(one whole message, the rest) from a TCP byte stream; (None, buffer) if incomplete."""
    buffer = buffer.lstrip(b"\r\n")
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None, buffer
    match = re.search(rb"^(?:content-length|l)[ \t]*:[ \t]*(\d+)", buffer[:head_end], re.I | re.M)
    end = head_end + 4 + (int(match.group(1)) if match else 0)
    if len(buffer) < end:
        return None, buffer
    return buffer[:end], buffer[end:]


def _header(name: str, head: bytes) -> bytes | None:
    match = re.search(_HEADER.format(name).encode(), head, re.I | re.M)
    return match.group(0).rstrip(b"\r") if match else None


def ack_for(request_data: bytes, reply: bytes) -> bytes | None:
    """The ACK for a non-2xx final answer to an INVITE (RFC 3261 s17.1.1.3), or None when
    the request was not a readable INVITE or the answer is not a final non-2xx."""
    status = status_of(reply)
    if not request_data.startswith(b"INVITE ") or status is None or status < 300:
        return None
    head = request_data.split(b"\r\n\r\n", 1)[0]
    reply_head = reply.split(b"\r\n\r\n", 1)[0]
    start = head.split(CRLF, 1)[0].split(b" ")
    via, from_, call_id = (_header(n, head) for n in ("via|v", "from|f", "call-id|i"))
    to = _header("to|t", reply_head)
    cseq = re.search(rb"^cseq[ \t]*:[ \t]*(\d+)", head, re.I | re.M)
    if len(start) != 3 or not (via and from_ and call_id and to and cseq):
        return None
    lines = [b"ACK " + start[1] + b" SIP/2.0", via, from_, to, call_id,
             b"CSeq: " + cseq.group(1) + b" ACK", b"Max-Forwards: 70", b"Content-Length: 0"]
    return CRLF.join(lines) + CRLF + CRLF
