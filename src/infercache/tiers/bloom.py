"""A scalable Bloom filter of keys: a "no" is certain, a "maybe" is wrong at most ``fp_rate``.

SQLCache keeps one of the keys its table holds, so that a lookup of a key that was never written
costs a few microseconds in memory instead of a query and the MultiLevelCache machinery around it:
on the server's all-distinct load that lookup path was ~8.5 % of the event loop's time (py-spy, in
process), and skipping it took the L1 + SQLite configuration from 0.80x to 0.89x of the L1-only
one. A Bloom filter never forgets a key it was given, so a "no" is always right; deleted or
expired keys stay "maybe" and cost one real lookup.

It grows in layers (Almeida et al., "Scalable Bloom Filters", 2007): when a layer holds its
capacity a new one twice as large is added, each with half the false-positive budget of the one
before, so the total rate stays under ``fp_rate`` however many keys arrive. Positions come from
one 128-bit xxh3 of the key, split into two 64-bit halves for double hashing (Kirsch and
Mitzenmacher); xxh3 is not cryptographic, which is fine here: a forged collision only buys a
real lookup.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import xxhash

__all__ = ["BloomFilter"]

_MASK64 = (1 << 64) - 1


class _Layer:
    __slots__ = ("bits", "capacity", "count", "k", "m")

    def __init__(self, capacity: int, fp_rate: float) -> None:
        m = max(64, math.ceil(-capacity * math.log(fp_rate) / (math.log(2) ** 2)))
        self.m = m
        self.k = max(1, round(m / capacity * math.log(2)))
        self.bits = bytearray((m + 7) // 8)
        self.capacity = capacity
        self.count = 0


class BloomFilter:
    """Keys (``str``) seen by :meth:`add`; ``key in f`` is False only for keys never added."""

    def __init__(self, capacity: int = 65_536, fp_rate: float = 0.01) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if not 0.0 < fp_rate < 1.0:
            raise ValueError("fp_rate must be in (0, 1)")
        self.fp_rate = fp_rate
        self._initial = capacity
        self._layers: list[_Layer] = []
        self.clear()

    def clear(self) -> None:
        """Forget every key."""
        self._layers = [_Layer(self._initial, self.fp_rate / 2)]

    def __len__(self) -> int:
        """Keys added (a key added twice counts twice: the filter cannot tell)."""
        return sum(layer.count for layer in self._layers)

    @property
    def nbytes(self) -> int:
        return sum(len(layer.bits) for layer in self._layers)

    def add(self, key: str) -> None:
        layer = self._layers[-1]
        if layer.count >= layer.capacity:
            # the n-th layer gets fp_rate / 2**(n+1): the sum over all layers stays < fp_rate
            layer = _Layer(layer.capacity * 2, self.fp_rate / 2 ** (len(self._layers) + 1))
            self._layers.append(layer)
        h = xxhash.xxh3_128_intdigest(key.encode("utf-8", "surrogatepass"))
        m, bits = layer.m, layer.bits
        # positions h1 + i*h2 (mod m), stepped in small ints: no 64-bit products per probe
        pos, step = (h & _MASK64) % m, ((h >> 64) | 1) % m
        for _ in range(layer.k):
            bits[pos >> 3] |= 1 << (pos & 7)
            pos += step
            if pos >= m:
                pos -= m
        layer.count += 1

    def add_many(self, keys: Iterable[str]) -> None:
        add = self.add
        for key in keys:
            add(key)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        h = xxhash.xxh3_128_intdigest(key.encode("utf-8", "surrogatepass"))
        h1, h2 = h & _MASK64, (h >> 64) | 1
        for layer in self._layers:
            m, bits = layer.m, layer.bits
            pos, step = h1 % m, h2 % m
            for _ in range(layer.k):
                if not bits[pos >> 3] & (1 << (pos & 7)):
                    break
                pos += step
                if pos >= m:
                    pos -= m
            else:
                return True
        return False
