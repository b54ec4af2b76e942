"""Latency measurement: :class:`LatencyMonitor` and the per-stage :class:`StageTimer`.

The user's tutorial kept the last 1,000 latencies in a deque and sorted them for every percentile.
That forgets everything older than the window (a p99 over 1,000 samples is ten values) and costs
O(n log n) per query. Here every recorded value goes into an HdrHistogram (microsecond resolution,
three significant figures, fixed memory), so percentiles cover the whole run and cost the same at
ten or ten million samples; a bounded deque still keeps the most recent values for ``recent(n)`` and
for the "recent p99" an adaptive batcher or a dashboard wants.

Exact ``min``, ``max``, ``mean`` and ``std`` are tracked beside the histogram (Welford's update), so
they carry no bucket rounding. Everything is guarded by one lock: the monitor is written from the
event loop and from worker threads alike. The clock is injected (``timer=``): tests need no sleeps.

A latency is a finite, non-negative real number of seconds; anything else (None, a str, NaN, inf,
a negative value) is refused where it comes in, never stored: one NaN in the buffer would turn the
histogram's bucket index into garbage and make every later read fail. Values a caller passes in
(``record``, ``record_many``) raise ``TypeError``/``ValueError`` there, at the bug's source. Values
measured on a serving path (``record_stages``, which the Predictor calls after the answer is
computed; ``time()``; ``end_request``) are dropped and counted in :attr:`LatencyMonitor.rejected`
instead: a metrics problem must not fail a request that was served, nor replace the exception a
``with monitor.time():`` block raised. The check is one type test and two float comparisons per
value (tens of nanoseconds); only an unusual value (an int, a numpy float, a bad one) takes the
slow path.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

__all__ = ["STAGES", "LatencyMonitor", "StageTimer"]

#: The hot path's stages, in order (DESIGN.md): decode/validate, key, cache lookups, waiting in the
#: batcher's queue, model compute, and the write-back to the cache.
STAGES: tuple[str, ...] = ("decode", "key", "cache", "queue", "compute", "write")

_FLUSH_EVERY = 256

_INF = math.inf

_PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p999", 99.9),
)


def _duration(value: object) -> float:
    """``value`` as a latency in float seconds, or TypeError / ValueError saying what is wrong.

    The slow path of the check every recording entry makes inline, ``type(v) is not float or
    not v >= 0.0 or v == _INF`` (NaN fails ``>=``; separate comparisons rather than a chained
    one, which CPython 3.11 does not specialize for floats). It accepts any real number (an int,
    a numpy float) and converts it, so the series hold plain floats only. bool is refused
    although it is an int: ``record(True)`` is a bug, not one second. A str is refused rather
    than parsed, as is anything without a value.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"a latency must be a real number of seconds, got {type(value).__name__}: {value!r:.60}"
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = _INF
    if not 0.0 <= seconds < _INF:  # NaN fails both comparisons
        raise ValueError(f"a latency must be finite and >= 0 seconds, got {value!r:.60}")
    return seconds


def _duration_or_none(value: object) -> float | None:
    """:func:`_duration`, with None instead of an error (for the entries that drop and count)."""
    try:
        return _duration(value)
    except (TypeError, ValueError):
        return None


