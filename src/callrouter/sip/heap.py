"""Giving the C heap's freed memory back to the OS after a burst of SIP traffic.

Why: pjsip allocates each call's transaction, dialog and media channel from pools, and
frees them (pjsua's caching pool keeps nothing: its maximum capacity is 0) when the
call's last RFC 3261 timer fires, at most 64*T1 = 32 s after its final response
(s17.2.1 Timer H; Timer I is T4 = 5 s). glibc keeps the freed chunks in its arenas: a
few long-lived allocations above them pin the heap, so the process's RSS stays at the
burst's peak. Measured (docs/benchmarks.md, "Memory after a flood"): 10,000 rejected
INVITEs took RSS from 146 MB to 446 MB, of which 30 MB was in use 30 s later and 446 MB
still resident a minute later; one ``malloc_trim(0)`` brought it to 154 MB in ~90 ms.

How: the SIP thread's loop tells ``HeapTrimmer.after`` how many events each
``libHandleEvents`` handled. Once ``burst`` events have come since the last trim and
then ``quiet`` seconds (longer than 64*T1, so pjsip has released the burst) passed with
every second under ``calm`` events, it trims, on the SIP thread. A trim holds the
allocator's locks for tens of milliseconds, so it never runs while traffic flows; a
steady trickle (keep-alives, session timers) still counts as quiet.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("callrouter.sip")

T1 = 0.5  # RFC 3261 s17.1.1.1
QUIET_SECONDS = 64 * T1 + 3  # the longest transaction timer, and a margin


class HeapTrimmer:
    """See the module docstring. Called on the SIP thread only."""

    def __init__(self, trim: Callable[[], None], *, burst: int = 5000, calm: int = 100,
                 quiet: float = QUIET_SECONDS) -> None:
        self._trim = trim
        self.burst, self.calm, self.quiet = burst, calm, quiet
        self._pending = 0  # events since the last trim
        self._second: int | None = None  # the whole second being counted
        self._in_second = 0
        self._quiet_since: float | None = None  # start of the current calm stretch

    def after(self, events: int, now: float) -> None:
        """One turn of the SIP thread's loop handled ``events``; trims when due."""
        self._pending += events
        if int(now) != self._second:
            self._close_second()
            self._second, self._in_second = int(now), 0
        self._in_second += events
        if self._in_second >= self.calm:
            self._quiet_since = None
        if self._due(now):
            self._pending, self._quiet_since = 0, None
            self._trim()

    def _close_second(self) -> None:
        if self._second is None or self._in_second >= self.calm:
            return  # no second yet, or a busy one (``after`` has reset the quiet already)
        if self._quiet_since is None:
            self._quiet_since = float(self._second)

    def _due(self, now: float) -> bool:
        return (self._pending >= self.burst and self._quiet_since is not None
                and now - self._quiet_since >= self.quiet)


def malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``, timed and logged (``engine.heap_trimmed``); a no-op
    where the C library has none (musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def trimmed() -> None:
        before, started = _rss_mb(), time.perf_counter()
        trim(0)
        log.info("engine.heap_trimmed", rss_before_mb=before, rss_after_mb=_rss_mb(),
                 took_ms=round((time.perf_counter() - started) * 1000, 1))

    return trimmed


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20), 1)
