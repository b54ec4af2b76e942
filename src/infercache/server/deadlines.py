"""Request deadlines enforced by one periodic task instead of one timer per request.

``asyncio.timeout()`` around every prediction cost ~5-10 µs on the hot path here: a Timeout object,
a TimerHandle pushed onto the loop's heap and cancelled again, the heap cleaned of cancelled
handles. Every request has the same timeout, so deadlines arrive in the order requests do: an
insertion-ordered dict of ``task -> deadline`` is already sorted, entering and leaving are a dict
insert and delete, and one reaper task wakes every ``tick`` seconds, cancels the overdue tasks at
the front and stops at the first that is not. A request may thus run up to ``tick`` past its
timeout (``tick`` is a tenth of the timeout, at most 0.1 s).

The handler turns the reaper's cancellation into :class:`~infercache.errors.DeadlineExceeded`
with :meth:`Deadlines.fired`, which also ``uncancel()``\\ s the task so it can still answer; any
other cancellation (the client went away, shutdown) stays a ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from infercache.aio import stop_task

__all__ = ["Deadlines"]


class Deadlines:
    """Deadlines of in-flight requests, all with the same ``timeout`` (seconds)."""

    def __init__(
        self,
        timeout: float,
        *,
        tick: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        self.timeout = timeout
        self.tick = tick if tick is not None else min(0.1, max(0.001, timeout / 10))
        self._clock = clock
        self._due: dict[asyncio.Task[object], float] = {}
        self._fired: set[asyncio.Task[object]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self.expired = 0

    def enter(self) -> asyncio.Task[object] | None:
        """Start the current task's deadline; pass the result to :meth:`leave` and :meth:`fired`."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always called from a task
            return None
        self._due[task] = self._clock() + self.timeout
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap(), name="infercache-deadlines"
            )
        return task

    def leave(self, task: asyncio.Task[object] | None) -> None:
        """The request finished (in any way): forget its deadline."""
        if task is not None:
            self._due.pop(task, None)
            self._fired.discard(task)

    def fired(self, task: asyncio.Task[object] | None) -> bool:
        """Whether a ``CancelledError`` in ``task`` came from its deadline (and only from it).

        If so the cancellation is withdrawn (``uncancel``), so the task can still answer.
        """
        if task is None or task not in self._fired:
            return False
        self._fired.discard(task)
        return task.uncancel() == 0

    async def _reap(self) -> None:
        due = self._due
        while True:
            await asyncio.sleep(self.tick)
            now = self._clock()
            while due:
                task, deadline = next(iter(due.items()))
                if deadline > now:
                    break
                del due[task]
                if not task.done():
                    self._fired.add(task)
                    self.expired += 1
                    task.cancel()

    async def close(self) -> None:
        """Stop the reaper (requests still in flight keep running, without deadlines)."""
        reaper, self._reaper = self._reaper, None
        await stop_task(reaper)
