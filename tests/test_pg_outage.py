"""Outages of a real PostgreSQL L3: frozen (SIGSTOP, like a partition) or stopped (refused).

The promise (docs/server.md): the cache degrades instead of stalling. A frozen server must cost
a lookup no more than ``read_timeout`` before the breaker opens and requests skip the tier; a
refused one must never make a request wait for the breaker's probe; ``close()`` must not wait on
a server that does not answer; and an outage shows in the log as one WARNING line when the
breaker opens and one INFO line when it closes, for PostgreSQL and Redis alike.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import pytest

from infercache.errors import TierError, TierUnavailable
from infercache.tiers.breaker import CircuitBreaker
from infercache.tiers.redis import RedisCache
from infercache.tiers.sql import SQLCache

try:
    from servers import wait_until
except ImportError:  # pragma: no cover
    from tests.servers import wait_until  # type: ignore[no-redef]

_ns = itertools.count()

BREAKER_LOG = "infercache.tiers.breaker"

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds the server's processes in /proc"
)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(entry))
    return out


@contextmanager
def frozen(server: Any) -> Iterator[None]:
    """SIGSTOP the postmaster, then its children (backends, background workers): the server
    stops answering without closing a connection, as behind a partition or on a stalled host.
    SIGCONT however the test ends. Processes are found by pid, never by name."""
    postmaster = int((server.datadir / "postmaster.pid").read_text().split()[0])
    stopped: list[int] = []
    try:
        os.kill(postmaster, signal.SIGSTOP)  # first: it forks no child after this
        stopped.append(postmaster)
        for pid in _children(postmaster):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield
    finally:
        for pid in reversed(stopped):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def timed(call: Awaitable[Any]) -> tuple[float, Any]:
    """(seconds, result or the exception raised) of one awaited call."""
    start = time.perf_counter()
    try:
        out = await call
    except Exception as exc:
        out = exc
    return time.perf_counter() - start, out


def breaker_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == BREAKER_LOG and r.levelno == level]


def assert_one_line(record: logging.LogRecord) -> str:
    msg = record.getMessage()
    assert "\n" not in msg and record.exc_info is None, msg  # one line, no traceback
    return msg


@linux_only
async def test_frozen_postgres_bounds_lookups_and_opens_the_breaker(
    postgres_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Each lookup waited for the 10 s statement timeout (a sequential client hung 8 s, p50 at
    50 req/s 286 ms). Now a lookup fails within read_timeout (0.5 s by default), the breaker
    opens after three, requests skip the tier at once while a background probe watches, and
    the tier is back once the server runs again."""
    caplog.set_level(logging.INFO, logger=BREAKER_LOG)
    c = SQLCache(postgres_server.url, namespace=f"frozen{next(_ns)}", recovery_time=0.3)
    try:
        await c.set("k", 1)
        assert await c.get("k") == 1
        with frozen(postgres_server):
            # requests in flight as the server freezes: each fails within read_timeout
            burst = await asyncio.gather(*(timed(c.get_many(["k", "x"])) for _ in range(20)))
            for took, out in burst:
                assert isinstance(out, TierError), out
                assert took < 2.0, f"a lookup took {took:.2f} s"  # it was 10 s
            assert c.breaker.opened_count == 1
            # then every request skips the tier at once
            probes = c.breaker.probes
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                took, out = await timed(c.get("k"))
                assert isinstance(out, TierUnavailable), out
                # well under the 0.5-1 s of a lookup that waits; not 1 ms, for a GC pause (torch
                # is imported in the suite: one full collection can take 0.1 s)
                assert took < 0.3, f"a lookup took {took:.3f} s with the circuit open"
                await asyncio.sleep(0.01)
            assert c.breaker.probes > probes  # checked in the background meanwhile
        await wait_until(lambda: c.breaker.state == "closed", limit=10)
        assert await c.get("k") == 1
        assert c.breaker.opened_count == 1
    finally:
        await c.close()
    (opened,) = breaker_lines(caplog, logging.WARNING)
    msg = assert_one_line(opened)
    assert "sql postgres unavailable" in msg and "Timeout" in msg, msg  # the tier, the error
    (closed,) = breaker_lines(caplog, logging.INFO)
    assert "sql postgres answers again" in assert_one_line(closed)


@linux_only
async def test_close_does_not_wait_for_a_frozen_postgres(postgres_server: Any) -> None:
    """SIGTERM took 8.6 s with PostgreSQL frozen. close() now fails the statements in flight at
    once, whatever their timeout, and does not wait for the pool's workers."""
    c = SQLCache(postgres_server.url, namespace=f"frozen{next(_ns)}", statement_timeout=30.0)
    await c.set("k", 1)
    with frozen(postgres_server):
        write = asyncio.create_task(c.set("k", 2))
        await asyncio.sleep(0.2)
        assert not write.done()  # held by the frozen server
        took, _ = await timed(c.close())
        assert took < 2.0, f"close() took {took:.2f} s"
        with pytest.raises(TierError):
            await asyncio.wait_for(write, 0.5)
    assert c.breaker.opened_count == 0  # closing is not an outage


