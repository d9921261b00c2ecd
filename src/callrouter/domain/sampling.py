"""Per-key sampling: at most ``limit`` of each kind per second, the rest only counted.

How it works: each key (a routing outcome, a bounded set) has one window, the whole
second of ``now`` it was last seen in. Within a window the first ``limit`` samples are
admitted and the rest skipped; when a key's next sample opens a new window, the number
skipped in its previous window is reported once, with that sample. Used for the records
and log lines of rejected INVITEs, so a flood of them costs a bounded number of database
rows and log lines (the metrics still count every one). Pure: time comes in as ``now``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Sample:
    admitted: bool
    skipped_before: int  # skipped in this key's previous window (reported once)


@dataclass
class _Window:
    second: int
    admitted: int = 0
    skipped: int = 0


class PerSecondSampler(Generic[K]):
    """See the module docstring. Not thread-safe: one thread samples (the SIP thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._windows: dict[K, _Window] = {}

    def sample(self, key: K, now: float) -> Sample:
        window, skipped_before = self._window(key, int(now))
        admitted = window.admitted < self.limit
        if admitted:
            window.admitted += 1
        else:
            window.skipped += 1
        return Sample(admitted, skipped_before)

    def _window(self, key: K, second: int) -> tuple[_Window, int]:
        window = self._windows.get(key)
        if window is not None and window.second == second:
            return window, 0
        self._windows[key] = _Window(second)
        return self._windows[key], window.skipped if window is not None else 0
