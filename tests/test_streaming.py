"""StreamProcessor: windows, idle flush, backpressure, Redis Streams at-least-once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from infercache.streaming import RedisStreamSource, StreamItem, StreamProcessor


async def numbers(n: int, delay: float = 0.0, pause_after: int | None = None,
                  pause: float = 0.0) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
    for i in range(n):
        yield {"value": i}
        if delay:
            await asyncio.sleep(delay)
        if pause_after is not None and i + 1 == pause_after:
            await asyncio.sleep(pause)


def double(xs: list[dict[str, Any]]) -> list[int]:
    return [x["value"] * 2 for x in xs]


async def collect(proc: StreamProcessor, source: Any) -> list[Any]:
    return [r async for r in proc.process(source)]


async def test_count_windows_and_end_flush() -> None:
    proc = StreamProcessor(fn=double, window="count", size=4, idle_timeout=None)
    results = await collect(proc, numbers(10))
    assert [r.outputs for r in results] == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18]]
    assert [r.reason for r in results] == ["full", "full", "end"]
    assert results[0].summary["count"] == 4 and results[0].summary["avg"] == 1.5
    assert results[0].summary["mean_output"] == 3.0
    assert [r.window for r in results] == [0, 1, 2]


async def test_sliding_windows() -> None:
    proc = StreamProcessor(fn=double, window="sliding", size=3, step=2, idle_timeout=None)
    results = await collect(proc, numbers(8))
    assert [r.outputs for r in results] == [[0, 2, 4], [4, 6, 8], [8, 10, 12], [10, 12, 14]]
    assert [r.reason for r in results] == ["slide", "slide", "slide", "end"]


async def test_time_windows() -> None:
    proc = StreamProcessor(fn=double, window="time", duration=0.1, idle_timeout=None)
    # 2 items, a gap longer than the window, 2 more: two windows, the first closed by its timer
    results = await collect(proc, numbers(4, pause_after=2, pause=0.3))
    assert [r.outputs for r in results] == [[0, 2], [4, 6]]
    assert results[0].reason == "time"


async def test_idle_timeout_flushes_a_partial_window() -> None:
    proc = StreamProcessor(fn=double, window="count", size=100, idle_timeout=0.05)
    results = await collect(proc, numbers(6, pause_after=3, pause=0.3))
    assert [r.outputs for r in results] == [[0, 2, 4], [6, 8, 10]]
    assert [r.reason for r in results] == ["idle", "end"]


async def test_without_model_outputs_are_the_inputs_and_bad_items_are_reported() -> None:
    async def source() -> AsyncIterator[Any]:
        yield StreamItem({"input": [1, 2]}, "a")
        yield StreamItem(None, "b", error="invalid JSON payload")
        yield StreamItem({"input": [3, 4]}, "c")

    results = await collect(StreamProcessor(size=3, idle_timeout=None), source())
    (r,) = results
    assert r.ids == ["a", "b", "c"]
    assert r.outputs == [[1, 2], None, [3, 4]]
    assert r.errors == {1: "invalid JSON payload"}
    assert r.summary["errors"] == 1 and r.summary["mean_output"] == [2.0, 3.0]


async def test_backpressure_slow_consumer_bounds_the_read_ahead() -> None:
    produced = 0

    async def source() -> AsyncIterator[int]:
        nonlocal produced
        for i in range(1000):
            produced += 1
            yield i

    proc = StreamProcessor(size=5, max_buffer=10, idle_timeout=None)
    consumed = 0
    async for r in proc.process(source()):
        consumed += len(r.ids)
        await asyncio.sleep(0.002)  # slow sink
        # the reader may run ahead by the queue plus the item it is putting, never more
        assert produced - consumed <= 10 + 5 + 1
        if consumed >= 100:
            break
    assert produced < 200


async def test_run_with_sink_and_publish() -> None:
    published: list[dict[str, Any]] = []
    got: list[Any] = []

    async def sink(result: Any) -> None:
        got.append(result.outputs)

    proc = StreamProcessor(fn=double, size=2, idle_timeout=None, publish=published.append)
    n = await proc.run(numbers(5), sink)
    assert n == 3 and got == [[0, 2], [4, 6], [8]]
    assert [p["outputs"] for p in published] == got
    assert json.dumps(published)  # JSON-able


def test_invalid_arguments() -> None:
    for kwargs in ({"window": "tumbling"}, {"size": 0}, {"window": "time"}, {"step": 0},
                   {"idle_timeout": 0}, {"max_buffer": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            StreamProcessor(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"size": "5"}, TypeError, "size"),
        ({"size": True}, TypeError, "size"),
        ({"size": 2.5}, TypeError, "size"),
        ({"window": None}, TypeError, "window"),
        ({"window": "sliding", "step": "2"}, TypeError, "step"),
        ({"window": "time", "duration": "1"}, TypeError, "duration"),
        ({"window": "time", "duration": float("nan")}, ValueError, "duration"),
        ({"window": "time", "duration": -1.0}, ValueError, "duration"),
        ({"idle_timeout": "1"}, TypeError, "idle_timeout"),
        ({"idle_timeout": float("inf")}, ValueError, "idle_timeout"),
        ({"max_buffer": 8.0}, TypeError, "max_buffer"),
        # arguments the chosen window kind would silently ignore
        ({"window": "count", "duration": 1.0}, ValueError, "duration"),
        ({"window": "sliding", "duration": 1.0}, ValueError, "duration"),
        ({"window": "count", "step": 2}, ValueError, "step"),
        ({"window": "time", "duration": 1.0, "step": 2}, ValueError, "step"),
        # a predictor and fn: fn would be ignored
        ({"predictor": object(), "fn": double}, ValueError, "fn"),
        ({"predictor": object()}, TypeError, "predictor"),
        ({"fn": 3}, TypeError, "fn"),
        ({"extract": None}, TypeError, "extract"),
        ({"publish": "hub"}, TypeError, "publish"),
        ({"stop_timeout": 0}, ValueError, "stop_timeout"),
        ({"stop_timeout": None}, TypeError, "stop_timeout"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=rf"\b{name}\b"):
        StreamProcessor(**kwargs)


def test_good_arguments_are_accepted_and_normalised() -> None:
    import numpy as np

    proc = StreamProcessor(window="sliding", size=np.int64(3), step=2)  # type: ignore[arg-type]
    assert proc.size == 3 and type(proc.size) is int and proc.step == 2
    # the server passes its size setting to every window kind; a time window ignores it
    proc = StreamProcessor(window="time", size=10, duration=1, idle_timeout=None)
    assert proc.duration == 1.0 and proc.idle_timeout is None


async def test_fn_that_fails_is_reported_in_its_window_and_the_stream_goes_on() -> None:
    def flaky(xs: list[dict[str, Any]]) -> list[int]:
        values = [x["value"] for x in xs]
        if 5 in values:
            raise ValueError("model rejected the batch")
        if 9 in values:
            return [v * 2 for v in values][:-1]  # one output short
        return [v * 2 for v in values]

    proc = StreamProcessor(fn=flaky, window="count", size=4, idle_timeout=None)
    results = await collect(proc, numbers(12))
    assert [r.outputs for r in results] == [[0, 2, 4, 6], [None] * 4, [None] * 4]
    assert results[0].errors == {}
    # the Predictor path's shape: "<code or type>: <message>" for every item of the call
    assert results[1].errors == dict.fromkeys(range(4), "ValueError: model rejected the batch")
    assert results[1].summary["errors"] == 4 and results[1].summary["mean_output"] is None
    assert results[2].errors == dict.fromkeys(
        range(4), "ValueError: fn returned 3 outputs for 4 inputs"
    )
    assert results[2].to_dict()["errors"]["0"].startswith("ValueError")


# --------------------------------------------------------------------------- Redis Streams

_CHILD = r"""
import asyncio, json, sys
from infercache.streaming import RedisStreamSource, StreamProcessor

