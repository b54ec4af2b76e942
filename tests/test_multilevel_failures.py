"""Degraded mode against real servers: Redis killed and restarted, PostgreSQL stopped, SIGTERM.

Every test here checks two things: the caller never sees an exception while a tier is down, and
the tier is used again once its server is back.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from infercache.errors import TierError
from infercache.multilevel import MultiLevelCache
from infercache.tiers.memory import MemoryCache
from infercache.tiers.redis import RedisCache
from infercache.tiers.sql import SQLCache

try:
    from servers import wait_until
except ImportError:  # pragma: no cover
    from tests.servers import wait_until  # type: ignore[no-redef]

_ns = itertools.count()
SRC = str(Path(__file__).resolve().parents[1] / "src")


def fast_redis(url: str, **kw: Any) -> RedisCache:
    """A RedisCache that notices an outage quickly and probes again soon."""
    return RedisCache(
        url,
        namespace="f",
        socket_timeout=0.5,
        connect_timeout=0.2,
        failure_threshold=1,
        recovery_time=0.05,
        **kw,
    )


async def test_redis_killed_and_restarted_mid_run(fresh_redis: Any, tmp_path: Path) -> None:
    redis = fast_redis(fresh_redis.url)
    sql = SQLCache(f"sqlite:///{tmp_path}/l3.db", namespace="f", purge_interval=None)
    cache = MultiLevelCache([MemoryCache(50), redis, sql])  # L1 smaller than the working set
    await cache.start()
    try:
        for i in range(100):
            await cache.set(f"k{i}", i)
        fresh_redis.kill()
        # Reads and writes go on, served by L1 and SQLite, with no exception.
        for i in range(100):
            assert await cache.get(f"k{i}") == i
        await cache.set_many({f"down{i}": i for i in range(20)})
        assert await cache.get_many([f"down{i}" for i in range(20)]) == {
            f"down{i}": i for i in range(20)
        }
        assert await cache.get_or_compute("computed-while-down", lambda: "ok") == "ok"
        assert await cache.delete("k1")
        await cache.invalidate(namespace="m")  # generation bumped locally
        s = await cache.stats()
        assert s["tiers"]["redis"]["errors"] > 0
        assert s["tiers"]["sqlite"]["errors"] == 0

        fresh_redis.start()

        async def redis_back() -> bool:
            await cache.set("after", "restart")
            try:
                return await redis.get("after") == "restart"
            except TierError:
                return False

        await wait_until(redis_back)
        raw = aioredis.Redis.from_url(fresh_redis.url)
        try:
            assert await raw.get("f:after") is not None  # written to the live Redis again
        finally:
            await raw.aclose()
        # misses are promoted into Redis again
        assert await cache.get("k99") == 99
        assert await redis.get("k99") == 99
    finally:
        await cache.close()


async def test_pubsub_recovers_after_redis_restart(fresh_redis: Any) -> None:
    a = MultiLevelCache([MemoryCache(100), fast_redis(fresh_redis.url)])
    b = MultiLevelCache([MemoryCache(100), fast_redis(fresh_redis.url)])
    await a.start()
    await b.start()
    try:
        fresh_redis.kill()
        fresh_redis.start()
        await wait_until(lambda: b._counters["resyncs"] >= 1)  # b resubscribed, L1 dropped
        await a.set("x", 1)
        assert await b.get("x") == 1
        l1 = b.l1
        assert l1 is not None and "x" in l1

        async def dropped() -> bool:
            await a.delete("x")
            return "x" not in l1

        await wait_until(dropped)
    finally:
        await a.close()
        await b.close()


async def test_postgres_stopped_then_back(
    redis_url: str, postgres_server: Any, tmp_path: Path
) -> None:
    ns = f"pgf{next(_ns)}"
    pg = SQLCache(
        postgres_server.url, namespace=ns, timeout=0.5, failure_threshold=1, recovery_time=0.05
    )
    redis = RedisCache(redis_url, namespace=ns)
    cache = MultiLevelCache([MemoryCache(100), redis, pg])
    await cache.start()
    try:
        await cache.set("before", 1)
        assert await pg.get("before") == 1
        postgres_server.stop()
        try:
            await cache.set("during", 2)  # no exception: L1 + Redis take it
            assert await cache.get("during") == 2
            assert await cache.get("before") == 1
            assert await redis.get("during") == 2
            assert await cache.get_or_compute("gc", lambda: "v") == "v"
            assert (await cache.stats())["tiers"]["postgres"]["errors"] > 0
        finally:
            postgres_server.start()

        async def pg_back() -> bool:
            await cache.set("after", 3)
            try:
                return await pg.get("after") == 3
            except Exception:
                return False

        await wait_until(pg_back, limit=30)
    finally:
        await cache.close()


async def test_write_behind_survives_redis_outage(fresh_redis: Any, tmp_path: Path) -> None:
    """Writes flushed while Redis is down wait for it (with backoff) and land once it is back."""
    redis = fast_redis(fresh_redis.url)
    sql = SQLCache(f"sqlite:///{tmp_path}/l3.db", namespace="f", purge_interval=None)
    cache = MultiLevelCache(
        [MemoryCache(100), redis, sql],
        write="behind",
        write_behind_interval=60,
        write_behind_retries=10_000,  # the test bounds the outage, not the retry budget
        write_behind_retry_delay=0.01,
        write_behind_retry_max_delay=0.05,
    )
    await cache.start()
    try:
        await cache.set("before", 0)
        await cache.flush()
        fresh_redis.stop()
        await cache.set_many({f"w{i}": i for i in range(10)})
        await cache.flush()  # no exception; SQLite gets the batch, Redis's copy waits
        assert len(await sql.get_many([f"w{i}" for i in range(10)])) == 10
        s = await cache.stats()
        assert s["tiers"]["redis"]["write_behind_retrying"] == 10
        assert s["tiers"]["sqlite"]["write_behind_retrying"] == 0
        assert s["write_behind"]["queue_depth"] == 0 and s["write_behind"]["retrying"] == 10
        await cache.set("w3", "newer")  # queued behind the waiting ones: the newest must win
        await cache.delete("w4")  # and a delete must not be undone by a retry
        await cache.flush()
        cache.l1.clear()  # type: ignore[union-attr]
        assert await cache.get("w3") == "newer"

        fresh_redis.start()  # empty (no persistence): only the retries can refill it
        want = {f"w{i}": i for i in range(10) if i != 4} | {"w3": "newer"}

        async def landed() -> bool:
            try:
                return await redis.get_many([f"w{i}" for i in range(10)]) == want
            except TierError:
                return False

        await wait_until(landed)  # the flusher retried on its own, nothing was lost
        s = await cache.stats()
        assert s["tiers"]["redis"]["write_behind_retrying"] == 0
        assert s["tiers"]["redis"]["write_behind_failed"] == 0
        assert s["tiers"]["redis"]["write_behind_dropped"] == 0
        assert s["tiers"]["redis"]["write_behind_retried"] == 9
    finally:
        await cache.close()


async def test_write_behind_survives_postgres_outage(redis_url: str, postgres_server: Any) -> None:
    ns = f"pgwb{next(_ns)}"
    pg = SQLCache(
        postgres_server.url, namespace=ns, timeout=0.5, failure_threshold=1, recovery_time=0.05
    )
    cache = MultiLevelCache(
        [MemoryCache(100), RedisCache(redis_url, namespace=ns), pg],
        write="behind",
        write_behind_interval=60,
        write_behind_retries=10_000,
        write_behind_retry_delay=0.01,
        write_behind_retry_max_delay=0.1,
    )
    await cache.start()
    try:
        postgres_server.stop()
        try:
            await cache.set_many({f"p{i}": i for i in range(20)})
            await cache.flush()
            s = await cache.stats()
            assert s["tiers"]["postgres"]["write_behind_retrying"] == 20
            assert s["tiers"]["redis"]["write_behind_retrying"] == 0
        finally:
            postgres_server.start()

        async def landed() -> bool:
            try:
                return len(await pg.get_many([f"p{i}" for i in range(20)])) == 20
            except TierError:
                return False

        await wait_until(landed, limit=30)
        assert (await cache.stats())["tiers"]["postgres"]["write_behind_failed"] == 0
    finally:
        await cache.close()


async def test_write_behind_retries_are_bounded() -> None:
    """A tier that stays down: its waiting writes are capped (oldest dropped first, counted),
    and each is given up after its retries (counted); the caller never sees an error."""
    from servers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
    cache = MultiLevelCache(
        [MemoryCache(100), fast_redis(url)],
        write="behind",
        write_behind_max_queue=5,
        write_behind_interval=60,
        write_behind_retries=2,
        write_behind_retry_delay=3600,  # only flush() retries here
    )
    try:
        await cache.set_many({f"b{i}": i for i in range(8)})  # through a queue of 5
        await cache.flush()
        s = (await cache.stats())["tiers"]["redis"]
        assert s["write_behind_retrying"] == 5 and s["write_behind_dropped"] == 3
        cache.l1.clear()  # type: ignore[union-attr]
        assert await cache.get_many([f"b{i}" for i in range(8)]) == {
            f"b{i}": i
            for i in range(3, 8)  # the newest stay readable
        }
        # b3, b4 failed in the first flush and once more in flush() above; b5-b7 were queued
        # behind them unattempted and failed once in flush() above.
        await cache.flush()  # b3, b4 fail a third time: their two retries are used up
        s = (await cache.stats())["tiers"]["redis"]
        assert s["write_behind_retrying"] == 3 and s["write_behind_failed"] == 2
        await cache.flush()
        s = (await cache.stats())["tiers"]["redis"]
        assert s["write_behind_retrying"] == 0 and s["write_behind_failed"] == 5
    finally:
        await cache.close()


async def test_redis_down_at_startup(tmp_path: Path) -> None:
    from servers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
    cache = MultiLevelCache(
        [MemoryCache(100), fast_redis(url), SQLCache(f"sqlite:///{tmp_path}/l3.db")]
    )
    try:
        await cache.start()
        await cache.set("k", 1)
        cache.l1.clear()  # type: ignore[union-attr]
        assert await cache.get("k") == 1  # from SQLite
        assert await cache.get_or_compute("c", lambda: 2) == 2
    finally:
        await cache.close()


SIGTERM_CHILD = """
import asyncio, sys
sys.path.insert(0, {src!r})
from infercache.multilevel import MultiLevelCache
from infercache.tiers.memory import MemoryCache
from infercache.tiers.redis import RedisCache

