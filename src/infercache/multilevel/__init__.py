"""MultiLevelCache: tiers fastest first, a write policy, read-through, refresh-ahead, invalidation.

The user's tutorial chained an in-memory cache, Redis and a dict "database", one GET per key, and
promoted hits with a fresh full TTL (so a promoted copy could outlive the original). This package
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
  to the caller; its circuit breaker lets it back in once the server returns. Write-behind
  entries a down tier missed are kept for it and retried with backoff, so a brief outage loses
  nothing.

Modules, each one concept, dependencies pointing down (each imports only those above it):

- ``retry``: RetryBuffer, the writes a down tier missed, kept for retries
- ``slots``: Slot (a tier below L1 and its counters), the sync-tier adapter, calls on tiers
- ``lookup``: batched reads through the slower tiers, promotion with the remaining TTL
- ``writebehind``: the write-behind queue, its flusher, per-tier retries
- ``singleflight``: one loader call per key, in process and across processes (Redis lock)
- ``refresh``: refresh-ahead and the background tasks it runs
- ``invalidation``: namespace generations (Redis + durable SQL) and pub/sub events
- ``cache``: MultiLevelCache, the facade

``from infercache.multilevel import MultiLevelCache`` is the public import.
"""

from infercache.multilevel.cache import MultiLevelCache, QueueFull, WritePolicy
from infercache.multilevel.singleflight import Loader

__all__ = ["Loader", "MultiLevelCache", "QueueFull", "WritePolicy"]
