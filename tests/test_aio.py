"""stop_task: a background task is stopped even when a cancellation is lost below it.

CI hung for 120 s closing an SQLCache: its writer heartbeat was cancelled as a bounded beat
(``asyncio.wait_for``) completed, Python 3.11's wait_for returned the beat's result instead of
raising, and the loop beat on while ``close()`` awaited it forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import pytest

from infercache.aio import ensure_task, raise_if_cancel_requested, stop_task
from infercache.tiers.sql import SQLCache


def _swallows(times: int, ended: list[str]) -> asyncio.Task[None]:
    """A loop that loses its first ``times`` cancellations, as a 3.11 wait_for can."""

    async def body() -> None:
        lost = 0
        try:
            while True:
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    if lost == times:
                        raise
                    lost += 1
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
        finally:
            ended.append("ended")

    return asyncio.create_task(body())


def _ignoring_cancels(release: asyncio.Event) -> asyncio.Task[None]:
    """A loop that ignores every cancellation until ``release`` is set."""

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    return asyncio.create_task(stubborn())


async def test_stop_task_cancels_again_until_the_task_ends() -> None:
    ended: list[str] = []
    task = _swallows(2, ended)
    await asyncio.sleep(0.02)
    assert await asyncio.wait_for(stop_task(task, recancel_every=0.05), 5) is True
    assert task.cancelled() and ended == ["ended"]


async def test_one_cancel_is_not_enough_for_such_a_task() -> None:
    """The premise of the test above: a single cancel leaves it running."""
    ended: list[str] = []
    task = _swallows(1, ended)
    await asyncio.sleep(0.02)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.2)
    assert not done and ended == []
    await stop_task(task)
    assert ended == ["ended"]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for loses no cancellation since 3.12")
async def test_python_311_wait_for_loses_a_cancellation_and_stop_task_still_stops_it() -> None:
    """The real race: the inner call completes in the same loop turn as the cancel."""
    inners: list[asyncio.Future[int]] = []
    rounds = 0

    async def beating() -> None:
        nonlocal rounds
        loop = asyncio.get_running_loop()
        while True:
            inner: asyncio.Future[int] = loop.create_future()
            inners.append(inner)
            await asyncio.wait_for(inner, 5)
            rounds += 1

    task = asyncio.create_task(beating())
    await asyncio.sleep(0)
    inners[-1].set_result(1)
    task.cancel()
    await asyncio.sleep(0.01)
    assert not task.done() and rounds == 1  # the cancellation was lost
    assert await asyncio.wait_for(stop_task(task, recancel_every=0.05), 5) is True
    assert task.cancelled()


async def test_stop_task_gives_up_after_its_limit() -> None:
    release = asyncio.Event()

    task = _ignoring_cancels(release)
    await asyncio.sleep(0)
    assert await stop_task(task, give_up_after=0.2, recancel_every=0.05) is False
    assert not task.done()
    release.set()
    await task


async def test_stop_task_consumes_the_tasks_failure() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails())
    await asyncio.sleep(0)
    assert await stop_task(failed) is True  # consumed, not raised
    assert await stop_task(None) is True


async def test_a_cancelled_caller_of_stop_task_is_cancelled() -> None:
    """Stopping a task inside a close that is itself cancelled does not hang on."""
    release = asyncio.Event()

    task = _ignoring_cancels(release)
    stopper = asyncio.create_task(stop_task(task, recancel_every=0.05))
    await asyncio.sleep(0.1)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stopper, 2)
    assert not task.done()
    release.set()
    await task


async def test_raise_if_cancel_requested_ends_a_loop_whose_cancellation_was_lost() -> None:
    rounds = 0

    async def loop_body() -> None:
        nonlocal rounds
        while True:
            with contextlib.suppress(asyncio.CancelledError):  # lost; cancelling() still says so
                await asyncio.sleep(0.01)
            raise_if_cancel_requested()
            rounds += 1

    task = asyncio.create_task(loop_body())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert rounds >= 1


async def test_sqlcache_close_ends_when_its_heartbeat_loses_the_cancellation(
    tmp_path: Path,
) -> None:
    """The CI hang, reproduced: the heartbeat's beat loses the cancellation close() sends."""
    cache = SQLCache(f"sqlite:///{tmp_path / 'c.db'}", key_filter=True, purge_interval=None)
    cache.WRITER_HEARTBEAT_S = 0.01
    await cache.set("k", 1)
    beat = cache._beat
    beating = asyncio.Event()

    async def losing_beat() -> None:
        beating.set()
        try:
            await beat()
            await asyncio.sleep(0.2)  # the beat takes the time: close() cancels it there
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]

    cache._beat = losing_beat  # type: ignore[method-assign]
    await asyncio.wait_for(beating.wait(), 5)
    await asyncio.wait_for(cache.close(), 10)
    assert cache._heartbeat is None


async def test_ensure_task_starts_one_task_and_replaces_one_that_ended() -> None:
    starts: list[int] = []
    release = asyncio.Event()

    async def body() -> None:
        starts.append(1)
        await release.wait()

    first = ensure_task(None, body, "t")
    assert first is not None and ensure_task(first, body, "t") is first  # running: kept
    await asyncio.sleep(0)
    release.set()
    await first
    second = ensure_task(first, body, "t")  # ended: replaced
    assert second is not first
    await second
    assert starts == [1, 1]
    # no event loop in this thread (a worker thread): the task given is answered, none started
    assert await asyncio.to_thread(ensure_task, first, body, "t") is first
    assert starts == [1, 1]
