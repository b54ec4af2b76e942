"""Property-based tests of MemoryCache: invariants under random operation sequences.

- For every policy, a stateful machine with a fake clock checks after each step that the bounds
  hold (entries <= max_size, bytes <= max_bytes, the byte count is exact), that a read returns
  only the value last written for that key and never an expired one, and that stats add up.
- For LRU, a reference model (an OrderedDict) predicts the cache's exact contents.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from infercache.tiers.memory import MemoryCache

KEYS = st.sampled_from([f"k{i}" for i in range(12)])
VALUES = st.binary(min_size=0, max_size=40)
TTLS = st.one_of(st.none(), st.floats(min_value=0.5, max_value=20))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CacheInvariants(RuleBasedStateMachine):
    """Random get/set/delete/clock moves against a model of what *may* be cached.

    Eviction may drop any entry, so the model is an upper bound: every value the cache returns
    must be the model's latest value for that key and not expired; entries the model says are
    gone (deleted, overwritten, expired) must never come back.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.cache: MemoryCache | None = None
        self.model: dict[str, tuple[bytes, float | None]] = {}
        self.lookups = 0

    @precondition(lambda self: self.cache is None)
    @rule(
        policy=st.sampled_from(["tinylfu", "lru", "lfu"]),
        max_size=st.integers(1, 8),
        max_bytes=st.one_of(st.none(), st.integers(1, 120)),
        ttl=TTLS,
    )
    def create(self, policy: str, max_size: int, max_bytes: int | None, ttl: float | None) -> None:
        self.cache = MemoryCache(
            max_size, ttl=ttl, max_bytes=max_bytes, policy=policy, timer=self.clock
        )

    def _expired(self, expire: float | None) -> bool:
        return expire is not None and self.clock.now >= expire

    def _check_read(self, key: str, got: Any, hit: bool) -> None:
        if not hit:
            return
        assert key in self.model, f"{key} returned but was never stored or was removed"
        value, expire = self.model[key]
        assert got == value
        assert not self._expired(expire), f"{key} returned after expiry"

    @precondition(lambda self: self.cache is not None)
    @rule(key=KEYS, value=VALUES, ttl=TTLS)
    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        assert self.cache is not None
        self.cache.set(key, value, ttl=ttl)
        eff = ttl if ttl is not None else self.cache.default_ttl
        mb = self.cache.max_bytes
        if mb is not None and len(value) > mb:
            self.model.pop(key, None)
        else:
            self.model[key] = (value, None if eff is None else self.clock.now + eff)

    @precondition(lambda self: self.cache is not None)
    @rule(items=st.dictionaries(KEYS, VALUES, max_size=4))
    def set_many(self, items: dict[str, bytes]) -> None:
        assert self.cache is not None
        self.cache.set_many(items)
        for key, value in items.items():
            eff = self.cache.default_ttl
            mb = self.cache.max_bytes
            if mb is not None and len(value) > mb:
                self.model.pop(key, None)
            else:
                self.model[key] = (value, None if eff is None else self.clock.now + eff)

    @precondition(lambda self: self.cache is not None)
    @rule(key=KEYS)
    def get(self, key: str) -> None:
        assert self.cache is not None
        sentinel = object()
        got = self.cache.get(key, sentinel)
        self.lookups += 1
        self._check_read(key, got, got is not sentinel)

    @precondition(lambda self: self.cache is not None)
    @rule(key=KEYS)
    def get_with_ttl(self, key: str) -> None:
        assert self.cache is not None
        got = self.cache.get_with_ttl(key)
        self.lookups += 1
        if got is not None:
            self._check_read(key, got[0], True)
            expire = self.model[key][1]
            if expire is None:
                assert got[1] is None
            else:
                assert got[1] == pytest.approx(expire - self.clock.now)

    @precondition(lambda self: self.cache is not None)
    @rule(keys=st.lists(KEYS, max_size=5))
    def get_many(self, keys: list[str]) -> None:
        assert self.cache is not None
        got = self.cache.get_many(keys)
        self.lookups += len(keys)
        for key, value in got.items():
            self._check_read(key, value, True)

    @precondition(lambda self: self.cache is not None)
    @rule(key=KEYS)
    def contains_and_ttl(self, key: str) -> None:
        assert self.cache is not None
        if key in self.cache:
            assert key in self.model and not self._expired(self.model[key][1])
            remaining = self.cache.ttl(key)
            expire = self.model[key][1]
            assert (remaining is None) == (expire is None)
        else:
            with pytest.raises(KeyError):
                self.cache.ttl(key)

    @precondition(lambda self: self.cache is not None)
    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        assert self.cache is not None
        removed = self.cache.delete(key)
        if removed:
            assert key in self.model and not self._expired(self.model[key][1])
        self.model.pop(key, None)

    @precondition(lambda self: self.cache is not None)
    @rule(seconds=st.floats(min_value=0, max_value=15))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @precondition(lambda self: self.cache is not None)
    @rule()
    def clear(self) -> None:
        assert self.cache is not None
        self.cache.clear()
        self.model.clear()

    @invariant()
    def bounds_and_stats(self) -> None:
        if self.cache is None:
            return
        s = self.cache.stats()
        assert s["size"] == len(self.cache) <= self.cache.max_size
        if self.cache.max_bytes is not None:
            assert s["bytes"] <= self.cache.max_bytes
        stored = self.cache._data  # the raw entries, expired ones included
        assert s["bytes"] == sum(len(e[0]) for e in stored.values())
        assert set(stored) <= set(self.model)
        assert s["hits"] + s["misses"] == self.lookups
        assert s["evictions"] >= 0 and s["expirations"] >= 0


