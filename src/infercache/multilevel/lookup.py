"""Reads below L1: ask each slower tier only for what the faster ones missed, promote the hits.

Hits are copied into every faster tier with their *remaining* TTL (capped by that tier's default
TTL, rounded down), so a promoted copy never outlives the original -- the user's tutorial gave
promoted copies a fresh full TTL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from infercache.multilevel.slots import Slot, log_tier_error, set_items
from infercache.tiers.base import MISSING

__all__ = ["Lookup", "promotion_ttl", "quantize_ttl"]

Found = dict[str, tuple[Any, float | None, int]]  # key -> (value, remaining TTL, slot index)


class Lookup:
    """Batched lookups through the slower tiers (one round trip per tier), with promotion."""

    def __init__(self, l1: Any | None, l1_slot: Slot | None, remote: Sequence[Slot]) -> None:
        self._l1 = l1
        self._l1_slot = l1_slot
        self._remote = remote

    async def __call__(self, keys: list[str]) -> Found:
        """Hits among ``keys`` with their remaining TTL and the index of the tier that had each."""
        found: Found = {}
        missing = keys
        for i, slot in enumerate(self._remote):
            if not missing:
                break
            start = time.perf_counter()
            try:
                res = await slot.tier.get_many_with_ttl(missing)
            except Exception as exc:
                slot.errors += 1
                log_tier_error(slot, "read", exc)
                continue
            slot.lat.record(time.perf_counter() - start)
            slot.hits += len(res)
            slot.misses += len(missing) - len(res)
            if res:
                for k, (v, rem) in res.items():
                    found[k] = (v, rem, i)
                missing = [k for k in missing if k not in res]
                await self.promote(res, i)
        return found

    async def promote(self, res: Mapping[str, tuple[Any, float | None]], upto: int) -> None:
        """Copy hits from tier ``upto`` into every faster tier with their remaining TTL."""
        l1 = self._l1
        if l1 is not None and self._l1_slot is not None:
            for k, (v, rem) in res.items():
                t = promotion_ttl(l1, rem)
                if t is MISSING:
                    continue
                l1.set(k, v, t)
                self._l1_slot.promotions += 1
        for slot in self._remote[:upto]:
            items: dict[str, tuple[Any, float | None]] = {}
            for k, (v, rem) in res.items():
                t = promotion_ttl(slot.tier, rem)
                if t is not MISSING:
                    items[k] = (v, t)
            if not items:
                continue
            try:
                await set_items(slot.tier, items)
                slot.promotions += len(items)
            except Exception as exc:
                slot.errors += 1
                log_tier_error(slot, "promote", exc)


def promotion_ttl(tier: Any, remaining: float | None) -> Any:
    """The TTL a promoted copy gets: the remaining TTL, capped by the tier's default TTL
    (an L1 may want shorter lives), quantized; MISSING when it is about to expire anyway."""
    cap = getattr(tier, "default_ttl", None)
    if remaining is None:
        return cap
    t = remaining if cap is None else min(remaining, cap)
    t = quantize_ttl(t)
    return t if t > 0.001 else MISSING


def quantize_ttl(ttl: float) -> float:
    """Round a remaining TTL down to two significant digits.

    Promoted entries carry their remaining TTL; rounding it keeps the number of distinct TTL
    values small (MemoryCache keeps one expiry queue per distinct TTL) while never letting the
    copy outlive the original.
    """
    if ttl <= 0:
        return 0.0
    exp = math.floor(math.log10(ttl)) - 1
    step = 10.0**exp
    return math.floor(ttl / step) * step
