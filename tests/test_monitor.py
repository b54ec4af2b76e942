"""LatencyMonitor and StageTimer: exact moments, histogram percentiles, the window, the clock."""

from __future__ import annotations

import math
import statistics
import threading

import numpy as np
import pytest

from infercache.monitor import LatencyMonitor, StageTimer


class FakeClock:
    """A clock the test moves by hand: no sleeps, no wall-clock assertions."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_empty_stats() -> None:
    assert LatencyMonitor().get_stats() == {"count": 0}
    assert LatencyMonitor().recent(5) == []


def test_start_end_request_uses_injected_clock() -> None:
    clock = FakeClock()
    mon = LatencyMonitor(timer=clock)
    mon.start_request("a")
    mon.start_request("b")
    clock.now += 0.010
    assert mon.end_request("a") == pytest.approx(0.010)
    clock.now += 0.005
    assert mon.end_request("b") == pytest.approx(0.015)
    assert mon.end_request("a") is None  # already ended
    assert mon.end_request("never") is None
    assert mon.get_stats()["count"] == 2
    assert mon.pending() == 0


def test_stats_match_exact_values() -> None:
    values = [i / 1000 for i in range(1, 1001)]  # 1..1000 ms
    mon = LatencyMonitor(window_size=10)
    for v in values:
        mon.record(v)
    s = mon.get_stats()
    assert s["count"] == 1000
    assert s["min"] == pytest.approx(0.001)
    assert s["max"] == pytest.approx(1.0)
    assert s["mean"] == pytest.approx(statistics.mean(values))
    assert s["std"] == pytest.approx(statistics.stdev(values))
    # hdrhistogram: three significant figures
    assert s["p50"] == pytest.approx(0.5, rel=2e-3)
    assert s["median"] == s["p50"]
    assert s["p95"] == pytest.approx(0.95, rel=2e-3)
    assert s["p99"] == pytest.approx(0.99, rel=2e-3)
    assert s["p999"] == pytest.approx(0.999, rel=2e-3)
    # percentiles cover every value, the window only the last 10
    assert mon.recent(3) == pytest.approx([0.998, 0.999, 1.0])
    assert len(mon.recent(100)) == 10


def test_out_of_range_values_are_clamped_not_dropped() -> None:
    mon = LatencyMonitor(max_seconds=1.0)
    mon.record(0.0)
    mon.record(5.0)
    s = mon.get_stats()
    assert s["count"] == 2
    assert s["max"] == 5.0
    assert s["p99"] <= 5.0


def test_time_context_manager_records_even_on_error() -> None:
    clock = FakeClock()
    mon = LatencyMonitor(timer=clock)
    with pytest.raises(RuntimeError), mon.time():
        clock.now += 0.25
        raise RuntimeError("boom")
    assert mon.recent(1) == [pytest.approx(0.25)]


def test_pending_table_is_bounded() -> None:
    mon = LatencyMonitor(max_pending=3)
    for i in range(10):
        mon.start_request(i)
    assert mon.pending() == 3
    assert mon.end_request(0) is None  # the oldest were dropped
    assert mon.end_request(9) is not None


def test_thread_safety() -> None:
    mon = LatencyMonitor(window_size=100)

    def work() -> None:
        for _ in range(2000):
            mon.record(0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mon.get_stats()["count"] == 8000


def test_stage_timer_and_stage_stats() -> None:
    clock = FakeClock()
    st = StageTimer(clock)
    clock.now += 0.001
    st.mark("decode")
    clock.now += 0.002
    st.mark("key")
    st.add("compute", 0.004)
    clock.now += 0.003
    st.mark("key")  # visiting a stage twice adds up
    assert st.timings == pytest.approx({"decode": 0.001, "key": 0.005, "compute": 0.004})
    assert st.total() == pytest.approx(0.006)
    mon = LatencyMonitor(timer=clock)
    mon.record_stages(st.timings, total=st.total())
    stages = mon.stage_stats()
    assert set(stages) == {"decode", "key", "compute"}
    assert stages["key"]["count"] == 1
    assert mon.get_stats()["count"] == 1
    assert mon.recent_percentile(99) == pytest.approx(0.006)
    mon.reset()
    assert mon.get_stats() == {"count": 0}


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-float("inf"), ValueError),
        (-1.0, ValueError),
        (np.float64("nan"), ValueError),
        (10**400, ValueError),  # beyond a float: overflowed the histogram's numpy flush
        (None, TypeError),
        ("1", TypeError),  # was parsed as 1.0
        (True, TypeError),  # a flag passed in the wrong place, not one second
        (np.array([0.5]), TypeError),
    ],
    ids=["nan", "inf", "-inf", "negative", "np-nan", "huge-int", "None", "str", "bool", "array"],
)
def test_invalid_latency_is_refused_at_record(bad: object, error: type[Exception]) -> None:
    """A NaN used to be stored and break get_stats() later (an IndexError from the histogram's
    bucket arithmetic); None, a str, a negative value or inf were stored too."""
    mon = LatencyMonitor()
    mon.record(0.01)
    with pytest.raises(error, match="latency must be"):
        mon.record(bad)  # type: ignore[arg-type]
    with pytest.raises(error, match="latency must be"):
        mon.record_many([0.02, bad])  # type: ignore[list-item]
    s = mon.get_stats()  # nothing of either call was recorded
    assert s["count"] == 1 and s["min"] == s["max"] == 0.01
    counts, n, total = mon.histogram([0.1])
    assert counts == [1] and n == 1 and total == pytest.approx(0.01)
    assert mon.recent(5) == [0.01] and mon.rejected == 0


def test_other_real_numbers_are_recorded_as_floats() -> None:
    mon = LatencyMonitor()
    mon.record(0)
    mon.record(np.float32(0.5))
    mon.record_many([np.int64(2), 0.25])
    mon.record_many(v for v in (0.125, 3))  # type: ignore[arg-type]  # an iterator: read once
    assert mon.recent(6) == [0.0, 0.5, 2.0, 0.25, 0.125, 3.0]
    assert all(type(v) is float for v in mon.recent(6))
    assert mon.get_stats()["max"] == 3.0


def test_serving_paths_drop_and_count_invalid_durations() -> None:
    """record_stages (after the Predictor has its answer), time() and end_request measure on a
    clock: a bad value there is dropped and counted, never raised and never stored."""
    clock = FakeClock()
    mon = LatencyMonitor(timer=clock)
    timings: dict[str, object] = {"decode": float("nan"), "key": 0.001, "cache": None}
    mon.record_stages(timings, total=-1.0)  # type: ignore[arg-type]
    assert mon.rejected == 3
    assert set(mon.stage_stats()) == {"key"}
    assert mon.get_stats() == {"count": 0}
    # a clock that steps back (an injected wall clock): the block's own exception survives
    with pytest.raises(RuntimeError, match="boom"), mon.time():
        clock.now -= 1.0
        raise RuntimeError("boom")
    mon.start_request("r")
    clock.now -= 1.0
    assert mon.end_request("r") == pytest.approx(-1.0)
    assert mon.rejected == 5 and mon.get_stats() == {"count": 0}
    assert mon.snapshot()["rejected"] == 5
    mon.record_stages({"key": 0.002}, total=0.003)
    s = mon.get_stats()
    assert s["count"] == 1 and math.isfinite(s["mean"]) and s["min"] >= 0
    mon.reset()
    assert mon.rejected == 0


def test_non_strict_monitor_drops_and_counts_instead_of_raising() -> None:
    mon = LatencyMonitor(strict=False)
    mon.record(float("nan"))
    mon.record("0.1")  # type: ignore[arg-type]
    mon.record_many([0.1, -0.5, 0.2, float("inf")])
    assert mon.rejected == 4
    assert mon.recent(10) == [0.1, 0.2]
    assert mon.get_stats()["count"] == 2
