"""Invalidation across processes: namespace generations and pub/sub events.

- :class:`Generations`: a counter per namespace. Keys built with it (the Predictor's) all change
  when it is bumped, so every old entry becomes unreachable at once, without a scan. The
  counters live in every :class:`~infercache.tiers.base.GenerationStore` (Redis for sharing,
  the SQL tier for durability): loading takes the maximum and repairs stores that lag behind,
  a bump advances all of them, so a Redis restarted empty can never send a namespace back to a
  generation whose entries still sit in the durable tier.
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

from infercache.tiers.base import Coordinator, GenerationStore

__all__ = ["EventBus", "Generations"]

log = logging.getLogger("infercache.multilevel")


class Generations:
    """Namespace generations, known locally and kept in every store (see module docstring)."""

    def __init__(self, stores: Sequence[GenerationStore]) -> None:
        self.stores = list(stores)
        self.current: dict[str, int] = {}

    def get(self, namespace: str) -> int:
        return self.current.get(namespace, 0)

    def observe(self, namespace: str, gen: int) -> None:
        """Learn of a generation (from an event): generations only move forward."""
        self.current[namespace] = max(self.current.get(namespace, 0), gen)

    async def record(self, namespace: str, gen: int) -> None:
        """Keep a generation learned from another process's event in our own stores too: the
        durable one may be this process's private SQLite file, which the bumping process never
        wrote. Else, after Redis restarted empty, a restart of this process read the old
        generation back from its file and served entries the bump had retired."""
        for store in self.stores:
            try:
                await store.raise_generation(namespace, gen)
            except Exception as exc:
                log.debug(
                    "generation of %r not recorded in %s: %s", namespace, _store_name(store), exc
                )

    async def load(self) -> dict[str, int]:
        """Take the maximum of every store's generations (and ours), then repair stores that
        lag behind it (a Redis restarted empty, a bump made while a store was down). Returns
        the generations some store lagged behind, for the caller to announce: a process that
        read a lagging store before this repair would otherwise keep the old one for good."""
        stores = self.stores
        if not stores:
            return {}
        reads = await asyncio.gather(
            *(s.read_generations() for s in stores), return_exceptions=True
        )
        merged = dict(self.current)
        answered: list[tuple[GenerationStore, dict[str, int]]] = []
        for store, got in zip(stores, reads, strict=True):
            if isinstance(got, BaseException):
                log.debug("generations not loaded from %s: %s", _store_name(store), got)
                continue
            answered.append((store, got))
            for ns, gen in got.items():
                merged[ns] = max(merged.get(ns, 0), gen)
        self.current = merged
        repaired: dict[str, int] = {}
        for store, got in answered:
            for ns, gen in merged.items():
                if got.get(ns, 0) < gen:
                    repaired[ns] = gen
                    try:
                        await store.raise_generation(ns, gen)
                    except Exception as exc:
                        log.debug("generation of %r not repaired: %s", ns, exc)
                        break
        return repaired

    async def bump(self, namespace: str) -> int:
        """Advance ``namespace`` past every generation any store (or this process) has seen.

        Each store advances atomically to ``max(its own + 1, what the previous store gave)``,
        so the result is new everywhere; stores left behind by a later one are raised to it.
        """
        gen = self.get(namespace) + 1
        reached: list[tuple[GenerationStore, int]] = []
        for store in self.stores:
            try:
                got = await store.advance_generation(namespace, gen)
            except Exception as exc:  # store down: the others (or a later load) carry it
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
        self.observe(namespace, gen)
        return self.get(namespace)


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
