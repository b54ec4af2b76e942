"""MultiLevelCache: the facade over the tiers and the policies of this package.

It owns the tiers and the configuration and routes each call: reads through L1 and
:class:`~infercache.multilevel.lookup.Lookup`, writes per policy (through / around here, behind
through :class:`~infercache.multilevel.writebehind.WriteBehind`), read-through through
:class:`~infercache.multilevel.singleflight.SingleFlight` and
:class:`~infercache.multilevel.refresh.RefreshAhead`, invalidation through
:class:`~infercache.multilevel.invalidation.Generations` and
:class:`~infercache.multilevel.invalidation.EventBus`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from infercache.errors import Closed, ConfigError, EncodeError, Overloaded
from infercache.multilevel.invalidation import EventBus, Generations
from infercache.multilevel.lookup import Lookup
from infercache.multilevel.refresh import Background, RefreshAhead
from infercache.multilevel.retry import RetryBuffer
from infercache.multilevel.singleflight import Loader, SingleFlight, call_loader
from infercache.multilevel.slots import (
    Slot,
    SyncTierAdapter,
    each_remote,
    eff_ttl,
    is_sync_tier,
    log_tier_error,
    set_items,
)
from infercache.multilevel.writebehind import QueueFull, WriteBehind, write_now
from infercache.tiers.base import (
    MISSING,
    Coordinator,
    GenerationStore,
    key_type_error,
    validate_ttl,
)

__all__ = ["MultiLevelCache", "QueueFull", "WritePolicy"]

WritePolicy = Literal["through", "behind", "around"]


class MultiLevelCache:
    """Tiers fastest first (normally ``[MemoryCache, RedisCache, SQLCache]``); see the package doc.

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
        events: where invalidation events go when no tier is a coordinator: an object with
            ``publish``/``subscribe``/``channel`` (:class:`~infercache.tiers.events.SQLiteEventLog`
            for processes that share an SQLite file and no Redis, as ``serve --workers N`` on the
            default configuration). Closed with the tiers.
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
        events: Any | None = None,
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
        for i, tier in enumerate(tiers):
            # (a dict has get(): it was taken, and every write was a logged tier failure)
            lacks = [
                f"{m}()" for m in ("get", "set", "delete") if not callable(getattr(tier, m, None))
            ]
            if lacks:
                raise TypeError(
                    f"tiers[{i}] is no cache tier (a MemoryCache, RedisCache, SQLCache or one with "
                    f"their methods): got {type(tier).__name__}, which lacks {', '.join(lacks)}"
                )
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
        self._l1: Any | None = first if is_sync_tier(first) else None
        self._l1_slot = Slot(first, "l1") if self._l1 is not None else None
        names: set[str] = {"l1"} if self._l1 is not None else set()
        self._remote: list[Slot] = []
        for tier in self._tiers[1:] if self._l1 is not None else self._tiers:
            t = SyncTierAdapter(tier) if is_sync_tier(tier) else tier
            name = str(getattr(t, "name", type(t).__name__.lower()))
            if name in names:
                name = f"{name}{len(self._remote) + 1}"
            names.add(name)
            retry = RetryBuffer(
                write_behind_max_queue,
                write_behind_retries,
                write_behind_retry_delay,
                self.write_behind_retry_max_delay,
            )
            self._remote.append(Slot(t, name, retry))
        if coordinator is None:
            for slot in self._remote:
                if isinstance(slot.tier, Coordinator):
                    coordinator = slot.tier
                    break
        self._coord: Coordinator | None = coordinator
        # tiers this host alone reaches (an SQLite file): other processes' invalidation events
        # are applied to them too (see _on_event); shared tiers were cleaned by the sender
        self._private = [
            s for s in self._remote if getattr(s.tier, "network_lookups", True) is False
        ]

        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._closed = False
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "loads",
                "coalesced",
                "lock_acquired",
                "lock_waited",
                "lock_fallbacks",
                "refreshes",
                "refresh_errors",
                "events_sent",
                "events_received",
                "event_errors",
                "events_unsent",
                "resyncs",
            ),
            0,
        )
        self._lookup = Lookup(self._l1, self._l1_slot, self._remote)
        self._wb = WriteBehind(
            self._remote,
            max_queue=write_behind_max_queue,
            batch=write_behind_batch,
            interval=write_behind_interval,
            when_full=write_behind_when_full,
            retries=write_behind_retries,
            write_through=self._write_remote,
        )
        self._flight = SingleFlight(
            coordinator if distributed_lock else None,
            lock_ttl=self.lock_ttl,
            lock_wait=self.lock_wait,
            lock_poll=lock_poll,
            counters=self._counters,
        )
        self._inflight = self._flight.inflight  # (tests watch it)
        self._bg = Background()
        self._refresh = (
            None
            if refresh_ahead is None
            else RefreshAhead(
                refresh_ahead,
                default_ttl=self.default_ttl,
                store=self.set,
                spawn=self._bg.spawn,
                counters=self._counters,
            )
        )
        # Where namespace generations live: the coordinator (Redis, shared and fast) first, then
        # every durable tier (SQL), so a Redis restart cannot send generations backwards.
        stores: list[GenerationStore] = []
        for candidate in [coordinator, *(slot.tier for slot in self._remote)]:
            if isinstance(candidate, GenerationStore) and all(candidate is not s for s in stores):
                stores.append(candidate)
        self._generations = Generations(stores, announce=self._announce)
        self._event_log = events if coordinator is None else None
        self._events = EventBus(
            coordinator or events,
            enabled=broadcast,
            channel=invalidation_channel,
            counters=self._counters,
        )

    # ================================================================= public properties

    @property
    def tiers(self) -> list[Any]:
        """The tiers as given, fastest first."""
        return list(self._tiers)

    @property
    def events_unsent(self) -> int:
        """Invalidation events this process could not publish (Redis down): other processes
        learn of those changes only when they resync, after their connection comes back."""
        return self._counters["events_unsent"]

    @property
    def l1(self) -> Any | None:
        """The first tier when it is a synchronous in-process cache (a MemoryCache), else None."""
        return self._l1

    @property
    def network_lookups(self) -> bool:
        """Whether a lookup past L1 can cross the network (a Redis or PostgreSQL tier).

        Callers batch such lookups (the Predictor's lookup batcher: one MGET for many requests);
        when every tier past L1 answers locally (an SQLite file, read on the event loop), a
        batcher would only add two event-loop hops per request (measured: 4.4 ms of queueing
        at the lookup batcher, p50, at 1,400 req/s on one core).
        """
        return any(getattr(s.tier, "network_lookups", True) for s in self._remote)

    def might_have(self, key: str) -> bool:
        """False only when no tier past L1 can hold ``key``: nothing queued for it and every
        tier's key filter (SQLCache ``key_filter``) says it was never written. A synchronous
        pre-check that spares a certain miss the whole lookup (about 8 % of a request)."""
        if self._wb.value(key) is not MISSING:  # value() is two dict lookups when none retries
            return True
        for slot in self._remote:
            check = getattr(slot.tier, "might_contain", None)
            if check is None or check(key):
                return True
        return False

    def generation(self, namespace: str) -> int:
        """The namespace's current generation (local and synchronous, for key building)."""
        return self._generations.get(namespace)

    # ================================================================= lifecycle

    async def start(self) -> None:
        """Subscribe to invalidation events and load namespace generations (idempotent).

        Every async method calls it lazily; call it yourself before relying on
        :meth:`generation` in a fresh process, or on events reaching this process. After
        :meth:`close` it raises :class:`~infercache.errors.Closed`, and so does every method but
        an L1 hit: a write would reach L1 only, the tiers below being closed, and be lost.
        """
        if self._started:
            return
        if self._closed:
            raise Closed("this MultiLevelCache is closed")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            self._started = True
            repaired = await self._generations.load()
            await self._events.start(self._on_event, self._on_resync)
            await self._announce(repaired)

    async def close(self) -> None:
        """Flush write-behind, stop background work, close the tiers. Idempotent.

        Await it on shutdown: writes acknowledged under write="behind" reach the slower tiers
        here (or call :meth:`install_signal_handlers` so SIGTERM does it).
        """
        if self._closed:
            return
        await self._wb.close()
        self._closed = True
        self._started = False  # so every lazy start() says it is closed
        await self._bg.cancel_all()
        await self._events.stop()
        await self._generations.close()  # generations a store missed: one last try
        if self.close_tiers:
            for slot in self._remote:
                with contextlib.suppress(Exception):
                    await slot.tier.close()
            if self._event_log is not None:
                with contextlib.suppress(Exception):
                    await self._event_log.close()

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
            self._bg.spawn(shutdown(sig))

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
        _str_keys((key,))  # after L1: a hit costs nothing more
        if not self._started:
            await self.start()
        pending = self._wb.value(key)
        if pending is not MISSING:
            return pending
        found = await self._lookup([key])
        hit = found.get(key)
        return default if hit is None else hit[0]

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Hits among ``keys``; each tier is asked only for what the faster tiers missed."""
        return {k: v for k, (v, _) in (await self.get_many_with_tier(keys)).items()}

    async def get_many_with_tier(self, keys: Iterable[str]) -> dict[str, tuple[Any, str]]:
        """Hits among ``keys`` with the name of the tier that served each (``"l1"`` for L1)."""
        _not_one_key(keys)
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
        _str_keys(missing)
        if not self._started:
            await self.start()
        if self._wb:
            for k in missing:
                v = self._wb.value(k)
                if v is not MISSING:
                    out[k] = (v, "l1")
            missing = [k for k in missing if k not in out]
        found = await self._lookup(missing)
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
            if self._refresh is None:
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
        pending = self._wb.value(key)
        if pending is not MISSING:
            return pending
        while True:
            value = await self._flight.follow(key)
            if value is not MISSING:
                return value
            found = await self._lookup([key])
            if key in found:
                value, remaining, i = found[key]
                self._maybe_refresh(key, loader, ttl, remaining, self._remote[i].tier)
                return value
            if key not in self._flight.inflight:  # else one started while we looked: follow it
                break

        async def load(through: bool) -> Any:
            mine = self._flight.inflight.get(key)  # lead() registered it before calling us
            return await self._load_and_store(key, loader, ttl, through=through, flight=mine)

        async def find() -> Any:
            hit = (await self._lookup([key])).get(key)
            return MISSING if hit is None else hit[0]

        return await self._flight.lead(key, load, find)

    # ================================================================= writes

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` per the write policy (None is never stored: it means miss)."""
        await self.set_many({key: value}, ttl)

    async def set_many(self, mapping: Mapping[str, Any], ttl: float | None = None) -> None:
        """Store every pair per the write policy; one round trip per slower tier.

        Raises EncodeError (``keys`` names them) when a slower tier's codec refuses values that
        were to be written now (write-through, or write-behind writing through); the rest is
        stored, the refused ones are nowhere. Written behind, a refused value stays in L1 only
        and is counted (``health()["write_behind"]["unencodable"]``): the call had returned.
        """
        t = validate_ttl(ttl) if ttl is not None else self.default_ttl
        items = {k: v for k, v in mapping.items() if v is not None}
        if not items:
            return
        _str_keys(items)  # refused now, not by a write-behind flush that retries it forever
        if not self._started:
            await self.start()
        if self.write == "around":
            await self._write_around(items, t)
        elif self.write == "behind":
            if self._l1 is not None:
                self._l1_set_many(items, t)
            if self._remote:  # with L1 alone there is nothing to write behind
                try:
                    await self._wb.enqueue(items, t)
                except Overloaded:  # when_full="error": a write refused is not visible either
                    if self._l1 is not None:
                        for k in items:
                            if k not in self._wb.pending:
                                self._l1.delete(k)
                    raise
                except EncodeError as exc:  # written through (queue full, or closed)
                    self._unwrite_l1(exc, items)
                    raise
        else:
            if self._l1 is not None:
                self._l1_set_many(items, t)
            try:
                await self._write_remote({k: (v, t) for k, v in items.items()})
            except EncodeError as exc:
                self._unwrite_l1(exc, items)
                raise
        if self.broadcast_sets:
            await self._events.publish({"t": "del", "k": list(items)})

    async def delete(self, key: str) -> bool:
        """Delete ``key`` from every tier and tell other processes to drop it from their L1."""
        return await self.delete_many([key]) > 0

    async def delete_many(self, keys: Iterable[str]) -> int:
        """Delete keys everywhere (broadcast); returns how many keys some tier held."""
        _not_one_key(keys)
        uniq = list(dict.fromkeys(keys))
        if not uniq:
            return 0
        if not self._started:
            await self.start()
        found = 0
        self._flight.retire(uniq)
        if self._l1 is not None:
            found = sum(bool(self._l1.delete(k)) for k in uniq)
        found += await self._wb.forget(uniq)
        counts = await each_remote(self._remote, "delete", lambda s: s.tier.delete_many(uniq))
        found = max([found, *(int(c) for c in counts if c is not None)])
        await self._events.publish({"t": "del", "k": uniq})
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
        ``namespace`` goes alone: a generation and a count of entries added up mean nothing.
        """
        targets = ([key] if key is not None else []) + list(keys or [])
        if namespace is not None and (targets or all):
            raise ConfigError(
                "invalidate(namespace=) returns the new generation: call it on its own, not "
                "with key=, keys= or all=True"
            )
        if not self._started:
            await self.start()
        n = 0
        if targets:
            n += await self.delete_many(targets)
        if namespace is not None:
            n = await self._generations.bump(namespace)
            await self._events.publish({"t": "gen", "ns": namespace, "g": n})
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
        self._flight.retire(None)
        if self._l1 is not None:
            removed += len(self._l1)
            self._l1.clear()
        removed += await self._wb.clear()
        counts = await each_remote(self._remote, "clear", lambda s: s.tier.clear())
        removed += sum(int(c) for c in counts if c is not None)
        await self._events.publish({"t": "clear"})
        return removed

    async def flush(self) -> None:
        """Write every queued write-behind entry to the slower tiers now, and try once more,
        without waiting for the backoff, what a tier missed while it was down."""
        await self._wb.flush()

    # ================================================================= stats

    def health(self) -> dict[str, Any]:
        """What a metrics scrape needs, without a round trip (``stats()`` asks each tier): per
        tier below L1 its circuit-breaker state ("closed", "open", "half_open"; "closed" for a
        tier without one), hits, misses, errors and write-behind entries waiting for a retry;
        plus the write-behind queue. A tier that fails every call shows here as errors and an
        open breaker while the requests it was meant to serve still succeed."""
        tiers = {}
        for slot in self._remote:
            breaker = getattr(slot.tier, "breaker", None)
            tiers[slot.name] = {
                "state": breaker.state if breaker is not None else "closed",
                "hits": slot.hits,
                "misses": slot.misses,
                "errors": slot.errors,
                "write_behind_retrying": len(slot.retry),
            }
        return {"tiers": tiers, "write_behind": self._wb.stats()}

    async def stats(self) -> dict[str, Any]:
        """Per tier: :meth:`health`'s figures, promotions, latency percentiles (ms), write-behind
        retries and the tier's own stats; plus write-behind queue depth, single-flight and
        event counters."""
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
        health = self.health()
        for slot in self._remote:
            try:
                own = await slot.tier.stats()
            except Exception as exc:
                own = {"error": str(exc)}
            tiers[slot.name] = {
                **health["tiers"][slot.name],  # state, hits, misses, errors, retrying
                "promotions": slot.promotions,
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
            "write_behind": health["write_behind"],
            "single_flight": {
                "loads": c["loads"],
                "coalesced": c["coalesced"],
                "in_flight": len(self._flight.inflight),
                "lock_acquired": c["lock_acquired"],
                "lock_waited": c["lock_waited"],
                "lock_fallbacks": c["lock_fallbacks"],
            },
            "refresh_ahead": {
                "fraction": self.refresh_ahead,
                "refreshes": c["refreshes"],
                "errors": c["refresh_errors"],
                "in_flight": 0 if self._refresh is None else len(self._refresh.refreshing),
            },
            "events": {
                "sent": c["events_sent"],
                "received": c["events_received"],
                "errors": c["event_errors"],
                "resyncs": c["resyncs"],
            },
            "generations": dict(self._generations.current),
        }

    # ================================================================= internals

    def _l1_set_many(self, items: Mapping[str, Any], ttl: float | None) -> None:
        assert self._l1 is not None
        if len(items) == 1:
            ((k, v),) = items.items()
            self._l1.set(k, v, ttl)
        else:
            self._l1.set_many(items, ttl)

    async def _write_remote(self, items: Mapping[str, tuple[Any, float | None]]) -> None:
        """One batched write per slower tier, concurrently; a failing tier is skipped.

        ``None`` as a TTL means "that tier's default". A value some tier's codec refuses is no
        outage to skip but the caller's to know: the EncodeError is raised once every tier has
        written what it could (it names the refused keys).
        """
        if not self._remote:
            return
        refused: list[EncodeError] = []

        async def one(slot: Slot) -> None:
            try:
                await write_now(slot, items)
            except EncodeError as exc:
                refused.append(exc)

        await each_remote(self._remote, "write", one)
        if refused:
            keys = tuple(dict.fromkeys(k for exc in refused for k in exc.keys))
            err = EncodeError(str(refused[0]))
            err.keys = keys if all(exc.keys for exc in refused) else tuple(items)
            raise err from refused[0]

    def _unwrite_l1(self, exc: EncodeError, items: Mapping[str, Any]) -> None:
        """Drop from L1 what the slower tiers refused to encode: set() raises, and L1 alone
        holding the value would answer this process what every other one misses."""
        if self._l1 is not None:
            for k in exc.keys or tuple(items):
                self._l1.delete(k)

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
                await set_items(
                    slot.tier, {k: (v, eff_ttl(slot.tier, ttl)) for k, v in items.items()}
                )
                written_at = i
                break
            except Exception as exc:
                slot.errors += 1
                log_tier_error(slot, "write-around", exc)
        if written_at is None:
            # Every slower tier is down: keep the value in L1 rather than lose it.
            if self._l1 is not None:
                self._l1_set_many(items, ttl)
            return
        faster = self._remote[:written_at]
        if faster:
            await each_remote(faster, "invalidate", lambda s: s.tier.delete_many(keys))
        await self._events.publish({"t": "del", "k": keys})

    async def _load_and_store(
        self,
        key: str,
        loader: Loader,
        ttl: float | None,
        *,
        through: bool,
        flight: asyncio.Future[Any] | None = None,
    ) -> Any:
        self._counters["loads"] += 1
        value = await call_loader(loader)
        if value is None:
            return None
        if flight is not None and flight in self._flight.retired:
            return value  # deleted while it loaded: answer the callers, store nothing
        if through and self.write == "behind":
            t = validate_ttl(ttl) if ttl is not None else self.default_ttl
            if self._l1 is not None:
                self._l1_set_many({key: value}, t)
            await self._wb.write_direct({key: (value, t)})
        else:
            await self.set(key, value, ttl)
        return value

    def _maybe_refresh(
        self, key: str, loader: Loader, ttl: float | None, remaining: float | None, tier: Any
    ) -> None:
        if self._refresh is not None:
            busy = key in self._flight.inflight or self._closed
            self._refresh.maybe(key, loader, ttl, remaining, tier, busy=busy)

    def _on_event(self, event: dict[str, Any]) -> None:
        """Apply another process's invalidation to our L1, our private tiers and generations.

        The sender deleted from the tiers it has; a tier only this host reaches (an SQLite
        file) may hold its own copy, which would answer the next lookup and be promoted back
        into the shared tiers (measured: two servers sharing Redis, each with its SQLite L3, an
        invalidated entry was served from the other's L3 and reached Redis again 1.5 s later).
        Generation bumps need nothing: keys built with the old generation are unreachable.
        """
        kind = event.get("t")
        l1 = self._l1
        if kind == "del":
            keys = [k for k in event.get("k", ()) if isinstance(k, str)]
            self._flight.retire(keys)
            if l1 is not None:
                for k in keys:
                    l1.delete(k)
            self._bg.spawn(self._apply_remote_event(keys))
        elif kind == "clear":
            self._flight.retire(None)
            if l1 is not None:
                l1.clear()
            self._bg.spawn(self._apply_remote_event(None))
        elif kind == "gen":
            ns, gen = event.get("ns"), event.get("g")
            if isinstance(ns, str) and isinstance(gen, int):
                if gen > self._generations.get(ns):
                    self._bg.spawn(self._generations.record(ns, gen))
                self._generations.observe(ns, gen)

    async def _apply_remote_event(self, keys: list[str] | None) -> None:
        """The rest of another process's delete (``keys``) or clear (None): our queued
        write-behind copies would put the old values back into every tier, shared ones too, and
        our private tiers hold copies the sender cannot reach (see :meth:`_on_event`). A file
        the sender shares (a worker beside us) is cleaned again on purpose: our own write of the
        old value may have landed there after the sender's delete. The price is a newer value
        written meanwhile being deleted too: a recompute, never a stale answer."""
        await (self._wb.clear() if keys is None else self._wb.forget(keys))
        for slot in self._private:
            try:
                await (slot.tier.clear() if keys is None else slot.tier.delete_many(keys))
            except Exception as exc:
                slot.errors += 1
                log_tier_error(slot, "invalidation", exc)

    async def _announce(self, repaired: dict[str, int]) -> None:
        """Tell the other processes of generations a store lagged behind (see Generations.load)."""
        for ns, gen in repaired.items():
            await self._events.publish({"t": "gen", "ns": ns, "g": gen})

    async def _on_resync(self) -> None:
        """Events sent while we were disconnected are lost: drop L1 and re-read generations
        (which also repairs a Redis that came back empty)."""
        self._counters["resyncs"] += 1
        if self._l1 is not None:
            self._l1.clear()
        await self._announce(await self._generations.load())


def _str_keys(keys: Iterable[Any]) -> None:
    """Refuse a key that is no str before it reaches a tier: there it would be a tier failure,
    logged and skipped, and a lookup would answer a silent miss."""
    for k in keys:
        if not isinstance(k, str):
            raise key_type_error("cache", k)


def _not_one_key(keys: Iterable[str]) -> None:
    """A str is an iterable of keys too, of one-character ones: ``get_many("abc")`` looked up
    "a", "b" and "c" in every tier, and ``delete_many("abc")`` would delete them."""
    if isinstance(keys, str | bytes):
        raise TypeError(
            f"expected an iterable of keys, got one {type(keys).__name__}: {keys!r:.60}"
        )
