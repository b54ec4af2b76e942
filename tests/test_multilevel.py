"""MultiLevelCache policies against real tiers: MemoryCache, a real Redis, a real SQLite file."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from infercache.errors import ConfigError, Overloaded
from infercache.multilevel import MultiLevelCache
from infercache.tiers.base import MISSING
from infercache.tiers.memory import MemoryCache
from infercache.tiers.redis import RedisCache
from infercache.tiers.sql import SQLCache

try:
    from servers import wait_until
except ImportError:  # pragma: no cover
    from tests.servers import wait_until  # type: ignore[no-redef]

Factory = Callable[..., Awaitable[MultiLevelCache]]
_n = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def make(redis_url: str, tmp_path: Path) -> AsyncIterator[Factory]:
    """Build MultiLevelCache(L1, Redis, SQLite) instances sharing one Redis db and one SQLite
    file, as separate processes would; each has its own L1."""
    made: list[MultiLevelCache] = []
    db = tmp_path / "l3.db"

    async def factory(
        *,
        l1: MemoryCache | None = None,
        l1_ttl: float | None = None,
        redis_ttl: float | None = None,
        sql: bool = True,
        sql_file: str | None = None,
        **kw: Any,
    ) -> MultiLevelCache:
        tiers: list[Any] = [l1 if l1 is not None else MemoryCache(1000, ttl=l1_ttl)]
        tiers.append(RedisCache(redis_url, namespace="ml", ttl=redis_ttl, socket_timeout=5.0))
        if sql:
            path = db if sql_file is None else tmp_path / sql_file  # one per host, or shared
            tiers.append(SQLCache(f"sqlite:///{path}", namespace="ml", purge_interval=None))
        cache = MultiLevelCache(tiers, **kw)
        await cache.start()
        made.append(cache)
        return cache

    yield factory
    for c in made:
        await c.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


def key() -> str:
    return f"key{next(_n)}"


# ----------------------------------------------------------------------------- reads


async def test_l1_and_tiers_members(make: Factory) -> None:
    c = await make()
    assert isinstance(c.l1, MemoryCache)
    assert [type(t).__name__ for t in c.tiers] == ["MemoryCache", "RedisCache", "SQLCache"]
    c2 = MultiLevelCache([c.tiers[1]], close_tiers=False)
    assert c2.l1 is None


async def test_promotion_carries_remaining_ttl(make: Factory) -> None:
    c = await make(l1_ttl=20)
    l1, redis, sql = c.tiers
    await sql.set("p", {"v": 1}, ttl=100)
    got = await c.get_many_with_tier(["p"])
    assert got == {"p": ({"v": 1}, "sqlite")}
    rem_redis = await redis.ttl("p")
    assert rem_redis is not None and 0 < rem_redis <= 100  # never outlives the original
    rem_l1 = l1.ttl("p")
    assert rem_l1 is not None and 0 < rem_l1 <= 20  # capped by L1's own TTL
    assert await c.get_many_with_tier(["p"]) == {"p": ({"v": 1}, "l1")}
    s = await c.stats()
    assert s["tiers"]["l1"]["promotions"] == 1 and s["tiers"]["redis"]["promotions"] == 1


async def test_promotion_of_entry_without_ttl(make: Factory) -> None:
    c = await make()
    l1, redis, sql = c.tiers
    await sql.set("forever", 1)
    assert await c.get("forever") == 1
    assert await redis.ttl("forever") is None and l1.ttl("forever") is None


async def test_get_many_asks_each_tier_only_for_misses(make: Factory) -> None:
    c = await make()
    l1, redis, sql = c.tiers
    l1.set("a", "A")
    await redis.set("b", "B")
    await sql.set("c", "C")
    got = await c.get_many_with_tier(["a", "b", "c", "d", "a"])
    assert got == {"a": ("A", "l1"), "b": ("B", "redis"), "c": ("C", "sqlite")}
    s = await c.stats()
    assert (s["tiers"]["redis"]["hits"], s["tiers"]["redis"]["misses"]) == (1, 2)  # b, c, d
    assert (s["tiers"]["sqlite"]["hits"], s["tiers"]["sqlite"]["misses"]) == (1, 1)  # c, d
    assert await c.get_many(["a", "b", "c"]) == {"a": "A", "b": "B", "c": "C"}
    assert await c.get("d", "dflt") == "dflt"


# ----------------------------------------------------------------------------- writes


async def test_write_through_reaches_every_tier(make: Factory) -> None:
    c = await make(write="through")
    l1, redis, sql = c.tiers
    await c.set("k", [1, 2], ttl=50)
    await c.set_many({"m1": 1, "m2": 2})
    assert l1.get("k") == [1, 2] and await redis.get("k") == [1, 2] and await sql.get("k") == [1, 2]
    assert 0 < (await redis.ttl("k") or 0) <= 50
    assert await redis.get_many(["m1", "m2"]) == {"m1": 1, "m2": 2}
    assert await sql.get_many(["m1", "m2"]) == {"m1": 1, "m2": 2}
    await c.set("none", None)
    assert not await sql.exists("none")
    assert await c.delete("k")
    assert l1.get("k") is None and await redis.get("k") is None and await sql.get("k") is None


async def test_write_around_writes_slowest_and_invalidates_faster(make: Factory) -> None:
    c = await make(write="around")
    l1, redis, sql = c.tiers
    l1.set("k", "old")
    await redis.set("k", "old")
    await c.set("k", "new")
    assert l1.get("k") is None and await redis.get("k") is None
    assert await sql.get("k") == "new"
    assert await c.get_many_with_tier(["k"]) == {"k": ("new", "sqlite")}
    assert l1.get("k") == "new"  # promoted on read


async def test_write_behind_batches_and_flushes(make: Factory) -> None:
    c = await make(write="behind", write_behind_interval=60, write_behind_batch=1000)
    l1, redis, sql = c.tiers
    await c.set_many({f"w{i}": i for i in range(10)})
    await c.set("w0", "newest")  # coalesced with the queued write
    assert l1.get("w3") == 3
    assert await redis.get("w3") is None  # not yet: the flush waits for a batch
    assert (await c.stats())["write_behind"]["queue_depth"] == 10
    l1.delete("w5")
    assert await c.get("w5") == 5  # read-your-writes from the queue
    await c.flush()
    assert await redis.get_many([f"w{i}" for i in range(10)]) == {
        "w0": "newest",
        **{f"w{i}": i for i in range(1, 10)},
    }
    assert len(await sql.get_many([f"w{i}" for i in range(10)])) == 10
    wb = (await c.stats())["write_behind"]
    assert wb["batches"] == 1 and wb["flushed"] == 10 and wb["queue_depth"] == 0


async def test_write_behind_with_l1_alone_queues_nothing() -> None:
    c = MultiLevelCache([MemoryCache(10)], write="behind")
    await c.set_many({"a": 1, "b": 2})
    assert await c.get("a") == 1
    wb = (await c.stats())["write_behind"]
    assert wb["enqueued"] == 0 and wb["queue_depth"] == 0
    await c.close()


class HeldSQLCache(SQLCache):
    """A real SQLite tier whose first ``held`` writes wait for the test to let them through."""

    def __init__(self, url: str, held: int = 1_000_000) -> None:
        super().__init__(url)
        self.gate = asyncio.Event()
        self.writing = asyncio.Event()
        self.writes: list[int] = []
        self.held = held

    async def set_many_with_ttl(self, items: Any) -> None:
        self.writes.append(len(items))
        self.writing.set()
        if len(self.writes) <= self.held:
            await self.gate.wait()
        await super().set_many_with_ttl(items)


async def test_write_behind_gathers_writes_that_arrive_during_a_flush(tmp_path: Path) -> None:
    l3 = HeldSQLCache(f"sqlite:///{tmp_path}/l3.db")
    c = MultiLevelCache(
        [MemoryCache(100), l3], write="behind", write_behind_batch=10, write_behind_interval=5.0
    )
    await c.set_many({f"a{i}": i for i in range(10)})  # a full batch: flushed at once
    await asyncio.wait_for(l3.writing.wait(), 5)
    await c.set_many({f"b{i}": i for i in range(4)})  # arrive while that write is in flight
    l3.gate.set()
    await wait_until(lambda: l3.writes == [10])
    await asyncio.sleep(0.2)
    # the late writes wait for the next gathering interval instead of a tiny batch right away
    assert l3.writes == [10] and (await c.stats())["write_behind"]["queue_depth"] == 4
    await c.flush()
    assert l3.writes == [10, 4]
    assert await l3.get_many([f"b{i}" for i in range(4)]) == {f"b{i}": i for i in range(4)}
    await c.close()


async def test_write_behind_flushes_on_its_own(make: Factory) -> None:
    c = await make(write="behind", write_behind_interval=0.001, write_behind_batch=4)
    redis = c.tiers[1]
    await c.set_many({f"a{i}": i for i in range(9)})

    async def landed() -> bool:
        # a batch is counted once every tier has it: Redis may have the last one first
        done = (await c.stats())["write_behind"]["flushed"] == 9
        return done and len(await redis.get_many([f"a{i}" for i in range(9)])) == 9

    await wait_until(landed)
    assert (await c.stats())["write_behind"]["batches"] >= 3  # batches of at most 4


async def test_write_behind_close_flushes_everything(
    make: Factory, redis_url: str, tmp_path: Path
) -> None:
    c = await make(write="behind", write_behind_interval=60, write_behind_batch=7)
    await c.set_many({f"c{i}": i for i in range(50)})
    await c.close()
    check = RedisCache(redis_url, namespace="ml", socket_timeout=5.0)
    sql = SQLCache(f"sqlite:///{tmp_path}/l3.db", namespace="ml")
    try:
        assert len(await check.get_many([f"c{i}" for i in range(50)])) == 50
        assert len(await sql.get_many([f"c{i}" for i in range(50)])) == 50
    finally:
        await check.close()
        await sql.close()


async def test_write_behind_delete_is_not_resurrected(make: Factory) -> None:
    c = await make(write="behind", write_behind_interval=60)
    redis = c.tiers[1]
    await c.set("d", 1)
    assert await c.delete("d")
    await c.flush()
    assert await redis.get("d") is None and await c.get("d") is None


async def test_queue_full_error(make: Factory) -> None:
    c = await make(
        write="behind",
        write_behind_max_queue=5,
        write_behind_interval=60,
        write_behind_batch=100,
        write_behind_when_full="error",
    )
    await c.set_many({f"q{i}": i for i in range(5)})
    await c.set("q0", "coalesced: no new slot needed")
    with pytest.raises(Overloaded):
        await c.set("q5", 5)
    assert await c.get("q5") is None  # refused: not even in L1
    with pytest.raises(Overloaded):
        await c.set_many({"q1": "queued already: kept", "q6": 6})
    assert await c.get("q1") == "queued already: kept" and await c.get("q6") is None
    await c.flush()
    await c.set("q5", 5)
    assert (await c.stats())["write_behind"]["full_errors"] == 2


async def test_a_str_is_not_taken_for_a_list_of_keys(make: Factory) -> None:
    c = await make()
    await c.set_many({"a": 1, "abc": 2})
    with pytest.raises(TypeError, match="iterable of keys"):
        await c.get_many("abc")
    with pytest.raises(TypeError, match="iterable of keys"):
        await c.delete_many("abc")
    assert await c.get_many(["a", "abc"]) == {"a": 1, "abc": 2}  # nothing deleted


async def test_non_str_keys_are_refused_before_anything_is_written(make: Factory) -> None:
    c = await make(write="behind")
    with pytest.raises(TypeError, match="keys must be str"):
        await c.set_many({"ok": 1, 123: 2})  # type: ignore[dict-item]
    assert await c.get("ok") is None  # nothing half-written
    await c.set("later", 3)
    await c.flush()
    assert await c.tiers[2].get("later") == 3 and not c._wb  # the flush was not held up
    # and reads: get(123) answered a silent miss, the tiers below logging a failure each
    with pytest.raises(TypeError, match="keys must be str, got int: 123"):
        await c.get(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keys must be str, got bytes"):
        await c.get_many(["later", b"raw"])  # type: ignore[list-item]
    assert await c.get("later") == 3


async def test_a_closed_cache_says_so_instead_of_losing_writes(make: Factory) -> None:
    from infercache.errors import Closed

    c = await make(write="behind")
    await c.set("before", 1)
    await c.close()
    with pytest.raises(Closed):
        await c.set("after", 2)
    with pytest.raises(Closed):
        await c.get("never-cached")
    with pytest.raises(Closed):
        await c.get_or_compute("k", lambda: 3)
    with pytest.raises(Closed):
        await c.invalidate(all=True)
    assert await c.get("before") == 1  # an L1 hit still answers
    await c.close()  # idempotent


async def test_queue_full_blocks_until_flushed(make: Factory) -> None:
    c = await make(
        write="behind",
        write_behind_max_queue=5,
        write_behind_interval=60,
        write_behind_batch=100,
        write_behind_when_full="block",
    )
    redis = c.tiers[1]
    # 12 writes through a queue of 5: the writer waits for the flusher, nothing is dropped.
    await asyncio.wait_for(c.set_many({f"b{i}": i for i in range(12)}), timeout=30)
    await c.flush()
    assert len(await redis.get_many([f"b{i}" for i in range(12)])) == 12
    assert (await c.stats())["write_behind"]["full_waits"] >= 1


async def test_queue_full_writes_through(make: Factory) -> None:
    c = await make(
        write="behind",
        write_behind_max_queue=3,
        write_behind_interval=60,
        write_behind_when_full="through",
    )
    redis = c.tiers[1]
    await c.set_many({f"t{i}": i for i in range(3)})
    await c.set("t3", 3)
    assert await redis.get("t3") == 3  # written synchronously
    assert await redis.get("t0") is None  # still queued
    assert (await c.stats())["write_behind"]["full_through"] == 1


async def test_direct_write_is_not_overtaken_by_an_older_flush(tmp_path: Path) -> None:
    # The queue is full, so v2 is written through while the flush of v1 is still in flight:
    # v1 must land first, or the tier would end up with the older value for good.
    l3 = HeldSQLCache(f"sqlite:///{tmp_path}/l3.db", held=1)
    c = MultiLevelCache(
        [MemoryCache(100), l3],
        write="behind",
        write_behind_batch=1,
        write_behind_max_queue=1,
        write_behind_interval=5.0,
        write_behind_when_full="through",
    )
    await c.set("k", "v1")  # a full batch: its flush starts and is held
    await asyncio.wait_for(l3.writing.wait(), 5)
    await c.set("other", 0)  # fills the queue
    direct = asyncio.create_task(c.set("k", "v2"))  # queue full: written through
    await asyncio.sleep(0.1)  # without ordering, v2 lands here, before the held v1
    l3.gate.set()
    await asyncio.wait_for(direct, 5)
    await c.flush()
    assert await l3.get("k") == "v2" and c.tiers[0].get("k") == "v2"
    assert (await c.stats())["write_behind"]["full_through"] == 1
    await c.close()


async def test_read_through_under_the_lock_supersedes_queued_writes(make: Factory) -> None:
    # The lock holder writes its loaded value through; a value set while it was loading and
    # still queued must not be flushed over it later (the L1 would disagree with the tiers).
    c = await make(write="behind", write_behind_interval=60)
    l1, redis, sql = c.tiers
    gate = asyncio.Event()
    started = asyncio.Event()

    async def loader() -> str:
        started.set()
        await gate.wait()
        return "loaded"

    k = key()
    task = asyncio.create_task(c.get_or_compute(k, loader))
    await asyncio.wait_for(started.wait(), 5)
    await c.set(k, "set-meanwhile")  # queued behind
    gate.set()
    assert await task == "loaded"
    await c.flush()
    assert l1.get(k) == await redis.get(k) == await sql.get(k) == "loaded"
    assert (await c.stats())["single_flight"]["lock_acquired"] == 1


def test_bad_config() -> None:
    l1 = MemoryCache(10)
    with pytest.raises(ConfigError):
        MultiLevelCache([])
    with pytest.raises(ConfigError):
        MultiLevelCache([l1], write="sideways")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        MultiLevelCache([l1], refresh_ahead=1.5)
    with pytest.raises(ConfigError):
        MultiLevelCache([l1], write_behind_when_full="drop")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- read-through


async def test_single_flight_in_process(make: Factory) -> None:
    c = await make()
    calls = 0
    gate = asyncio.Event()

    async def loader() -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return "computed"

    k = key()
    tasks = [asyncio.create_task(c.get_or_compute(k, loader)) for _ in range(50)]
    await wait_until(lambda: calls == 1)
    gate.set()
    assert await asyncio.gather(*tasks) == ["computed"] * 50
    assert calls == 1
    assert await c.tiers[1].get(k) == "computed"
    s = (await c.stats())["single_flight"]
    assert s["loads"] == 1 and s["coalesced"] >= 1  # the rest found the stored value


async def test_a_cancelled_leader_does_not_fail_the_callers_waiting_on_it(make: Factory) -> None:
    """One client going away cancelled the leading call; every caller waiting on the same key
    then got CancelledError. Now a waiter leads in its place; a waiter cancelled itself still
    gets its CancelledError, and the leader goes on."""
    c = await make()
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        return f"v{calls}"

    k = key()
    leader = asyncio.create_task(c.get_or_compute(k, slow))
    await asyncio.sleep(0.05)
    follower = asyncio.create_task(c.get_or_compute(k, slow))
    await asyncio.sleep(0.05)
    leader.cancel()
    assert await follower == "v2"
    with pytest.raises(asyncio.CancelledError):
        await leader
    k2 = key()
    leader = asyncio.create_task(c.get_or_compute(k2, slow))
    await asyncio.sleep(0.05)
    follower = asyncio.create_task(c.get_or_compute(k2, slow))
    await asyncio.sleep(0.05)
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    assert await leader == "v3" and calls == 3


async def test_a_delete_during_a_load_keeps_its_value_out_of_the_cache(make: Factory) -> None:
    """A loader that read the source before a delete and finished after it stored its old value
    anyway, served until its TTL ran out; callers after the delete joined that stale load."""
    source = {"k": "v1"}

    async def loader() -> str:
        value = source["k"]
        await asyncio.sleep(0.2)
        return value

    for write in ("through", "behind", "around"):
        c = await make(write=write)
        source["k"] = "v1"

        k = key()
        first = asyncio.create_task(c.get_or_compute(k, loader))
        await asyncio.sleep(0.05)
        source["k"] = "v2"
        await c.delete(k)
        after = asyncio.create_task(c.get_or_compute(k, loader))  # a fresh load, not a join
        assert await first == "v1"  # asked before the delete: answered what it read
        assert await after == "v2"
        await c.flush()
        assert await c.get(k) == "v2" and await c.get_or_compute(k, loader) == "v2", write
        assert not c._flight.retired and not c._flight.inflight
        await c.close()  # else it takes the next cache's deletes as another process's


async def test_single_flight_across_instances(make: Factory) -> None:
    a = await make()
    b = await make()
    calls: list[str] = []
    gate = asyncio.Event()

    def loader_for(name: str) -> Callable[[], Awaitable[int]]:
        async def loader() -> int:
            calls.append(name)
            await gate.wait()
            return 42

        return loader

    k = key()
    ta = [asyncio.create_task(a.get_or_compute(k, loader_for("a"))) for _ in range(5)]
    await wait_until(lambda: calls)
    tb = [asyncio.create_task(b.get_or_compute(k, loader_for("b"))) for _ in range(5)]
    await wait_until(lambda: b._counters["lock_waited"] >= 1)
    gate.set()
    assert await asyncio.gather(*ta, *tb) == [42] * 10
    assert calls == ["a"]  # one loader call across both "processes"


async def test_lock_holder_death_falls_back(make: Factory, raw: aioredis.Redis) -> None:
    c = await make(lock_ttl=5.0)
    k = key()
    # A holder that died: its lock is there, nobody will ever write the value.
    await raw.set(f"__infercache__:ml:lock:{k}", "dead-holder", px=150)
    calls = 0

    def loader() -> str:
        nonlocal calls
        calls += 1
        return "mine"

    assert await c.get_or_compute(k, loader) == "mine"
    assert calls == 1
    assert c._counters["lock_waited"] == 1 and c._counters["lock_acquired"] == 1


async def test_loader_errors_reach_every_waiter_and_are_not_cached(make: Factory) -> None:
    c = await make()
    gate = asyncio.Event()

    async def failing() -> Any:
        await gate.wait()
        raise RuntimeError("model down")

    k = key()
    tasks = [asyncio.create_task(c.get_or_compute(k, failing)) for _ in range(3)]
    await wait_until(lambda: k in c._inflight)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await c.get(k) is None
    assert await c.get_or_compute(k, lambda: None) is None  # None: returned, not stored
    assert await c.tiers[1].get(k) is None
    assert await c.get_or_compute(k, lambda: "ok") == "ok"


async def test_refresh_ahead_recomputes_in_background(make: Factory) -> None:
    clock = Clock()
    c = await make(l1=MemoryCache(100, timer=clock), refresh_ahead=0.25)
    k = key()
    versions = iter(["v1", "v2", "v3"])
    calls = 0

    def loader() -> str:
        nonlocal calls
        calls += 1
        return next(versions)

    assert await c.get_or_compute(k, loader, ttl=100) == "v1"
    clock.now += 50  # half the TTL left: no refresh
    assert await c.get_or_compute(k, loader, ttl=100) == "v1"
    assert calls == 1
    clock.now += 30  # 20 % left, under the 25 % threshold
    assert await c.get_or_compute(k, loader, ttl=100) == "v1"  # the current value, at once
    await wait_until(lambda: c.l1 is not None and c.l1.get(k) == "v2")
    assert calls == 2
    assert await c.tiers[1].get(k) == "v2"
    assert (await c.stats())["refresh_ahead"]["refreshes"] == 1


# ----------------------------------------------------------------------------- invalidation


async def test_generations_are_shared(make: Factory) -> None:
    a = await make()
    b = await make()
    assert a.generation("model") == 0
    assert await a.invalidate(namespace="model") == 1
    assert a.generation("model") == 1
    await wait_until(lambda: b.generation("model") == 1)  # by event
    assert await b.invalidate(namespace="model") == 2
    await wait_until(lambda: a.generation("model") == 2)
    late = await make()  # a new process loads generations at start
    assert late.generation("model") == 2
    assert late.generation("other") == 0
    # combined with a deletion, the generation was returned and the count lost (found in review)
    with pytest.raises(ConfigError, match="on its own"):
        await a.invalidate("k", namespace="model")
    assert a.generation("model") == 2  # refused before anything changed


async def test_what_is_no_cache_tier_is_refused_at_construction() -> None:
    """A dict, a str or None used to be taken as a tier: every write then logged a tier failure
    and a Predictor(runner, {}) never cached anything (found in review)."""
    for tiers, lacking in (
        (["y"], "tiers[0] is no cache tier"),
        ([None], "got NoneType, which lacks get(), set(), delete()"),
        ([MemoryCache(), {}], "tiers[1] is no cache tier"),
        ([MemoryCache(), {}], "got dict, which lacks set(), delete()"),
    ):
        with pytest.raises(TypeError, match=re.escape(lacking)):
            MultiLevelCache(tiers)


async def test_delete_and_invalidate_reach_other_l1s(make: Factory) -> None:
    a = await make()
    b = await make()
    await a.set_many({"x": 1, "y": 2, "z": 3})
    assert await b.get_many(["x", "y", "z"]) == {"x": 1, "y": 2, "z": 3}
    assert b.l1 is not None and "x" in b.l1
    await a.delete("x")
    await wait_until(lambda: "x" not in b.l1)
    assert await b.get("x") is None
    assert await a.invalidate(keys=["y"]) == 1
    await wait_until(lambda: "y" not in b.l1)
    await a.invalidate(all=True)
    await wait_until(lambda: "z" not in b.l1)
    assert await b.get("z") is None
    assert (await b.stats())["events"]["received"] >= 3


async def test_invalidation_reaches_other_hosts_sqlite_and_their_queued_writes(
    make: Factory, raw: aioredis.Redis
) -> None:
    """Two servers sharing Redis, each with its own SQLite L3: a delete on one used to leave the
    other's L3 copy, which answered the next lookup and was promoted back into Redis; and the
    other's queued write-behind copy would have put the old value back everywhere."""
    a = await make(sql_file="a.db")
    b = await make(sql_file="b.db", write="behind", write_behind_interval=60)
    b_sql = b.tiers[2]
    await b_sql.set_many({"k": "old", "q": "old"})  # copies only b's own L3 holds
    await b.set("p", "old")  # queued for the slower tiers (the flush interval is a minute)
    await a.delete_many(["k", "p"])

    async def cleaned() -> bool:
        return await b_sql.get("k") is None and b._wb.value("p") is MISSING

    await wait_until(cleaned)
    await b.flush()
    assert await b.get("k") is None and await b.get("p") is None
    assert await raw.exists("ml:k", "ml:p") == 0  # nothing came back into Redis
    assert await b_sql.get("q") == "old"
    await a.invalidate(all=True)

    async def cleared() -> bool:
        return await b_sql.get("q") is None

    await wait_until(cleared)
    assert await b.get("q") is None