async def main(url, stream, out):
    src = RedisStreamSource(url, stream, "workers", "a", count=8, block_ms=100,
                            claim_min_idle_ms=60_000)
    proc = StreamProcessor(fn=lambda xs: [x * 2 for x in xs], size=5, max_buffer=8,
                           idle_timeout=None)
    with open(out, "a") as f:
        async for r in proc.process(src):
            f.write(json.dumps({"ids": r.ids, "outputs": r.outputs}) + "\n")
            f.flush()
            await asyncio.sleep(0.05)  # a slow sink: the consumer is killed mid-stream

asyncio.run(main(*sys.argv[1:]))
"""


_SRC = str(Path(__file__).resolve().parents[1] / "src")


def _spawn_consumer(redis_url: str, stream: str, out: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=_SRC)
    return subprocess.Popen([sys.executable, "-c", _CHILD, redis_url, stream, str(out)], env=env)


async def test_redis_stream_consumer_killed_midway_loses_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    stream = "infercache:test:stream"
    values = {}
    for i in range(120):
        entry_id = await client.xadd(stream, {"data": json.dumps(i)})
        values[entry_id.decode()] = i
    out = tmp_path / "a.jsonl"
    out.touch()
    child = _spawn_consumer(redis_url, stream, out)
    try:
        deadline = time.monotonic() + 30
        while len(out.read_text().splitlines()) < 3:
            assert child.poll() is None, "consumer a exited early"
            assert time.monotonic() < deadline, "consumer a made no progress"
            await asyncio.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    done_by_a = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    ids_a = {i for w in done_by_a for i in w["ids"]}
    assert len(ids_a) < len(values), "a finished everything before it was killed"
    info = await client.xpending(stream, "workers")
    assert info["pending"] > 0  # a read ahead and died without acknowledging

    await asyncio.sleep(0.15)  # let a's entries go idle past claim_min_idle_ms
    source = RedisStreamSource(client, stream, "workers", "b", count=16, block_ms=50,
                               claim_min_idle_ms=100, stop_when_empty=True)  # fmt: skip
    proc = StreamProcessor(fn=lambda xs: [x * 2 for x in xs], size=7, idle_timeout=None)
    results = [r async for r in proc.process(source)]
    ids_b = [i for r in results for i in r.ids]
    for r in results:
        assert r.outputs == [values[i] * 2 for i in r.ids]
    assert ids_a | set(ids_b) == set(values)  # nothing lost
    assert source.claimed > 0  # b took over a's pending entries
    assert (await client.xpending(stream, "workers"))["pending"] == 0  # everything acknowledged
    await client.aclose()


async def test_redis_stream_restarted_consumer_rereads_its_own_pending(redis_url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    stream = "infercache:test:own"
    for i in range(6):
        await client.xadd(stream, {"data": json.dumps({"input": i}), "src": "t"})
    await client.xadd(stream, {"data": b"{not json"})
    first = RedisStreamSource(client, stream, "g", "c1", count=10, block_ms=50)
    await first.ensure_group()
    await client.xreadgroup("g", "c1", {stream: ">"}, count=3)  # read 3, "crash" before ack
    again = RedisStreamSource(client, stream, "g", "c1", count=10, block_ms=50,
                              stop_when_empty=True)  # fmt: skip
    proc = StreamProcessor(size=100, idle_timeout=None)
    (r,) = [r async for r in proc.process(again)]
    assert len(r.ids) == 7 and len(set(r.ids)) == 7
    assert r.outputs[:6] == list(range(6))
    assert list(r.errors.values()) == [r.errors[6]] and "invalid JSON" in r.errors[6]
    assert (await client.xpending(stream, "g"))["pending"] == 0
    assert await again.pending() == 0
    await client.aclose()


async def test_redis_stream_window_whose_fn_fails_is_acknowledged_and_the_worker_goes_on(
    redis_url: str,
) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    stream = "infercache:test:fnfail"
    for i in range(6):
        await client.xadd(stream, {"data": json.dumps(i)})

    async def model(xs: list[int]) -> list[int]:
        if 2 in xs:
            raise RuntimeError("out of memory")
        return [x * 2 for x in xs]

    source = RedisStreamSource(client, stream, "g", "c1", block_ms=50, stop_when_empty=True)
    proc = StreamProcessor(fn=model, window="count", size=2, idle_timeout=None)
    results = [r async for r in proc.process(source)]
    assert [r.outputs for r in results] == [[0, 2], [None, None], [8, 10]]
    assert results[1].errors == {0: "RuntimeError: out of memory", 1: "RuntimeError: out of memory"}
    # reported, not retried forever: the failed window's entries are acknowledged too
    assert source.acked == 6
    assert (await client.xpending(stream, "g"))["pending"] == 0
    await client.aclose()


async def test_redis_stream_idle_claim_takes_dead_consumers_entries_not_its_own_in_flight(
    redis_url: str,
) -> None:
    """An idle stream runs XAUTOCLAIM; it must not hand this consumer's own unacknowledged
    entries (still in its open window) back to it -- that duplicated them in the window."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    stream = "infercache:test:selfclaim"
    for i in range(3):
        await client.xadd(stream, {"data": json.dumps(i)})
    source = RedisStreamSource(client, stream, "g", "c1", block_ms=50, claim_min_idle_ms=100,
                               claim_interval=0.05)  # fmt: skip
    await source.ensure_group()
    await client.xreadgroup("g", "dead", {stream: ">"}, count=1)  # entry 0: a crashed consumer's
    await asyncio.sleep(0.15)  # idle past claim_min_idle_ms

    async def feed_later() -> None:
        # long enough for c1's own entries 1 and 2 to go idle through several claim passes
        await asyncio.sleep(0.6)
        await client.xadd(stream, {"data": json.dumps(3)})

    feeder = asyncio.create_task(feed_later())
    proc = StreamProcessor(window="count", size=4, idle_timeout=None)
    results = []
    async for r in proc.process(source):
        results.append(r)
        source.stop_when_empty = True  # end at the next empty read; acks this window first
    await feeder
    (r,) = results
    assert r.outputs == [0, 1, 2, 3]
    assert len(set(r.ids)) == 4
    assert source.claimed == 1  # the dead consumer's entry, and nothing of c1's own
    assert (await client.xpending(stream, "g"))["pending"] == 0
    await client.aclose()