async def main():
    cache = MultiLevelCache(
        [MemoryCache(1000), RedisCache({url!r}, namespace="sig")],
        write="behind", write_behind_interval=3600, write_behind_batch=1000,
    )
    await cache.start()
    cache.install_signal_handlers()
    await cache.set_many({{f"s{{i}}": i for i in range(200)}})
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_sigterm_flushes_write_behind(redis_url: str) -> None:
    """Acknowledged write-behind entries survive a graceful shutdown by SIGTERM."""
    code = textwrap.dedent(SIGTERM_CHILD.format(src=SRC, url=redis_url))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"ready", await proc.stderr.read()
        check = RedisCache(redis_url, namespace="sig")
        try:
            assert await check.get_many([f"s{i}" for i in range(200)]) == {}  # still queued
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(proc.wait(), 30)
            assert rc == -signal.SIGTERM  # it died of the signal, after flushing
            got = await check.get_many([f"s{i}" for i in range(200)])
            assert got == {f"s{i}": i for i in range(200)}
        finally:
            await check.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_generations_survive_redis_restart(fresh_redis: Any, tmp_path: Path) -> None:
    """Generations are durable: Redis restarted empty (no persistence) cannot bring a fresh
    process back to an old generation whose entries still sit in the SQL tier."""
    db = f"sqlite:///{tmp_path}/l3.db"

    def build() -> MultiLevelCache:
        sql = SQLCache(db, namespace="f", purge_interval=None)
        return MultiLevelCache([MemoryCache(100), fast_redis(fresh_redis.url), sql])

    def k(gen: int) -> str:
        return f"m\x00{gen}:x"

    a = build()
    await a.start()
    try:
        g0 = a.generation("m")
        await a.set(k(g0), "old")
        g1 = await a.invalidate(namespace="m")
        await a.set(k(g1), "mid")
        g2 = await a.invalidate(namespace="m")
        assert g0 < g1 < g2
    finally:
        await a.close()

    fresh_redis.kill()
    fresh_redis.start()  # empty: the generations hash is gone from Redis
    check = SQLCache(db, namespace="f", purge_interval=None)
    try:  # the invalidated entries are still in L3: only the generation keeps them out
        assert await check.get_many([k(g0), k(g1)]) == {k(g0): "old", k(g1): "mid"}
    finally:
        await check.close()

    b = build()
    await b.start()
    try:
        assert b.generation("m") == g2
        assert await b.get(k(b.generation("m"))) is None
        redis = RedisCache(fresh_redis.url, namespace="f")
        try:  # loading repaired the restarted Redis
            assert await redis.read_generations() == {"m": g2}
        finally:
            await redis.close()
        # A bump after the restart never reuses a generation that was handed out before.
        g3 = await b.invalidate(namespace="m")
        assert g3 > g2
        assert await b.get(k(g3)) is None

        fresh_redis.kill()  # a bump while Redis is down still reaches the durable tier
        g4 = await b.invalidate(namespace="m")
        assert g4 > g3
    finally:
        await b.close()

    fresh_redis.start()
    c = build()
    await c.start()
    try:
        assert c.generation("m") == g4
        assert await c.get(k(c.generation("m"))) is None
    finally:
        await c.close()


