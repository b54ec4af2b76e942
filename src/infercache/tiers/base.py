"""The interface every remote cache tier implements, and the small helpers they share.

MultiLevelCache talks to tiers only through :class:`AsyncTier`, so a tier can be swapped (Redis,
SQLite, PostgreSQL, something new) without touching the policy code. Tiers that can also
coordinate processes (locks, broadcast, shared counters: Redis) implement :class:`Coordinator`
as well; MultiLevelCache finds one by its methods, so importing this module never imports redis.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

from infercache.errors import ConfigError, DecodeError, EncodeError, TierError

__all__ = [
    "MISSING",
    "AsyncTier",
    "Coordinator",
    "GenerationStore",
    "LatencyWindow",
    "TierMetrics",
    "consume_outcome",
    "escape_glob",
    "key_type_error",
    "validate_ttl",
]


log = logging.getLogger("infercache.tiers")

T = TypeVar("T")


class _Missing:
    """Sentinel for "no value" where ``None`` could be ambiguous (``get(key, default)``)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()


@runtime_checkable
class AsyncTier(Protocol):
    """A slower, shared cache tier (the contract in docs/architecture.md).

    Misses are ``None``/absence; failures raise :class:`infercache.errors.TierError` (or
    ``TierUnavailable`` when a circuit breaker is open); corrupt stored bytes are a miss.
    """

    name: str

    async def get(self, key: str) -> Any | None: ...
    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]: ...
    async def get_many_with_ttl(
        self, keys: Sequence[str]
    ) -> dict[str, tuple[Any, float | None]]: ...
    async def set(self, key: str, value: Any, ttl: float | None = None) -> None: ...
    async def set_many(self, mapping: Mapping[str, Any], ttl: float | None = None) -> None: ...
    async def delete(self, key: str) -> bool: ...
    async def delete_many(self, keys: Sequence[str]) -> int: ...
    async def exists(self, key: str) -> bool: ...
    async def ttl(self, key: str) -> float | None: ...
    async def expire(self, key: str, ttl: float) -> bool: ...
    async def clear(self) -> int: ...
    async def stats(self) -> dict[str, Any]: ...
    async def close(self) -> None: ...


@runtime_checkable
class Coordinator(Protocol):
    """What a tier offers to coordinate processes: short locks, broadcast, shared counters.

    RedisCache implements it; MultiLevelCache uses the first tier that does for cross-process
    single-flight, invalidation events and namespace generations.
    """

    namespace: str

    async def acquire_lock(self, name: str, ttl: float) -> str | None: ...
    async def release_lock(self, name: str, token: str) -> bool: ...
    async def lock_held(self, name: str) -> bool: ...
    async def publish(self, channel: str, message: bytes) -> int: ...
    async def subscribe(
        self,
        channel: str,
        on_message: Callable[[bytes], None],
        on_reconnect: Callable[[], Awaitable[None] | None] | None = None,
    ) -> Callable[[], Awaitable[None]]: ...
    async def incr_counter(self, hash_name: str, field: str) -> int: ...
    async def read_counters(self, hash_name: str) -> dict[str, int]: ...


@runtime_checkable
class GenerationStore(Protocol):
    """Shared, monotonic namespace generations (the counters behind ``invalidate(namespace=)``).

    RedisCache keeps them beside its coordination keys, SQLCache in a small table next to its
    entries, so they survive a Redis restart without persistence. MultiLevelCache reads every
    store and takes the maximum, and writes each bump to all of them. Both writes are atomic
    read-modify-writes, so concurrent bumps in several processes never go backwards.
    """

    async def read_generations(self) -> dict[str, int]: ...
    async def advance_generation(self, name: str, floor: int = 0) -> int:
        """Set the generation to ``max(current + 1, floor)`` and return it."""
        ...

    async def raise_generation(self, name: str, value: int) -> int:
        """Set the generation to ``max(current, value)`` and return it."""
        ...


def key_type_error(owner: str, key: object) -> TypeError:
    """The error for a key that is no str, ``owner`` naming who refuses it ("SQLCache", ...):
    every remote tier refuses one by name, rather than let a lookup answer a silent miss."""
    return TypeError(f"{owner} keys must be str, got {type(key).__name__}: {key!r:.60}")


