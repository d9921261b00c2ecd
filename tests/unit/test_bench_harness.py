"""The bench's own bookkeeping (bench/run.py, bench/harness.py): what a report keeps when a
step fails, and the ports it hands to SIPp."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench(monkeypatch_module: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch_module.syspath_prepend(str(BENCH))
    import harness
    import run

    return run, harness


@pytest.fixture(scope="module")
def monkeypatch_module():  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_held_steps_done_before_a_failing_one_stay_in_the_report(bench, monkeypatch, tmp_path):
    run, harness = bench

    def hold(start, n, plan, workdir):  # type: ignore[no-untyped-def]
        if n > 500:
            raise harness.BenchError("runtime SIPp exited:\nbind: address in use")
        return run.Concurrency(n, n, 0, 0.1, 200.0, 100.0, 1.0, 0)

    monkeypatch.setattr(run, "hold_calls", hold)
    result = run.measure("sipp", None, run.FULL, tmp_path)
    assert [c.calls for c in result.concurrent] == [500]
    assert result.error is not None and "runtime SIPp exited" in result.error
    report = "\n".join(run.target_section(result))
    assert "Not (fully) measured" in report
    assert "| 500 | 500 | 0 |" in report


def test_rate_steps_done_before_a_failing_one_stay_in_the_report(bench, monkeypatch, tmp_path):
    run, harness = bench
    steps = []

    def sweep(start, path, rates, plan, workdir, sweep=None):  # type: ignore[no-untyped-def]
        sweep.steps.append(run.RateStep(rates[0], 5, 0, 0.0, 4.0, 0.5))
        steps.append(path)
        raise harness.BenchError("SIPp exited")

    monkeypatch.setattr(run, "rate_sweep", sweep)
    result = run.measure("router", None, run.FULL, tmp_path, steps=("reject",))
    assert steps == ["reject"]
    assert result.reject is not None and [s.rate for s in result.reject.steps] == [100]
    assert "| 100 | 5 | 0 |" in "\n".join(run.target_section(result))


def test_free_port_never_hands_out_a_port_twice(bench, monkeypatch):
    _, harness = bench
    picks = iter([40001, 40001, 40002])

    class Probe:
        def __init__(self, *args: object) -> None:
            self.port = 0

        def __enter__(self) -> Probe:
            return self

        def __exit__(self, *args: object) -> None:
            return None

        def bind(self, address: tuple[str, int]) -> None:
            self.port = next(picks)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(harness, "_GIVEN_PORTS", set())
    monkeypatch.setattr(harness.socket, "socket", Probe)
    assert [harness.free_port(), harness.free_port()] == [40001, 40002]

