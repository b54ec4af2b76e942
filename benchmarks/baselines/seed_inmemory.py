"""A baseline that works the way the user's tutorial ``InMemoryCache`` works (our own code).

Same design, on purpose, so the benchmark can report what infercache's L1 changes:

- keys are derived on every call: ``md5(json.dumps(data, sort_keys=True))`` for lists and dicts,
  ``md5(str(data))`` for anything else;
- an ``OrderedDict`` of values in recency order plus a separate dict of write timestamps from
  ``time.time()``; one TTL for the whole cache, checked on read;
- a re-entrant lock around every call;
- ``set`` first walks *every* timestamp to drop expired entries (O(n) per write), then evicts the
  least recently used entries while the cache is full.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from typing import Any


class SeedInMemoryCache:
    """LRU + single TTL, keyed by md5 of the input, with the tutorial's O(n) expiry scan."""

    def __init__(self, max_size: int = 1000, ttl: float = 3600) -> None:
        self.max_size = max_size
        self.ttl = ttl
        self._values: OrderedDict[str, Any] = OrderedDict()
        self._written: dict[str, float] = {}
        self._lock = threading.RLock()

    @staticmethod
    def _key(data: Any) -> str:
        text = json.dumps(data, sort_keys=True) if isinstance(data, list | dict) else str(data)
        return hashlib.md5(text.encode()).hexdigest()

    def _stale(self, key: str, now: float) -> bool:
        written = self._written.get(key)
        return written is None or now - written > self.ttl

    def _drop_expired(self, now: float) -> None:
        # The tutorial's approach: look at every entry on every write.
        for key in [k for k, t in self._written.items() if now - t > self.ttl]:
            self._values.pop(key, None)
            self._written.pop(key, None)

    def get(self, data: Any) -> Any | None:
        with self._lock:
            key = self._key(data)
            if key not in self._values:
                return None
            if self._stale(key, time.time()):
                self._values.pop(key, None)
                self._written.pop(key, None)
                return None
            value = self._values.pop(key)  # re-insert at the recent end
            self._values[key] = value
            return value

    def set(self, data: Any, value: Any) -> None:
        with self._lock:
            key = self._key(data)
            if key in self._values:
                self._values.pop(key)
                self._written.pop(key, None)
            now = time.time()
            self._drop_expired(now)
            while len(self._values) >= self.max_size:
                old, _ = self._values.popitem(last=False)
                self._written.pop(old, None)
            self._values[key] = value
            self._written[key] = now

    def delete(self, data: Any) -> None:
        with self._lock:
            key = self._key(data)
            self._values.pop(key, None)
            self._written.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._written.clear()

    def __len__(self) -> int:
        return len(self._values)