async def test_a_value_no_tier_can_encode_does_not_stop_the_writes_behind_it(
    redis_url: str, tmp_path: Path
) -> None:
    """A model output msgpack cannot hold (a datetime, an int beyond 64 bits) once failed its
    write-behind batch, was retried, and held every later write behind it: the SQLite L3 stored
    nothing more. Now it stays in L1 only, counted, and the rest is written."""
    import datetime

    from infercache.errors import EncodeError

    ns = f"enc{next(_ns)}"
    redis = RedisCache(redis_url, namespace=ns, socket_timeout=5.0)
    sql = SQLCache(f"sqlite:///{tmp_path}/l3.db", namespace=ns, purge_interval=None)
    cache = MultiLevelCache([MemoryCache(), redis, sql], write="behind", close_tiers=False)
    odd = {"at": datetime.datetime(2024, 1, 1), "big": 2**70}
    await cache.set_many({"odd": odd, "before": 1})
    assert await cache.get("odd") == odd  # L1 has it
    for i in range(20):
        await cache.set(f"after{i}", i)
    await cache.close()
    try:
        want = {"before": 1, **{f"after{i}": i for i in range(20)}}
        for tier in (redis, sql):
            assert await tier.get_many([*want, "odd"]) == want
        wb = cache.health()["write_behind"]
        assert wb["unencodable"] == 2 and wb["retrying"] == 0  # one value, two tiers
        # the tiers themselves: the others written, the odd one named
        for tier in (redis, sql):
            try:
                await tier.set_many({"x": 1, "y": odd})
            except EncodeError as exc:
                assert exc.keys == ("y",)
            else:
                raise AssertionError("no EncodeError")
            assert await tier.get("x") == 1 and await tier.get("y") is None
    finally:
        await redis.close()
        await sql.close()


