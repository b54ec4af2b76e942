"""MultiLevelCache: tiers fastest first, a write policy, read-through, refresh-ahead, invalidation.

The user's tutorial chained an in-memory cache, Redis and a dict "database", one GET per key, and
promoted hits with a fresh full TTL (so a promoted copy could outlive the original). This module
keeps its shape -- look in the fastest tier first, promote what slower tiers find -- and adds what
a serving team needs:

- **Promotion with the remaining TTL**: a copy never outlives the original.
- **Batched lookups**: ``get_many`` asks each tier only for what the faster tiers missed, in one
  round trip per tier.
- **Write policies**: ``"through"`` (every tier before returning), ``"behind"`` (L1 now, slower
  tiers from a bounded queue flushed in batches: one pipeline / one transaction per tier per
  flush; ``close()`` -- and SIGTERM with :meth:`install_signal_handlers` -- flushes it), and
  ``"around"`` (slowest tier only; faster copies invalidated).
- **Read-through with single-flight**: :meth:`get_or_compute` runs one loader per key in this
  process and, when a Redis tier is present, one across processes (a short ``SET NX PX`` lock;
  if its holder dies the lock expires and a waiter takes over).
- **Refresh-ahead**: an entry read in the last ``refresh_ahead`` fraction of its TTL is recomputed
  in the background; callers keep getting the current value meanwhile.
- **Invalidation**: by key on every tier, by namespace generation (bumping it makes every old key
  unreachable without a scan; generations are kept in Redis *and* in the durable SQL tier, so a
  Redis restarted empty cannot send them backwards), by hand (``clear``), and by events: each
  delete/invalidate is published on Redis pub/sub and other processes drop the key from their L1.
- **Degraded mode**: a failing slower tier (Redis or PostgreSQL down) is skipped with no exception
  to the caller; its circuit breaker lets it back in once the server returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import secrets
import signal
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

from infercache.errors import ConfigError, Overloaded, TierError
from infercache.tiers.base import (
    MISSING,
    Coordinator,
    GenerationStore,
    LatencyWindow,
    validate_ttl,
)

__all__ = ["MultiLevelCache"]

log = logging.getLogger(__name__)

WritePolicy = Literal["through", "behind", "around"]
QueueFull = Literal["block", "error", "through"]
Loader = Callable[[], Any]


class _SyncTierAdapter:
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


class _Retry(NamedTuple):
    value: Any
    ttl: float | None  # the tier's effective TTL when written (None: no expiry)
    since: float  # monotonic time the TTL started running
    attempts: int  # failed attempts so far


class _RetryBuffer:
    """Write-behind entries one tier missed (it was down), kept for later attempts.

    Bounded: beyond ``capacity`` entries the oldest are dropped (counted in ``dropped``). An
    entry is tried at most ``retries`` more times after its first failure, with exponential
    backoff (per tier) between attempts; then it is given up (counted in ``failed``). A newer
    write or a delete of a key makes its entry obsolete (:meth:`discard`, :meth:`replace`).
    An entry keeps the rest of its TTL, never a fresh one, and is skipped once it expired.
    """

    __slots__ = (
        "_entries",
        "_flying",
        "capacity",
        "delay",
        "dropped",
        "failed",
        "failures",
        "max_delay",
        "next_at",
        "retried",
        "retries",
    )

    def __init__(self, capacity: int, retries: int, delay: float, max_delay: float) -> None:
        self._entries: OrderedDict[str, _Retry] = OrderedDict()
        self._flying: dict[str, _Retry] = {}  # taken for the attempt in progress
        self.capacity = capacity
        self.retries = retries
        self.delay = delay
        self.max_delay = max_delay
        self.failures = 0  # consecutive failed attempts: the backoff exponent
        self.next_at = 0.0
        self.dropped = 0
        self.failed = 0
        self.retried = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._flying)

    def due(self, now: float) -> bool:
        return bool(self._entries) and now >= self.next_at

    def wait_time(self, now: float) -> float | None:
        """Seconds until the next attempt is due (None: nothing waits)."""
        return max(0.0, self.next_at - now) if self._entries else None

    def holds(self, keys: Iterable[str] | None) -> bool:
        """Whether an attempt in progress carries one of ``keys`` (None: any)."""
        if not self._flying:
            return False
        return keys is None or any(k in self._flying for k in keys)

    def add(
        self, items: Mapping[str, tuple[Any, float | None]], now: float, *, attempts: int = 0
    ) -> None:
        """Queue writes for this tier behind those already waiting (the newest value wins)."""
        for k, (v, t) in items.items():
            self._entries.pop(k, None)
            self._flying.pop(k, None)
            if attempts > self.retries:
                self.failed += 1
                continue
            self._entries[k] = _Retry(v, t, now, attempts)
        self._trim()

    def failed_write(self, items: Mapping[str, tuple[Any, float | None]], now: float) -> None:
        """A first write of ``items`` failed: keep them for retries and back off."""
        self.add(items, now, attempts=1)
        self._back_off(now)

    def replace(self, items: Mapping[str, tuple[Any, float | None]], now: float) -> None:
        """Newer values for keys that already wait here (a write that did not reach the tier)."""
        waiting = {k: e for k, e in items.items() if k in self._entries or k in self._flying}
        if waiting:
            self.add(waiting, now)

    def discard(self, keys: Iterable[str]) -> None:
        """Forget keys (deleted, or written to the tier by a newer write)."""
        for k in keys:
            self._entries.pop(k, None)
            self._flying.pop(k, None)

    def clear(self) -> int:
        n = len(self)
        self._entries.clear()
        self._flying.clear()
        return n

    def get(self, key: str, now: float) -> Any:
        """The value waiting for ``key`` (MISSING if none, or if it expired)."""
        e = self._entries.get(key) or self._flying.get(key)
        if e is None or _remaining(e, now) is MISSING:
            return MISSING
        return e.value

    def take(self, n: int, now: float) -> dict[str, tuple[Any, float | None]]:
        """Up to ``n`` oldest entries for an attempt, with what is left of their TTL."""
        out: dict[str, tuple[Any, float | None]] = {}
        while self._entries and len(out) < n:
            k, e = self._entries.popitem(last=False)
            rem = _remaining(e, now)
            if rem is MISSING:  # expired while waiting: nothing left to write
                continue
            self._flying[k] = e
            out[k] = (e.value, rem)
        return out

    def succeeded(self) -> None:
        self.retried += len(self._flying)
        self._flying.clear()
        self.failures = 0
        self.next_at = 0.0

    def attempt_failed(self, now: float) -> None:
        """Requeue the attempt's entries ahead of newer ones (if attempts remain); back off."""
        requeue = [(k, e._replace(attempts=e.attempts + 1)) for k, e in self._flying.items()]
        self._flying.clear()
        for k, e in reversed(requeue):
            if k in self._entries:  # a newer value arrived meanwhile
                continue
            if e.attempts > self.retries:
                self.failed += 1
                continue
            self._entries[k] = e
            self._entries.move_to_end(k, last=False)
        self._back_off(now)
        self._trim()

    def give_up(self) -> int:
        """Drop everything (on close, when the tier is still down); returns how many."""
        n = self.clear()
        self.failed += n
        return n

    def _back_off(self, now: float) -> None:
        self.failures += 1
        step = self.delay * 2 ** min(self.failures - 1, 30)
        self.next_at = now + min(step, self.max_delay)

    def _trim(self) -> None:
        while self._entries and len(self) > self.capacity:
            self._entries.popitem(last=False)
            self.dropped += 1