# ------------------------------------------------------------------- stopping the reader


def _readers_alive() -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if t.get_name() == "infercache-stream-reader" and not t.done()
    ]


async def _within(seconds: float, coro: Any) -> float:
    """Run ``coro`` in a task and fail (instead of hanging the suite) unless it ends in time;
    returns how long it took. Not ``asyncio.timeout``: the bug swallowed its cancellation too."""
    task = asyncio.ensure_future(coro)
    start = time.monotonic()
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task not in done:
        task.cancel()
        pytest.fail(f"did not return within {seconds} s (hung)")
    task.result()
    return time.monotonic() - start


async def _five_entries(client: Any, stream: str) -> list[str]:
    return [(await client.xadd(stream, {"data": json.dumps(i)})).decode() for i in range(5)]


async def _pending_ids(client: Any, stream: str, group: str) -> set[str]:
    rows = await client.xpending_range(stream, group, min="-", max="+", count=100)
    return {r["message_id"].decode() for r in rows}


async def test_redis_stream_run_max_windows_returns_and_unprocessed_entries_stay_pending(
    redis_url: str,
) -> None:
    """The user-acceptance repro: run(max_windows=1) right after a window never returned.
    Stopping cancelled the reader while redis-py sent its next XREADGROUP through Python 3.11's
    asyncio.wait_for, which lost the cancellation; the reader read on and ``await reader``
    waited forever."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    ids = await _five_entries(client, "ev7")
    # a URL: the source's own client, with redis-py's default socket_timeout (wait_for sends)
    source = RedisStreamSource(redis_url, "ev7", "g", "me")
    got: list[Any] = []
    proc = StreamProcessor(window="count", size=2)
    try:
        for n in range(2):  # the race was hit every time; twice makes a regression certain
            got.clear()
            await _within(10, proc.run(source, got.append, max_windows=1))
            assert not _readers_alive()
            # the window the sink handled is acknowledged (each run got the first one again);
            # at-least-once: what no window handled was read but not acknowledged
            assert len(got) == 1 and got[0].ids == ids[2 * n : 2 * n + 2]
            pending = await _pending_ids(client, "ev7", "g")
            assert not pending & set(got[0].ids)
            assert set(ids[2 * n + 2 :]) <= pending
        assert source.acked == 4
    finally:
        await source.close()
        await client.aclose()


@pytest.mark.parametrize(
    ("window", "options", "handled"),
    [
        ("count", {"size": 2}, 2),
        ("sliding", {"size": 3, "step": 1}, 3),  # the window's three entries
    ],
)
async def test_run_max_windows_acknowledges_the_windows_its_sink_handled_and_no_more(
    redis_url: str, window: str, options: dict[str, int], handled: int
) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    stream = f"acked-{window}"
    ids = [(await client.xadd(stream, {"data": json.dumps(i)})).decode() for i in range(8)]
    source = RedisStreamSource(redis_url, stream, "g", "me")
    got: list[Any] = []
    try:
        proc = StreamProcessor(window=window, **options)  # type: ignore[arg-type]
        await _within(10, proc.run(source, got.append, max_windows=1))
        assert len(got) == 1 and got[0].ids == ids[:handled]
        pending = await _pending_ids(client, stream, "g")
        assert not pending & set(ids[:handled])  # handled: acknowledged
        assert source.acked == handled
        # the next run starts after them: the pending ones first (read ahead, never handled)
        got.clear()
        await _within(10, proc.run(source, got.append, max_windows=1))
        assert got[0].ids[0] == ids[handled]
    finally:
        await source.close()
        await client.aclose()


async def test_redis_stream_process_aclose_after_the_first_window_returns(redis_url: str) -> None:
    """The second repro: ``gen.__anext__()`` then ``gen.aclose()`` hung the same way."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    ids = await _five_entries(client, "ev7")
    source = RedisStreamSource(redis_url, "ev7", "g", "me")
    proc = StreamProcessor(window="count", size=2)
    try:
        for _ in range(3):
            gen = proc.process(source)
            first = await gen.__anext__()
            await _within(10, gen.aclose())
            assert not _readers_alive()
            assert set(ids) - set(first.ids) <= await _pending_ids(client, "ev7", "g")
        # a restarted consumer re-reads its own pending entries: nothing was lost
        again = RedisStreamSource(client, "ev7", "g", "me", block_ms=50, stop_when_empty=True)
        results = [r async for r in StreamProcessor(size=10, idle_timeout=None).process(again)]
        assert sorted(i for r in results for i in r.ids) == sorted(ids)
        assert await _pending_ids(client, "ev7", "g") == set()
    finally:
        await source.close()
        await client.aclose()