def validate_ttl(ttl: float | None, *, what: str = "ttl") -> float | None:
    """Return ``ttl`` as a float, or raise ConfigError for values a tier cannot honour.

    A TTL of 0 or below, NaN or infinity would mean "expire now" on one tier and "never" on
    another (Redis rejects PX 0, SQLite would store it happily); rejecting it keeps tiers in step.
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise ConfigError(f"{what} must be a number of seconds or None, got {ttl!r}")
    value = float(ttl)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a positive finite number of seconds, got {ttl!r}")
    return value


def ttl_ms(ttl: float) -> int:
    """Seconds to whole milliseconds for Redis PX, never rounding a positive TTL down to 0."""
    return max(1, math.ceil(ttl * 1000))


def encode_values(
    codec: Any, items: Mapping[str, tuple[Any, float | None]]
) -> tuple[list[tuple[str, bytes, float | None]], EncodeError | None]:
    """``(key, encoded value, ttl)`` for each pair (None values skipped: None means a miss), and
    the EncodeError the tier raises *after* writing those: a value the codec cannot hold is left
    out instead of failing the whole batch. One model output of an odd type (a datetime, say)
    used to fail every write-behind batch queued behind it, so the SQLite L3 stored nothing
    more for the life of the process."""
    rows: list[tuple[str, bytes, float | None]] = []
    bad: list[str] = []
    first: EncodeError | None = None
    for k, (v, t) in items.items():
        if v is None:
            continue
        try:
            rows.append((k, codec.encode(v), t))
        except EncodeError as exc:
            bad.append(k)
            first = first or exc
    if first is None:
        return rows, None
    named = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    err = EncodeError(
        f"{len(bad)} of {len(bad) + len(rows)} values cannot be encoded and were not written "
        f"({first}); keys: {named}"
    )
    err.keys = tuple(bad)
    return rows, err


def consume_outcome(fut: asyncio.Future[Any]) -> None:
    """A done-callback marking a future's exception as retrieved, for a future nobody awaits
    (or whose exception is re-raised elsewhere): asyncio would log it as never retrieved."""
    if not fut.cancelled():
        fut.exception()


def escape_glob(text: str) -> str:
    """Escape Redis MATCH glob characters so a namespace like ``a*`` matches only itself."""
    out = []
    for ch in text:
        if ch in "*?[]\\":
            out.append("\\")
        out.append(ch)
    return "".join(out)


class LatencyWindow:
    """The last ``size`` latencies of one operation, for the percentiles in ``stats()``.

    A bounded window instead of a histogram: constant memory, no dependency, and stats() is
    rare enough that sorting a few thousand floats there costs nothing on the hot path.
    """

    __slots__ = ("_samples", "count")

    def __init__(self, size: int = 2048) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self.count = 0

    def record(self, seconds: float) -> None:
        self._samples.append(seconds)
        self.count += 1

    def time(self) -> _Timer:
        return _Timer(self)

    def summary(self) -> dict[str, float | int]:
        """Count and p50/p95/p99/max in milliseconds over the window (zeros when empty)."""
        data = sorted(self._samples)
        if not data:
            return {"count": self.count, "p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}

        def pct(p: float) -> float:
            idx = min(len(data) - 1, max(0, math.ceil(p * len(data)) - 1))
            return round(data[idx] * 1000, 4)

        return {
            "count": self.count,
            "p50_ms": pct(0.50),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "max_ms": round(data[-1] * 1000, 4),
        }


class TierMetrics:
    """The counters every remote tier reports in ``stats()``, and the bookkeeping of a call."""

    __slots__ = ("corrupt", "deletes", "errors", "hits", "lat", "misses", "sets")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.corrupt = 0
        self.sets = 0
        self.deletes = 0
        self.lat = LatencyWindow()

    def lookups(self, asked: int, found: int) -> None:
        self.hits += found
        self.misses += asked - found

    async def timed(self, call: Awaitable[T]) -> T:
        """Await ``call``: its latency is recorded on success, a TierError counted."""
        start = time.perf_counter()
        try:
            result = await call
        except TierError:
            self.errors += 1
            raise
        self.lat.record(time.perf_counter() - start)
        return result

    def decode(self, codec: Any, tier: str, key: str, raw: bytes, corrupt: list[str]) -> Any:
        """``raw`` decoded, or MISSING: undecodable bytes are counted, logged and their key
        added to ``corrupt`` (the tier deletes them: a cache never executes what it reads)."""
        try:
            return codec.decode(raw)
        except DecodeError as exc:
            self.corrupt += 1
            corrupt.append(key)
            log.warning("%s: dropping undecodable value for %r: %s", tier, key, exc)
            return MISSING

    def snapshot(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": self.hits / total if total else 0.0,
            "sets": self.sets,
            "deletes": self.deletes,
            "errors": self.errors,
            "corrupt": self.corrupt,
            "latency": self.lat.summary(),
        }


class _Timer:
    __slots__ = ("_start", "_window")

    def __init__(self, window: LatencyWindow) -> None:
        self._window = window
        self._start = 0.0

    def __enter__(self) -> _Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._window.record(time.perf_counter() - self._start)
