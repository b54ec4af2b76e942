"""A circuit breaker for remote tiers: fail fast while a server is down, probe to come back.

Without it, every request during a Redis outage would wait for a socket timeout before falling
through to the next tier, turning an outage of the cache into an outage of the service. With it,
after ``failure_threshold`` consecutive connection failures the tier raises TierUnavailable
immediately for ``recovery_time`` seconds; then one call is let through as a probe (half-open):
success closes the circuit, failure opens it again.

A tier that can check its server cheaply on its own passes ``probe``: then no request is ever the
probe. A request made the probe waits as long as the outage makes it (a PostgreSQL lookup waited
the pool's whole 1 s for a connection that was refused at once, one request every ~2 s), while a
background probe costs requests nothing, and runs even when no request comes.

The breaker logs one WARNING when it opens (the tier, the failures, the last error) and one INFO
when it closes again, so an outage shows in the log as two lines, whatever the tier's client
library logs or does not (redis-py logs nothing).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from infercache.aio import ensure_task, stop_task
from infercache.errors import ConfigError, TierError, TierUnavailable

__all__ = ["CircuitBreaker"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


def _describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (libpq's messages carry newlines and tabs), shortened."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe at a time.

    Thread-safe (a lock around a few field updates), so the SQLite worker thread and the event
    loop can share one. ``timer`` is injectable so tests drive the cooldown without sleeping.
    ``probe`` (an async callable that raises when the server is not healthy): check the server
    in a background task, ``recovery_time`` after the circuit opens and again after each failed
    check, instead of letting a request through; requests fail fast until a check succeeds.
    The task needs a running event loop; :meth:`close` stops it.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 3,
        recovery_time: float = 1.0,
        timer: Callable[[], float] = time.monotonic,
        probe: Callable[[], Awaitable[object]] | None = None,
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
        self._outage_since = 0.0
        self._probe_in_flight = False
        self._probe = probe
        self._prober: asyncio.Task[None] | None = None
        self._closed = False
        self.opened_count = 0
        self.rejected = 0
        self.probes = 0

    @property
    def state(self) -> str:
        with self._lock:
            if (
                self._probe is None  # with a background probe no call is let through: open
                and self._state == OPEN
                and self._timer() - self._opened_at >= self.recovery_time
            ):
                return HALF_OPEN
            return self._state

    def before_call(self) -> None:
        """Raise TierUnavailable if the circuit is open; let one probe through when it may heal
        (never with a background ``probe``: that one decides)."""
        with self._lock:
            if self._state == CLOSED:
                return
            if self._probe is None:
                now = self._timer()
                if self._state == OPEN and now - self._opened_at >= self.recovery_time:
                    self._state = HALF_OPEN
                    self._probe_in_flight = False
                if self._state == HALF_OPEN and not self._probe_in_flight:
                    self._probe_in_flight = True
                    return
            self.rejected += 1
        self._start_prober()  # an open circuit with no prober (opened outside an event loop)
        raise TierUnavailable(f"{self.name} unavailable (circuit open, retrying shortly)")

    def record_success(self) -> None:
        with self._lock:
            was = self._state
            self._state = CLOSED
            self._failures = 0
            self._probe_in_flight = False
            down_for = self._timer() - self._outage_since
        if was != CLOSED:
            log.info("%s answers again: circuit closed after %.1f s", self.name, down_for)

    def record_failure(self, error: BaseException | None = None) -> None:
        """Count a failure; open the circuit at ``failure_threshold`` in a row (or at once when
        the probe failed). ``error`` is named in the one WARNING line logged on opening."""
        with self._lock:
            self._failures += 1
            opened = False
            if self._state == HALF_OPEN or self._failures >= self.failure_threshold:
                if self._state == CLOSED:
                    self.opened_count += 1
                    self._outage_since = self._timer()
                    opened = True
                self._state = OPEN
                self._opened_at = self._timer()
                self._probe_in_flight = False
            failures = self._failures
        if opened:
            why = "" if error is None else f": {_describe(error)}"
            log.warning(
                "%s unavailable after %d failure%s in a row, failing fast; %s%s",
                self.name,
                failures,
                "" if failures == 1 else "s",
                "probing it in the background" if self._probe else "a request will probe it",
                why,
            )
            self._start_prober()

    def release_probe(self) -> None:
        """End a probe that neither succeeded nor failed at the connection level."""
        with self._lock:
            self._probe_in_flight = False

    # ----------------------------------------------------------------- background probe

    def _start_prober(self) -> None:
        """Start the background probe, if there is one to run and none runs yet."""
        if self._probe is None or self._closed:
            return
        # a prober of a loop that is gone is replaced: untouched, the circuit never closed
        self._prober = ensure_task(self._prober, self._probe_loop, f"infercache-probe {self.name}")

    async def _probe_loop(self) -> None:
        """Check the server every ``recovery_time`` seconds until a check succeeds."""
        assert self._probe is not None
        while True:
            with self._lock:
                if self._state == CLOSED:  # a call that began before the outage succeeded
                    return
                wait = self._opened_at + self.recovery_time - self._timer()
            await asyncio.sleep(max(wait, 0.0))
            self.probes += 1
            try:
                await self._probe()
            except Exception as exc:  # any error: not healthy yet (logged once, at opening)
                log.debug("%s: probe failed: %s", self.name, _describe(exc))
                with self._lock:  # stay open, the cooldown counted from now
                    if self._state == CLOSED:  # closed meanwhile by a call that succeeded
                        return
                    self._failures += 1
                    self._state = OPEN
                    self._opened_at = self._timer()
                continue
            self.record_success()
            return

    async def close(self) -> None:
        """Stop the background probe (idempotent)."""
        self._closed = True
        prober, self._prober = self._prober, None
        await stop_task(prober)

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
            self.record_failure(exc)
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
            "probes": self.probes,
        }
