"""Invalidation across processes: namespace generations and pub/sub events.

- :class:`Generations`: a counter per namespace. Keys built with it (the Predictor's) all change
  when it is bumped, so every old entry becomes unreachable at once, without a scan. The
  counters live in every :class:`~infercache.tiers.base.GenerationStore` (Redis for sharing,
  the SQL tier for durability): loading takes the maximum and repairs stores that lag behind,
  a bump advances all of them, so a Redis restarted empty can never send a namespace back to a
  generation whose entries still sit in the durable tier. A write a store missed because it was
  down (a bump, a repair, a generation learned by event) is *owed* to it and stored there once it
  answers again, and a store that could not be read at load is read then: else PostgreSQL,
  down during a bump that reached Redis only, kept the old generation for good, and once Redis
  restarted empty every process went back to it and served the entries the bump had retired.
- :class:`EventBus`: deletes, clears and bumps published on the coordinator's pub/sub, so every
  other process drops its L1 copies (our own events are skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from infercache.aio import ensure_task, stop_task
from infercache.tiers.base import Coordinator, GenerationStore

__all__ = ["EventBus", "Generations"]

log = logging.getLogger("infercache.multilevel")


class Generations:
    """Namespace generations, known locally and kept in every store (see module docstring).

    What a store missed while it was down is kept in :attr:`owed` (per store, the generation it
    must be raised to; ``raise_generation`` is idempotent, so paying twice, or after another
    process did, is harmless) and in the set of stores not read at load. A background task tries
    again, with backoff from ``retry_delay`` to ``retry_max_delay`` seconds, until every store
    has answered: the store may come back while this process runs on without ever bumping
    again. An attempt on a store whose circuit is open fails at once, without a round trip.
    :meth:`close` tries once more and logs what is still owed. Every process that used or
    learned a generation owes it, so the one still running when the store returns pays for one
    that is gone; if none is left, the next process to start finds it in Redis and repairs.
    ``announce`` (optional): told of the generations a late read found some store lagging
    behind, like :meth:`load`'s result.
    """

    def __init__(
        self,
        stores: Sequence[GenerationStore],
        *,
        announce: Callable[[dict[str, int]], Awaitable[None]] | None = None,
        retry_delay: float = 0.1,
        retry_max_delay: float = 1.0,
    ) -> None:
        self.stores = list(stores)
        self.current: dict[str, int] = {}
        #: per store (its index in ``stores``): namespace -> generation it missed
        self.owed: dict[int, dict[str, int]] = {}
        self._unread: set[int] = set()  # stores that were down when we last loaded
        self._announce = announce
        self.retry_delay = retry_delay
        self.retry_max_delay = retry_max_delay
        self._repairer: asyncio.Task[None] | None = None
        self._closed = False

    def get(self, namespace: str) -> int:
        return self.current.get(namespace, 0)

    def observe(self, namespace: str, gen: int) -> None:
        """Learn of a generation (from an event): generations only move forward."""
        self.current[namespace] = max(self.current.get(namespace, 0), gen)

    async def record(self, namespace: str, gen: int) -> None:
        """Keep a generation learned from another process's event in our own stores too: the
        durable one may be this process's private SQLite file, which the bumping process never
        wrote. Else, after Redis restarted empty, a restart of this process read the old
        generation back from its file and served entries the bump had retired. A store that is
        down owes it (the bumping process may be gone before the store is back)."""
        for i, store in enumerate(self.stores):
            try:
                self._paid(i, namespace, await store.raise_generation(namespace, gen))
            except Exception as exc:
                log.debug(
                    "generation of %r not recorded in %s: %s", namespace, _store_name(store), exc
                )
                self._owe(i, namespace, gen)

    async def load(self) -> dict[str, int]:
        """Take the maximum of every store's generations (and ours), then repair stores that
        lag behind it (a Redis restarted empty, a bump made while a store was down). Returns
        the generations some store lagged behind, for the caller to announce: a process that
        read a lagging store before this repair would otherwise keep the old one for good.
        A store that does not answer is read again once it does: it may hold a later
        generation than the others, and once back it would serve us the entries that one
        retired."""
        stores = self.stores
        if not stores:
            return {}
        reads = await asyncio.gather(
            *(s.read_generations() for s in stores), return_exceptions=True
        )
        merged = dict(self.current)
        answered: list[tuple[int, GenerationStore, dict[str, int]]] = []
        for i, (store, got) in enumerate(zip(stores, reads, strict=True)):
            if isinstance(got, BaseException):
                log.debug("generations not loaded from %s: %s", _store_name(store), got)
                self._unread.add(i)
                continue
            self._unread.discard(i)
            answered.append((i, store, got))
            for ns, gen in got.items():
                merged[ns] = max(merged.get(ns, 0), gen)
        self.current = merged
        repaired: dict[str, int] = {}
        for i, store, got in answered:
            for ns in list(self.owed.get(i, ())):
                self._paid(i, ns, got.get(ns, 0))
            down = False
            for ns, gen in merged.items():
                if got.get(ns, 0) < gen:
                    repaired[ns] = gen
                    if down:  # failed just now: owe the rest without waiting on it again
                        self._owe(i, ns, gen)
                        continue
                    try:
                        self._paid(i, ns, await store.raise_generation(ns, gen))
                    except Exception as exc:
                        log.debug("generation of %r not repaired: %s", ns, exc)
                        self._owe(i, ns, gen)
                        down = True
        if self._unread:
            self._start_repairer()
        return repaired

    async def bump(self, namespace: str) -> int:
        """Advance ``namespace`` past every generation any store (or this process) has seen.

        Each store advances atomically to ``max(its own + 1, what the previous store gave)``,
        so the result is new everywhere; stores left behind by a later one are raised to it,
        and a store that is down owes it.
        """
        gen = self.get(namespace) + 1
        reached: list[tuple[int, GenerationStore, int]] = []
        missed: list[int] = []
        for i, store in enumerate(self.stores):
            try:
                got = await store.advance_generation(namespace, gen)
            except Exception as exc:  # store down: owed to it, stored there once it answers
                log.warning(
                    "generation of %r not stored in %s (stored there once it answers): %s",
                    namespace,
                    _store_name(store),
                    exc,
                )
                missed.append(i)
                continue
            gen = max(gen, got)
            reached.append((i, store, got))
        for i, store, got in reached:
            if got >= gen:
                self._paid(i, namespace, got)
                continue
            try:
                self._paid(i, namespace, await store.raise_generation(namespace, gen))
            except Exception:
                self._owe(i, namespace, gen)
        for i in missed:
            self._owe(i, namespace, gen)
        self.observe(namespace, gen)
        return self.get(namespace)

    async def repair(self) -> dict[str, int]:
        """One attempt at what the stores missed: read the stores not read at load (a
        :meth:`load`, whose result it returns), then raise each store to what it owes. A store
        that fails is left for the next attempt."""
        repaired = await self.load() if self._unread else {}
        for i, debts in list(self.owed.items()):
            store = self.stores[i]
            for ns, gen in list(debts.items()):
                try:
                    self._paid(i, ns, await store.raise_generation(ns, gen))
                except Exception as exc:
                    log.debug(
                        "generation of %r still not stored in %s: %s", ns, _store_name(store), exc
                    )
                    break  # still down: the rest waits for the next attempt
        return repaired

    async def close(self) -> None:
        """Stop the background repairs, try once more, and log what a store still misses.

        Call it before the stores are closed."""
        self._closed = True
        task, self._repairer = self._repairer, None
        await stop_task(task)
        if self.owed:
            with contextlib.suppress(Exception):
                await self.repair()
        for i, debts in self.owed.items():
            for ns, gen in debts.items():
                log.warning(
                    "generation %d of %r was never stored in %s (down): until a process that "
                    "knows it stores it there, a Redis restarted empty would bring back the "
                    "entries it retired",
                    gen,
                    ns,
                    _store_name(self.stores[i]),
                )

    def _owe(self, i: int, namespace: str, gen: int) -> None:
        debts = self.owed.setdefault(i, {})
        debts[namespace] = max(debts.get(namespace, 0), gen)
        self._start_repairer()

    def _paid(self, i: int, namespace: str, stored: int) -> None:
        """Store ``i`` now holds ``stored`` for ``namespace``: settle what that covers."""
        debts = self.owed.get(i)
        if debts is not None and debts.get(namespace, stored + 1) <= stored:
            del debts[namespace]
            if not debts:
                del self.owed[i]

    def _start_repairer(self) -> None:
        """Start the background repairs, unless they run already (or we are closed)."""
        if not self._closed:
            self._repairer = ensure_task(
                self._repairer, self._repair_loop, "infercache-generations"
            )

    async def _repair_loop(self) -> None:
        delay = self.retry_delay
        while self.owed or self._unread:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max_delay)
            try:
                repaired = await self.repair()
                if repaired and self._announce is not None:
                    await self._announce(repaired)
            except Exception as exc:  # never let the task die with debts left
                log.debug("generation repair failed: %s", exc)


class EventBus:
    """Invalidation events on the coordinator's pub/sub channel.

    Events are small JSON objects: ``{"t": "del", "k": [keys]}``, ``{"t": "clear"}``,
    ``{"t": "gen", "ns": namespace, "g": generation}``, each tagged with this process's origin
    so it ignores its own. ``counters`` (shared with ``stats()``): events_sent,
    events_received, event_errors, events_unsent (publish failed: the transport was down).
    """

    def __init__(
        self,
        coordinator: Coordinator | None,
        *,
        enabled: bool,
        channel: str | None,
        counters: dict[str, int],
    ) -> None:
        self._coord = coordinator
        self.enabled = enabled and coordinator is not None
        self._channel = channel
        self._counters = counters
        self.origin = secrets.token_hex(8)
        self._stop: Callable[[], Awaitable[None]] | None = None

    @property
    def channel(self) -> str:
        if self._channel is not None:
            return self._channel
        assert self._coord is not None
        channel = getattr(self._coord, "channel", None)
        if callable(channel):
            return str(channel("events"))
        return f"__infercache__:{self._coord.namespace}:events"

    async def start(
        self,
        on_event: Callable[[dict[str, Any]], None],
        on_resync: Callable[[], Awaitable[None]],
    ) -> None:
        """Subscribe: ``on_event`` gets other processes' events; ``on_resync`` runs after a
        reconnection (events sent meanwhile are lost, so assume anything changed)."""
        if not self.enabled or self._coord is None:
            return

        def receive(data: bytes) -> None:
            event = self._decode(data)
            if event is not None:
                on_event(event)

        try:
            self._stop = await self._coord.subscribe(self.channel, receive, on_resync)
        except Exception as exc:  # a coordinator that cannot subscribe: no events
            log.warning("invalidation subscriber not started: %s", exc)

    async def stop(self) -> None:
        if self._stop is not None:
            with contextlib.suppress(Exception):
                await self._stop()
            self._stop = None

    async def publish(self, event: dict[str, Any]) -> None:
        if not self.enabled or self._coord is None:
            return
        event["o"] = self.origin
        try:
            await self._coord.publish(self.channel, json.dumps(event).encode())
            self._counters["events_sent"] += 1
        except Exception as exc:
            self._counters["event_errors"] += 1
            self._counters["events_unsent"] += 1
            log.warning("invalidation event not published: %s", exc)

    def _decode(self, data: bytes) -> dict[str, Any] | None:
        """Another process's event, or None (ours, or unreadable: counted)."""
        try:
            event = json.loads(data)
        except ValueError:
            self._counters["event_errors"] += 1
            return None
        if not isinstance(event, dict) or event.get("o") == self.origin:
            return None
        self._counters["events_received"] += 1
        return event


def _store_name(store: Any) -> str:
    return str(getattr(store, "name", type(store).__name__))