TestCacheInvariants = CacheInvariants.TestCase
TestCacheInvariants.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class ReferenceLRU:
    """The textbook LRU with a byte budget, written as plainly as possible."""

    def __init__(self, max_size: int, max_bytes: int | None) -> None:
        self.max_size = max_size
        self.max_bytes = max_bytes
        self.data: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        return None

    def set(self, key: str, value: bytes) -> None:
        if self.max_bytes is not None and len(value) > self.max_bytes:
            self.data.pop(key, None)
            return
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.max_size:
            self.data.popitem(last=False)
        while self.max_bytes is not None and sum(map(len, self.data.values())) > self.max_bytes:
            self.data.popitem(last=False)

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


OPS = st.lists(
    st.tuples(st.sampled_from(["get", "set", "delete"]), KEYS, VALUES), min_size=1, max_size=80
)


@settings(max_examples=120, deadline=None)
@given(ops=OPS, max_size=st.integers(1, 6), max_bytes=st.one_of(st.none(), st.integers(1, 100)))
def test_lru_matches_reference(
    ops: list[tuple[str, str, bytes]], max_size: int, max_bytes: int | None
) -> None:
    cache = MemoryCache(max_size, max_bytes=max_bytes, policy="lru")
    ref = ReferenceLRU(max_size, max_bytes)
    for op, key, value in ops:
        if op == "get":
            assert cache.get(key) == ref.get(key)
        elif op == "set":
            cache.set(key, value)
            ref.set(key, value)
        else:
            cache.delete(key)
            ref.delete(key)
        assert list(cache._policy._order) == list(ref.data)
        assert {k: e[0] for k, e in cache._data.items()} == dict(ref.data)


@settings(max_examples=60, deadline=None)
@given(
    ops=OPS,
    max_size=st.integers(1, 10),
    policy=st.sampled_from(["tinylfu", "lfu"]),
)
def test_policy_bookkeeping_matches_the_stored_keys(
    ops: list[tuple[str, str, bytes]], max_size: int, policy: str
) -> None:
    """The policy tracks exactly the keys the cache stores (no leaks, no ghosts)."""
    cache = MemoryCache(max_size, policy=policy)
    for op, key, value in ops:
        if op == "get":
            cache.get(key)
        elif op == "set":
            cache.set(key, value)
        else:
            cache.delete(key)
        pol: Any = cache._policy
        if policy == "tinylfu":
            tracked = [k for seg in pol._segments for k in seg]
            for k, e in cache._data.items():
                assert k in pol._segments[e[5]]
        else:
            tracked = [k for b in pol._buckets.values() for k in b]
            for k, e in cache._data.items():
                assert k in pol._buckets[e[5]]
        assert sorted(tracked) == sorted(cache._data)
        assert pol._size == len(cache._data)
