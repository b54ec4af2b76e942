"""The live dashboard: one static HTML page (``static/dashboard.html``) polling a JSON summary.

No build step and no JavaScript dependencies: the page is a few hundred lines of plain HTML, CSS
and JS that fetch ``/dashboard/data`` every second and compute rates from successive counters.
The summary holds aggregates only (counts, ratios, percentiles), never keys, inputs or settings.
"""

from __future__ import annotations

import time
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infercache.server.service import Service


@lru_cache(maxsize=1)
def page() -> str:
    """The dashboard HTML (read once from the package)."""
    return (
        resources.files("infercache.server")
        .joinpath("static/dashboard.html")
        .read_text(encoding="utf-8")
    )


def _ms(stats: dict[str, Any] | None, key: str) -> float | None:
    if not stats or not stats.get("count"):
        return None
    value = stats.get(key)
    return None if value is None else float(value) * 1000.0


async def summary(service: Service) -> dict[str, Any]:
    """Aggregate numbers for the page."""
    m = service.metrics
    by_tier: dict[str, int] = {}
    by_model: dict[str, int] = {}
    for (model, tier), n in m.prediction_counts.items():
        by_tier[tier] = by_tier.get(tier, 0) + n
        by_model[model] = by_model.get(model, 0) + n
    total = sum(by_tier.values())
    hits = total - by_tier.get("computed", 0)
    models: dict[str, Any] = {}
    for name, entry in service.models.items():
        b = entry.batcher
        st: dict[str, Any] = b.stats() if b is not None and hasattr(b, "stats") else {}
        models[name] = {
            "version": entry.version,
            "predictions": by_model.get(name, 0),
            "queued": st.get("queued", 0),
            "batches": st.get("batches", 0),
            "mean_batch_size": st.get("mean_batch_size", 0.0),
            "rejected": st.get("rejected", 0),
            "compute_p50_ms": _ms(st.get("compute"), "p50"),
            "compute_p99_ms": _ms(st.get("compute"), "p99"),
        }
    latency = service.monitor.get_stats() if service.monitor is not None else None
    l1 = getattr(service.cache, "l1", None)
    l1_stats = l1.stats() if l1 is not None else None
    health = getattr(service.cache, "health", None)
    tiers = health() if callable(health) else {"tiers": {}, "write_behind": {}}
    return {
        "time": time.time(),
        "uptime_s": time.time() - service.started_at,
        "ready": service.ready,
        "predictions": total,
        "by_tier": by_tier,
        "hit_ratio": (hits / total) if total else None,
        "requests_by_status": {str(k): v for k, v in sorted(m.status_counts.items())},
        "latency_ms": {
            "p50": _ms(latency, "p50"),
            "p99": _ms(latency, "p99"),
            "p999": _ms(latency, "p999"),
        },
        "models": models,
        "l1": None
        if l1_stats is None
        else {k: l1_stats.get(k) for k in ("size", "max_size", "hit_ratio", "evictions")},
        "tiers": tiers["tiers"],
        "write_behind_queue": tiers["write_behind"].get("queue_depth"),
        # counts only: topic names can carry user or session ids, and this page has no auth
        "websocket": {"connections": m.ws_open, **service.hub.counts()},
    }
