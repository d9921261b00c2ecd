#!/usr/bin/env python3
"""Send generated parser-breaking SIP messages to a SIP server; check it answers after each.

    python scripts/sip-fuzz.py --target 127.0.0.1:5060 [--transport udp|tcp] [--family NAME]...
    python scripts/sip-fuzz.py --list [--family NAME]...

The messages come from tests/support/sipfuzz.py (the generator the integration test
tests/integration/test_fuzz_survival.py uses). After each message a fresh OPTIONS goes to the
target over UDP; one line per message says what the message got back and whether the OPTIONS
got 200. Over UDP, messages larger than one datagram (65,507 bytes) are skipped; over TCP each
message has a connection of its own, closed after its final answer, the server's close or
--wait seconds. Exit status 0 when the target answered after every message, 1 when it stopped
answering (the run stops there unless --keep-going). Send it only to a server you run.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import sipfuzz
from tests.support.sipwire import options, send_tcp, send_udp


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


def _answer(replies: list[bytes]) -> int | None:
    """The final status among the replies, else the last provisional one."""
    statuses = [s for s in map(sipfuzz.status_of, replies) if s is not None]
    finals = [s for s in statuses if s >= 200]
    return finals[0] if finals else (statuses[-1] if statuses else None)


def list_families(ctx: sipfuzz.Context, families: list[str] | None) -> None:
    chosen = families or list(sipfuzz.FAMILIES)
    for name in chosen:
        messages = list(sipfuzz.generate(ctx, [name]))
        doc = (sipfuzz.FAMILIES[name].__doc__ or "").strip().split("\n")[0]
        print(f"{name:15} {len(messages):4} messages  {doc}")
        if families:
            for message in messages:
                print(f"    {message.name}  ({len(message.data)} bytes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--target", type=parse_target, help="host:port of the SIP server")
    parser.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    parser.add_argument("--family", action="append", choices=list(sipfuzz.FAMILIES),
                        help="a message family (repeatable; default: all)")
    parser.add_argument("--list", action="store_true", help="list the families and exit")
    parser.add_argument("--wait", type=float, default=0.2,
                        help="TCP: seconds to wait for an answer or a close (default 0.2)")
    parser.add_argument("--options-timeout", type=float, default=2.0,
                        help="seconds the OPTIONS after each message may take (default 2)")
    parser.add_argument("--salt", default=None,
                        help="salt of branches and Call-IDs (default: random; give one to "
                             "repeat a run byte for byte)")
    parser.add_argument("--keep-going", action="store_true",
                        help="go on after the target stopped answering")
    args = parser.parse_args(argv)
    host, port = args.target or ("127.0.0.1", 5060)
    salt = args.salt or uuid.uuid4().hex[:12]
    ctx = sipfuzz.Context(host=host, port=port, transport=args.transport, salt=salt)
    if args.list:
        list_families(ctx, args.family)
        return 0
    if args.target is None:
        parser.error("--target is required (or --list)")

    print(f"# sip-fuzz {args.transport} -> {host}:{port}  salt={salt}", flush=True)
    if options(host, port, args.options_timeout) != 200:
        print("target does not answer OPTIONS with 200 before the first message")
        return 1
    sent = skipped = failed = 0
    for message in sipfuzz.generate(ctx, args.family):
        size = len(message.data)
        if args.transport == "udp" and size > sipfuzz.UDP_MAX_PAYLOAD:
            skipped += 1
            print(f"SKIP {message.label}  {size} B  larger than one UDP datagram", flush=True)
            continue
        if args.transport == "udp":
            replies, status = send_udp(host, port, message.data, args.options_timeout)
        else:
            replies = send_tcp(host, port, message.data, args.wait)
            status = options(host, port, args.options_timeout)
        sent += 1
        answer = _answer(replies)
        verdict = "ok  " if status == 200 else "FAIL"
        print(f"{verdict} {message.label}  {size} B  answer {answer or '-'}  "
              f"OPTIONS {status or 'none'}", flush=True)
        if status != 200:
            failed += 1
            if not args.keep_going:
                print(f"# the target stopped answering after {message.label}")
                break
    print(f"# {sent} sent, {skipped} skipped, {failed} followed by no OPTIONS 200")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