async def test_refused_postgres_is_probed_in_the_background(
    postgres_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """With PostgreSQL stopped, one request every ~2 s took 1.0 s: it was the breaker's probe,
    and waited the pool's whole timeout for a connection refused at once. Now the probe runs in
    the background, on a connection of its own, and a refused one fails in milliseconds; the
    pool, whose reconnection attempts logged several lines a second, is dropped meanwhile."""
    caplog.set_level(logging.INFO, logger=BREAKER_LOG)
    c = SQLCache(postgres_server.url, namespace=f"refused{next(_ns)}", recovery_time=0.1)
    try:
        await c.set("k", 1)
        postgres_server.stop()
        try:
            for _ in range(c.breaker.failure_threshold + 1):
                took, out = await timed(c.get("k"))
                assert isinstance(out, TierError) and took < 1.5, (out, took)
                if isinstance(out, TierUnavailable):
                    break
            assert c.breaker.opened_count == 1
            await asyncio.sleep(0.3)  # the breaker's probes have run and dropped the pool
            probes, since = c.breaker.probes, time.time()
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                took, out = await timed(c.get_many(["k"]))
                assert isinstance(out, TierUnavailable), out
                # well under the 0.5-1 s of a lookup that waits; not 1 ms, for a GC pause (torch
                # is imported in the suite: one full collection can take 0.1 s)
                assert took < 0.3, f"a lookup took {took:.3f} s with the circuit open"
                await asyncio.sleep(0.01)
            assert c.breaker.probes >= probes + 5  # every ~0.1 s, none on a request
            retried = [
                r for r in caplog.records if r.name.startswith("psycopg") and r.created > since
            ]
            assert not retried, [r.getMessage() for r in retried]
            took, out = await timed(c.backend.probe())  # type: ignore[union-attr]
            assert isinstance(out, psycopg.OperationalError), out
            assert took < 0.4, f"a refused probe took {took:.3f} s"  # the pool's wait: 1 s
        finally:
            postgres_server.start()

        async def back() -> bool:
            with suppress(TierError):
                return await c.get("k") == 1
            return False

        await wait_until(back, limit=10)
    finally:
        await c.close()
    (opened,) = breaker_lines(caplog, logging.WARNING)
    assert "sql postgres unavailable" in assert_one_line(opened)
    (closed,) = breaker_lines(caplog, logging.INFO)
    assert "sql postgres answers again" in assert_one_line(closed)


# -- the breaker's log lines, for every tier that uses it --------------------------------------


def test_breaker_logs_one_warning_when_it_opens_and_one_info_when_it_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis outage wrote nothing to the log: the breaker said nothing and redis-py logs
    nothing. Now opening is one WARNING line (the tier, the failures, the last error) and
    closing one INFO line; the failed probes in between add nothing."""
    caplog.set_level(logging.DEBUG, logger=BREAKER_LOG)
    clock = [0.0]
    b = CircuitBreaker("redis l2", failure_threshold=2, recovery_time=1.0, timer=lambda: clock[0])
    refused = ConnectionRefusedError("connection refused\n\tIs the server running?")
    b.record_failure(refused)
    assert not breaker_lines(caplog, logging.WARNING)  # one failure is not an outage
    for _ in range(3):  # the threshold, then failed probes
        b.record_failure(refused)
        clock[0] += 1.0
        b.before_call()  # half-open: the probe
    b.record_success()
    b.record_success()
    (opened,) = breaker_lines(caplog, logging.WARNING)
    assert assert_one_line(opened) == (
        "redis l2 unavailable after 2 failures in a row, failing fast; a request will probe "
        "it: ConnectionRefusedError: connection refused Is the server running?"
    )
    (closed,) = breaker_lines(caplog, logging.INFO)
    assert assert_one_line(closed) == "redis l2 answers again: circuit closed after 3.0 s"


async def test_redis_outage_is_logged_once_and_its_end_too(
    fresh_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=BREAKER_LOG)
    c = RedisCache(fresh_redis.url, namespace="logged", failure_threshold=1, recovery_time=0.05)
    try:
        await c.set("k", 1)
        fresh_redis.kill()
        for _ in range(5):
            with pytest.raises(TierError):
                await c.get("k")
        fresh_redis.start()

        async def back() -> bool:
            with suppress(TierError):
                await c.get("k")
                return True
            return False

        await wait_until(back)
    finally:
        await c.close()
    (opened,) = breaker_lines(caplog, logging.WARNING)
    assert "redis redis unavailable" in assert_one_line(opened)
    (closed,) = breaker_lines(caplog, logging.INFO)
    assert "redis redis answers again" in assert_one_line(closed)


async def test_a_locked_table_leaves_no_statement_running_and_the_circuit_open(
    postgres_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A migration holds our table: lookups time out here, but the server kept each one waiting
    for the lock, one more backend per lookup until max_connections ran out; and the probe's
    SELECT 1 closed the circuit again every ~1.5 s. The server now ends our statements itself,
    and the probe reads the table."""
    caplog.set_level(logging.INFO, logger=BREAKER_LOG)
    table = f"locked{next(_ns)}"
    c = SQLCache(
        postgres_server.url, namespace="n", table=table, read_timeout=0.3,
        statement_timeout=0.5, recovery_time=0.2,
    )  # fmt: skip
    await c.set("k", 1)
    holder = await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True)
    watcher = await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True)

    async def waiting_long() -> int:
        # backends of ours waiting for the lock for longer than the server's statement_timeout
        # (1.0 s here); the probe's own short waits come and go
        cur = await watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE %s AND pid <> pg_backend_pid()"
            " AND now() - query_start > interval '1.5 seconds'",
            (f"%{table}%",),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    try:
        await holder.execute("BEGIN")
        await holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            took, out = await timed(c.get("k"))
            assert isinstance(out, TierError) and took < 1.5, (out, took)
            await asyncio.sleep(0.05)
        # what we gave up on ended on the server too: without its statement_timeout the first
        # lookups would still be waiting, 2 s on
        await asyncio.sleep(0.6)
        assert await waiting_long() == 0
        assert c.breaker.opened_count == 1  # opened once, and stayed open while locked
        assert c.breaker.state == "open"
    finally:
        await holder.execute("ROLLBACK")
        await holder.close()
        await watcher.close()
    await wait_until(lambda: c.breaker.state == "closed", limit=10)
    assert await c.get("k") == 1
    await c.close()
    assert len(breaker_lines(caplog, logging.WARNING)) == 1


