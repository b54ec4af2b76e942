"""Single-flight for read-through: one loader call per missing key, here and across processes.

Concurrent callers of one key in this process share one future. With a coordinator (Redis),
the process that wins a short ``SET NX PX`` lock computes and writes the value through while
holding it; the others poll the shared tiers for the result. If the holder dies, its lock
expires and a waiter takes over; if the lock cannot be taken at all (Redis down), the process
computes on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from infercache.tiers.base import MISSING, Coordinator, consume_outcome

__all__ = ["Loader", "SingleFlight", "call_loader"]

log = logging.getLogger("infercache.multilevel")

Loader = Callable[[], Any]


async def call_loader(loader: Loader) -> Any:
    """Call a sync or async loader."""
    result = loader()
    if inspect.isawaitable(result):
        result = await result
    return result


class SingleFlight:
    """In-flight computations by key, and the cross-process lock protocol around them.

    ``counters`` is shared with the owner's ``stats()``: coalesced, lock_acquired, lock_waited,
    lock_fallbacks.
    """

    def __init__(
        self,
        coordinator: Coordinator | None,
        *,
        lock_ttl: float,
        lock_wait: float,
        lock_poll: float,
        counters: dict[str, int],
    ) -> None:
        self._coord = coordinator
        self.lock_ttl = lock_ttl
        self.lock_wait = lock_wait
        self.lock_poll = lock_poll
        self._counters = counters
        self.inflight: dict[str, asyncio.Future[Any]] = {}
        #: loads a delete overtook (see :meth:`retire`); a leader forgets its own when it ends
        self.retired: set[asyncio.Future[Any]] = set()

    def retire(self, keys: Iterable[str] | None) -> None:
        """A delete (``keys``) or a clear (None) overtook these keys' loads in flight: what they
        read predates it, so it must not be stored (it was, and the stale value was served until
        its TTL ran out); callers from now on start a fresh load instead of joining."""
        targets = list(self.inflight) if keys is None else [k for k in keys if k in self.inflight]
        for k in targets:
            self.retired.add(self.inflight.pop(k))

    async def follow(self, key: str) -> Any:
        """The result of ``key``'s computation in progress; MISSING when there is none, or when
        its leader was cancelled (its caller went away) while we were not: then the caller looks
        again and may lead itself. Cancelling the leader used to raise CancelledError in every
        caller waiting on the key, so one client that disconnected failed all the others."""
        fut = self.inflight.get(key)
        if fut is None:
            return MISSING
        self._counters["coalesced"] += 1
        try:  # shielded: a follower going away must not cancel the leader's computation
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if fut.cancelled() and task is not None and not task.cancelling():
                return MISSING  # the leader went away, not us
            raise

    async def lead(
        self,
        key: str,
        load: Callable[[bool], Awaitable[Any]],
        find: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Compute ``key`` for every caller that joins meanwhile.

        ``load(through)`` calls the loader and stores its value (``through``: write it to the
        shared tiers before returning, so waiters elsewhere see it when the lock goes);
        ``find()`` looks the key up in the shared tiers (MISSING on a miss).
        """
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(consume_outcome)  # its callers re-raise it
        self.inflight[key] = fut
        try:
            value = await self._locked(key, load, find)
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
            if self.inflight.get(key) is fut:
                del self.inflight[key]
            self.retired.discard(fut)

    async def _locked(
        self,
        key: str,
        load: Callable[[bool], Awaitable[Any]],
        find: Callable[[], Awaitable[Any]],
    ) -> Any:
        coord = self._coord
        if coord is None:
            return await load(False)
        deadline = time.monotonic() + self.lock_wait
        delay = self.lock_poll
        waited = False
        while True:
            try:
                token = await coord.acquire_lock(key, self.lock_ttl)
            except Exception as exc:  # Redis down: single-flight is per process only for now
                log.debug("lock unavailable for %r: %s", key, exc)
                return await load(False)
            if token is not None:
                self._counters["lock_acquired"] += 1
                try:
                    if waited:  # the holder may have finished just before we got the lock
                        found = await find()
                        if found is not MISSING:
                            return found
                    # Write through while holding the lock, so waiters elsewhere find the value
                    # in the shared tier as soon as the lock is gone (even under write="behind").
                    return await load(True)
                finally:
                    with contextlib.suppress(Exception):
                        await coord.release_lock(key, token)
            if not waited:
                self._counters["lock_waited"] += 1
                waited = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            found = await find()
            if found is not MISSING:
                return found
            if time.monotonic() >= deadline:
                self._counters["lock_fallbacks"] += 1
                return await load(False)