async def test_broadcast_sets_drop_stale_copies(make: Factory) -> None:
    a = await make(broadcast_sets=True)
    b = await make()
    await a.set("s", "v1")
    assert await b.get("s") == "v1"
    await a.set("s", "v2")
    assert b.l1 is not None
    await wait_until(lambda: "s" not in b.l1)
    assert await b.get("s") == "v2"


async def test_invalidate_needs_a_target(make: Factory) -> None:
    c = await make()
    with pytest.raises(ConfigError):
        await c.invalidate()


async def test_clear_clears_every_tier(make: Factory, raw: aioredis.Redis) -> None:
    c = await make()
    await raw.set("foreign", b"kept")
    await c.set_many({"a": 1, "b": 2})
    assert await c.clear() >= 2
    l1, redis, sql = c.tiers
    assert len(l1) == 0 and await redis.get("a") is None and await sql.get("b") is None
    assert await raw.get("foreign") == b"kept"


async def test_stats_shape(make: Factory) -> None:
    c = await make()
    await c.set("a", 1)
    await c.get("a")
    await c.get("missing")
    s = await c.stats()
    assert set(s["tiers"]) == {"l1", "redis", "sqlite"}
    for name in ("redis", "sqlite"):
        t = s["tiers"][name]
        assert {"hits", "misses", "errors", "promotions", "latency", "tier"} <= set(t)
        assert t["latency"]["count"] >= 1
    assert s["tiers"]["l1"]["hits"] == 1
    assert s["write_behind"]["queue_depth"] == 0
    assert s["write_policy"] == "through"


async def test_memory_only_and_sync_second_tier() -> None:
    l1, l2 = MemoryCache(10), MemoryCache(100, name="big")
    c = MultiLevelCache([l1, l2])
    try:
        await c.set_many({"a": 1, "b": 2})
        l1.delete("a")
        assert await c.get_many_with_tier(["a", "b"]) == {"a": (1, "big"), "b": (2, "l1")}
        assert l1.get("a") == 1  # promoted from the synchronous second tier
        assert await c.get_or_compute("d", lambda: 4) == 4 and l2.get("d") == 4
        assert await c.invalidate(namespace="n") == 1 and c.generation("n") == 1
    finally:
        await c.close()


async def test_custom_invalidation_channel(make: Factory) -> None:
    a = await make(invalidation_channel="app:events")
    b = await make(invalidation_channel="app:events")
    deaf = await make()  # default channel: does not hear app:events
    await a.set("k", 1)
    assert await b.get("k") == 1 and await deaf.get("k") == 1
    await a.delete("k")
    assert b.l1 is not None and deaf.l1 is not None
    await wait_until(lambda: "k" not in b.l1)
    assert "k" in deaf.l1
