"""Write-behind entries that a slower tier missed while it was down, kept for retries.

A synchronous, in-memory structure (one per tier) used by the write-behind flusher: bounded,
oldest dropped first, each entry tried a bounded number of times with exponential backoff, and
superseded by any newer write or delete of its key so a retry can never write a stale value.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from infercache.tiers.base import MISSING

__all__ = ["Retry", "RetryBuffer", "remaining"]


class Retry(NamedTuple):
    value: Any
    ttl: float | None  # the tier's effective TTL when written (None: no expiry)
    since: float  # monotonic time the TTL started running
    attempts: int  # failed attempts so far


class RetryBuffer:
    """Write-behind entries one tier missed (it was down), kept for later attempts.

    Bounded: beyond ``capacity`` entries the oldest are dropped (counted in ``dropped``). An
    entry is tried at most ``retries`` more times after its first failure, with exponential
    backoff (per tier) between attempts; then it is given up (counted in ``failed``). A newer
    write or a delete of a key makes its entry obsolete (:meth:`discard`, :meth:`replace`).
    An entry keeps the rest of its TTL, never a fresh one, and is skipped once it expired.
    """

    __slots__ = (
        "_entries",
        "_flying",
        "capacity",
        "delay",
        "dropped",
        "failed",
        "failures",
        "max_delay",
        "next_at",
        "retried",
        "retries",
    )

    def __init__(self, capacity: int, retries: int, delay: float, max_delay: float) -> None:
        self._entries: OrderedDict[str, Retry] = OrderedDict()
        self._flying: dict[str, Retry] = {}  # taken for the attempt in progress
        self.capacity = capacity
        self.retries = retries
        self.delay = delay
        self.max_delay = max_delay
        self.failures = 0  # consecutive failed attempts: the backoff exponent
        self.next_at = 0.0
        self.dropped = 0
        self.failed = 0
        self.retried = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._flying)

    def due(self, now: float) -> bool:
        return bool(self._entries) and now >= self.next_at

    def wait_time(self, now: float) -> float | None:
        """Seconds until the next attempt is due (None: nothing waits)."""
        return max(0.0, self.next_at - now) if self._entries else None

    def holds(self, keys: Iterable[str] | None) -> bool:
        """Whether an attempt in progress carries one of ``keys`` (None: any)."""
        if not self._flying:
            return False
        return keys is None or any(k in self._flying for k in keys)

    def add(
        self, items: Mapping[str, tuple[Any, float | None]], now: float, *, attempts: int = 0
    ) -> None:
        """Queue writes for this tier behind those already waiting (the newest value wins)."""
        for k, (v, t) in items.items():
            self._entries.pop(k, None)
            self._flying.pop(k, None)
            if attempts > self.retries:
                self.failed += 1
                continue
            self._entries[k] = Retry(v, t, now, attempts)
        self._trim()

    def failed_write(self, items: Mapping[str, tuple[Any, float | None]], now: float) -> None:
        """A first write of ``items`` failed: keep them for retries and back off."""
        self.add(items, now, attempts=1)
        self._back_off(now)

    def replace(self, items: Mapping[str, tuple[Any, float | None]], now: float) -> None:
        """Newer values for keys that already wait here (a write that did not reach the tier)."""
        waiting = {k: e for k, e in items.items() if k in self._entries or k in self._flying}
        if waiting:
            self.add(waiting, now)

    def discard(self, keys: Iterable[str]) -> None:
        """Forget keys (deleted, or written to the tier by a newer write)."""
        for k in keys:
            self._entries.pop(k, None)
            self._flying.pop(k, None)

    def clear(self) -> int:
        n = len(self)
        self._entries.clear()
        self._flying.clear()
        return n

    def get(self, key: str, now: float) -> Any:
        """The value waiting for ``key`` (MISSING if none, or if it expired)."""
        e = self._entries.get(key) or self._flying.get(key)
        if e is None or remaining(e, now) is MISSING:
            return MISSING
        return e.value

    def take(self, n: int, now: float) -> dict[str, tuple[Any, float | None]]:
        """Up to ``n`` oldest entries for an attempt, with what is left of their TTL."""
        out: dict[str, tuple[Any, float | None]] = {}
        while self._entries and len(out) < n:
            k, e = self._entries.popitem(last=False)
            rem = remaining(e, now)
            if rem is MISSING:  # expired while waiting: nothing left to write
                continue
            self._flying[k] = e
            out[k] = (e.value, rem)
        return out

    def succeeded(self) -> None:
        self.retried += len(self._flying)
        self._flying.clear()
        self.failures = 0
        self.next_at = 0.0

    def attempt_failed(self, now: float) -> None:
        """Requeue the attempt's entries ahead of newer ones (if attempts remain); back off."""
        requeue = [(k, e._replace(attempts=e.attempts + 1)) for k, e in self._flying.items()]
        self._flying.clear()
        for k, e in reversed(requeue):
            if k in self._entries:  # a newer value arrived meanwhile
                continue
            if e.attempts > self.retries:
                self.failed += 1
                continue
            self._entries[k] = e
            self._entries.move_to_end(k, last=False)
        self._back_off(now)
        self._trim()

    def give_up(self) -> int:
        """Drop everything (on close, when the tier is still down); returns how many."""
        n = self.clear()
        self.failed += n
        return n

    def _back_off(self, now: float) -> None:
        self.failures += 1
        step = self.delay * 2 ** min(self.failures - 1, 30)
        self.next_at = now + min(step, self.max_delay)

    def _trim(self) -> None:
        while self._entries and len(self) > self.capacity:
            self._entries.popitem(last=False)
            self.dropped += 1


def remaining(e: Retry, now: float) -> Any:
    """What is left of an entry's TTL (None: no expiry; MISSING: expired)."""
    if e.ttl is None:
        return None
    rem = e.ttl - (now - e.since)
    return rem if rem > 0.001 else MISSING
