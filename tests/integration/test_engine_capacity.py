"""The built engine holds hundreds of concurrent calls.

Guards the reason the engine is built from source (../shared/engine.md): PyPI's
pjsua2-python build has ``PJSUA_MAX_CALLS`` 4 and answers the fifth concurrent INVITE with
``486 Busy Here``, whatever ``maxCalls`` says. This test FAILS against such a capped
engine: it holds 250 calls at once on bench/bare_engine.py (the bare pjsua2 UAS on the
same module the router uses) and requires every one of them to succeed.

The module comes from ``CALLROUTER_ENGINE_DIR`` if set, else the test interpreter's
site-packages if ``import pjsua2`` works there, else ``scripts/build-engine.sh --print-dir``.
To see it fail: ``pip install --target DIR pjsua2-python==2.15.1`` and run it with
``CALLROUTER_ENGINE_DIR=DIR``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import harness

pytestmark = [
    pytest.mark.sip,
    pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp is not installed"),
]

CONCURRENT = 250
HOLD_MS = 4000


@pytest.mark.timeout(120)
def test_engine_holds_250_concurrent_calls(tmp_path: Path) -> None:
    env = harness.engine_env()
    engine, address = harness.start_bare_engine(
        tmp_path, mode="answer", rtp_ports="30000-30999", max_calls=CONCURRENT + 50, env=env
    )
    with harness.running(engine):
        # 250 calls at 100/s, each held 4 s: all 250 are up together from ~2.5 s to ~4 s.
        command = harness.sipp_command(
            address, ["-sn", "uac"], rate=100, calls=CONCURRENT, limit=CONCURRENT,
            hold_ms=HOLD_MS, timeout_s=30, media_port=harness.free_port(),
        )  # fmt: skip
        result = harness.run_sipp(command, tmp_path / "sipp", timeout_s=30)
        assert engine.alive(), engine.tail()

    screen = (tmp_path / "sipp" / "screen.log").read_text(errors="replace")
    assert (result.successful, result.failed) == (CONCURRENT, 0), screen[-3000:]
    assert f"Peak was {CONCURRENT} calls" in screen, screen[-3000:]
