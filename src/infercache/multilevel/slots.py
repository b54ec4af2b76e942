"""The slower tiers as MultiLevelCache sees them, and the calls every policy makes on them.

A :class:`Slot` wraps one tier below L1 with the counters ``stats()`` reports and the tier's
write-behind :class:`~infercache.multilevel.retry.RetryBuffer`. :class:`SyncTierAdapter` lets a
synchronous cache sit below L1. :func:`each_remote` runs one call on several tiers at once and
turns a failing tier into a logged, counted ``None`` (degraded mode, never an exception).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from infercache.errors import TierError
from infercache.multilevel.retry import RetryBuffer
from infercache.tiers.base import LatencyWindow

__all__ = [
    "Slot",
    "SyncTierAdapter",
    "each_remote",
    "eff_ttl",
    "is_sync_tier",
    "log_tier_error",
    "set_items",
]

log = logging.getLogger("infercache.multilevel")


class SyncTierAdapter:
    """Lets a synchronous cache (a second MemoryCache, say) sit below L1 as an async tier."""

    def __init__(self, tier: Any) -> None:
        self.tier = tier
        self.name = getattr(tier, "name", type(tier).__name__.lower())
        self.default_ttl = getattr(tier, "default_ttl", None)

    async def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        out: dict[str, tuple[Any, float | None]] = {}
        for k in keys:
            hit = self.tier.get_with_ttl(k)
            if hit is not None and hit[0] is not None:
                out[k] = hit
        return out

    async def set_many_with_ttl(self, items: Mapping[str, tuple[Any, float | None]]) -> None:
        for k, (v, t) in items.items():
            self.tier.set(k, v, t)

    async def set_many(self, mapping: Mapping[str, Any], ttl: float | None = None) -> None:
        self.tier.set_many(mapping, ttl)

    async def delete(self, key: str) -> bool:
        return bool(self.tier.delete(key))

    async def delete_many(self, keys: Sequence[str]) -> int:
        return sum(bool(self.tier.delete(k)) for k in keys)

    async def clear(self) -> int:
        n = len(self.tier)
        self.tier.clear()
        return n

    async def stats(self) -> dict[str, Any]:
        return dict(self.tier.stats())

    async def close(self) -> None:
        return None


class Slot:
    """One tier below L1 plus the counters MultiLevelCache keeps about it."""

    __slots__ = ("errors", "hits", "lat", "misses", "name", "promotions", "retry", "tier")

    def __init__(self, tier: Any, name: str, retry: RetryBuffer | None = None) -> None:
        self.tier = tier
        self.name = name
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.promotions = 0
        self.retry = retry if retry is not None else RetryBuffer(0, 0, 0.0, 0.0)
        self.lat = LatencyWindow()


def is_sync_tier(tier: Any) -> bool:
    return not inspect.iscoroutinefunction(getattr(tier, "get", None))


def eff_ttl(tier: Any, ttl: float | None) -> float | None:
    """A write's TTL for one tier: the given one, else the tier's default (None: no expiry)."""
    return ttl if ttl is not None else getattr(tier, "default_ttl", None)


async def set_items(tier: Any, items: Mapping[str, tuple[Any, float | None]]) -> None:
    """Write pairs with per-key TTLs in one call when the tier can, else one set_many per TTL."""
    fn = getattr(tier, "set_many_with_ttl", None)
    if fn is not None:
        await fn(items)
        return
    groups: dict[float | None, dict[str, Any]] = {}
    for k, (v, t) in items.items():
        groups.setdefault(t, {})[k] = v
    for t, mapping in groups.items():
        await tier.set_many(mapping, t)


async def each_remote(
    slots: Sequence[Slot], what: str, fn: Callable[[Slot], Awaitable[Any]]
) -> list[Any]:
    """Run ``fn(slot)`` on every given tier at once; failures are logged, counted, None."""

    async def guarded(slot: Slot) -> Any:
        start = time.perf_counter()
        try:
            res = await fn(slot)
        except Exception as exc:
            slot.errors += 1
            log_tier_error(slot, what, exc)
            return None
        slot.lat.record(time.perf_counter() - start)
        return res

    if len(slots) == 1:
        return [await guarded(slots[0])]
    return list(await asyncio.gather(*(guarded(s) for s in slots)))


_last_logged: dict[str, float] = {}


def log_tier_error(slot: Slot, what: str, exc: BaseException) -> None:
    """Log a tier failure at most once a second per tier: an outage must not flood the log."""
    now = time.monotonic()
    if now - _last_logged.get(slot.name, 0.0) >= 1.0:
        _last_logged[slot.name] = now
        level = logging.INFO if isinstance(exc, TierError) else logging.WARNING
        log.log(level, "tier %s %s failed (skipped): %s", slot.name, what, exc)