async def test_write_through_raises_for_a_value_no_tier_can_encode(
    redis_url: str, tmp_path: Path
) -> None:
    """Write-through used to log the refusal as a tier failure, keep the value in L1 only and
    return as if it were stored (found in review): this process then answered what every other
    one misses. Now set() raises, naming the key, L1 drops it, and the rest of the batch lands;
    nothing waits for a retry that could never succeed."""
    from infercache.errors import EncodeError

    ns = f"encthru{next(_ns)}"
    l1 = MemoryCache()
    redis = RedisCache(redis_url, namespace=ns, socket_timeout=5.0)
    sql = SQLCache(f"sqlite:///{tmp_path}/l3.db", namespace=ns, purge_interval=None)
    cache = MultiLevelCache([l1, redis, sql], close_tiers=False)
    try:
        with pytest.raises(EncodeError, match="cannot be encoded") as info:
            await cache.set_many({"good": 1, "bad": object()})
        assert info.value.keys == ("bad",)
        assert l1.get("bad") is None and await cache.get("bad") is None
        assert await cache.get("good") == 1
        for tier in (redis, sql):
            assert await tier.get_many(["good", "bad"]) == {"good": 1}
        health = cache.health()
        assert health["write_behind"]["retrying"] == 0
        assert all(t["errors"] == 0 for t in health["tiers"].values())  # not an outage
    finally:
        await cache.close()
        await redis.close()
        await sql.close()


