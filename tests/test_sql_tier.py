"""SQLCache against a real SQLite file and a real PostgreSQL server (same tests for both)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from infercache.errors import ConfigError, TierError, TierUnavailable
from infercache.tiers.base import AsyncTier
from infercache.tiers.sql import SQLCache, _SQLiteBackend

try:
    from servers import ReplyDelayProxy, wait_until
except ImportError:  # pragma: no cover
    from tests.servers import ReplyDelayProxy, wait_until  # type: ignore[no-redef]

_ns = itertools.count()


class Clock:
    """Wall-clock stand-in: expiry is stored as absolute epoch seconds."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ns() -> str:
    return f"ns{next(_ns)}"


@pytest.fixture
async def cache(sql_url: str, ns: str) -> AsyncIterator[SQLCache]:
    c = SQLCache(sql_url, namespace=ns)
    yield c
    await c.close()


def raw_write(url: str, ns: str, key: str, value: bytes) -> None:
    """Put bytes straight into the table, bypassing the codec (a corrupt or foreign row)."""
    sql = (
        "INSERT INTO infercache_entries (namespace, key, value, expires_at, created_at)"
        " VALUES ({p}, {p}, {p}, NULL, 0)"
    )
    if url.startswith("sqlite"):
        with sqlite3.connect(url[len("sqlite:///") :]) as db:
            db.execute(sql.format(p="?"), (ns, key, value))
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.format(p="%s"), (ns, key, value))


async def test_protocol_and_name(cache: SQLCache, sql_url: str) -> None:
    assert isinstance(cache, AsyncTier)
    assert cache.name == ("sqlite" if sql_url.startswith("sqlite") else "postgres")


async def test_roundtrip_upsert_delete(cache: SQLCache) -> None:
    arr = np.linspace(0, 1, 5, dtype=np.float32)
    await cache.set("k", {"out": arr, "tag": "x"})
    got = await cache.get("k")
    assert got is not None
    assert got["tag"] == "x" and got["out"].dtype == np.float32
    np.testing.assert_array_equal(got["out"], arr)
    await cache.set("k", "new")  # UPSERT
    assert await cache.get("k") == "new"
    assert await cache.exists("k")
    assert await cache.delete("k")
    assert not await cache.delete("k")
    assert await cache.get("k") is None
    await cache.set("none", None)
    assert not await cache.exists("none")


async def test_get_many_set_many(cache: SQLCache) -> None:
    await cache.set_many({f"k{i}": [i] for i in range(700)})  # > one SQLite chunk
    got = await cache.get_many([f"k{i}" for i in range(750)])
    assert len(got) == 700 and got["k699"] == [699]
    # more rows than one upsert statement takes (1,000): several statements, one transaction
    await cache.set_many({f"big{i}": i for i in range(2345)})
    big = await cache.get_many([f"big{i}" for i in range(2345)])
    assert len(big) == 2345 and big["big2344"] == 2344 and big["big0"] == 0
    assert await cache.get_many([]) == {}
    assert await cache.delete_many([f"k{i}" for i in range(600)]) == 600
    assert len(await cache.get_many([f"k{i}" for i in range(700)])) == 100


async def test_ttl_expiry_and_purge(sql_url: str, ns: str) -> None:
    clock = Clock()
    c = SQLCache(sql_url, namespace=ns, ttl=60, timer=clock, purge_interval=None)
    try:
        await c.set("default", 1)
        await c.set("short", 2, ttl=5)
        await c.set_many({"a": 1, "b": 2}, ttl=30)
        assert await c.ttl("default") == pytest.approx(60)
        assert await c.ttl("short") == pytest.approx(5)
        with pytest.raises(KeyError):
            await c.ttl("absent")
        clock.now += 10
        assert await c.get("short") is None  # expired rows are never returned
        assert not await c.exists("short")
        with pytest.raises(KeyError):
            await c.ttl("short")
        assert not await c.expire("short", 100)  # an expired row cannot be revived
        assert await c.expire("a", 100)
        with_ttl = await c.get_many_with_ttl(["a", "b", "short"])
        assert with_ttl["a"] == (1, pytest.approx(100)) and with_ttl["b"][1] == pytest.approx(20)
        assert "short" not in with_ttl
        clock.now += 50
        assert await c.purge_expired() == 3  # short, b, default
        assert await c.get_many(["a", "default", "b"]) == {"a": 1}
        assert (await c.stats())["purged"] == 3
        with pytest.raises(ConfigError):
            await c.set("x", 1, ttl=-1)
    finally:
        await c.close()


