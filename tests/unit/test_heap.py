"""When the SIP thread gives freed C heap memory back to the OS (``sip.heap``).

Guards issue 9 item 7(b): after 10,000 rejected INVITEs the router's RSS stayed at
446 MB with 30 MB of it in use (pjsip had freed every call's pools; glibc kept the
chunks), for good. ``HeapTrimmer`` trims once a burst is over and pjsip has released it
(quiet for longer than 64*T1), never while traffic flows. Time and the trim are injected.
"""

from __future__ import annotations

from structlog.testing import capture_logs

from callrouter.sip.heap import HeapTrimmer, malloc_trim

BURST, CALM, QUIET = 5000, 100, 35.0


class Loop:
    """The SIP thread's loop, 10 ms a turn, reporting the events each turn handled."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.trims: list[float] = []
        self.trimmer = HeapTrimmer(lambda: self.trims.append(self.now), burst=BURST,
                                   calm=CALM, quiet=QUIET)

    def run(self, seconds: float, events_per_second: int) -> None:
        owed = 0.0
        for _ in range(round(seconds * 100)):
            self.now += 0.01
            owed += events_per_second / 100
            events = int(owed)
            owed -= events
            self.trimmer.after(events, self.now)


def test_a_burst_is_trimmed_once_after_it_has_been_quiet_for_longer_than_64_t1() -> None:
    loop = Loop()
    loop.run(6, 3000)  # a flood: 18,000 events
    loop.run(QUIET - 1, 0)
    assert loop.trims == []  # pjsip may still be releasing the flood's transactions
    loop.run(2, 0)
    assert len(loop.trims) == 1
    loop.run(120, 0)
    assert len(loop.trims) == 1  # nothing new to give back


def test_no_trim_while_traffic_flows_however_long() -> None:
    loop = Loop()
    loop.run(6, 3000)
    loop.run(120, 500)  # steady calls: the trim would stall them for tens of ms
    assert loop.trims == []
    loop.run(QUIET + 1, 10)  # a trickle (keepalives, timers) counts as quiet
    assert len(loop.trims) == 1


def test_light_traffic_never_makes_a_burst() -> None:
    loop = Loop()
    loop.run(40, 50)  # 2,000 events, well under a burst
    loop.run(QUIET + 5, 0)
    assert loop.trims == []


def test_a_second_flood_is_trimmed_again() -> None:
    loop = Loop()
    for _ in range(2):
        loop.run(6, 3000)
        loop.run(QUIET + 2, 0)
    assert len(loop.trims) == 2


def test_the_trim_runs_the_c_librarys_and_logs_what_it_gave_back() -> None:
    with capture_logs() as logs:
        malloc_trim()()
    assert [e["event"] for e in logs] == ["engine.heap_trimmed"]
    assert logs[0]["took_ms"] >= 0