class _Series:
    """One histogram plus exact moments. Not thread-safe alone: the monitor's lock guards it.

    ``add`` only appends to a small buffer; every ``_FLUSH_EVERY`` values (and before any read)
    the buffer is folded into the HdrHistogram with numpy, using hdrh's own bucket arithmetic on
    a numpy view of its counts array. hdrh's pure-Python ``record_value`` costs ~2.3 µs a call,
    and the Predictor records several stages per request, so this keeps recording off the hot
    path's budget (~0.3 µs a value) without the latency spike a large deferred flush would add.
    """

    __slots__ = ("buf", "count", "counts", "highest_us", "hist", "m2", "max", "mean", "min")

    def __init__(self, highest_us: int, significant_figures: int) -> None:
        self.highest_us = highest_us
        self.hist = HdrHistogram(1, highest_us, significant_figures)
        self.counts = np.ctypeslib.as_array(self.hist.counts)
        self.buf: list[float] = []
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, seconds: float) -> None:
        buf = self.buf
        buf.append(seconds)
        if len(buf) >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        a = np.asarray(self.buf, dtype=np.float64)
        self.buf.clear()
        n = int(a.size)
        # exact moments: Chan et al.'s parallel merge of (count, mean, M2)
        mean_b = float(a.mean())
        m2_b = float(((a - mean_b) ** 2).sum())
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / total
        self.m2 += m2_b + delta * delta * self.count * n / total
        self.count = total
        self.min = min(self.min, float(a.min()))
        self.max = max(self.max, float(a.max()))
        # clamp into the histogram's range: below 1 µs counts as 1 µs, above the top as the top,
        # instead of being silently dropped (hdrh's record_value returns False for those)
        us = np.clip(np.rint(a * 1e6), 1, self.highest_us).astype(np.int64)
        h = self.hist
        # hdrh: bucket = bit_length(v | sub_bucket_mask) - unit_magnitude - (half_magnitude + 1)
        bit_length = np.frexp((us | h.sub_bucket_mask).astype(np.float64))[1].astype(np.int64)
        bucket = bit_length - h.unit_magnitude - (h.sub_bucket_half_count_magnitude + 1)
        sub = us >> (bucket + h.unit_magnitude)
        index = ((bucket + 1) << h.sub_bucket_half_count_magnitude) + (
            sub - h.sub_bucket_half_count
        )
        np.add.at(self.counts, index, 1)
        h.total_count += n
        h.min_value = min(h.min_value, int(us.min()))
        h.max_value = max(h.max_value, int(us.max()))

    def cumulative(self, bounds_us: np.ndarray[Any, Any]) -> tuple[list[int], int, float]:
        """Counts of values <= each bound (µs), the total count and the sum in seconds.

        Reads hdrh's counts array with numpy: each slot's lowest equivalent value decides which
        bounds it falls under, so the answer is exact to the histogram's precision.
        """
        self.flush()
        h = self.hist
        counts = self.counts[: h.counts_len]
        index = np.arange(counts.size, dtype=np.int64)
        half_mag = h.sub_bucket_half_count_magnitude
        bucket = (index >> half_mag) - 1
        sub = (index & (h.sub_bucket_half_count - 1)) + h.sub_bucket_half_count
        low = bucket < 0
        sub = np.where(low, sub - h.sub_bucket_half_count, sub)
        bucket = np.where(low, 0, bucket)
        values = sub << (bucket + h.unit_magnitude)
        order = np.argsort(values, kind="stable")
        cum = np.cumsum(counts[order])
        pos = np.searchsorted(values[order], bounds_us, side="right")
        out = [int(cum[p - 1]) if p > 0 else 0 for p in pos]
        return out, self.count, self.mean * self.count

    def stats(self) -> dict[str, float]:
        self.flush()
        if self.count == 0:
            return {"count": 0}
        pct = self.hist.get_percentile_to_value_dict([p for _, p in _PERCENTILES])
        out: dict[str, float] = {
            "count": self.count,
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0,
        }
        for name, p in _PERCENTILES:
            # hdrh reports the bucket's highest equivalent value; never beyond the true extremes.
            out[name] = min(max(pct[p] / 1e6, self.min), self.max)
        out["median"] = out["p50"]
        return out