async def test_background_purge(sql_url: str, ns: str) -> None:
    clock = Clock()
    c = SQLCache(sql_url, namespace=ns, timer=clock, purge_interval=0.01)
    try:
        await c.set("gone", 1, ttl=1)
        await c.set("kept", 1)
        clock.now += 2
        await wait_until(lambda: c._purged >= 1)
        assert (await c.stats())["entries"] == 1
    finally:
        await c.close()


async def test_no_ttl_is_forever(cache: SQLCache) -> None:
    await cache.set("p", 1)
    assert await cache.ttl("p") is None
    assert await cache.get_many_with_ttl(["p"]) == {"p": (1, None)}


async def test_clear_is_namespace_only(sql_url: str, ns: str) -> None:
    a = SQLCache(sql_url, namespace=ns + "a")
    b = SQLCache(sql_url, namespace=ns + "b")
    try:
        await a.set_many({"x": 1, "y": 2})
        await b.set("x", "b")
        assert await a.clear() == 2
        assert await a.get("x") is None
        assert await b.get("x") == "b"
    finally:
        await a.close()
        await b.close()


async def test_corrupt_rows_are_a_miss_and_deleted(
    cache: SQLCache, sql_url: str, ns: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (marker.write_text, ("unpickled!",))

    await cache.set("good", 1)  # creates the table
    raw_write(sql_url, ns, "bad", b"\x01\xc1garbage")
    raw_write(sql_url, ns, "pickle", pickle.dumps(Evil()))
    assert await cache.get_many(["bad", "pickle", "good"]) == {"good": 1}
    assert not marker.exists()
    assert not await cache.exists("bad") and not await cache.exists("pickle")
    assert (await cache.stats())["corrupt"] == 2


async def test_two_instances_share_the_store(sql_url: str, ns: str) -> None:
    a = SQLCache(sql_url, namespace=ns)
    b = SQLCache(sql_url, namespace=ns)
    try:
        await a.set("k", "from a")
        assert await b.get("k") == "from a"
    finally:
        await a.close()
        await b.close()


async def test_stats(cache: SQLCache) -> None:
    await cache.set("a", 1)
    await cache.get("a")
    await cache.get("b")
    s = await cache.stats()
    assert (s["hits"], s["misses"], s["entries"]) == (1, 1, 1)
    assert s["latency"]["count"] >= 3 and s["breaker"]["state"] == "closed"


def test_bad_urls() -> None:
    with pytest.raises(ConfigError):
        SQLCache("mysql://x")
    with pytest.raises(ConfigError):
        SQLCache("sqlite:///x.db", table="x; drop table y")


async def test_sqlite_memory_url() -> None:
    c = SQLCache("sqlite:///:memory:")
    try:
        await c.set("k", 1)
        assert await c.get("k") == 1
    finally:
        await c.close()


async def test_postgres_that_stops_answering_fails_calls_instead_of_holding_them(
    postgres_server: Any,
) -> None:
    """A PostgreSQL that stops answering on an open connection (a partition, a stalled host): a
    statement has no timeout of its own, so a lookup, or the write-behind flusher, waited until
    TCP gave up. Now a lookup fails at read_timeout and a write at statement_timeout, and the
    next ones work again."""
    proxy = await ReplyDelayProxy(postgres_server.port).start()
    c = SQLCache(
        proxy.through(postgres_server.url),
        namespace=f"ns{next(_ns)}",
        read_timeout=0.5,
        statement_timeout=0.5,
    )
    try:
        await c.set("k", 1)
        proxy.hold = {b"SELECT": 60.0, b"INSERT": 60.0}  # replies held far past the timeout
        for call in (c.get("k"), c.set("k", 2)):
            with pytest.raises(TierError, match=r"did not answer within 0\.5 s"):
                await asyncio.wait_for(call, 30)  # only turns a hang into a failure
        proxy.hold = {}
        await c.set("k", 3)  # the held connections were dropped; new ones answer
        assert await c.get("k") == 3
    finally:
        await c.close()
        await proxy.stop()


async def test_postgres_caller_that_gives_up_leaves_a_healthy_connection_pooled(
    postgres_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A request deadline cancels a lookup in flight. On a server that answers, its statement
    finishes without the caller and the connection goes back to the pool: only a statement past
    its own deadline has its connection aborted (and replaced)."""
    proxy = await ReplyDelayProxy(postgres_server.port).start()
    c = SQLCache(proxy.through(postgres_server.url), namespace=f"ns{next(_ns)}", read_timeout=2.0)
    try:
        await c.set("k", 1)
        proxy.hold = {b"SELECT": 0.3}
        lookup = asyncio.create_task(c.get("k"))
        await asyncio.sleep(0.05)
        lookup.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lookup
        await wait_until(lambda: not c.backend._busy)  # type: ignore[union-attr]
        proxy.hold = {}
        assert await c.get("k") == 1
        lost = [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")]
        assert not lost, lost
        assert c.breaker.snapshot()["consecutive_failures"] == 0
    finally:
        await c.close()
        await proxy.stop()


async def test_postgres_stop_and_restart(postgres_server: Any) -> None:
    """A stopped PostgreSQL raises TierError, the breaker fails fast, and it comes back."""
    c = SQLCache(
        postgres_server.url,
        namespace=f"ns{next(_ns)}",
        timeout=0.5,
        failure_threshold=2,
        recovery_time=0.05,
    )
    try:
        await c.set("k", 1)
        postgres_server.stop()
        try:
            failures = 0
            for _ in range(4):
                try:
                    await c.get("k")
                except TierUnavailable:
                    break
                except TierError:
                    failures += 1
            assert failures >= 1
            assert c.breaker.opened_count >= 1
        finally:
            postgres_server.start()

        async def back() -> bool:
            try:
                return await c.get("k") == 1
            except TierError:
                return False

        await wait_until(back, limit=30)
        assert c.breaker.state == "closed"
    finally:
        await c.close()


async def test_generations_are_monotonic_and_per_namespace(sql_url: str, ns: str) -> None:
    a = SQLCache(sql_url, namespace=ns)
    b = SQLCache(sql_url, namespace=ns)
    other = SQLCache(sql_url, namespace=ns + "x")
    try:
        assert await a.read_generations() == {}
        assert await a.advance_generation("m") == 1
        assert await b.advance_generation("m") == 2  # shared through the database
        assert await a.advance_generation("m", floor=10) == 10
        assert await a.advance_generation("m", floor=3) == 11  # never backwards
        assert await a.raise_generation("m", 5) == 11
        assert await a.raise_generation("n", 4) == 4
        await a.clear()  # entries only: generations outlive clear()
        assert await b.read_generations() == {"m": 11, "n": 4}
        assert await other.read_generations() == {}
    finally:
        await a.close()
        await b.close()
        await other.close()


# -- SQLite: lookups on the event loop, with the reader thread as the fallback ----------------


async def test_sqlite_lookups_run_inline_and_see_committed_writes(tmp_path: Path) -> None:
    async with SQLCache(f"sqlite:///{tmp_path}/l3.db", namespace="inline") as c:
        await c.set_many({f"k{i}": i for i in range(10)})
        assert await c.get_many([f"k{i}" for i in range(12)]) == {f"k{i}": i for i in range(10)}
        stats = await c.stats()
        assert stats["inline_lookups"] >= 1 and stats["inline_backoffs"] == 0


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling classes")
async def test_sqlite_writer_thread_runs_at_idle_priority_unless_told(tmp_path: Path) -> None:
    # Writes are background work: on a busy core they must not take time from the event loop.
    for idle, policy in ((True, os.SCHED_IDLE), (False, os.SCHED_OTHER)):
        url = f"sqlite:///{tmp_path}/l3-{idle}.db"
        async with SQLCache(url, namespace="prio", idle_writer=idle) as c:
            await c.set_many({"k": 1})
            assert await c.get("k") == 1
            backend = c.backend
            assert isinstance(backend, _SQLiteBackend)
            assert await backend._call(os.sched_getscheduler, 0) == policy
            assert await backend._read(os.sched_getscheduler, 0) == os.SCHED_OTHER  # reads
            assert (await c.stats())["idle_writer"] is idle
    async with SQLCache("sqlite:///:memory:", idle_writer=True) as c:  # one thread reads too
        assert (await c.stats())["idle_writer"] is False


async def test_sqlite_failed_inline_lookup_falls_back_to_the_reader_thread(
    tmp_path: Path,
) -> None:
    async with SQLCache(f"sqlite:///{tmp_path}/l3.db", namespace="fallback") as c:
        await c.set("k", "v")
        assert await c.get("k") == "v"
        n = c.backend.inline_lookups
        assert c.backend._iconn is not None
        c.backend._iconn.close()  # any sqlite3.Error on the inline connection
        assert await c.get_many(["k"]) == {"k": "v"}  # answered by the reader thread
        assert c.backend.inline_lookups == n
        assert (await c.stats())["errors"] == 0  # a fallback, not a tier error
        c.backend._inline_off_until = 0.0  # skip the pause: the next lookup reconnects inline
        assert await c.get_many(["k"]) == {"k": "v"}
        assert c.backend.inline_lookups == n + 1


async def test_sqlite_slow_inline_lookup_backs_off_to_the_thread(tmp_path: Path) -> None:
    async with SQLCache(f"sqlite:///{tmp_path}/l3.db", namespace="slow") as c:
        await c.set("k", 1)
        c.backend.INLINE_BUDGET_S = 0.0  # every inline lookup is "too slow"
        for _ in range(c.backend.INLINE_SLOW_STREAK - 1):
            assert await c.get("k") == 1
        assert c.backend.inline_backoffs == 0  # one slow lookup is not a slow disk
        assert await c.get("k") == 1
        assert c.backend.inline_backoffs == 1
        n = c.backend.inline_lookups
        assert await c.get_many(["k"]) == {"k": 1}  # now through the reader thread
        assert c.backend.inline_lookups == n


async def test_large_batches_are_written_whole(cache: SQLCache) -> None:
    # more rows than one SQLite statement carries (199), so several statements, one transaction
    values = {f"big{i}": i for i in range(450)}
    await cache.set_many(values)
    await cache.set_many({"big7": "again", "big400": "again"})
    got = await cache.get_many(list(values))
    assert got == {**values, "big7": "again", "big400": "again"}


# -- the key filter: lookups of keys never written skip the query ----------------------------


async def test_key_filter_loads_existing_keys_and_skips_unknown_ones(sql_url: str, ns: str) -> None:
    import asyncio

    async with SQLCache(sql_url, namespace=ns) as writer:  # an earlier run of the server
        await writer.set_many({f"old{i:05d}": i for i in range(2500)})  # more than one page
        await writer.set("", "the empty key")  # no page, read after "", holds it (in review)
    async with SQLCache(sql_url, namespace=ns, key_filter=True) as c:
        assert await c.get("old00007") == 7  # first use: set up, start loading
        assert c._filter is not None
        await asyncio.wait_for(c._filter._loader, 10)  # type: ignore[arg-type]
        stats = (await c.stats())["key_filter"]
        assert stats["ready"] and stats["loaded"] == 2500
        assert await c.get_many(["old00000", "old02499", "never", ""]) == {
            "old00000": 0,
            "old02499": 2499,
            "": "the empty key",
        }
        before = c._filter.skipped
        assert await c.get_many([f"new{i}" for i in range(50)]) == {}
        assert c._filter.skipped - before >= 48  # at most a false "maybe" or two
        await c.set_many({"new1": "written"})  # learnt before the write lands
        assert await c.get("new1") == "written"
        hits = (await c.stats())["hits"]
        assert hits >= 4


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling classes")
async def test_serve_settings_choose_the_writer_priority(tmp_path: Path) -> None:
    from infercache.config import Settings
    from infercache.server.service import build_service

    for idle in (True, False):
        url = f"sqlite:///{tmp_path}/serve-{idle}.db"
        settings = Settings().replace(sql_url=url, sql_idle_writer=idle, warmup=False)
        service = await build_service(settings)
        try:
            sql = service.cache.tiers[-1]
            assert isinstance(sql, SQLCache) and isinstance(sql.backend, _SQLiteBackend)
            assert await sql.backend._call(os.sched_getscheduler, 0) == (
                os.SCHED_IDLE if idle else os.SCHED_OTHER
            )
        finally:
            await service.close()


async def test_non_str_keys_are_refused(cache: SQLCache) -> None:
    """``set(123, v)`` stored the row under '123' (SQLite's TEXT affinity) and ``get(123)``
    then missed; keys must be str in every remote tier (RedisCache refuses them too). Every
    entry raises TypeError before the database is asked, so nothing is written, nothing is
    counted as a tier error and the breaker stays closed."""
    await cache.set("ok", 1)
    calls = [
        lambda: cache.set(123, "v"),  # type: ignore[arg-type]
        lambda: cache.set_many({"fine": 1, 5: 2}),  # type: ignore[dict-item]
        lambda: cache.set_many_with_ttl({b"k": (1, None)}),  # type: ignore[dict-item]
        lambda: cache.get(123),  # type: ignore[arg-type]
        lambda: cache.get_many(["ok", 123]),  # type: ignore[list-item]
        lambda: cache.get_many_with_ttl([1.5]),  # type: ignore[list-item]
        lambda: cache.delete(123),  # type: ignore[arg-type]
        lambda: cache.delete_many(["ok", None]),  # type: ignore[list-item]
        lambda: cache.exists(123),  # type: ignore[arg-type]
        lambda: cache.ttl(123),  # type: ignore[arg-type]
        lambda: cache.expire(123, 10),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(TypeError, match="SQLCache keys must be str"):
            await call()
    assert await cache.get_many(["ok", "fine", "123", "5"]) == {"ok": 1}  # nothing written
    stats = await cache.stats()
    assert stats["errors"] == 0 and stats["breaker"]["state"] == "closed"
    assert stats["entries"] == 1


async def test_writes_to_a_deleted_sqlite_file_fail_instead_of_vanishing(tmp_path: Path) -> None:
    """The open connection went on writing to the unlinked file: every later write was lost
    with no error and health stayed green. Now they fail (and feed the breaker)."""
    from infercache.errors import TierError

    path = tmp_path / "gone.db"
    c = SQLCache(f"sqlite:///{path}", purge_interval=None, failure_threshold=100)
    try:
        await c.set("before", 1)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")
        await asyncio.sleep(1.1)  # the file is checked at most once a second
        with pytest.raises(TierError, match="deleted or replaced"):
            await c.set("after", 2)
        assert (await c.stats())["errors"] >= 1
    finally:
        await c.close()