def _remaining(e: _Retry, now: float) -> Any:
    """What is left of an entry's TTL (None: no expiry; MISSING: expired)."""
    if e.ttl is None:
        return None
    rem = e.ttl - (now - e.since)
    return rem if rem > 0.001 else MISSING


class _Slot:
    """One tier plus the counters MultiLevelCache keeps about it."""

    __slots__ = ("errors", "hits", "lat", "misses", "name", "promotions", "retry", "tier")

    def __init__(self, tier: Any, name: str, retry: _RetryBuffer) -> None:
        self.tier = tier
        self.name = name
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.promotions = 0
        self.retry = retry
        self.lat = LatencyWindow()


def _is_sync_tier(tier: Any) -> bool:
    return not inspect.iscoroutinefunction(getattr(tier, "get", None))


def _quantize_ttl(ttl: float) -> float:
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


async def _call_loader(loader: Loader) -> Any:
    result = loader()
    if inspect.isawaitable(result):
        result = await result
    return result


class MultiLevelCache:
    """Tiers fastest first (normally ``[MemoryCache, RedisCache, SQLCache]``); see module doc.

    Args:
        tiers: fastest first. A synchronous first tier (a MemoryCache) is the L1, read without
            an await on the hot path (``.l1``).
        write: ``"through"``, ``"behind"`` or ``"around"``.
        ttl: TTL for writes that give none; None leaves each tier's own default in force.
        refresh_ahead: fraction in (0, 1): an entry read through :meth:`get_or_compute` with less
            than this fraction of its TTL left is recomputed in the background. None: off.
        write_behind_max_queue: most writes waiting for the slower tiers (write="behind").
        write_behind_batch: most writes per flush (one set_many per tier per flush).
        write_behind_interval: seconds a flush waits to gather a batch before writing.
        write_behind_when_full: when the queue is full, ``"block"`` waits for the flusher to make
            room (backpressure; nothing dropped), ``"error"`` raises Overloaded, ``"through"``
            writes that entry synchronously instead.
        write_behind_retries: how many more times a flush that a tier missed (it was down) is
            tried on that tier, with exponential backoff from ``write_behind_retry_delay`` up to
            ``write_behind_retry_max_delay`` seconds; so a brief outage loses nothing. Each tier
            keeps at most ``write_behind_max_queue`` such entries and drops the oldest beyond
            that (counted in ``stats()``); 0 gives up at the first failure.
        coordinator: the tier used for locks and pub/sub; by default the first tier that
            implements :class:`~infercache.tiers.base.Coordinator` (a RedisCache). Namespace
            generations are kept by it and by every tier that implements
            :class:`~infercache.tiers.base.GenerationStore` (RedisCache and SQLCache): loading
            takes the maximum, bumps go to all of them.
        broadcast: publish deletes/invalidations so other processes drop their L1 copies.
        invalidation_channel: the pub/sub channel for those events; by default one derived from
            the coordinator's namespace, so caches sharing a namespace share events.
        broadcast_sets: also publish each write, so other processes drop stale L1 copies of
            keys whose value changed (off by default: prediction values of one key never change).
        distributed_lock: cross-process single-flight in get_or_compute (needs a coordinator).
        lock_ttl: seconds the cross-process lock lives; a dead holder's lock expires after it.
        lock_wait: most seconds a waiter polls for another process's result before computing
            itself (default: lock_ttl + 1).
        close_tiers: close the tiers in :meth:`close`.
    """

    def __init__(
        self,
        tiers: Sequence[Any],
        *,
        write: WritePolicy = "through",
        ttl: float | None = None,
        refresh_ahead: float | None = None,
        write_behind_max_queue: int = 10_000,
        write_behind_batch: int = 256,
        write_behind_interval: float = 0.05,
        write_behind_when_full: QueueFull = "block",
        write_behind_retries: int = 10,
        write_behind_retry_delay: float = 0.1,
        write_behind_retry_max_delay: float = 5.0,
        coordinator: Coordinator | None = None,
        broadcast: bool = True,
        invalidation_channel: str | None = None,
        broadcast_sets: bool = False,
        distributed_lock: bool = True,
        lock_ttl: float = 10.0,
        lock_wait: float | None = None,
        lock_poll: float = 0.005,
        close_tiers: bool = True,
    ) -> None:
        if not tiers:
            raise ConfigError("tiers must hold at least one cache")
        if write not in ("through", "behind", "around"):
            raise ConfigError(f"write must be 'through', 'behind' or 'around', got {write!r}")
        if refresh_ahead is not None and not 0.0 < refresh_ahead < 1.0:
            raise ConfigError(f"refresh_ahead must be a fraction in (0, 1), got {refresh_ahead!r}")
        if write_behind_max_queue < 1 or write_behind_batch < 1:
            raise ConfigError("write_behind_max_queue and write_behind_batch must be >= 1")
        if write_behind_when_full not in ("block", "error", "through"):
            raise ConfigError(
                "write_behind_when_full must be 'block', 'error' or 'through', "
                f"got {write_behind_when_full!r}"
            )
        self.write = write
        self.default_ttl = validate_ttl(ttl)
        self.refresh_ahead = refresh_ahead
        self.write_behind_max_queue = write_behind_max_queue
        self.write_behind_batch = write_behind_batch
        self.write_behind_interval = write_behind_interval
        self.write_behind_when_full = write_behind_when_full
        if write_behind_retries < 0 or write_behind_retry_delay < 0:
            raise ConfigError("write_behind_retries and write_behind_retry_delay must be >= 0")
        self.write_behind_retries = write_behind_retries
        self.write_behind_retry_delay = write_behind_retry_delay
        self.write_behind_retry_max_delay = max(
            write_behind_retry_max_delay, write_behind_retry_delay
        )
        self.broadcast = broadcast
        self.invalidation_channel = invalidation_channel
        self.broadcast_sets = broadcast_sets
        self.distributed_lock = distributed_lock
        self.lock_ttl = validate_ttl(lock_ttl, what="lock_ttl") or 10.0
        self.lock_wait = lock_wait if lock_wait is not None else self.lock_ttl + 1.0
        self.lock_poll = lock_poll
        self.close_tiers = close_tiers

        self._tiers = list(tiers)
        first = self._tiers[0]
        self._l1: Any | None = first if _is_sync_tier(first) else None
        self._l1_slot = _Slot(first, "l1", self._retry_buffer()) if self._l1 is not None else None
        names: set[str] = {"l1"} if self._l1 is not None else set()
        self._remote: list[_Slot] = []
        for tier in self._tiers[1:] if self._l1 is not None else self._tiers:
            t = _SyncTierAdapter(tier) if _is_sync_tier(tier) else tier
            name = str(getattr(t, "name", type(t).__name__.lower()))
            if name in names:
                name = f"{name}{len(self._remote) + 1}"
            names.add(name)
            self._remote.append(_Slot(t, name, self._retry_buffer()))
        if coordinator is None:
            for slot in self._remote:
                if isinstance(slot.tier, Coordinator):
                    coordinator = slot.tier
                    break
        self._coord: Coordinator | None = coordinator
        # Where namespace generations live: the coordinator (Redis, shared and fast) first, then
        # every durable tier (SQL), so a Redis restart cannot send generations backwards.
        self._gen_stores: list[GenerationStore] = []
        for candidate in [coordinator, *(slot.tier for slot in self._remote)]:
            if isinstance(candidate, GenerationStore) and not any(
                candidate is s for s in self._gen_stores
            ):
                self._gen_stores.append(candidate)

        self._origin = secrets.token_hex(8)
        self._generations: dict[str, int] = {}
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._stop_subscriber: Callable[[], Awaitable[None]] | None = None
        self._closed = False

        # single-flight and refresh-ahead
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

        # write-behind
        self._pending: OrderedDict[str, tuple[Any, float | None]] = OrderedDict()
        self._flushing: dict[str, tuple[Any, float | None]] = {}
        self._wake: asyncio.Event | None = None
        self._batch_ready: asyncio.Event | None = None
        self._space: asyncio.Condition | None = None
        self._drain_lock: asyncio.Lock | None = None
        self._flush_idle: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None

        self._counters: dict[str, int] = dict.fromkeys(
            (
                "loads",
                "coalesced",
                "lock_acquired",
                "lock_waited",
                "lock_fallbacks",
                "refreshes",
                "refresh_errors",
                "wb_enqueued",
                "wb_flushed",
                "wb_batches",
                "wb_full_waits",
                "wb_full_errors",
                "wb_full_through",
                "events_sent",
                "events_received",
                "event_errors",
                "resyncs",
            ),
            0,
        )

    def _retry_buffer(self) -> _RetryBuffer:
        return _RetryBuffer(
            self.write_behind_max_queue,
            self.write_behind_retries,
            self.write_behind_retry_delay,
            self.write_behind_retry_max_delay,
        )

    # ================================================================= public properties

    @property
    def tiers(self) -> list[Any]:
        """The tiers as given, fastest first."""
        return list(self._tiers)

    @property
    def l1(self) -> Any | None:
        """The first tier when it is a synchronous in-process cache (a MemoryCache), else None."""
        return self._l1

    def generation(self, namespace: str) -> int:
        """The namespace's current generation (local and synchronous, for key building)."""
        return self._generations.get(namespace, 0)

    # ================================================================= lifecycle

    async def start(self) -> None:
        """Subscribe to invalidation events and load namespace generations (idempotent).

        Every async method calls it lazily; call it yourself before relying on
        :meth:`generation` in a fresh process, or on events reaching this process.
        """
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            self._started = True
            await self._load_generations()
            coord = self._coord
            if coord is not None and self.broadcast:
                try:
                    self._stop_subscriber = await coord.subscribe(
                        self._channel(), self._on_event, self._on_resubscribe
                    )
                except Exception as exc:  # a coordinator that cannot subscribe: no events
                    log.warning("invalidation subscriber not started: %s", exc)

    async def close(self) -> None:
        """Flush write-behind, stop background work, close the tiers. Idempotent.

        Await it on shutdown: writes acknowledged under write="behind" reach the slower tiers
        here (or call :meth:`install_signal_handlers` so SIGTERM does it).
        """
        if self._closed:
            return
        await self.flush()
        self._closed = True
        for slot in self._remote:
            if slot.retry:
                lost = slot.retry.give_up()
                log.warning(
                    "tier %s still down at close: %d write-behind entries lost", slot.name, lost
                )
        if self._flusher is not None:
            # Wake it to see _closed and return, and cancel it too. Either alone can be lost:
            # Python 3.11's wait_for swallows a cancellation that races with its inner wait.
            if self._wake is not None:
                self._wake.set()
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
            self._flusher = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._stop_subscriber is not None:
            with contextlib.suppress(Exception):
                await self._stop_subscriber()
            self._stop_subscriber = None
        if self.close_tiers:
            for slot in self._remote:
                with contextlib.suppress(Exception):
                    await slot.tier.close()

    async def __aenter__(self) -> MultiLevelCache:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def install_signal_handlers(
        self, signals: Iterable[int] = (signal.SIGTERM,), *, reraise: bool = True
    ) -> None:
        """On these signals, flush and close the cache, then (``reraise``) die of the signal.

        Call from inside the running event loop. Servers with their own shutdown hook (uvicorn's
        lifespan) should rather ``await cache.close()`` there.
        """
        loop = asyncio.get_running_loop()

        async def shutdown(sig: int) -> None:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
            try:
                await self.close()
            finally:
                if reraise:
                    signal.signal(sig, signal.SIG_DFL)
                    os.kill(os.getpid(), sig)

        def handler(sig: int) -> None:
            self._spawn(shutdown(sig))

        for sig in signals:
            loop.add_signal_handler(sig, handler, sig)

    # ================================================================= reads

    async def get(self, key: str, default: Any = None) -> Any:
        """The value from the fastest tier that has it (promoting it), else ``default``."""
        l1 = self._l1
        if l1 is not None:
            value = l1.get(key, MISSING)
            if value is not MISSING:
                return value
        if not self._started:
            await self.start()
        pending = self._pending_value(key)
        if pending is not MISSING:
            return pending
        found = await self._lookup_remote([key])
        hit = found.get(key)
        return default if hit is None else hit[0]

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Hits among ``keys``; each tier is asked only for what the faster tiers missed."""
        return {k: v for k, (v, _) in (await self.get_many_with_tier(keys)).items()}

    async def get_many_with_tier(self, keys: Iterable[str]) -> dict[str, tuple[Any, str]]:
        """Hits among ``keys`` with the name of the tier that served each (``"l1"`` for L1)."""
        uniq = list(dict.fromkeys(keys))
        out: dict[str, tuple[Any, str]] = {}
        l1 = self._l1
        if l1 is not None and uniq:
            for k, v in l1.get_many(uniq).items():
                out[k] = (v, "l1")
            missing = [k for k in uniq if k not in out]
        else:
            missing = uniq
        if not missing:
            return out
        if not self._started:
            await self.start()
        if self._pending or self._flushing or self._retrying():
            for k in missing:
                v = self._pending_value(k)
                if v is not MISSING:
                    out[k] = (v, "l1")
            missing = [k for k in missing if k not in out]
        found = await self._lookup_remote(missing)
        for k, (v, _, i) in found.items():
            out[k] = (v, self._remote[i].name)
        return out

    async def get_or_compute(self, key: str, loader: Loader, ttl: float | None = None) -> Any:
        """Read-through: the cached value, or ``loader()``'s (sync or async), stored per policy.

        Concurrent callers of one missing key share one loader call (and, with a Redis tier,
        callers in other processes wait for this one's result). A None result is returned but
        not stored. With ``refresh_ahead``, a hit near the end of its TTL triggers a background
        reload while this call returns the current value.
        """
        l1 = self._l1
        if l1 is not None:
            if self.refresh_ahead is None:
                value = l1.get(key, MISSING)
                if value is not MISSING:
                    return value
            else:
                hit = l1.get_with_ttl(key)
                if hit is not None and hit[0] is not None:
                    self._maybe_refresh(key, loader, ttl, hit[1], l1)
                    return hit[0]
        if not self._started:
            await self.start()
        pending = self._pending_value(key)
        if pending is not MISSING:
            return pending
        fut = self._inflight.get(key)
        if fut is not None:
            self._counters["coalesced"] += 1
            return await asyncio.shield(fut)
        found = await self._lookup_remote([key])
        if key in found:
            value, remaining, i = found[key]
            self._maybe_refresh(key, loader, ttl, remaining, self._remote[i].tier)
            return value
        fut = self._inflight.get(key)  # another caller may have started while we looked
        if fut is not None:
            self._counters["coalesced"] += 1
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume_exception)
        self._inflight[key] = fut
        try:
            value = await self._compute(key, loader, ttl)
        except BaseException as exc:
            if not fut.done():
                if isinstance(exc, asyncio.CancelledError):
                    fut.cancel()
                else:
                    fut.set_exception(exc)
            raise
        else:
            if not fut.done():
                fut.set_result(value)
            return value
        finally:
            if self._inflight.get(key) is fut:
                del self._inflight[key]

    # ================================================================= writes

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` per the write policy (None is never stored: it means miss)."""
        await self.set_many({key: value}, ttl)

    async def set_many(self, mapping: Mapping[str, Any], ttl: float | None = None) -> None:
        """Store every pair per the write policy; one round trip per slower tier."""
        t = validate_ttl(ttl) if ttl is not None else self.default_ttl
        items = {k: v for k, v in mapping.items() if v is not None}
        if not items:
            return
        if not self._started:
            await self.start()
        if self.write == "around":
            await self._write_around(items, t)
        elif self.write == "behind":
            if self._l1 is not None:
                self._l1_set_many(items, t)
            await self._enqueue(items, t)
        else:
            if self._l1 is not None:
                self._l1_set_many(items, t)
            await self._write_remote({k: (v, t) for k, v in items.items()})
        if self.broadcast_sets:
            await self._publish({"t": "del", "k": list(items)})

    async def delete(self, key: str) -> bool:
        """Delete ``key`` from every tier and tell other processes to drop it from their L1."""
        return await self.delete_many([key]) > 0

    async def delete_many(self, keys: Iterable[str]) -> int:
        """Delete keys everywhere (broadcast); returns how many keys some tier held."""
        uniq = list(dict.fromkeys(keys))
        if not uniq:
            return 0
        if not self._started:
            await self.start()
        found = 0
        if self._l1 is not None:
            found = sum(bool(self._l1.delete(k)) for k in uniq)
        for k in uniq:
            if self._pending.pop(k, None) is not None:
                found += 1
        await self._wait_flushing(uniq)
        for slot in self._remote:
            slot.retry.discard(uniq)
        counts = await self._each_remote("delete", lambda s: s.tier.delete_many(uniq))
        found = max([found, *(int(c) for c in counts if c is not None)])
        await self._publish({"t": "del", "k": uniq})
        return found

    async def invalidate(
        self,
        key: str | None = None,
        *,
        keys: Iterable[str] | None = None,
        namespace: str | None = None,
        all: bool = False,
    ) -> int:
        """Invalidate by hand, broadcasting to other processes.

        ``key``/``keys``: delete those keys everywhere (returns how many existed).
        ``namespace``: bump its generation (returns the new one): keys built with the old
        generation become unreachable at once, without a scan; they age out by TTL.
        ``all``: clear every tier's namespace (returns entries removed).
        """
        if not self._started:
            await self.start()
        n = 0
        targets = ([key] if key is not None else []) + list(keys or [])
        if targets:
            n += await self.delete_many(targets)
        if namespace is not None:
            n = await self._bump_generation(namespace)
        if all:
            n += await self.clear()
        if not targets and namespace is None and not all:
            raise ConfigError("invalidate() needs key=, keys=, namespace= or all=True")
        return n

    async def clear(self) -> int:
        """Clear every tier (each only its own namespace) and every process's L1."""
        if not self._started:
            await self.start()
        removed = 0
        if self._l1 is not None:
            removed += len(self._l1)
            self._l1.clear()
        removed += len(self._pending)
        self._pending.clear()
        await self._wait_flushing(None)
        for slot in self._remote:
            slot.retry.clear()
        counts = await self._each_remote("clear", lambda s: s.tier.clear())
        removed += sum(int(c) for c in counts if c is not None)
        await self._publish({"t": "clear"})
        return removed

    async def flush(self) -> None:
        """Write every queued write-behind entry to the slower tiers now, and try once more,
        without waiting for the backoff, what a tier missed while it was down."""
        if self._pending or self._flushing or self._retrying():
            await self._drain(force=True)

    # ================================================================= stats

    async def stats(self) -> dict[str, Any]:
        """Per tier: hits, misses, errors, promotions, latency percentiles (ms) and the tier's
        own stats; plus write-behind queue depth, single-flight and event counters."""
        tiers: dict[str, Any] = {}
        if self._l1 is not None and self._l1_slot is not None:
            own = dict(self._l1.stats())
            tiers["l1"] = {
                "hits": own.get("hits", 0),
                "misses": own.get("misses", 0),
                "errors": 0,
                "promotions": self._l1_slot.promotions,
                "latency": None,
                "tier": own,
            }
        for slot in self._remote:
            try:
                own = await slot.tier.stats()
            except Exception as exc:
                own = {"error": str(exc)}
            tiers[slot.name] = {
                "hits": slot.hits,
                "misses": slot.misses,
                "errors": slot.errors,
                "promotions": slot.promotions,
                "write_behind_retrying": len(slot.retry),
                "write_behind_retried": slot.retry.retried,
                "write_behind_dropped": slot.retry.dropped,
                "write_behind_failed": slot.retry.failed,
                "latency": slot.lat.summary(),
                "tier": own,
            }
        c = self._counters
        return {
            "write_policy": self.write,
            "tiers": tiers,
            "write_behind": {
                "queue_depth": len(self._pending) + len(self._flushing),
                "max_queue": self.write_behind_max_queue,
                "enqueued": c["wb_enqueued"],
                "flushed": c["wb_flushed"],
                "batches": c["wb_batches"],
                "full_waits": c["wb_full_waits"],
                "full_errors": c["wb_full_errors"],
                "full_through": c["wb_full_through"],
                "retrying": sum(len(slot.retry) for slot in self._remote),
                "retries": self.write_behind_retries,
            },
            "single_flight": {
                "loads": c["loads"],
                "coalesced": c["coalesced"],
                "in_flight": len(self._inflight),
                "lock_acquired": c["lock_acquired"],
                "lock_waited": c["lock_waited"],
                "lock_fallbacks": c["lock_fallbacks"],
            },
            "refresh_ahead": {
                "fraction": self.refresh_ahead,
                "refreshes": c["refreshes"],
                "errors": c["refresh_errors"],
                "in_flight": len(self._refreshing),
            },
            "events": {
                "sent": c["events_sent"],
                "received": c["events_received"],
                "errors": c["event_errors"],
                "resyncs": c["resyncs"],
            },
            "generations": dict(self._generations),
        }

    # ================================================================= internals: reads

    async def _lookup_remote(self, keys: list[str]) -> dict[str, tuple[Any, float | None, int]]:
        """Ask each slower tier for what the faster ones missed; promote what is found."""
        found: dict[str, tuple[Any, float | None, int]] = {}
        missing = keys
        for i, slot in enumerate(self._remote):
            if not missing:
                break
            start = time.perf_counter()
            try:
                res = await slot.tier.get_many_with_ttl(missing)
            except Exception as exc:
                slot.errors += 1
                _log_tier_error(slot, "read", exc)
                continue
            slot.lat.record(time.perf_counter() - start)
            slot.hits += len(res)
            slot.misses += len(missing) - len(res)
            if res:
                for k, (v, rem) in res.items():
                    found[k] = (v, rem, i)
                missing = [k for k in missing if k not in res]
                await self._promote(res, i)
        return found

    async def _promote(self, res: Mapping[str, tuple[Any, float | None]], upto: int) -> None:
        """Copy hits from tier ``upto`` into every faster tier with their remaining TTL."""
        l1 = self._l1
        if l1 is not None and self._l1_slot is not None:
            for k, (v, rem) in res.items():
                t = self._promotion_ttl(l1, rem)
                if t is MISSING:
                    continue
                l1.set(k, v, t)
                self._l1_slot.promotions += 1
        for slot in self._remote[:upto]:
            items: dict[str, tuple[Any, float | None]] = {}
            for k, (v, rem) in res.items():
                t = self._promotion_ttl(slot.tier, rem)
                if t is not MISSING:
                    items[k] = (v, t)
            if not items:
                continue
            try:
                await _set_items(slot.tier, items)
                slot.promotions += len(items)
            except Exception as exc:
                slot.errors += 1
                _log_tier_error(slot, "promote", exc)

    @staticmethod
    def _promotion_ttl(tier: Any, remaining: float | None) -> Any:
        """The TTL a promoted copy gets: the remaining TTL, capped by the tier's default TTL
        (an L1 may want shorter lives), quantized; MISSING when it is about to expire anyway."""
        cap = getattr(tier, "default_ttl", None)
        if remaining is None:
            return cap
        t = remaining if cap is None else min(remaining, cap)
        t = _quantize_ttl(t)
        return t if t > 0.001 else MISSING

    def _pending_value(self, key: str) -> Any:
        """A write-behind entry not yet in the slower tiers (read-your-writes after L1 eviction)."""
        hit = self._pending.get(key) or self._flushing.get(key)
        if hit is not None:
            return hit[0]
        if self._retrying():
            now = time.monotonic()
            for slot in self._remote:
                value = slot.retry.get(key, now)
                if value is not MISSING:
                    return value
        return MISSING

    def _retrying(self) -> bool:
        """Whether some tier holds write-behind entries it missed while down."""
        return any(slot.retry for slot in self._remote)

    # ================================================================= internals: writes

    def _l1_set_many(self, items: Mapping[str, Any], ttl: float | None) -> None:
        assert self._l1 is not None
        if len(items) == 1:
            ((k, v),) = items.items()
            self._l1.set(k, v, ttl)
        else:
            self._l1.set_many(items, ttl)

    async def _write_remote(self, items: Mapping[str, tuple[Any, float | None]]) -> None:
        """One batched write per slower tier, concurrently; a failing tier is skipped.

        ``None`` as a TTL means "that tier's default".
        """
        if not self._remote:
            return

        async def one(slot: _Slot) -> None:
            per = {k: (v, _eff_ttl(slot.tier, t)) for k, (v, t) in items.items()}
            if not slot.retry:
                await _set_items(slot.tier, per)
                return
            # An older write-behind value waits for this tier: the newer one must win.
            try:
                await _set_items(slot.tier, per)
            except Exception:
                slot.retry.replace(per, time.monotonic())
                raise
            slot.retry.discard(per)

        await self._each_remote("write", one, slots=self._remote)

    async def _write_around(self, items: Mapping[str, Any], ttl: float | None) -> None:
        """Write the slowest tier that works; drop faster copies (here and, by event, elsewhere).

        Used for values that are written often but read rarely: they should not push hot entries
        out of the fast tiers.
        """
        keys = list(items)
        if self._l1 is not None:
            for k in keys:
                self._l1.delete(k)
        for slot in self._remote:
            slot.retry.discard(keys)
        written_at: int | None = None
        for i in range(len(self._remote) - 1, -1, -1):
            slot = self._remote[i]
            try:
                await _set_items(
                    slot.tier, {k: (v, _eff_ttl(slot.tier, ttl)) for k, v in items.items()}
                )
                written_at = i
                break
            except Exception as exc:
                slot.errors += 1
                _log_tier_error(slot, "write-around", exc)
        if written_at is None:
            # Every slower tier is down: keep the value in L1 rather than lose it.
            if self._l1 is not None:
                self._l1_set_many(items, ttl)
            return
        faster = self._remote[:written_at]
        if faster:
            await self._each_remote("invalidate", lambda s: s.tier.delete_many(keys), slots=faster)
        await self._publish({"t": "del", "k": keys})

    async def _each_remote(
        self,
        what: str,
        fn: Callable[[_Slot], Awaitable[Any]],
        *,
        slots: Sequence[_Slot] | None = None,
    ) -> list[Any]:
        """Run ``fn(slot)`` on every slower tier at once; failures are logged, counted, None."""
        chosen = self._remote if slots is None else slots

        async def guarded(slot: _Slot) -> Any:
            start = time.perf_counter()
            try:
                res = await fn(slot)
            except Exception as exc:
                slot.errors += 1
                _log_tier_error(slot, what, exc)
                return None
            slot.lat.record(time.perf_counter() - start)
            return res

        if len(chosen) == 1:
            return [await guarded(chosen[0])]
        return list(await asyncio.gather(*(guarded(s) for s in chosen)))

    # ----------------------------------------------------------------- write-behind

    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            if self._wake is None:
                self._wake = asyncio.Event()
                self._batch_ready = asyncio.Event()
                self._space = asyncio.Condition()
                self._drain_lock = asyncio.Lock()
                self._flush_idle = asyncio.Event()
                self._flush_idle.set()
            self._flusher = asyncio.create_task(self._flush_loop(), name="infercache-write-behind")

    async def _enqueue(self, items: Mapping[str, Any], ttl: float | None) -> None:
        if self._closed:
            # After close() there is no flusher: write synchronously rather than lose it.
            await self._write_remote({k: (v, ttl) for k, v in items.items()})
            return
        self._ensure_flusher()
        assert self._wake is not None and self._space is not None
        assert self._batch_ready is not None
        through: dict[str, tuple[Any, float | None]] = {}
        for k, v in items.items():
            if k in self._pending:  # coalesce: the newest value wins, one write
                self._pending[k] = (v, ttl)
                continue
            if len(self._pending) >= self.write_behind_max_queue:
                policy = self.write_behind_when_full
                if policy == "error":
                    self._counters["wb_full_errors"] += 1
                    raise Overloaded(
                        f"write-behind queue full ({self.write_behind_max_queue} entries)",
                        retry_after=max(self.write_behind_interval, 0.01),
                    )
                if policy == "through":
                    self._counters["wb_full_through"] += 1
                    through[k] = (v, ttl)
                    continue
                self._counters["wb_full_waits"] += 1
                self._batch_ready.set()
                self._wake.set()
                async with self._space:
                    await self._space.wait_for(
                        lambda: len(self._pending) < self.write_behind_max_queue
                    )
            self._pending[k] = (v, ttl)
            self._counters["wb_enqueued"] += 1
        if through:
            await self._write_remote(through)
        self._wake.set()
        if len(self._pending) >= self.write_behind_batch:
            self._batch_ready.set()

    async def _flush_loop(self) -> None:
        assert self._wake is not None and self._batch_ready is not None
        while True:
            retry_in = self._next_retry_in()
            if retry_in is None:
                await self._wake.wait()
            elif retry_in > 0:  # a tier's retry is due then, unless new writes come first
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), retry_in)
            if self._closed:
                return
            self._wake.clear()
            if (
                self._pending
                and self.write_behind_interval > 0
                and len(self._pending) < self.write_behind_batch
            ):
                # Gather a batch, but not past a tier's next retry.
                retry_in = self._next_retry_in()
                wait = self.write_behind_interval
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self._batch_ready.wait(), wait if retry_in is None else min(wait, retry_in)
                    )
            self._batch_ready.clear()
            try:
                await self._drain()
            except Exception:  # keep the flusher alive whatever a tier does
                log.exception("write-behind flush failed")

    def _next_retry_in(self) -> float | None:
        """Seconds until some tier's write-behind retry is due (None: none waits)."""
        now = time.monotonic()
        waits = [w for s in self._remote if (w := s.retry.wait_time(now)) is not None]
        return min(waits) if waits else None

    async def _drain(self, *, force: bool = False) -> None:
        """Write queued entries in batches (one set per slower tier per batch), then retry what
        tiers missed while down: when due, or (``force``) now."""
        self._ensure_flusher()
        assert self._drain_lock is not None and self._flush_idle is not None
        assert self._space is not None
        async with self._drain_lock:
            while self._pending:
                batch: dict[str, tuple[Any, float | None]] = {}
                while self._pending and len(batch) < self.write_behind_batch:
                    k, entry = self._pending.popitem(last=False)
                    batch[k] = entry
                self._flushing = batch
                self._flush_idle.clear()
                async with self._space:
                    self._space.notify_all()
                try:
                    await self._write_behind_batch(batch)
                finally:
                    self._flushing = {}
                    self._flush_idle.set()
            now = time.monotonic()
            due = [s for s in self._remote if (s.retry if force else s.retry.due(now))]
            if due:
                self._flush_idle.clear()
                try:
                    await self._each_remote(
                        "write-behind retry", lambda s: self._retry(s, force=force), slots=due
                    )
                finally:
                    self._flush_idle.set()

    async def _write_behind_batch(self, batch: dict[str, tuple[Any, float | None]]) -> None:
        async def one(slot: _Slot) -> None:
            now = time.monotonic()
            per = {k: (v, _eff_ttl(slot.tier, t)) for k, (v, t) in batch.items()}
            if slot.retry:  # older writes wait for this tier: queue behind them, keep order
                slot.retry.add(per, now)
                if slot.retry.due(now):
                    await self._retry(slot)
                return
            try:
                await _set_items(slot.tier, per)
            except Exception:
                # The tier is down: keep its copy for retries; the other tiers have theirs.
                slot.retry.failed_write(per, now)
                raise

        await self._each_remote("write-behind", one, slots=self._remote)
        self._counters["wb_flushed"] += len(batch)
        self._counters["wb_batches"] += 1

    async def _retry(self, slot: _Slot, *, force: bool = False) -> None:
        """Write what ``slot`` missed, oldest first, in batches; stop at the first failure."""
        buf = slot.retry
        while buf.due(time.monotonic()) or (force and buf):
            items = buf.take(self.write_behind_batch, time.monotonic())
            if not items:
                continue
            try:
                await _set_items(slot.tier, items)
            except Exception:
                buf.attempt_failed(time.monotonic())
                raise
            buf.succeeded()

    async def _wait_flushing(self, keys: list[str] | None) -> None:
        """Let an in-flight flush holding these keys (None: any) land before deleting them,
        so a queued write can never resurrect a key deleted after it."""
        if self._flush_idle is None or self._flush_idle.is_set():
            return
        if (
            keys is None
            or any(k in self._flushing for k in keys)
            or any(slot.retry.holds(keys) for slot in self._remote)
        ):
            await self._flush_idle.wait()

    # ----------------------------------------------------------------- read-through

    async def _compute(self, key: str, loader: Loader, ttl: float | None) -> Any:
        coord = self._coord if self.distributed_lock else None
        if coord is None:
            return await self._load_and_store(key, loader, ttl, through=False)
        deadline = time.monotonic() + self.lock_wait
        delay = self.lock_poll
        waited = False
        while True:
            try:
                token = await coord.acquire_lock(key, self.lock_ttl)
            except Exception as exc:  # Redis down: single-flight is per process only for now
                log.debug("lock unavailable for %r: %s", key, exc)
                return await self._load_and_store(key, loader, ttl, through=False)
            if token is not None:
                self._counters["lock_acquired"] += 1
                try:
                    if waited:  # the holder may have finished just before we got the lock
                        found = await self._lookup_remote([key])
                        if key in found:
                            return found[key][0]
                    # Write through while holding the lock, so waiters elsewhere find the value
                    # in the shared tier as soon as the lock is gone (even under write="behind").
                    return await self._load_and_store(key, loader, ttl, through=True)
                finally:
                    with contextlib.suppress(Exception):
                        await coord.release_lock(key, token)
            if not waited:
                self._counters["lock_waited"] += 1
                waited = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            found = await self._lookup_remote([key])
            if key in found:
                return found[key][0]
            if time.monotonic() >= deadline:
                self._counters["lock_fallbacks"] += 1
                return await self._load_and_store(key, loader, ttl, through=False)

    async def _load_and_store(
        self, key: str, loader: Loader, ttl: float | None, *, through: bool
    ) -> Any:
        self._counters["loads"] += 1
        value = await _call_loader(loader)
        if value is None:
            return None
        if through and self.write == "behind":
            t = validate_ttl(ttl) if ttl is not None else self.default_ttl
            if self._l1 is not None:
                self._l1_set_many({key: value}, t)
            await self._write_remote({key: (value, t)})
        else:
            await self.set(key, value, ttl)
        return value

    # ----------------------------------------------------------------- refresh-ahead

    def _maybe_refresh(
        self, key: str, loader: Loader, ttl: float | None, remaining: float | None, tier: Any
    ) -> None:
        if self.refresh_ahead is None or remaining is None:
            return
        total = validate_ttl(ttl) if ttl is not None else self.default_ttl
        cap = getattr(tier, "default_ttl", None)
        if total is None:
            total = cap
        elif cap is not None:
            total = min(total, cap)
        if total is None or remaining > total * self.refresh_ahead:
            return
        if key in self._refreshing or key in self._inflight or self._closed:
            return
        self._refreshing.add(key)
        self._spawn(self._refresh(key, loader, ttl))

    async def _refresh(self, key: str, loader: Loader, ttl: float | None) -> None:
        try:
            value = await _call_loader(loader)
            if value is not None:
                await self.set(key, value, ttl)
            self._counters["refreshes"] += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            self._counters["refresh_errors"] += 1
            log.exception("refresh-ahead of %r failed; the current value stays", key)
        finally:
            self._refreshing.discard(key)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----------------------------------------------------------------- events, generations

    def _channel(self) -> str:
        if self.invalidation_channel is not None:
            return self.invalidation_channel
        assert self._coord is not None
        channel = getattr(self._coord, "channel", None)
        if callable(channel):
            return str(channel("events"))
        return f"__infercache__:{self._coord.namespace}:events"

    async def _publish(self, event: dict[str, Any]) -> None:
        if not self.broadcast or self._coord is None:
            return
        event["o"] = self._origin
        try:
            await self._coord.publish(self._channel(), json.dumps(event).encode())
            self._counters["events_sent"] += 1
        except Exception as exc:
            self._counters["event_errors"] += 1
            log.debug("invalidation event not published: %s", exc)

    def _on_event(self, data: bytes) -> None:
        """Apply another process's invalidation to our L1 (our own events are skipped)."""
        try:
            event = json.loads(data)
        except ValueError:
            self._counters["event_errors"] += 1
            return
        if not isinstance(event, dict) or event.get("o") == self._origin:
            return
        self._counters["events_received"] += 1
        kind = event.get("t")
        l1 = self._l1
        if kind == "del" and l1 is not None:
            for k in event.get("k", ()):
                l1.delete(k)
        elif kind == "clear" and l1 is not None:
            l1.clear()
        elif kind == "gen":
            ns, gen = event.get("ns"), event.get("g")
            if isinstance(ns, str) and isinstance(gen, int):
                self._generations[ns] = max(self._generations.get(ns, 0), gen)

    async def _on_resubscribe(self) -> None:
        """Events sent while we were disconnected are lost: drop L1 and re-read generations."""
        self._counters["resyncs"] += 1
        if self._l1 is not None:
            self._l1.clear()
        await self._load_generations()

    async def _load_generations(self) -> None:
        """Take the maximum of every store's generations (and ours), then repair stores that
        lag behind it (a Redis restarted empty, a bump made while a store was down)."""
        stores = self._gen_stores
        if not stores:
            return
        reads = await asyncio.gather(
            *(s.read_generations() for s in stores), return_exceptions=True
        )
        merged = dict(self._generations)
        answered: list[tuple[GenerationStore, dict[str, int]]] = []
        for store, got in zip(stores, reads, strict=True):
            if isinstance(got, BaseException):
                log.debug("generations not loaded from %s: %s", _store_name(store), got)
                continue
            answered.append((store, got))
            for ns, gen in got.items():
                merged[ns] = max(merged.get(ns, 0), gen)
        self._generations = merged
        for store, got in answered:
            for ns, gen in merged.items():
                if got.get(ns, 0) < gen:
                    try:
                        await store.raise_generation(ns, gen)
                    except Exception as exc:
                        log.debug("generation of %r not repaired: %s", ns, exc)
                        break

    async def _bump_generation(self, namespace: str) -> int:
        """Advance ``namespace`` past every generation any store (or this process) has seen.

        Each store advances atomically to ``max(its own + 1, what the previous store gave)``,
        so the result is new everywhere; stores left behind by a later one are raised to it.
        """
        gen = self._generations.get(namespace, 0) + 1
        reached: list[tuple[GenerationStore, int]] = []
        for store in self._gen_stores:
            try:
                got = await store.advance_generation(namespace, gen)
            except Exception as exc:  # store down: the others (or a later resync) carry it
                log.warning(
                    "generation of %r not stored in %s: %s", namespace, _store_name(store), exc
                )
                continue
            gen = max(gen, got)
            reached.append((store, got))
        for store, got in reached:
            if got < gen:
                with contextlib.suppress(Exception):
                    await store.raise_generation(namespace, gen)
        self._generations[namespace] = max(self._generations.get(namespace, 0), gen)
        await self._publish({"t": "gen", "ns": namespace, "g": gen})
        return gen


# --------------------------------------------------------------------------- helpers


def _eff_ttl(tier: Any, ttl: float | None) -> float | None:
    """A write's TTL for one tier: the given one, else the tier's default (None: no expiry)."""
    return ttl if ttl is not None else getattr(tier, "default_ttl", None)


async def _set_items(tier: Any, items: Mapping[str, tuple[Any, float | None]]) -> None:
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


def _store_name(store: Any) -> str:
    return str(getattr(store, "name", type(store).__name__))


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    """Mark a single-flight future's exception as retrieved (the caller re-raises it)."""
    if not fut.cancelled():
        fut.exception()


_last_logged: dict[str, float] = {}


def _log_tier_error(slot: _Slot, what: str, exc: BaseException) -> None:
    """Log a tier failure at most once a second per tier: an outage must not flood the log."""
    now = time.monotonic()
    if now - _last_logged.get(slot.name, 0.0) >= 1.0:
        _last_logged[slot.name] = now
        level = logging.INFO if isinstance(exc, TierError) else logging.WARNING
        log.log(level, "tier %s %s failed (skipped): %s", slot.name, what, exc)
