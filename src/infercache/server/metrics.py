"""Prometheus metrics for the server (``GET /metrics``).

Each app owns its own :class:`~prometheus_client.CollectorRegistry`, so that several apps in one
process (tests, embedding) never share or collide on counters. Per-request metrics are updated on
the hot path through pre-bound label children (a dict lookup, not ``labels()`` every time). Gauges
that already live elsewhere -- batch-size histograms and queue depth in each DynamicBatcher, the L1
cache's counters -- are read at scrape time by a custom collector instead of being mirrored on every
request, which would double the bookkeeping for numbers nobody reads between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from infercache.monitor import LatencyMonitor

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# ``*_created`` timestamps double the exposition size and no dashboard uses them.
disable_created_metrics()

#: Sub-millisecond resolution: cached answers take tens of microseconds, computed ones milliseconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _buckets(counts: list[int], total: int) -> list[tuple[str, float]]:
    return [
        *((str(b), float(c)) for b, c in zip(LATENCY_BUCKETS, counts, strict=True)),
        ("+Inf", float(total)),
    ]


class _RuntimeCollector(Collector):
    """Reads batcher and L1 statistics when Prometheus scrapes."""

    def __init__(self, sources: Callable[[], Mapping[str, Any]]) -> None:
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        sources = self._sources()
        batchers: Mapping[str, Any] = sources.get("batchers", {})
        queue = GaugeMetricFamily(
            "infercache_queue_depth", "Items waiting in the model batcher", labels=["model"]
        )
        busy = GaugeMetricFamily(
            "infercache_batcher_busy_workers", "Batcher workers computing now", labels=["model"]
        )
        rejected = CounterMetricFamily(
            "infercache_batcher_rejected", "Items refused because the queue was full",
            labels=["model"],
        )  # fmt: skip
        sizes = HistogramMetricFamily(
            "infercache_batch_size", "Items per model batch", labels=["model"]
        )
        for model, batcher in batchers.items():
            if batcher is None:
                continue
            try:
                stats = batcher.stats()
            except Exception:  # a metrics scrape must never fail because of one source
                continue
            queue.add_metric([model], float(stats.get("queued", 0)))
            busy.add_metric([model], float(stats.get("busy_workers", 0)))
            rejected.add_metric([model], float(stats.get("rejected", 0)))
            hist: Mapping[int, int] = stats.get("batch_sizes", {})
            buckets: list[tuple[str, float]] = []
            total_sum = 0.0
            for bound in _BATCH_BUCKETS:
                buckets.append((str(bound), float(sum(n for s, n in hist.items() if s <= bound))))
            count = float(sum(hist.values()))
            buckets.append(("+Inf", count))
            total_sum = float(sum(s * n for s, n in hist.items()))
            sizes.add_metric([model], buckets, total_sum)
        yield queue
        yield busy
        yield rejected
        yield sizes

        stage_hist = HistogramMetricFamily(
            "infercache_stage_duration_seconds",
            "Hot-path stage durations (decode, key, cache, queue, compute, write)",
            labels=["stage"],
        )
        monitors = {id(m): m for m in sources.get("monitors", ()) if m is not None}
        merged: dict[str, tuple[list[int], int, float]] = {}
        for monitor in monitors.values():
            for stage in monitor.stages():
                counts, n, total = monitor.histogram(LATENCY_BUCKETS, stage)
                prev = merged.get(stage)
                if prev is not None:
                    counts = [a + b for a, b in zip(prev[0], counts, strict=True)]
                    n, total = n + prev[1], total + prev[2]
                merged[stage] = (counts, n, total)
        for stage, (counts, n, total) in merged.items():
            stage_hist.add_metric([stage], _buckets(counts, n), total)
        yield stage_hist

        requests = CounterMetricFamily(
            "infercache_http_requests", "HTTP requests by route and status",
            labels=["route", "status"],
        )  # fmt: skip
        for (route, status), n in list(sources.get("request_counts", {}).items()):
            requests.add_metric([route, str(status)], float(n))
        yield requests
        predictions = CounterMetricFamily(
            "infercache_predictions",
            "Predictions by model and serving tier (l1, redis, sqlite, ..., coalesced, computed)",
            labels=["model", "tier"],
        )
        for (model, tier), n in list(sources.get("prediction_counts", {}).items()):
            predictions.add_metric([model, tier], float(n))
        yield predictions

        request_hist = HistogramMetricFamily(
            "infercache_http_request_duration_seconds", "HTTP request latency by route",
            labels=["route"],
        )  # fmt: skip
        routes: Mapping[str, Any] = sources.get("routes", {})
        for route, monitor in list(routes.items()):
            counts, n, total = monitor.histogram(LATENCY_BUCKETS)
            request_hist.add_metric([route], _buckets(counts, n), total)
        yield request_hist

        l1 = sources.get("l1")
        if l1 is not None:
            try:
                stats = l1.stats()
            except Exception:
                stats = {}
            for key in ("hits", "misses", "evictions", "expirations"):
                if key in stats:
                    c = CounterMetricFamily(f"infercache_l1_{key}", f"L1 cache {key}")
                    c.add_metric([], float(stats[key]))
                    yield c
            for key in ("size", "bytes"):
                if key in stats and stats[key] is not None:
                    g = GaugeMetricFamily(f"infercache_l1_{key}", f"L1 cache {key}")
                    g.add_metric([], float(stats[key]))
                    yield g

        cache = sources.get("tiers")
        if cache is not None:
            yield from _tier_metrics(cache.health())


def _tier_metrics(health: Mapping[str, Any]) -> Iterator[Any]:
    """The tiers below L1 and the write-behind queue. A tier that fails every call is skipped
    and requests still succeed, so its errors and breaker state are what shows it."""
    tiers: Mapping[str, Mapping[str, Any]] = health.get("tiers", {})
    up = GaugeMetricFamily(
        "infercache_tier_up",
        "1 while a cache tier's circuit breaker is closed (the tier answers), 0 while it is open "
        "or half open (down, or one probe call testing whether it is back)",
        labels=["tier"],
    )
    for name, t in tiers.items():
        # half open is still down: it said 1 there, so an `== 0` alert flapped or never fired
        up.add_metric([name], 1.0 if t["state"] == "closed" else 0.0)
    yield up
    for key, text in (
        ("hits", "lookups found in the tier"),
        ("misses", "lookups not found in the tier"),
        ("errors", "failed calls to the tier (timeouts, refused connections, ...)"),
    ):
        c = CounterMetricFamily(f"infercache_tier_{key}", f"Cache tier {text}", labels=["tier"])
        for name, t in tiers.items():
            c.add_metric([name], float(t[key]))
        yield c
    wb = health.get("write_behind") or {}
    for key, text in (
        ("queue_depth", "writes queued for the tiers below L1"),
        ("retrying", "writes that failed and wait for a retry"),
    ):
        if key in wb:
            g = GaugeMetricFamily(f"infercache_write_behind_{key}", f"Write-behind {text}")
            g.add_metric([], float(wb[key]))
            yield g
    if "unencodable" in wb:
        c = CounterMetricFamily(
            "infercache_write_behind_unencodable",
            "Values the tiers below L1 could not store (their codec cannot encode the type)",
        )
        c.add_metric([], float(wb["unencodable"]))
        yield c


class _WorkerLabelled:
    """A registry's metrics with a ``worker`` label on every sample.

    With ``serve --workers N`` each worker process counts on its own and a scrape reaches one of
    them at random: unlabelled, a counter read 1024, 77, 77, 1024 on successive scrapes, which
    Prometheus takes for resets (``rate()`` and alerts wrong). With the label each worker is its
    own series, and ``sum by (...)`` over them gives the totals.
    """

    def __init__(self, registry: CollectorRegistry, worker: str) -> None:
        self._registry = registry
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [
                s._replace(labels={**s.labels, "worker": self._worker}) for s in metric.samples
            ]
            yield metric


class ServerMetrics:
    """The server's metrics, with cheap hot-path helpers.

    ``worker``: a label value for every sample, when several worker processes share the port.
    """

    def __init__(
        self, sources: Callable[[], Mapping[str, Any]] | None = None, *, worker: str | None = None
    ) -> None:
        self.worker = worker
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.errors = Counter("infercache_errors", "Error responses by code", ["code"], registry=r)
        self.ws_connections = Gauge(
            "infercache_ws_connections", "Open WebSocket connections", registry=r
        )
        self.ws_messages = Counter(
            "infercache_ws_messages", "WebSocket messages received by type", ["type"], registry=r
        )
        self.ws_dropped = Counter(
            "infercache_ws_dropped", "Broadcast messages dropped for slow subscribers", registry=r
        )
        self.ws_disconnected = Counter(
            "infercache_ws_slow_disconnects", "Subscribers disconnected for being slow", registry=r
        )
        #: Per-route request latencies, exported as histograms at scrape time (see
        #: LatencyMonitor.histogram): recording is a buffered append, not a locked bucket walk.
        self.route_latency: dict[str, LatencyMonitor] = {}
        self._sources = sources
        #: Requests by (route, status) and predictions by (model, tier): plain dict counters,
        #: exported as Prometheus counters at scrape time. A prometheus_client Counter.inc()
        #: takes a lock and cost ~2.5 µs per request here; a dict increment ~0.1 µs.
        self.request_counts: dict[tuple[str, int], int] = {}
        self.prediction_counts: dict[tuple[str, str], int] = {}
        r.register(_RuntimeCollector(self._all_sources))
        self.ws_open = 0

    def _all_sources(self) -> Mapping[str, Any]:
        sources = dict(self._sources()) if self._sources is not None else {}
        sources["routes"] = self.route_latency
        sources["request_counts"] = self.request_counts
        sources["prediction_counts"] = self.prediction_counts
        return sources

    @property
    def status_counts(self) -> dict[int, int]:
        """HTTP requests by status, all routes together (for the dashboard)."""
        out: dict[int, int] = {}
        for (_, status), n in self.request_counts.items():
            out[status] = out.get(status, 0) + n
        return out

    def ws_opened(self) -> None:
        self.ws_open += 1
        self.ws_connections.inc()

    def ws_closed(self) -> None:
        self.ws_open -= 1
        self.ws_connections.dec()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        counts = self.request_counts
        counts[key] = counts.get(key, 0) + 1
        lat = self.route_latency.get(route)
        if lat is None:
            lat = self.route_latency[route] = LatencyMonitor(window_size=1)
        lat.record(seconds)

    def observe_prediction(
        self, model: str, tier: str | None, timings: Mapping[str, float]
    ) -> None:
        key = (model, tier or "computed")
        self.prediction_counts[key] = self.prediction_counts.get(key, 0) + 1

    def render(self) -> bytes:
        if self.worker is None:
            return generate_latest(self.registry)
        return generate_latest(_WorkerLabelled(self.registry, self.worker))
