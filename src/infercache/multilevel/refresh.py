"""Refresh-ahead: an entry read in the last part of its TTL is recomputed in the background.

Callers keep getting the current value meanwhile; a failed refresh leaves it in place. The
background tasks are owned by :class:`Background`, which MultiLevelCache cancels on close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from infercache.aio import stop_task
from infercache.multilevel.singleflight import Loader, call_loader
from infercache.tiers.base import validate_ttl

__all__ = ["Background", "RefreshAhead"]

log = logging.getLogger("infercache.multilevel")


class Background:
    """Fire-and-forget tasks that are still cancelled and awaited on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            await stop_task(task)


class RefreshAhead:
    """Decides when a hit is due for a background reload, and runs it.

    ``fraction``: reload when less than this fraction of the entry's TTL is left (the TTL being
    the write's, else the cache's default, capped by the serving tier's default). ``store``
    writes a reloaded value (MultiLevelCache.set, so the write policy applies).
    """

    def __init__(
        self,
        fraction: float,
        *,
        default_ttl: float | None,
        store: Callable[[str, Any, float | None], Awaitable[None]],
        spawn: Callable[[Awaitable[Any]], Any],
        counters: dict[str, int],
    ) -> None:
        self.fraction = fraction
        self.default_ttl = default_ttl
        self._store = store
        self._spawn = spawn
        self._counters = counters
        self.refreshing: set[str] = set()

    def maybe(
        self,
        key: str,
        loader: Loader,
        ttl: float | None,
        remaining: float | None,
        tier: Any,
        *,
        busy: bool,
    ) -> None:
        """Start a reload of ``key`` if it is near its expiry (``busy``: it is being computed
        already, or the cache is closing)."""
        if remaining is None:
            return
        total = validate_ttl(ttl) if ttl is not None else self.default_ttl
        cap = getattr(tier, "default_ttl", None)
        if total is None:
            total = cap
        elif cap is not None:
            total = min(total, cap)
        if total is None or remaining > total * self.fraction:
            return
        if key in self.refreshing or busy:
            return
        self.refreshing.add(key)
        self._spawn(self._refresh(key, loader, ttl))

    async def _refresh(self, key: str, loader: Loader, ttl: float | None) -> None:
        try:
            value = await call_loader(loader)
            if value is not None:
                await self._store(key, value, ttl)
            self._counters["refreshes"] += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            self._counters["refresh_errors"] += 1
            log.exception("refresh-ahead of %r failed; the current value stays", key)
        finally:
            self.refreshing.discard(key)