async def test_a_background_probe_never_reports_half_open_and_follows_a_new_loop() -> None:
    """With a background probe no call is let through, so the circuit is open until the probe
    succeeds: ``state`` said half_open (and infercache_tier_up 1) between probes. And a probe
    task of a loop that is gone never ran again, so the circuit never closed."""
    healthy = False

    async def probe() -> None:
        if not healthy:
            raise ConnectionRefusedError("refused")

    b = CircuitBreaker("t", failure_threshold=1, recovery_time=0.05, probe=probe)

    async def fail() -> None:
        b.record_failure(ConnectionRefusedError("refused"))
        await asyncio.sleep(0.2)  # several probe periods
        assert b.state == "open"
        with pytest.raises(TierUnavailable):
            b.before_call()

    def in_another_loop() -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(fail())
        loop.close()  # its probe task is left behind, never to run again

    await asyncio.to_thread(in_another_loop)
    healthy = True
    with pytest.raises(TierUnavailable):
        b.before_call()  # from this loop: a new probe starts here
    await wait_until(lambda: b.state == "closed", limit=5)
    await b.close()


@linux_only
async def test_close_with_writes_queued_for_a_frozen_postgres_tries_it_once(
    postgres_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """close() flushes what waits for the slower tiers. With PostgreSQL frozen that flush used
    to try the tier once per queued batch and once more for what it had missed: about three
    statement timeouts (~6 s) before the breaker opened. A tier that failed during close()'s
    own flush is not tried again: close() takes one statement timeout, and what the tier
    missed is counted as lost (logged), while the other tiers got every write."""
    from infercache.multilevel import MultiLevelCache
    from infercache.tiers.memory import MemoryCache

    caplog.set_level(logging.WARNING)
    l1 = MemoryCache(max_size=10_000)
    sql = SQLCache(postgres_server.url, namespace=f"frozen{next(_ns)}", statement_timeout=1.0)
    cache = MultiLevelCache(
        tiers=[l1, sql], write="behind", write_behind_batch=50, write_behind_interval=5.0
    )
    await cache.set("warm", 0)
    await cache.flush()  # the pool is open and the table exists: only the freeze is measured
    with frozen(postgres_server):
        await cache.set_many({f"k{i}": i for i in range(500)})  # ten batches, all queued
        took, out = await timed(cache.close())
    assert not isinstance(out, Exception), out
    assert took < 2.5, f"close() took {took:.2f} s"  # one statement timeout, not three
    assert sql.breaker.opened_count <= 1
    lost = [r.getMessage() for r in caplog.records if "entries lost" in r.getMessage()]
    assert lost and "500 write-behind entries lost" in lost[0], lost
    assert len(l1.get_many([f"k{i}" for i in range(500)])) == 500  # L1 kept every write
