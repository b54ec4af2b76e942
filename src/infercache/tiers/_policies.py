"""Eviction policies for :class:`infercache.tiers.memory.MemoryCache` (private).

A policy decides *which* key leaves; the cache owns the values, TTLs, weights, lock and statistics.
The split keeps every policy small and lets the cache's hit path stay the same for all of them.

Every stored entry is a ``list`` (a list literal is the cheapest mutable record CPython builds, and
``e[4] += 1`` on it is a specialised bytecode). Its slots:

====  =========  ==================================================================================
 0    value      the cached value
 1    expire     absolute expiry time on the cache's timer, or ``None`` (never expires)
 2    ttl        the TTL the entry was written with, or ``None``
 3    weight     its size in bytes per the weigher
 4    hits       hits not yet seen by the policy: bumped by the cache on a hit when the policy has
                 no ``touch``; tinylfu reads and zeroes it (zeroing keeps it a small, cached int)
 5    slot       policy-owned (segment id for tinylfu, frequency for lfu)
 6    spare      unused (kept so the layout is stable)
====  =========  ==================================================================================

Contract with the cache (all calls happen under the cache's lock):

- ``insert(key, entry)`` is called for a new key right after ``data[key] = entry``.
  It returns the key the policy evicted to stay within ``max_size`` entries (already removed from
  the policy's own structures) or :data:`NO_KEY`. The returned key may be the new key itself: an
  admission policy can refuse it. The cache then drops that key from ``data``.
- ``update(key, entry)``: an existing key was overwritten; counts as an access.
- ``remove(key, entry)``: the cache dropped the key (delete, expiry); forget it.
- ``evict()``: choose, forget and return one victim (the cache uses it under byte pressure). Only
  called while the policy holds at least one key.
- ``touch``: a callable run with the key on every hit (LRU passes ``OrderedDict.move_to_end``
  itself, so its hit costs one C call), or ``None``: then the cache does ``entry[4] += 1`` instead.

No method scans the entries. LRU and LFU are O(1) per call; tinylfu's CLOCK sweeps are O(1)
amortised: each second chance it gives consumes hits recorded since the entry was last looked at,
so the sweeping never exceeds the number of hits and writes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Final

Entry = list[Any]

#: Returned by :meth:`insert` when nothing had to leave.
NO_KEY: Final = object()

# tinylfu segments
_WINDOW, _PROBATION, _PROTECTED = 0, 1, 2


class LRUPolicy:
    """Least recently used: one ``OrderedDict`` whose order is recency (oldest first)."""

    name = "lru"

    def __init__(self, data: dict[Hashable, Entry], max_size: int) -> None:
        self._cap = max_size
        self._order: OrderedDict[Hashable, None] = OrderedDict()
        self.touch: Callable[[Hashable], None] | None = self._order.move_to_end

    def insert(self, key: Hashable, entry: Entry) -> object:
        order = self._order
        order[key] = None
        if len(order) > self._cap:
            return order.popitem(last=False)[0]
        return NO_KEY

    def update(self, key: Hashable, entry: Entry) -> None:
        self._order.move_to_end(key)

    def remove(self, key: Hashable, entry: Entry) -> None:
        del self._order[key]

    def evict(self) -> Hashable:
        return self._order.popitem(last=False)[0]

    def clear(self) -> None:
        self._order.clear()


class LFUPolicy:
    """Least frequently used, ties broken by recency, O(1) per operation.

    Keys sit in one ``OrderedDict`` per use count, and the counts in use form a doubly linked list
    (``_nxt``/``_prv`` dicts with the sentinel ``0``), the classic O(1) LFU: a key moving from
    count f to f+1 lands in the bucket right after f, and the victim is the oldest key of the first
    bucket, with no search. Counts live in ``entry[5]`` and are forgotten when a key leaves
    (in-cache LFU, as textbook and libCacheSim ``LFU``). A new key evicts *before* it is added,
    otherwise it would always be its own victim (count 1 is the minimum).
    """

    name = "lfu"

    def __init__(self, data: dict[Hashable, Entry], max_size: int) -> None:
        self._data = data
        self._cap = max_size
        self._size = 0
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}
        self._nxt: dict[int, int] = {0: 0}
        self._prv: dict[int, int] = {0: 0}
        self.touch: Callable[[Hashable], None] | None = self._touch

    def _link_after(self, freq: int, new: int) -> OrderedDict[Hashable, None]:
        nxt = self._nxt
        after = nxt[freq]
        nxt[freq] = new
        nxt[new] = after
        self._prv[new] = freq
        self._prv[after] = new
        bucket: OrderedDict[Hashable, None] = OrderedDict()
        self._buckets[new] = bucket
        return bucket

    def _unlink(self, freq: int) -> None:
        prev = self._prv.pop(freq)
        after = self._nxt.pop(freq)
        self._nxt[prev] = after
        self._prv[after] = prev
        del self._buckets[freq]

    def _touch(self, key: Hashable) -> None:
        entry = self._data[key]
        freq = entry[5]
        buckets = self._buckets
        bucket = buckets[freq]
        del bucket[key]
        new = freq + 1
        entry[5] = new
        nxt = buckets.get(new)
        if nxt is None:
            nxt = self._link_after(freq, new)
        nxt[key] = None
        if not bucket:
            self._unlink(freq)

    def insert(self, key: Hashable, entry: Entry) -> object:
        victim: object = NO_KEY
        if self._size >= self._cap:
            victim = self.evict()
        entry[5] = 1
        bucket = self._buckets.get(1)
        if bucket is None:
            bucket = self._link_after(0, 1)
        bucket[key] = None
        self._size += 1
        return victim

    def update(self, key: Hashable, entry: Entry) -> None:
        self._touch(key)

    def remove(self, key: Hashable, entry: Entry) -> None:
        freq = entry[5]
        bucket = self._buckets[freq]
        del bucket[key]
        self._size -= 1
        if not bucket:
            self._unlink(freq)

    def evict(self) -> Hashable:
        freq = self._nxt[0]
        bucket = self._buckets[freq]
        key = bucket.popitem(last=False)[0]
        self._size -= 1
        if not bucket:
            self._unlink(freq)
        return key

    def clear(self) -> None:
        self._buckets.clear()
        self._nxt = {0: 0}
        self._prv = {0: 0}
        self._size = 0


# bytes.translate table that halves every counter: the sketch's aging step, at C speed.
_HALVE: Final = bytes(i >> 1 for i in range(256))


class FrequencySketch:
    """A count-min sketch of 4-bit counters (4 rows) with periodic halving: TinyLFU's history.

    It estimates how often a key was accessed recently, including keys no longer cached, in
    ``4 * width`` bytes (``width`` = ``width_factor`` x capacity, rounded up to a power of two;
    one byte per counter, because byte indexing is what pure Python does fast). Indexes come from
    ``hash(key)``; str hashes are SipHash salted per process, so callers cannot aim collisions.
    After ``sample_factor`` x capacity counted accesses every counter is halved, so old
    popularity fades and the estimate follows a drifting workload.
    """

    __slots__ = ("_bits", "_mask", "_samples", "_table", "sample_size")

    def __init__(self, capacity: int, width_factor: int = 16, sample_factor: int = 15) -> None:
        # 4 rows x width counters, laid out in 64-byte blocks (Caffeine's layout): a key's four
        # counters sit in one block, one per 16-byte quarter, so a lookup costs one cache miss
        # instead of four. The block comes from the low hash bits, each counter from 4 more.
        width = 1 << max(4, (max(1, capacity) * width_factor - 1).bit_length())
        blocks = width // 16
        self._mask = blocks - 1
        self._bits = blocks.bit_length() - 1
        self._table = bytearray(64 * blocks)
        self._samples = 0
        self.sample_size = sample_factor * max(1, capacity)

    def add(self, key: Hashable, n: int = 1) -> None:
        """Count ``n`` accesses of ``key``: a conservative update, saturating at 15.

        Only counters below ``estimate + n`` rise, and only to that value. A plain count-min
        adds ``n`` to all four; raising the larger ones only inflates other keys' estimates.
        """
        t = self._table
        h = hash(key)
        base = (h & self._mask) << 6
        h >>= self._bits
        i0 = base + (h & 15)
        i1 = base + 16 + ((h >> 4) & 15)
        i2 = base + 32 + ((h >> 8) & 15)
        i3 = base + 48 + ((h >> 12) & 15)
        c0 = t[i0]
        c1 = t[i1]
        c2 = t[i2]
        c3 = t[i3]
        low = c0
        if c1 < low:
            low = c1
        if c2 < low:
            low = c2
        if c3 < low:
            low = c3
        target = low + n
        if target > 15:
            target = 15
        if c0 < target:
            t[i0] = target
        if c1 < target:
            t[i1] = target
        if c2 < target:
            t[i2] = target
        if c3 < target:
            t[i3] = target
        self._samples += n
        if self._samples >= self.sample_size:
            self._table = t.translate(_HALVE)
            self._samples //= 2

    def estimate(self, key: Hashable) -> int:
        """Accesses of ``key`` counted (an upper bound, 0..15), after aging."""
        t = self._table
        h = hash(key)
        base = (h & self._mask) << 6
        h >>= self._bits
        low = t[base + (h & 15)]
        c = t[base + 16 + ((h >> 4) & 15)]
        if c < low:
            low = c
        c = t[base + 32 + ((h >> 8) & 15)]
        if c < low:
            low = c
        c = t[base + 48 + ((h >> 12) & 15)]
        if c < low:
            low = c
        return low

    def clear(self) -> None:
        self._table = bytearray(len(self._table))
        self._samples = 0


class TinyLFUPolicy:
    """W-TinyLFU with CLOCK segments: scan resistant, and a hit costs no policy work at all.

    Layout as in Caffeine: a small admission *window* (1 % of ``max_size``) in front of a main
    area split into *probation* (20 %) and *protected* (80 %). New keys enter the window; when it
    overflows, its victim is a *candidate* for the main area, admitted only if the frequency
    sketch says it was accessed more often than the main area's victim. A one-time scan therefore
    flows through the window and is refused, while popular keys stay.

    Differences from Caffeine, each for the pure-Python hit path's sake:

    - The three segments are CLOCK queues (an ``OrderedDict`` in insertion order plus the entry's
      hit counter as reference bit) instead of LRU lists. A hit only does ``entry[4] += 1`` in the
      cache; second chances and promotion (probation -> protected) happen when an eviction looks
      at a queue's head.
    - Hits reach the sketch late, in bulk: ``entry[4]`` counts the hits since the last look, and
      when an eviction looks at an entry they are added to the sketch in one step
      (:meth:`_flush`). Every entry a duel compares has just been looked at, so admission
      decisions see all of its hits; only the timing relative to the sketch's aging shifts.
    - The sketch is wider (16 counters per entry and row, Caffeine: 4; memory 64 B per entry)
      and ages after 15 x ``max_size`` accesses (Caffeine: 10), uses conservative updates, and
      has no doorkeeper. Measured (docs/benchmarks.md): the width gains 1.4 points on the drifting
      trace at a 1 % cache, the longer period 0.2-0.4 points on Zipf traces.
    """

    name = "tinylfu"

    def __init__(
        self,
        data: dict[Hashable, Entry],
        max_size: int,
        *,
        window: float = 0.01,
        protected: float = 0.8,
        width_factor: int = 16,
        sample_factor: int = 15,
    ) -> None:
        self._data = data
        self._cap = max_size
        self._wcap = max(1, round(max_size * window))
        self._pcap = max(0, int((max_size - self._wcap) * protected))
        self._size = 0
        self._window: OrderedDict[Hashable, None] = OrderedDict()
        self._probation: OrderedDict[Hashable, None] = OrderedDict()
        self._protected: OrderedDict[Hashable, None] = OrderedDict()
        self._segments = (self._window, self._probation, self._protected)
        self.sketch = FrequencySketch(max_size, width_factor, sample_factor)
        self.touch: Callable[[Hashable], None] | None = None

    def _flush(self, key: Hashable, entry: Entry) -> bool:
        """Add the entry's hits since the last look to the sketch; True if there were any."""
        new = entry[4]
        if new:
            entry[4] = 0
            self.sketch.add(key, new)
            return True
        return False

    # -- queue heads ------------------------------------------------------------------------

    def _pop_window(self) -> Hashable:
        """Remove and return the window's CLOCK victim (referenced keys get a second chance)."""
        window = self._window
        data = self._data
        while True:
            key = next(iter(window))
            if self._flush(key, data[key]):
                window.move_to_end(key)
                continue
            del window[key]
            return key

    def _demote(self) -> None:
        """Move protected's CLOCK victim to probation's tail."""
        protected = self._protected
        data = self._data
        while True:
            key = next(iter(protected))
            entry = data[key]
            if self._flush(key, entry):
                protected.move_to_end(key)
                continue
            del protected[key]
            self._probation[key] = None
            entry[5] = _PROBATION
            return

    def _main_victim(self) -> object:
        """The main area's victim, still in place: probation's head after promoting referenced
        heads to protected; protected's CLOCK victim if probation is empty; NO_KEY if both are."""
        probation = self._probation
        protected = self._protected
        data = self._data
        while probation:
            key = next(iter(probation))
            entry = data[key]
            new = entry[4]
            if not new:
                return key
            entry[4] = 0
            self.sketch.add(key, new)
            del probation[key]
            protected[key] = None
            entry[5] = _PROTECTED
            if len(protected) > self._pcap:
                self._demote()
        if protected:
            self._demote()
            return next(iter(probation))
        return NO_KEY

    # -- policy interface -------------------------------------------------------------------

    def insert(self, key: Hashable, entry: Entry) -> object:
        # The hot write path: _pop_window and _flush are inlined here.
        sketch = self.sketch
        sketch.add(key)
        entry[5] = _WINDOW
        window = self._window
        window[key] = None
        size = self._size = self._size + 1
        if len(window) <= self._wcap:
            if size <= self._cap:
                return NO_KEY
            return self.evict()  # window under quota after deletes; the main area pays
        data = self._data
        while True:  # the window's CLOCK victim becomes the candidate
            candidate = next(iter(window))
            cand_entry = data[candidate]
            new = cand_entry[4]
            if not new:
                if cand_entry is not entry:
                    break
                # Every older window entry had a second chance and went behind the new key:
                # the new key still stays (as in an LRU window), the next one leaves.
                window.move_to_end(candidate)
                continue
            cand_entry[4] = 0
            sketch.add(candidate, new)
            window.move_to_end(candidate)
        del window[candidate]
        probation = self._probation
        if size <= self._cap:
            probation[candidate] = None
            cand_entry[5] = _PROBATION
            return NO_KEY
        self._size = size - 1
        victim = self._main_victim()
        if victim is NO_KEY:
            return candidate
        if sketch.estimate(candidate) > sketch.estimate(victim):
            del self._segments[data[victim][5]][victim]
            probation[candidate] = None
            cand_entry[5] = _PROBATION
            return victim
        return candidate

    def update(self, key: Hashable, entry: Entry) -> None:
        entry[4] += 1

    def remove(self, key: Hashable, entry: Entry) -> None:
        self._flush(key, entry)
        del self._segments[entry[5]][key]
        self._size -= 1

    def evict(self) -> Hashable:
        victim = self._main_victim()
        if victim is NO_KEY:
            victim = self._pop_window()
        else:
            del self._segments[self._data[victim][5]][victim]
        self._size -= 1
        return victim

    def clear(self) -> None:
        for segment in self._segments:
            segment.clear()
        self.sketch.clear()
        self._size = 0


POLICIES: Final[dict[str, Callable[[dict[Hashable, Entry], int], Any]]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "tinylfu": TinyLFUPolicy,
}
