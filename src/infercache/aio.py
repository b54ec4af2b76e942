"""Stopping background tasks reliably on Python 3.11.

Python 3.11's ``asyncio.wait_for`` returns the inner result when the outer task is cancelled just
as the inner call completes (fixed in 3.12, where it is built on ``asyncio.timeout``). A task
that loops around such a call, as redis-py's commands (sent through ``wait_for`` whenever a
socket timeout is set) and our own bounded waits do, then goes on as if it was never asked to
stop, and a bare ``task.cancel(); await task`` waits for it forever. CI saw exactly that: an
SQLite writer heartbeat, cancelled at close while its bounded beat completed, kept beating, and
the close hung until the test's 120 s timeout.

:func:`stop_task` is the one way infercache stops a task it started: cancel, and cancel again
until the task has ended. Loops that can tell they were asked to stop should also call
:func:`raise_if_cancel_requested` before their next round. :func:`ensure_task` starts a
background task unless one runs already.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

#: How long to give a task to end after each cancellation before cancelling it again: long
#: enough for its own cleanup after a delivered cancellation (closing a connection) to finish
#: uninterrupted, short enough that a lost one costs a fraction of a second.
RECANCEL_EVERY_S = 0.5


def raise_if_cancel_requested() -> None:
    """Raise CancelledError if the current task was asked to cancel and is still running: a loop
    calls it before its next round.

    The task's ``cancelling()`` count records the request even when the CancelledError itself was
    lost below an ``await`` (only ``uncancel()``, which code that suppresses a cancellation on
    purpose must call, clears it).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:
        raise asyncio.CancelledError()


def ensure_task(
    task: asyncio.Task[Any] | None,
    start: Callable[[], Coroutine[Any, Any, Any]],
    name: str,
) -> asyncio.Task[Any] | None:
    """``task`` if it still runs on this thread's event loop, else a new task of ``start()``
    there; ``task`` as it is where no loop runs (a worker thread: the next call from the loop
    starts it). A task that ended, or that belongs to a loop that is gone (closed without
    cancelling its tasks: it never runs again), is replaced.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return task
    if task is not None and not task.done() and task.get_loop() is loop:
        return task
    return loop.create_task(start(), name=name)


async def stop_task(
    task: asyncio.Task[Any] | None,
    *,
    give_up_after: float | None = None,
    recancel_every: float = RECANCEL_EVERY_S,
) -> bool:
    """Cancel ``task`` and wait until it has ended, cancelling it again every ``recancel_every``
    seconds in case a cancellation was lost. True once it has ended; False when ``give_up_after``
    seconds passed first (the task is left running, cancelled).

    The task's own outcome (a result, an exception, its cancellation) is consumed, never raised:
    it is being stopped. A cancellation of the caller itself still propagates (``asyncio.wait``
    neither raises the task's outcome nor swallows the caller's), so stopping something inside a
    close that is itself cancelled does not hang on.

    A task of another event loop, or of one already closed, can be neither awaited nor
    (once closed) cancelled: it is cancelled if its loop still runs, and reported as ended.
    """
    if task is None or task.done():
        _consume(task)
        return True
    loop = task.get_loop()
    if loop.is_closed():
        return True
    if loop is not asyncio.get_running_loop():
        loop.call_soon_threadsafe(task.cancel)
        return True
    deadline = None if give_up_after is None else loop.time() + give_up_after
    while not task.done():
        wait = recancel_every
        if deadline is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            wait = min(wait, remaining)
        task.cancel()
        await asyncio.wait((task,), timeout=wait)
    _consume(task)
    return True


def _consume(task: asyncio.Task[Any] | None) -> None:
    """Mark the task's exception retrieved, so asyncio does not log it as never retrieved."""
    if task is not None and task.done() and not task.cancelled():
        task.exception()
