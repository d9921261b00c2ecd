"""Fixed-window rate limiting: at most ``limit`` hits per key per window.

How it works: time (from an injected clock, monotonic by default) is cut into windows of
``window_seconds``, the same for every key; each key counts its hits in the current
window. When the clock enters a new window every count is dropped at once, so memory is
bounded by the keys seen in one window. A refused hit still counts, which keeps a client
that ignores ``Retry-After`` refused until the window ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int  # until the window ends; also the Retry-After of a refusal

    def headers(self) -> dict[str, str]:
        """``X-RateLimit-*`` (Reset in seconds from now), plus ``Retry-After`` if refused."""
        headers = {"X-RateLimit-Limit": str(self.limit),
                   "X-RateLimit-Remaining": str(self.remaining),
                   "X-RateLimit-Reset": str(self.reset_seconds)}
        if not self.allowed:
            headers["Retry-After"] = str(self.reset_seconds)
        return headers


class FixedWindowLimiter:
    def __init__(
        self, limit: int, *, window_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._window_seconds = window_seconds
        self._clock = clock
        self._window = -1
        self._counts: dict[Hashable, int] = {}

    def hit(self, key: Hashable) -> Verdict:
        now = self._clock()
        window = int(now // self._window_seconds)
        if window != self._window:
            self._window, self._counts = window, {}
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        reset = max(1, math.ceil((window + 1) * self._window_seconds - now))
        return Verdict(allowed=count <= self._limit, limit=self._limit,
                       remaining=max(0, self._limit - count), reset_seconds=reset)
