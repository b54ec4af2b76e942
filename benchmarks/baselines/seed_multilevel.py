"""Baseline: a multi-level cache that works the way the user's tutorial's MultiLevelCache works.

Written for benchmarks/bench_tiers.py, to measure infercache against the design it replaces, in
the same run. It deliberately keeps the tutorial's choices (they are what is being measured):

- keys: ``md5(json.dumps(data, sort_keys=True))`` (``str(data)`` for other types), computed again
  at every level;
- L1: an OrderedDict LRU with a timestamp dict whose ``set`` first scans every entry for expired
  ones (O(n) per write);
- L2: the synchronous redis-py client, one GET per key, one SETEX per write, values as JSON when
  possible else pickle (and ``pickle.loads`` on anything that is not JSON);
- L3: a Python dict standing in for the database;
- promotion re-sets the value with a fresh full TTL.

Do not use this code for anything else: it unpickles what Redis returns.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
import time
from collections import OrderedDict
from typing import Any

import redis


def _md5_key(data: Any) -> str:
    text = json.dumps(data, sort_keys=True) if isinstance(data, list | dict) else str(data)
    return hashlib.md5(text.encode()).hexdigest()


class SeedMemoryCache:
    """The tutorial's InMemoryCache: LRU + TTL, an O(n) expiry scan on every set."""

    def __init__(self, max_size: int = 1000, ttl: int = 3600) -> None:
        self.max_size = max_size
        self.ttl = ttl
        self.cache: OrderedDict[str, Any] = OrderedDict()
        self.timestamps: dict[str, float] = {}
        self.lock = threading.RLock()

    def _expired(self, k: str) -> bool:
        return k not in self.timestamps or time.time() - self.timestamps[k] > self.ttl

    def get(self, key: Any) -> Any:
        with self.lock:
            k = _md5_key(key)
            if k in self.cache:
                if self._expired(k):
                    self.cache.pop(k, None)
                    self.timestamps.pop(k, None)
                    return None
                value = self.cache.pop(k)
                self.cache[k] = value
                return value
            return None

    def set(self, key: Any, value: Any) -> None:
        with self.lock:
            k = _md5_key(key)
            if k in self.cache:
                self.cache.pop(k, None)
                self.timestamps.pop(k, None)
            now = time.time()
            for old in [o for o, ts in self.timestamps.items() if now - ts > self.ttl]:
                self.cache.pop(old, None)
                self.timestamps.pop(old, None)
            while len(self.cache) >= self.max_size:
                self.cache.popitem(last=False)
            self.cache[k] = value
            self.timestamps[k] = now


class SeedRedisCache:
    """The tutorial's RedisCache: one command per call, JSON-or-pickle values."""

    def __init__(self, host: str = "localhost", port: int = 6379, db: int = 0) -> None:
        self.redis_client = redis.Redis(host=host, port=port, db=db, decode_responses=False)
        self.default_ttl = 3600

    @staticmethod
    def _serialize(data: Any) -> bytes:
        if isinstance(data, dict | list | str | int | float | bool):
            return json.dumps(data).encode("utf-8")
        return pickle.dumps(data)

    @staticmethod
    def _deserialize(data: bytes) -> Any:
        try:
            return json.loads(data.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return pickle.loads(data)  # the unsafe part the tutorial has

    def get(self, key: Any) -> Any:
        data = self.redis_client.get(_md5_key(key))
        return None if data is None else self._deserialize(data)

    def set(self, key: Any, value: Any, ttl: int | None = None) -> None:
        self.redis_client.setex(_md5_key(key), ttl or self.default_ttl, self._serialize(value))

    def close(self) -> None:
        self.redis_client.close()


class SeedMultiLevelCache:
    """The tutorial's MultiLevelCache: L1 dict-LRU, L2 Redis, L3 a dict."""

    def __init__(
        self,
        l1_size: int = 100,
        l1_ttl: int = 300,
        redis_host: str = "localhost",
        redis_port: int = 6379,
        redis_db: int = 1,
    ) -> None:
        self.l1_cache = SeedMemoryCache(max_size=l1_size, ttl=l1_ttl)
        self.l2_cache = SeedRedisCache(host=redis_host, port=redis_port, db=redis_db)
        self.l3_storage: dict[Any, Any] = {}

    def get(self, key: Any) -> Any:
        value = self.l1_cache.get(key)
        if value is not None:
            return value
        value = self.l2_cache.get(key)
        if value is not None:
            self.l1_cache.set(key, value)
            return value
        # The tutorial indexes its dict by the raw key; lists are unhashable, so use the md5.
        value = self.l3_storage.get(_md5_key(key))
        if value is not None:
            self.l2_cache.set(key, value)
            self.l1_cache.set(key, value)
            return value
        return None

    def set(self, key: Any, value: Any, ttl: int | None = None) -> None:
        self.l1_cache.set(key, value)
        self.l2_cache.set(key, value, ttl)
        self.l3_storage[_md5_key(key)] = value

    def close(self) -> None:
        self.l2_cache.close()
