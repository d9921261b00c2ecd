"""The libFuzzer harnesses run clean: ``scripts/fuzz.sh`` with a 40-second budget.

Two harnesses, both with AddressSanitizer and UndefinedBehaviorSanitizer (tests/fuzz/):
``fuzz_guard_text`` over the guard's raw-text functions (the code in the engine that reads
bytes pjsip could not parse and builds a response from them) and ``fuzz-sip``,
pjproject's own SIP parser harness against sanitizer-built pjproject libraries. Each runs
every input in tests/fuzz/regressions/<harness>/ first (past crashes), then fuzzes for
20 s from tests/fuzz/corpus/<harness>/ (a smoke run inside the suite's time budget;
`make fuzz` fuzzes for longer).

clang is installed by scripts/install-deps.sh (and by fuzz.sh itself if missing): this
test never skips. The first run builds the sanitizer libraries (about a minute on two
cores) and caches them beside the engine cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
HARNESSES = ("fuzz_guard_text", "fuzz-sip")


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.timeout(1800)  # a cold sanitizer build, and the pjproject source on first use
def test_fuzz_harnesses_find_no_crash(tmp_path: Path) -> None:
    before = _snapshot(CORPUS)
    env = dict(os.environ, CALLROUTER_FUZZ_SECONDS="20", TMPDIR=str(tmp_path))
    env.pop("ASAN_OPTIONS", None)
    env.pop("UBSAN_OPTIONS", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "fuzz.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1750, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"scripts/fuzz.sh failed (rc {proc.returncode}):\n{log[-8000:]}"
    for name in HARNESSES:
        assert f"] {name}: " in log and "exec/s" in log, log[-4000:]
    assert "CRASH" not in log
    # New inputs go to a temporary directory: the repository's corpus is left alone.
    assert _snapshot(CORPUS) == before
