"""A circuit breaker for remote tiers: fail fast while a server is down, probe to come back.

Without it, every request during a Redis outage would wait for a socket timeout before falling
through to the next tier, turning an outage of the cache into an outage of the service. With it,
after ``failure_threshold`` consecutive connection failures the tier raises TierUnavailable
immediately for ``recovery_time`` seconds; then one call is let through as a probe (half-open):
success closes the circuit, failure opens it again.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from infercache.errors import ConfigError, TierError, TierUnavailable

__all__ = ["CircuitBreaker"]

T = TypeVar("T")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe at a time.

    Thread-safe (a lock around a few field updates), so the SQLite worker thread and the event
    loop can share one. ``timer`` is injectable so tests drive the cooldown without sleeping.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 3,
        recovery_time: float = 1.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ConfigError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if recovery_time < 0:
            raise ConfigError(f"recovery_time must be >= 0, got {recovery_time}")
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_time = recovery_time
        self._timer = timer
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.opened_count = 0
        self.rejected = 0

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == OPEN and self._timer() - self._opened_at >= self.recovery_time:
                return HALF_OPEN
            return self._state

    def before_call(self) -> None:
        """Raise TierUnavailable if the circuit is open; let one probe through when it may heal."""
        with self._lock:
            if self._state == CLOSED:
                return
            now = self._timer()
            if self._state == OPEN and now - self._opened_at >= self.recovery_time:
                self._state = HALF_OPEN
                self._probe_in_flight = False
            if self._state == HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return
            self.rejected += 1
        raise TierUnavailable(f"{self.name} unavailable (circuit open, retrying shortly)")

    def record_success(self) -> None:
        with self._lock:
            self._state = CLOSED
            self._failures = 0
            self._probe_in_flight = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == HALF_OPEN or self._failures >= self.failure_threshold:
                if self._state != OPEN:
                    self.opened_count += 1
                self._state = OPEN
                self._opened_at = self._timer()
                self._probe_in_flight = False

    def release_probe(self) -> None:
        """End a probe that neither succeeded nor failed at the connection level."""
        with self._lock:
            self._probe_in_flight = False

    async def run(
        self,
        what: str,
        call: Awaitable[T],
        *,
        outage: tuple[type[BaseException], ...],
        answered: tuple[type[BaseException], ...] = (),
    ) -> T:
        """Await ``call`` through the breaker and map its errors to TierError.

        While the circuit is open, raise TierUnavailable without awaiting it (a coroutine is
        closed). ``outage`` errors (unreachable, timed out) count as failures and open the
        circuit; ``answered`` errors (the server replied with an error) count as a success.
        """
        try:
            self.before_call()
        except TierUnavailable:
            if inspect.iscoroutine(call):
                call.close()  # never awaited: close it so Python does not warn
            raise
        try:
            result = await call
        except outage as exc:
            self.record_failure()
            raise TierError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        except answered as exc:
            self.record_success()
            raise TierError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.release_probe()
            raise
        self.record_success()
        return result

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "consecutive_failures": self._failures,
            "opened": self.opened_count,
            "rejected": self.rejected,
        }
