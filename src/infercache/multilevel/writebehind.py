"""write="behind": L1 at once, the slower tiers from a bounded queue flushed in batches.

One background flusher gathers queued writes (coalescing rewrites of a key: the newest value
wins) and writes each batch with one ``set_many`` per slower tier -- one pipeline, one
transaction. A tier that is down at flush time does not lose its copy: the entries go to that
tier's :class:`~infercache.multilevel.retry.RetryBuffer` and are retried with backoff, oldest
first, ahead of newer batches, until they land or run out of retries. ``close()`` (and SIGTERM,
through MultiLevelCache) flushes everything, so nothing acknowledged is lost on a graceful
shutdown while the tiers are reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from infercache.aio import stop_task
from infercache.errors import EncodeError, Overloaded
from infercache.multilevel.slots import Slot, each_remote, eff_ttl, log_tier_error, set_items
from infercache.tiers.base import MISSING

__all__ = ["QueueFull", "WriteBehind", "write_now"]

log = logging.getLogger("infercache.multilevel")

QueueFull = Literal["block", "error", "through"]
Items = Mapping[str, tuple[Any, float | None]]  # key -> (value, TTL; None: the tier's default)


async def write_now(slot: Slot, items: Items) -> None:
    """Write ``items`` to one tier now, superseding any older write-behind value that waits
    there for a retry (the newer value must win, whether or not this write gets through)."""
    per = {k: (v, eff_ttl(slot.tier, t)) for k, (v, t) in items.items()}
    if not slot.retry:
        await set_items(slot.tier, per)
        return
    try:
        await set_items(slot.tier, per)
    except EncodeError:
        slot.retry.discard(per)  # the others landed; a value the codec refused never will
        raise
    except Exception:
        slot.retry.replace(per, time.monotonic())
        raise
    slot.retry.discard(per)


class WriteBehind:
    """The queue, its flusher task and the per-tier retries (see the module docstring).

    ``write_through`` writes entries synchronously to every slower tier: used when the queue is
    full under ``when_full="through"`` and after :meth:`close`.
    """

    def __init__(
        self,
        slots: Sequence[Slot],
        *,
        max_queue: int,
        batch: int,
        interval: float,
        when_full: QueueFull,
        retries: int,
        write_through: Callable[[Items], Awaitable[None]],
    ) -> None:
        self._slots = slots
        self.max_queue = max_queue
        self.batch = batch
        self.interval = interval
        self.when_full = when_full
        self.retries = retries
        self._write_through = write_through
        self.pending: OrderedDict[str, tuple[Any, float | None]] = OrderedDict()
        self.flushing: dict[str, tuple[Any, float | None]] = {}
        self.closed = False
        self._closing = False
        #: tiers (``id(slot)``) that failed during close()'s flush: not tried again
        self._failed_at_close: set[int] = set()
        self._wake: asyncio.Event | None = None
        self._batch_ready: asyncio.Event | None = None
        self._space: asyncio.Condition | None = None
        self._drain_lock: asyncio.Lock | None = None
        self._flush_idle: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "enqueued",
                "flushed",
                "batches",
                "full_waits",
                "full_errors",
                "full_through",
                "unencodable",
            ),
            0,
        )

    # ----------------------------------------------------------------- what waits

    def __bool__(self) -> bool:
        """Whether anything waits: queued, being flushed, or kept for a tier's retry."""
        return bool(self.pending or self.flushing or self.retrying())

    def retrying(self) -> bool:
        """Whether some tier holds entries it missed while down."""
        return any(slot.retry for slot in self._slots)

    def value(self, key: str) -> Any:
        """A written value not yet in every slower tier (read-your-writes after L1 eviction);
        MISSING when none waits."""
        hit = self.pending.get(key) or self.flushing.get(key)
        if hit is not None:
            return hit[0]
        if self.retrying():
            now = time.monotonic()
            for slot in self._slots:
                value = slot.retry.get(key, now)
                if value is not MISSING:
                    return value
        return MISSING

    # ----------------------------------------------------------------- writers

    async def enqueue(self, items: Mapping[str, Any], ttl: float | None) -> None:
        if self.closed:
            # After close() there is no flusher: write synchronously rather than lose it.
            await self.write_direct({k: (v, ttl) for k, v in items.items()})
            return
        self._ensure_flusher()
        assert self._wake is not None and self._space is not None
        assert self._batch_ready is not None
        through: dict[str, tuple[Any, float | None]] = {}
        for k, v in items.items():
            if k in self.pending:  # coalesce: the newest value wins, one write
                self.pending[k] = (v, ttl)
                continue
            if len(self.pending) >= self.max_queue:
                if self.when_full == "error":
                    self.counters["full_errors"] += 1
                    raise Overloaded(
                        f"write-behind queue full ({self.max_queue} entries)",
                        retry_after=max(self.interval, 0.01),
                    )
                if self.when_full == "through":
                    self.counters["full_through"] += 1
                    through[k] = (v, ttl)
                    continue
                self.counters["full_waits"] += 1
                self._batch_ready.set()
                self._wake.set()
                async with self._space:
                    await self._space.wait_for(lambda: len(self.pending) < self.max_queue)
            self.pending[k] = (v, ttl)
            self.counters["enqueued"] += 1
        if through:
            await self.write_direct(through)
        self._wake.set()
        if len(self.pending) >= self.batch:
            self._batch_ready.set()

    async def write_direct(self, items: Items) -> None:
        """Write ``items`` to every slower tier now, in order with the flusher.

        A flush or retry in flight may carry older values of these keys: it lands first (the
        drain lock), so it cannot overwrite this newer write afterwards. Older values still
        queued are dropped, since this write supersedes them and the flusher would otherwise
        write them after it. Writes queued while this one is in flight flush after it.
        """
        lock = self._drain_lock
        if lock is None:  # nothing was ever queued: there is no flusher to order with
            await self._write_through(items)
            return
        async with lock:
            dropped = sum(self.pending.pop(k, None) is not None for k in items)
            if dropped and self._space is not None:
                async with self._space:
                    self._space.notify_all()
            await self._write_through(items)

    async def forget(self, keys: list[str]) -> int:
        """Drop queued and waiting writes of deleted keys; returns how many were queued.

        An in-flight flush holding one of them lands first, so a queued write can never
        resurrect a key deleted after it.
        """
        n = sum(self.pending.pop(k, None) is not None for k in keys)
        await self._wait_flushing(keys)
        for slot in self._slots:
            slot.retry.discard(keys)
        return n

    async def clear(self) -> int:
        """Drop everything queued or waiting; returns how many entries were queued."""
        n = len(self.pending)
        self.pending.clear()
        await self._wait_flushing(None)
        for slot in self._slots:
            slot.retry.clear()
        return n

    async def flush(self) -> None:
        """Write every queued entry now, and try once more, without waiting for the backoff,
        what a tier missed while it was down."""
        if self:
            await self._drain(force=True)

    async def close(self) -> None:
        """Flush, give up on what a still-down tier missed (counted), stop the flusher."""
        if self.closed:
            return
        # One try per tier: a tier that fails during this flush (down, or frozen: each try then
        # waits its statement or socket timeout) gets no second one, not for the next batch nor
        # for its retries. Trying each queued batch and then the retries took about three
        # timeouts before the breaker opened (~4-6 s of SIGTERM with PostgreSQL frozen).
        self._closing = True
        try:
            await self.flush()
        finally:
            self._closing = False
            self._failed_at_close.clear()
        self.closed = True
        for slot in self._slots:
            if slot.retry:
                lost = slot.retry.give_up()
                log.warning(
                    "tier %s still down at close: %d write-behind entries lost", slot.name, lost
                )
        if self._flusher is not None:
            # Wake it to see `closed` and return, and cancel it too. Either alone can be lost:
            # Python 3.11's wait_for swallows a cancellation that races with its inner wait.
            if self._wake is not None:
                self._wake.set()
            await stop_task(self._flusher)
            self._flusher = None

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "queue_depth": len(self.pending) + len(self.flushing),
            "max_queue": self.max_queue,
            "enqueued": c["enqueued"],
            "flushed": c["flushed"],
            "batches": c["batches"],
            "full_waits": c["full_waits"],
            "full_errors": c["full_errors"],
            "full_through": c["full_through"],
            "unencodable": c["unencodable"],
            "retrying": sum(len(slot.retry) for slot in self._slots),
            "retries": self.retries,
        }

    # ----------------------------------------------------------------- the flusher

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

    async def _flush_loop(self) -> None:
        assert self._wake is not None and self._batch_ready is not None
        while True:
            retry_in = self._next_retry_in()
            if retry_in is None:
                await self._wake.wait()
            elif retry_in > 0:  # a tier's retry is due then, unless new writes come first
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), retry_in)
            if self.closed:
                return
            self._wake.clear()
            if self.pending and self.interval > 0 and len(self.pending) < self.batch:
                # Gather a batch, but not past a tier's next retry.
                retry_in = self._next_retry_in()
                wait = self.interval if retry_in is None else min(self.interval, retry_in)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._batch_ready.wait(), wait)
            self._batch_ready.clear()
            try:
                await self._drain()
            except Exception:  # keep the flusher alive whatever a tier does
                log.exception("write-behind flush failed")

    def _next_retry_in(self) -> float | None:
        """Seconds until some tier's retry is due (None: none waits)."""
        now = time.monotonic()
        waits = [w for s in self._slots if (w := s.retry.wait_time(now)) is not None]
        return min(waits) if waits else None

    async def _drain(self, *, force: bool = False) -> None:
        """Write queued entries in batches (one set per slower tier per batch), then retry what
        tiers missed while down: when due, or (``force``) now."""
        self._ensure_flusher()
        assert self._drain_lock is not None and self._flush_idle is not None
        assert self._space is not None
        async with self._drain_lock:
            # Without force, write what was queued when the drain began, then go back to
            # gathering: writes arriving during a batch's round trip wait for the next interval
            # instead of following at once in small batches (measured at 1,400 req/s: 80 batches
            # a second of ~17 entries, each a thread hop, a transaction and GIL hand-offs).
            budget = len(self.pending)
            while self.pending and (force or budget > 0):
                budget -= min(len(self.pending), self.batch)
                batch: dict[str, tuple[Any, float | None]] = {}
                while self.pending and len(batch) < self.batch:
                    k, entry = self.pending.popitem(last=False)
                    batch[k] = entry
                self.flushing = batch
                self._flush_idle.clear()
                async with self._space:
                    self._space.notify_all()
                try:
                    await self._write_batch(batch)
                finally:
                    self.flushing = {}
                    self._flush_idle.set()
            now = time.monotonic()
            due = [s for s in self._slots if (s.retry if force else s.retry.due(now))]
            due = [s for s in due if id(s) not in self._failed_at_close]
            if due:
                self._flush_idle.clear()
                try:
                    await each_remote(
                        due, "write-behind retry", lambda s: self._retry(s, force=force)
                    )
                finally:
                    self._flush_idle.set()

    async def _write_batch(self, batch: dict[str, tuple[Any, float | None]]) -> None:
        async def one(slot: Slot) -> None:
            now = time.monotonic()
            per = {k: (v, eff_ttl(slot.tier, t)) for k, (v, t) in batch.items()}
            if slot.retry:  # older writes wait for this tier: queue behind them, keep order
                slot.retry.add(per, now)
                if slot.retry.due(now) and id(slot) not in self._failed_at_close:
                    await self._retry(slot)
                return
            try:
                await set_items(slot.tier, per)
            except EncodeError as exc:
                self._unencodable(slot, exc, len(per))  # the rest of the batch is written
            except Exception:
                # The tier is down: keep its copy for retries; the other tiers have theirs.
                slot.retry.failed_write(per, now)
                if self._closing:
                    self._failed_at_close.add(id(slot))
                raise

        await each_remote(self._slots, "write-behind", one)
        self.counters["flushed"] += len(batch)
        self.counters["batches"] += 1

    async def _retry(self, slot: Slot, *, force: bool = False) -> None:
        """Write what ``slot`` missed, oldest first, in batches; stop at the first failure."""
        buf = slot.retry
        while buf.due(time.monotonic()) or (force and buf):
            items = buf.take(self.batch, time.monotonic())
            if not items:
                continue
            try:
                await set_items(slot.tier, items)
            except EncodeError as exc:
                self._unencodable(slot, exc, len(items))
            except Exception:
                buf.attempt_failed(time.monotonic())
                if self._closing:
                    self._failed_at_close.add(id(slot))
                raise
            buf.succeeded()

    def _unencodable(self, slot: Slot, exc: EncodeError, tried: int) -> None:
        """Values the tier's codec cannot hold were left out; the rest landed. Retrying cannot
        help (the value will never encode) and must not hold up the writes behind it: drop
        them from this tier (L1 keeps them), count them, and log (at most once a second). A
        tier that names no keys (not built on ``tiers.base.encode_values``) lost all ``tried``."""
        slot.retry.discard(exc.keys)
        self.counters["unencodable"] += len(exc.keys) or tried
        log_tier_error(slot, "write-behind", exc)

    async def _wait_flushing(self, keys: Iterable[str] | None) -> None:
        """Let an in-flight flush or retry holding these keys (None: any) land first."""
        if self._flush_idle is None or self._flush_idle.is_set():
            return
        keys = None if keys is None else list(keys)
        if (
            keys is None
            or any(k in self.flushing for k in keys)
            or any(slot.retry.holds(keys) for slot in self._slots)
        ):
            await self._flush_idle.wait()