class LatencyMonitor:
    """Thread-safe latency statistics over everything recorded, plus a window of recent values.

    ``window_size`` bounds ``recent()`` (and the memory the window holds); percentiles come from the
    histogram and cover every value since creation or :meth:`reset`. ``max_seconds`` is the largest
    value the histogram distinguishes (larger ones are clamped to it). ``max_pending`` bounds the
    table of ``start_request`` ids, so ids that never end (a client that vanished) cannot grow it
    without limit: the oldest pending id is dropped first.

    ``strict`` decides what :meth:`record` and :meth:`record_many` do with an invalid latency (not
    a finite, non-negative real number of seconds): raise ``TypeError``/``ValueError`` (default),
    or, with ``strict=False``, drop it and count it in :attr:`rejected`. A monitor fed by a worker
    from its own clock (the batcher's) wants the latter: a raise there would strand the batch's
    callers. ``record_stages``, ``time()`` and ``end_request`` always drop and count (see the module
    docstring).
    """

    def __init__(
        self,
        window_size: int = 1000,
        *,
        max_seconds: float = 3600.0,
        significant_figures: int = 3,
        timer: Callable[[], float] = time.perf_counter,
        max_pending: int = 100_000,
        strict: bool = True,
    ) -> None:
        if window_size < 1:
            raise ValueError("window_size must be >= 1")
        self.window_size = window_size
        self._timer = timer
        self._highest_us = max(2, int(max_seconds * 1e6))
        self._sig = significant_figures
        self._lock = threading.Lock()
        self._total = _Series(self._highest_us, self._sig)
        self._recent: deque[float] = deque(maxlen=window_size)
        self._pending: dict[Hashable, float] = {}
        self._max_pending = max_pending
        self._stages: dict[str, _Series] = {}
        self.strict = strict
        self._rejected = 0

    # -- recording -------------------------------------------------------------------------------

    @property
    def timer(self) -> Callable[[], float]:
        """The clock this monitor reads (seconds, monotonic): share it with a StageTimer."""
        return self._timer

    def start_request(self, request_id: Hashable) -> None:
        """Remember when ``request_id`` started; :meth:`end_request` records the elapsed time."""
        now = self._timer()
        with self._lock:
            if len(self._pending) >= self._max_pending and request_id not in self._pending:
                # dicts keep insertion order: the first key is the oldest pending request
                del self._pending[next(iter(self._pending))]
            self._pending[request_id] = now

    def end_request(self, request_id: Hashable) -> float | None:
        """Record and return the seconds since ``start_request(request_id)``; None if unknown."""
        now = self._timer()
        with self._lock:
            start = self._pending.pop(request_id, None)
            if start is None:
                return None
            latency = now - start
            self._add_measured(latency)
        return latency

    def record(self, seconds: float) -> None:
        """Record one latency measured elsewhere (seconds).

        Raises ``TypeError`` for a value that is not a real number and ``ValueError`` for NaN, an
        infinity or a negative value (with ``strict=False``: drops it and counts it in
        :attr:`rejected`); nothing is recorded then.
        """
        if type(seconds) is not float or not seconds >= 0.0 or seconds == _INF:
            # the slow path: an int or a numpy float is converted, anything else refused
            checked = _duration(seconds) if self.strict else _duration_or_none(seconds)
            if checked is None:
                with self._lock:
                    self._rejected += 1
                return
            seconds = checked
        with self._lock:
            total = self._total
            buf = total.buf  # _Series.add inlined: the call cost more than the check above
            buf.append(seconds)
            if len(buf) >= _FLUSH_EVERY:
                total.flush()
            self._recent.append(seconds)

    def record_many(self, values: list[float] | tuple[float, ...]) -> None:
        """Record several latencies under one lock acquisition (a batch's queue waits, say).

        Invalid values are treated as in :meth:`record`; when strict, one invalid value raises
        before any of ``values`` is recorded.
        """
        if type(values) is not list and type(values) is not tuple:
            values = list(values)  # an iterator: it is read twice, to check and to record
        rejected = 0
        for seconds in values:
            if type(seconds) is not float or not seconds >= 0.0 or seconds == _INF:
                if self.strict:
                    values = [_duration(v) for v in values]
                else:
                    checked = [_duration_or_none(v) for v in values]
                    values = [v for v in checked if v is not None]
                    rejected = len(checked) - len(values)
                break
        with self._lock:
            self._rejected += rejected
            total = self._total
            total.buf.extend(values)  # one flush for the lot, however many there are
            if len(total.buf) >= _FLUSH_EVERY:
                total.flush()
            self._recent.extend(values)

    def record_stages(self, timings: Mapping[str, float], total: float | None = None) -> None:
        """Record one request's per-stage durations (and, if given, its total) under one lock.

        An invalid duration (see :meth:`record`) is dropped and counted in :attr:`rejected`, never
        raised: the Predictor calls this after the request's answer is computed.
        """
        stages = self._stages
        with self._lock:
            for stage, seconds in timings.items():
                if type(seconds) is not float or not seconds >= 0.0 or seconds == _INF:
                    checked = _duration_or_none(seconds)
                    if checked is None:
                        self._rejected += 1
                        continue
                    seconds = checked
                series = stages.get(stage)
                if series is None:
                    series = stages[stage] = _Series(self._highest_us, self._sig)
                buf = series.buf  # _Series.add inlined: this runs for every stage of every request
                buf.append(seconds)
                if len(buf) >= _FLUSH_EVERY:
                    series.flush()
            if total is not None:
                if type(total) is not float or not total >= 0.0 or total == _INF:
                    checked = _duration_or_none(total)
                    if checked is None:
                        self._rejected += 1
                        return
                    total = checked
                self._total.add(total)
                self._recent.append(total)

    @contextmanager
    def time(self) -> Iterator[None]:
        """Time the ``with`` block and record it, even when the block raises.

        A duration the clock got wrong (it stepped back: an injected wall clock) is dropped and
        counted in :attr:`rejected`: raising here would replace the block's own exception.
        """
        start = self._timer()
        try:
            yield
        finally:
            elapsed = self._timer() - start
            with self._lock:
                self._add_measured(elapsed)

    def _add_measured(self, seconds: float) -> None:
        """Add a duration measured on this monitor's clock (the lock held): a bad one, from a
        clock that stepped back (an injected wall clock) or returned garbage, is counted."""
        checked = (
            seconds
            if type(seconds) is float and seconds >= 0.0 and seconds != _INF
            else _duration_or_none(seconds)
        )
        if checked is None:
            self._rejected += 1
            return
        self._total.add(checked)
        self._recent.append(checked)

    # -- reading ---------------------------------------------------------------------------------

    def get_stats(self) -> dict[str, float]:
        """count, min, max, mean, median, p50, p95, p99, p999, std (seconds); ``{"count": 0}``
        before anything was recorded."""
        with self._lock:
            return self._total.stats()

    def stage_stats(self) -> dict[str, dict[str, float]]:
        """The same statistics per hot-path stage (see :data:`STAGES`)."""
        with self._lock:
            return {name: s.stats() for name, s in self._stages.items()}

    def recent(self, n: int = 100) -> list[float]:
        """The last ``n`` latencies recorded, oldest first (at most ``window_size``)."""
        with self._lock:
            if n <= 0:
                return []
            items = list(self._recent)
        return items[-n:]

    def recent_percentile(self, percentile: float) -> float | None:
        """A percentile over the recent window only (what changed lately); None when empty."""
        with self._lock:
            items = sorted(self._recent)
        if not items:
            return None
        index = min(len(items) - 1, max(0, math.ceil(len(items) * percentile / 100.0) - 1))
        return items[index]

    @property
    def rejected(self) -> int:
        """Invalid latencies dropped (not a finite, non-negative number of seconds) since creation
        or :meth:`reset`; non-zero means a caller or a clock is broken."""
        return self._rejected

    def pending(self) -> int:
        """How many started requests have not ended."""
        with self._lock:
            return len(self._pending)

    def reset(self) -> None:
        """Forget every value (pending request starts are kept)."""
        with self._lock:
            self._total = _Series(self._highest_us, self._sig)
            self._recent.clear()
            self._stages.clear()
            self._rejected = 0

    def histogram(
        self, bounds: Sequence[float], stage: str | None = None
    ) -> tuple[list[int], int, float]:
        """Cumulative counts of recorded values <= each bound (seconds), their count and sum.

        This is what a Prometheus histogram exposes; computing it at scrape time from the
        HdrHistogram keeps the request path at one buffered append per value instead of a
        prometheus-client ``observe()`` (a lock and a bucket walk) per stage per request.
        ``stage=None`` reads the overall latency.
        """
        bounds_us = np.asarray([b * 1e6 for b in bounds], dtype=np.float64)
        with self._lock:
            series = self._total if stage is None else self._stages.get(stage)
            if series is None:
                return [0] * len(bounds), 0, 0.0
            return series.cumulative(bounds_us)

    def stages(self) -> list[str]:
        """The stages recorded so far."""
        with self._lock:
            return list(self._stages)

    def snapshot(self) -> dict[str, Any]:
        """Overall and per-stage statistics in one dict (for /metrics, dashboards, stats())."""
        return {
            "latency": self.get_stats(),
            "stages": self.stage_stats(),
            "rejected": self._rejected,
        }


