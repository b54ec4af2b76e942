"""MemoryCache: the in-process L1 tier (synchronous, thread-safe).

It sits on the request's hot path, so a hit is kept to a dict lookup, an expiry check and at most
one C-level policy call under a single ``threading.Lock``. Eviction policies live in
``_policies.py``; this module owns values, TTLs, weights and statistics.

Expiry is lazy plus amortised: an expired entry is never returned (every read checks it), and each
``set`` reclaims up to a few expired entries from the front of per-TTL FIFO queues of expiry
records. Entries written with the same TTL expire in the order they were written, so one queue per
distinct TTL finds them without looking at any live entry. No operation scans the cache (the
seed's ``set`` did: O(n) per write).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from infercache.errors import ConfigError
from infercache.tiers._policies import NO_KEY, POLICIES, Entry
from infercache.tiers.base import validate_ttl

__all__ = ["MemoryCache", "default_weigher"]

_MISSING = object()


def default_weigher(value: Any) -> int:
    """Approximate size of ``value`` in bytes, in O(1).

    - ``bytes``/``bytearray``/``str``: ``len()`` (characters for ``str``; exact for ASCII).
    - anything with an integer ``nbytes`` (numpy arrays, torch tensors, memoryview): ``nbytes``,
      the payload, not the few hundred bytes of header; for a view, its base's (what it keeps
      alive).
    - ``list``/``tuple``: ``sys.getsizeof`` of the container plus ``len() x`` the size of its
      first item; ``dict``: the same with its first key and value. An estimate, on purpose: exact
      deep sizing costs O(size of the value) on every ``set``.
    - anything else: ``sys.getsizeof``.

    Pass ``weigher=`` to :class:`MemoryCache` for an exact measure (say, the encoded length).
    """
    tp = type(value)
    if tp is bytes or tp is str or tp is bytearray:
        return len(value)
    if tp is list or tp is tuple:
        size = sys.getsizeof(value)
        if value:
            size += len(value) * sys.getsizeof(value[0])
        return size
    if tp is dict:
        size = sys.getsizeof(value)
        if value:
            k, v = next(iter(value.items()))
            size += len(value) * (sys.getsizeof(k) + sys.getsizeof(v))
        return size
    if tp is int or tp is float or tp is bool or value is None:
        return sys.getsizeof(value)
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        # a numpy view keeps its whole base array alive: weigh what it holds, not what it shows
        # (a 4-element slice of a million-element array weighed 32 bytes and held 8 MB)
        base = getattr(value, "base", None)
        base_nbytes = getattr(base, "nbytes", None)
        if isinstance(base_nbytes, int) and base_nbytes > nbytes:
            return base_nbytes
        return nbytes
    return sys.getsizeof(value)


class MemoryCache:
    """Bounded in-process cache with TTLs and a scan-resistant eviction policy.

    Args:
        max_size: most entries held.
        ttl: default time to live in seconds for ``set`` without ``ttl``; ``None``: no expiry.
        max_bytes: optional bound on the summed weights; an item heavier than this is not stored.
        policy: ``"tinylfu"`` (default; W-TinyLFU, keeps frequent keys through scans), ``"lru"``
            or ``"lfu"``.
        weigher: ``value -> bytes``; default :func:`default_weigher`.
        timer: clock in seconds (monotonic); injected so tests drive TTLs without sleeping.
        name: tier name reported in ``stats()``.

    Keys are any hashable (normally a ``fingerprint`` str). ``None`` can be stored, but ``get``
    then cannot tell it from a miss; ``get_with_ttl`` can. ``len()`` counts entries not yet
    removed, which may include expired ones that no read or cleanup has reached yet.
    """

    def __init__(
        self,
        max_size: int = 10_000,
        ttl: float | None = None,
        *,
        max_bytes: int | None = None,
        policy: str = "tinylfu",
        weigher: Callable[[Any], int] | None = None,
        timer: Callable[[], float] = time.monotonic,
        name: str = "memory",
    ) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ConfigError(f"max_size must be an int >= 1, got {max_size!r}")
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1
        ):
            raise ConfigError(f"max_bytes must be None or an int >= 1, got {max_bytes!r}")
        factory = POLICIES.get(policy)
        if factory is None:
            raise ConfigError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
        self.name = name
        self.max_size = max_size
        self.max_bytes = max_bytes
        self.default_ttl: float | None = validate_ttl(ttl)
        self.policy = policy
        self._weigher = weigher or default_weigher
        self._timer = timer
        self._lock = threading.Lock()
        self._data: dict[Hashable, Entry] = {}
        self._policy = factory(self._data, max_size)
        self._touch: Callable[[Hashable], None] | None = self._policy.touch
        # ttl -> (expire_at, key, entry) records in write order, which for one TTL on a monotonic
        # clock is expiry order; the ring visits the queues in turn (see _reap).
        self._ttlq: dict[float, deque[tuple[float, Hashable, Entry]]] = {}
        self._ring: deque[float] = deque()
        self._qlimit = 2 * max_size + 64
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._sets = 0
        self._evictions = 0
        self._expirations = 0
        self._rejected = 0

    # -- reads ------------------------------------------------------------------------------

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value for ``key``, or ``default`` if absent or expired. Counts a hit or a miss."""
        # acquire/release in try/finally, not ``with``: measured 1.2-1.6x faster per call on
        # CPython 3.11, and this is the request hot path.
        lock = self._lock
        lock.acquire()
        try:
            e = self._data.get(key)
            if e is not None:
                exp = e[1]
                if exp is None or self._timer() < exp:
                    touch = self._touch
                    if touch is None:
                        e[4] += 1  # tinylfu's reference bit and pending frequency
                    else:
                        touch(key)  # lru: OrderedDict.move_to_end
                    self._hits += 1
                    return e[0]
                self._expire(key, e)
            self._misses += 1
            return default
        finally:
            lock.release()

    def get_with_ttl(self, key: Hashable) -> tuple[Any, float | None] | None:
        """``(value, remaining seconds or None)`` if live, else ``None``; counts like ``get``."""
        with self._lock:
            e = self._data.get(key)
            if e is not None:
                exp = e[1]
                remaining = None
                if exp is not None:
                    remaining = exp - self._timer()
                if remaining is None or remaining > 0:
                    self._hit(key, e)
                    return e[0], remaining
                self._expire(key, e)
            self._misses += 1
            return None

    def get_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Any]:
        """The live entries among ``keys`` (hits only), under one lock acquisition."""
        out: dict[Hashable, Any] = {}
        with self._lock:
            data = self._data
            now: float | None = None
            for key in keys:
                e = data.get(key)
                if e is not None:
                    exp = e[1]
                    if exp is not None and now is None:
                        now = self._timer()
                    if exp is None or now < exp:
                        self._hit(key, e)
                        out[key] = e[0]
                        continue
                    self._expire(key, e)
                self._misses += 1
        return out

    def ttl(self, key: Hashable) -> float | None:
        """Remaining seconds for ``key``; ``None`` if it never expires. KeyError if absent."""
        with self._lock:
            e = self._data.get(key)
            if e is not None:
                exp = e[1]
                if exp is None:
                    return None
                remaining: float = exp - self._timer()
                if remaining > 0:
                    return remaining
                self._expire(key, e)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` holds a live entry; not counted as a hit or miss."""
        with self._lock:
            e = self._data.get(key)
            if e is None:
                return False
            exp = e[1]
            if exp is None or self._timer() < exp:
                return True
            self._expire(key, e)
            return False

    def __len__(self) -> int:
        return len(self._data)

    # -- writes -----------------------------------------------------------------------------

    def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Store ``value``; ``ttl`` (seconds, > 0) overrides the default TTL for this entry."""
        ttl = self.default_ttl if ttl is None else validate_ttl(ttl)
        weight = self._weigher(value)  # user code: outside the lock
        lock = self._lock
        lock.acquire()
        try:
            self._store(key, value, ttl, weight)
        finally:
            lock.release()

    def set_many(self, mapping: Mapping[Hashable, Any], ttl: float | None = None) -> None:
        """``set`` for each item, weighed outside the lock and stored under one acquisition."""
        ttl = self.default_ttl if ttl is None else validate_ttl(ttl)
        weigh = self._weigher
        items = [(k, v, weigh(v)) for k, v in mapping.items()]
        with self._lock:
            for key, value, weight in items:
                self._store(key, value, ttl, weight)

    def delete(self, key: Hashable) -> bool:
        """Remove ``key``; True if a live entry was removed."""
        with self._lock:
            e = self._data.get(key)
            if e is None:
                return False
            exp = e[1]
            if exp is not None and self._timer() >= exp:
                self._expire(key, e)
                return False
            self._remove(key, e)
            return True

    def clear(self) -> None:
        """Remove every entry. Statistics counters are kept (they describe the cache's life)."""
        with self._lock:
            self._data.clear()
            self._policy.clear()
            self._ttlq.clear()
            self._ring.clear()
            self._bytes = 0

    def stats(self) -> dict[str, Any]:
        """Counters and sizes. ``hits + misses`` equals the keys looked up by the get methods."""
        with self._lock:
            hits, misses = self._hits, self._misses
            return {
                "name": self.name,
                "policy": self.policy,
                "hits": hits,
                "misses": misses,
                "hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
                "sets": self._sets,
                "evictions": self._evictions,
                "expirations": self._expirations,
                "rejected": self._rejected,
                "size": len(self._data),
                "bytes": self._bytes,
                "max_size": self.max_size,
                "max_bytes": self.max_bytes,
            }

    # -- internals (caller holds the lock) ----------------------------------------------------

    def _hit(self, key: Hashable, e: Entry) -> None:
        touch = self._touch
        if touch is None:
            e[4] += 1
        else:
            touch(key)
        self._hits += 1

    def _store(self, key: Hashable, value: Any, ttl: float | None, weight: int) -> None:
        data = self._data
        self._sets += 1
        expire: float | None = None
        if ttl is not None:
            now = self._timer()
            expire = now + ttl
            self._reap(now)
        elif self._ring:
            self._reap(self._timer())
        max_bytes = self.max_bytes
        old = data.get(key)
        if max_bytes is not None and weight > max_bytes:
            # Too big to ever fit; the old value must not outlive the write that replaced it.
            self._rejected += 1
            if old is not None:
                self._remove(key, old)
            return
        if old is not None:
            self._bytes += weight - old[3]
            old[0] = value
            old[1] = expire
            old[2] = ttl
            old[3] = weight
            if ttl is not None:
                self._track(key, old, expire, ttl)  # type: ignore[arg-type]
            self._policy.update(key, old)
        else:
            e: Entry = [value, expire, ttl, weight, 0, 0, 0]
            data[key] = e
            self._bytes += weight
            if ttl is not None:
                self._track(key, e, expire, ttl)  # type: ignore[arg-type]
            victim = self._policy.insert(key, e)
            if victim is not NO_KEY:  # _drop, inlined: this runs on every write to a full cache
                self._bytes -= data.pop(victim)[3]
                self._evictions += 1
        if max_bytes is not None:
            while self._bytes > max_bytes:
                self._drop(self._policy.evict())

    def _track(self, key: Hashable, e: Entry, expire: float, ttl: float) -> None:
        """Queue an expiry record. Records are never searched or removed early: a deleted,
        evicted or rewritten entry leaves a stale record that _reap skips (O(1) per write)."""
        q = self._ttlq.get(ttl)
        if q is None:
            self._ttlq[ttl] = q = deque()
            self._ring.append(ttl)
        q.append((expire, key, e))
        if len(q) > self._qlimit:
            # Mostly stale records (many writes per TTL period). Dropping the oldest only means
            # its entry, if still live, is not reclaimed early: reads still check its expiry and
            # the policy still evicts it.
            q.popleft()

    def _reap(self, now: float) -> None:
        """Pop up to 4 due records from each of up to 2 TTL queues (round robin), expiring the
        entries that are still the ones recorded. O(1) per call, amortised over writes."""
        ring = self._ring
        queues = self._ttlq
        data = self._data
        for _ in range(min(2, len(ring))):
            ttl = ring.popleft()
            q = queues[ttl]
            for _ in range(4):
                if not q:
                    break
                expire, key, e = q[0]
                if expire > now:
                    break
                q.popleft()
                if e[1] == expire and data.get(key) is e:
                    self._expire(key, e)
            if q:
                ring.append(ttl)
            else:
                del queues[ttl]

    def _unlink(self, key: Hashable, e: Entry) -> None:
        """Forget ``key`` in the cache's own structures (not the policy's)."""
        del self._data[key]
        self._bytes -= e[3]

    def _remove(self, key: Hashable, e: Entry) -> None:
        self._policy.remove(key, e)
        self._unlink(key, e)

    def _expire(self, key: Hashable, e: Entry) -> None:
        self._remove(key, e)
        self._expirations += 1

    def _drop(self, key: Hashable) -> None:
        """The policy already forgot ``key``; forget it here and count the eviction."""
        self._unlink(key, self._data[key])
        self._evictions += 1

    def __repr__(self) -> str:
        return (
            f"MemoryCache(name={self.name!r}, policy={self.policy!r}, size={len(self._data)}, "
            f"max_size={self.max_size}, max_bytes={self.max_bytes})"
        )
