#!/usr/bin/env python3
"""Replay the RFC 4475/5118 torture corpus at a SIP server and print a verdict per file.

    python scripts/sip-torture.py --target 127.0.0.1:5060 [--transport udp|tcp]

Exit status 0 when every file passes (see tests/support/torture.py for the rule), 1 otherwise.
Send it only to a server you run: loopback by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import torture


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=parse_target, required=True, help="host:port")
    parser.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="corpus directory (default: $CALLROUTER_TORTURE_DIR)")
    parser.add_argument("--wait", type=float, default=1.0, help="seconds to wait for each answer")
    args = parser.parse_args(argv)
    host, port = args.target
    outcomes = torture.replay(host, port, args.transport, torture.load_cases(args.corpus),
                              args.wait)
    print(torture.format_table(outcomes))
    failed = [o for o in outcomes if not torture.judge(o).passed]
    print(f"\n{len(outcomes) - len(failed)}/{len(outcomes)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