class StageTimer:
    """Splits one request's wall time into named stages with one clock read per boundary.

    ``mark(stage)`` charges the time since the previous boundary to ``stage`` (adding up if a stage
    is visited twice); ``timings`` then holds each stage's seconds, which the Predictor returns in
    ``Prediction.timings`` (the server's Server-Timing header) and records into the monitor. It is
    deliberately tiny: it runs on every request.
    """

    __slots__ = ("_last", "_start", "_timer", "timings")

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self._timer = timer
        self._start = self._last = timer()
        self.timings: dict[str, float] = {}

    def mark(self, stage: str) -> float:
        """End ``stage`` now; return its duration."""
        now = self._timer()
        elapsed = now - self._last
        self._last = now
        self.timings[stage] = self.timings.get(stage, 0.0) + elapsed
        return elapsed

    def lap(self) -> float:
        """Move the boundary to now without charging any stage; return the seconds skipped
        (the caller splits them itself, e.g. from stage times measured in another task)."""
        now = self._timer()
        elapsed = now - self._last
        self._last = now
        return elapsed

    def add(self, stage: str, seconds: float) -> None:
        """Charge time measured elsewhere (in a worker thread, say) to ``stage``."""
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def total(self) -> float:
        """Seconds since the timer was created."""
        return self._timer() - self._start