async def test_an_invalidation_redis_did_not_carry_is_reported(
    fresh_redis: Any, tmp_path: Path
) -> None:
    """With Redis down an admin invalidation answered 200 like any other: nothing said that the
    other servers never heard of it (they drop their copies only when they resync)."""
    import httpx

    from infercache.bench.process import ServerProcess

    token = "unsent-admin-token"
    proc = ServerProcess.infercache(
        "--redis-url", fresh_redis.url, "--sql-url", "none", "--admin-token", token,
        "--no-require-tiers", cwd=tmp_path,
    )  # fmt: skip
    with proc:
        async with httpx.AsyncClient(
            base_url=proc.url, timeout=30, headers={"Authorization": f"Bearer {token}"}
        ) as http:
            ok = (await http.post("/v1/cache/invalidate", json={"model": "mlp"})).json()
            assert "broadcast" not in ok and "warning" not in ok
            fresh_redis.kill()
            for body in ({"model": "mlp"}, {"all": True}):
                r = await http.post("/v1/cache/invalidate", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["broadcast"] is False and "resync" in r.json()["warning"]


async def test_a_generation_learned_by_event_survives_redis_and_a_restart(
    fresh_redis: Any, tmp_path: Path
) -> None:
    """Two processes, each with its own SQLite file: B learned A's bump by event only, so its
    file kept the old generation; after Redis restarted empty, a restarted B read it back and
    served entries the bump had retired, for good (A's later repair of Redis was silent)."""

    def build(name: str) -> MultiLevelCache:
        sql = SQLCache(f"sqlite:///{tmp_path}/{name}.db", namespace="g", purge_interval=None)
        redis = RedisCache(fresh_redis.url, namespace="g", socket_timeout=5.0)
        return MultiLevelCache([MemoryCache(100), redis, sql])

    a, b = build("a"), build("b")
    await a.start()
    await b.start()
    try:
        assert await a.invalidate(namespace="m") == 1
        await wait_until(lambda: b.generation("m") == 1)
        await asyncio.sleep(0.3)  # B records it in its own file in the background
    finally:
        await a.close()
        await b.close()
    fresh_redis.kill()
    fresh_redis.start()  # empty
    b2 = build("b")
    await b2.start()
    try:
        assert b2.generation("m") == 1  # from its own file
    finally:
        await b2.close()
    # and the other way round: a restarted process that read a lagging store is told
    fresh_redis.kill()
    fresh_redis.start()
    (tmp_path / "b.db").unlink()
    b3 = build("b")  # nothing anywhere: generation 0 for now
    await b3.start()
    try:
        assert b3.generation("m") == 0
        a2 = build("a")  # its file has 1: it repairs Redis, and says so
        await a2.start()
        try:
            await wait_until(lambda: b3.generation("m") == 1)
        finally:
            await a2.close()
    finally:
        await b3.close()


def pg_and_redis(redis_url: str, pg_url: str, ns: str) -> MultiLevelCache:
    """L1 + Redis + PostgreSQL, both quick to notice an outage and to come back."""
    redis = RedisCache(
        redis_url, namespace=ns, socket_timeout=0.5, connect_timeout=0.2, recovery_time=0.05
    )
    pg = SQLCache(pg_url, namespace=ns, timeout=0.5, failure_threshold=1, recovery_time=0.05)
    return MultiLevelCache([MemoryCache(100), redis, pg])


async def pg_generations(pg_url: str, ns: str) -> dict[str, int] | None:
    """What PostgreSQL itself holds (None while it does not answer)."""
    check = SQLCache(pg_url, namespace=ns, timeout=0.5, purge_interval=None)
    try:
        return await check.read_generations()
    except TierError:
        return None
    finally:
        await check.close()


def key(gen: int) -> str:
    return f"m:{gen}:x"  # (PostgreSQL text holds no NUL)


async def test_a_bump_postgres_missed_is_stored_there_once_it_is_back(
    fresh_redis: Any, postgres_server: Any
) -> None:
    """A user-acceptance review: with PostgreSQL down, invalidate(namespace=) reached Redis only
    and PostgreSQL kept the old generation even once it was back; after Redis restarted empty a
    fresh process loaded that old generation and served the retired entry from PostgreSQL. Now
    the missed bump is owed to PostgreSQL and stored there as soon as it answers again."""
    ns = f"owed{next(_ns)}"
    a = pg_and_redis(fresh_redis.url, postgres_server.url, ns)
    await a.start()
    try:
        g1 = await a.invalidate(namespace="m")
        await a.set(key(g1), "retired")  # in Redis and PostgreSQL
        postgres_server.stop()
        try:
            g2 = await a.invalidate(namespace="m")  # Redis only
            assert g2 > g1
        finally:
            postgres_server.start()
        # the process goes on running: PostgreSQL is repaired without another call
        await wait_until(lambda: _eq(pg_generations(postgres_server.url, ns), {"m": g2}), limit=30)
    finally:
        await a.close()

    fresh_redis.kill()
    fresh_redis.start()  # empty, no persistence
    b = pg_and_redis(fresh_redis.url, postgres_server.url, ns)
    await b.start()
    try:
        assert b.generation("m") == g2
        assert await b.get(key(b.generation("m"))) is None
        # only the generation keeps the retired entry out: it still sits in PostgreSQL
        assert await b.tiers[2].get(key(g1)) == "retired"
    finally:
        await b.close()


async def test_a_bump_learned_by_event_is_stored_by_the_process_that_is_still_running(
    fresh_redis: Any, postgres_server: Any
) -> None:
    """The process that bumped while PostgreSQL was down is gone before it comes back (its
    close cannot store the bump either): another process, which learned the bump by event while
    PostgreSQL was down, stores it there once PostgreSQL answers."""
    ns = f"owedev{next(_ns)}"
    a = pg_and_redis(fresh_redis.url, postgres_server.url, ns)
    c = pg_and_redis(fresh_redis.url, postgres_server.url, ns)
    await a.start()
    await c.start()
    try:
        g1 = await a.invalidate(namespace="m")
        await a.set(key(g1), "retired")
        await wait_until(lambda: c.generation("m") == g1)
        postgres_server.stop()
        try:
            g2 = await a.invalidate(namespace="m")
            await wait_until(lambda: c.generation("m") == g2)
            await a.close()  # PostgreSQL still down: a cannot store it
            await asyncio.sleep(0.3)  # c tries (and fails) in the background meanwhile
            assert await pg_generations(postgres_server.url, ns) is None
        finally:
            postgres_server.start()
        await wait_until(lambda: _eq(pg_generations(postgres_server.url, ns), {"m": g2}), limit=30)
    finally:
        await a.close()
        await c.close()

    fresh_redis.kill()
    fresh_redis.start()
    b = pg_and_redis(fresh_redis.url, postgres_server.url, ns)
    await b.start()
    try:
        assert b.generation("m") == g2
        assert await b.get(key(b.generation("m"))) is None
    finally:
        await b.close()


async def test_a_store_down_at_start_is_read_once_it_is_back(
    fresh_redis: Any, postgres_server: Any
) -> None:
    """A process that started while PostgreSQL was down (and Redis had restarted empty) knew
    generation 0 only; once PostgreSQL was back it served the entries of generation 0 that a
    bump had retired, and Redis was never told. Now the store that missed the load is read when
    it answers again: the process moves on to its generation and repairs Redis."""
    ns = f"unread{next(_ns)}"
    a = pg_and_redis(fresh_redis.url, postgres_server.url, ns)
    try:
        g0 = a.generation("m")
        await a.set(key(g0), "retired")
        g1 = await a.invalidate(namespace="m")
    finally:
        await a.close()
    fresh_redis.kill()
    fresh_redis.start()  # empty
    postgres_server.stop()
    b = pg_and_redis(fresh_redis.url, postgres_server.url, ns)
    try:
        try:
            await b.start()
            assert b.generation("m") == g0  # all it can know for now
        finally:
            postgres_server.start()
        await wait_until(lambda: b.generation("m") == g1, limit=30)
        assert await b.get(key(b.generation("m"))) is None
        redis = RedisCache(fresh_redis.url, namespace=ns)
        try:
            await wait_until(lambda: _eq(redis.read_generations(), {"m": g1}))
        finally:
            await redis.close()
    finally:
        await b.close()


async def _eq(got: Any, want: Any) -> bool:
    try:
        return bool(await got == want)
    except TierError:
        return False