async def test_redis_stream_source_ends_after_a_cancellation_lost_below_it(
    redis_url: str,
) -> None:
    """A cancellation swallowed under the source (here by the consumer, as Python 3.11's
    wait_for does inside redis-py) still ends the iteration before its next Redis command:
    before, the source issued XREADGROUP ... BLOCK forever in a task that stayed 'cancelling'."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    stream = "infercache:test:lostcancel"
    await client.xadd(stream, {"data": json.dumps(1)})
    source = RedisStreamSource(client, stream, "g", "c1", block_ms=50)
    got: list[Any] = []
    reading = asyncio.Event()

    async def consume() -> None:
        async for item in source:
            got.append(item.value)
            reading.set()
            # lost on the way, without uncancel(): the task is still 'cancelling'
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)

    task = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(reading.wait(), 5)
        assert got == [1]
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done, "the source kept reading after its task was cancelled"
        assert task.cancelled()
        assert await source.pending() == 1  # delivered, never acknowledged: still pending
    finally:
        task.cancel()
        await client.aclose()


async def test_stopping_gives_up_on_a_reader_that_ignores_cancellation_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The wait for the reader is bounded: a source that refuses to stop cannot hang the
    consumer's exit; the processor says it left the reader behind."""
    release = asyncio.Event()

    async def stubborn() -> AsyncIterator[int]:
        yield 1
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()  # suppressed on purpose, and said so

    proc = StreamProcessor(size=1, idle_timeout=None, stop_timeout=0.3)
    gen = proc.process(stubborn())
    assert (await gen.__anext__()).outputs == [1]
    try:
        with caplog.at_level("WARNING", logger="infercache.streaming"):
            took = await _within(5, gen.aclose())
        assert took >= 0.3  # it waited stop_timeout; _within bounds the rest (no timing test)
        assert "did not stop within 0.3 s" in caplog.text
    finally:
        release.set()  # the abandoned reader ends with its source
    for _ in range(100):
        if not _readers_alive():
            break
        await asyncio.sleep(0.01)
    assert not _readers_alive()
