"""RedisCache against a real redis-server (standalone and a 3-master cluster)."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from infercache.errors import ConfigError, TierError, TierUnavailable
from infercache.tiers.base import AsyncTier, Coordinator, GenerationStore
from infercache.tiers.redis import _ACQUIRE_LOCK, RedisCache

try:
    from servers import ReplyDelayProxy, wait_until
except ImportError:  # pragma: no cover
    from tests.servers import ReplyDelayProxy, wait_until  # type: ignore[no-redef]


# Tests of what the tier answers, not of its timeouts, allow a loaded CI machine's stall: with
# the 0.5 s default a stall fails the call (a timed-out command is never re-sent).
PATIENT = 5.0


@pytest.fixture
async def cache(redis_url: str) -> AsyncIterator[RedisCache]:
    c = RedisCache(redis_url, namespace="t", socket_timeout=PATIENT)
    yield c
    await c.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


@pytest.fixture
async def proxy(redis_server: Any) -> AsyncIterator[ReplyDelayProxy]:
    """A ReplyDelayProxy in front of the session Redis (``proxy.through(redis_url)``)."""
    p = await ReplyDelayProxy(redis_server.port).start()
    yield p
    await p.stop()


async def test_implements_protocols(cache: RedisCache) -> None:
    assert isinstance(cache, AsyncTier)
    assert isinstance(cache, Coordinator)


async def test_set_get_delete_roundtrip(cache: RedisCache, raw: aioredis.Redis) -> None:
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    value = {"label": "cat", "scores": [0.9, 0.1], "arr": arr}
    await cache.set("k", value)
    got = await cache.get("k")
    assert got is not None
    assert got["label"] == "cat" and got["scores"] == [0.9, 0.1]
    assert got["arr"].dtype == np.int32 and got["arr"].shape == (2, 3)
    assert await raw.exists("t:k") == 1  # stored under the namespace
    assert await cache.exists("k")
    assert await cache.delete("k") is True
    assert await cache.delete("k") is False
    assert await cache.get("k") is None
    assert not await cache.exists("k")


async def test_none_is_never_stored(cache: RedisCache) -> None:
    await cache.set("n", None)
    assert not await cache.exists("n")


async def test_get_many_and_set_many(cache: RedisCache) -> None:
    await cache.set_many({f"k{i}": i for i in range(40)})
    got = await cache.get_many([f"k{i}" for i in range(50)] + ["k1"])
    assert got == {f"k{i}": i for i in range(40)}
    assert await cache.get_many([]) == {}
    assert await cache.delete_many([f"k{i}" for i in range(10)]) == 10
    assert len(await cache.get_many([f"k{i}" for i in range(40)])) == 30


async def test_ttl_default_explicit_and_expire(redis_url: str) -> None:
    c = RedisCache(redis_url, namespace="t", ttl=100, socket_timeout=PATIENT)
    try:
        await c.set("d", 1)
        await c.set("e", 2, ttl=5)
        rem_d, rem_e = await c.ttl("d"), await c.ttl("e")
        assert rem_d is not None and 5 < rem_d <= 100
        assert rem_e is not None and 0 < rem_e <= 5
        with pytest.raises(KeyError):
            await c.ttl("absent")
        assert await c.expire("d", 1000)
        rem = await c.ttl("d")
        assert rem is not None and rem > 100
        assert not await c.expire("absent", 10)
        with_ttl = await c.get_many_with_ttl(["d", "e", "absent"])
        assert set(with_ttl) == {"d", "e"}
        assert with_ttl["e"][0] == 2 and 0 < (with_ttl["e"][1] or 0) <= 5
        with pytest.raises(ConfigError):
            await c.set("x", 1, ttl=0)
        with pytest.raises(ConfigError):
            await c.set("x", 1, ttl=float("nan"))
    finally:
        await c.close()


async def test_no_ttl_means_no_expiry(cache: RedisCache) -> None:
    await cache.set("p", "v")
    assert await cache.ttl("p") is None
    assert (await cache.get_many_with_ttl(["p"]))["p"] == ("v", None)


async def test_entries_expire(cache: RedisCache) -> None:
    await cache.set("short", 1, ttl=0.02)

    async def gone() -> bool:
        return await cache.get("short") is None

    await wait_until(gone)


async def test_clear_removes_only_its_namespace(redis_url: str, raw: aioredis.Redis) -> None:
    a = RedisCache(redis_url, namespace="a", socket_timeout=PATIENT)
    b = RedisCache(redis_url, namespace="b", socket_timeout=PATIENT)
    # glob characters in a namespace must be escaped
    star = RedisCache(redis_url, namespace="a*", socket_timeout=PATIENT)
    try:
        await a.set_many({f"k{i}": i for i in range(1200)})  # more than one SCAN batch
        await b.set("k", "b")
        await star.set("k", "star")
        await raw.set("a-foreign", b"x")
        await raw.set("other", b"y")
        assert await star.clear() == 1
        assert await a.get("k1") == 1
        assert await a.clear() == 1200
        assert await a.get_many([f"k{i}" for i in range(1200)]) == {}
        assert await b.get("k") == "b"
        assert await raw.get("a-foreign") == b"x" and await raw.get("other") == b"y"
    finally:
        for c in (a, b, star):
            await c.close()


async def test_corrupt_bytes_are_a_miss_and_deleted(
    cache: RedisCache, raw: aioredis.Redis, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (marker.write_text, ("unpickled!",))

    await raw.set("t:garbage", b"\x01\xc1\xc1 not msgpack")
    await raw.set("t:pickle", pickle.dumps(Evil()))
    await raw.set("t:empty", b"")
    await cache.set("good", 1)
    assert await cache.get("garbage") is None
    assert await cache.get_many(["pickle", "empty", "good"]) == {"good": 1}
    assert await cache.get_many_with_ttl(["garbage", "good"]) == {"good": (1, None)}
    assert not marker.exists()
    assert await raw.exists("t:garbage", "t:pickle", "t:empty") == 0
    stats = await cache.stats()
    assert stats["corrupt"] >= 3


async def test_namespace_validation(redis_url: str) -> None:
    with pytest.raises(ConfigError):
        RedisCache(redis_url, namespace="a:b")
    with pytest.raises(ConfigError):
        RedisCache(redis_url, namespace="")
    with pytest.raises(ConfigError, match=r"RedisCache url: .*redis://") as info:
        RedisCache("http://user:secret@localhost/0")  # was redis-py's ValueError
    assert "secret" not in str(info.value)


async def test_keys_that_are_not_str_are_refused_by_name(cache: RedisCache) -> None:
    calls = (cache.set(1, "x"), cache.get(1), cache.get_many(["a", b"b"]))  # type: ignore[arg-type]
    for call in calls:
        with pytest.raises(TypeError, match=r"RedisCache keys must be str, got (int|bytes)"):
            await call


async def test_a_closed_tier_refuses_reads_and_writes(redis_url: str, raw: aioredis.Redis) -> None:
    """After close() a RedisCache went on reading and writing through a new connection, where
    SQLCache says it is closed (found in review)."""
    c = RedisCache(redis_url, namespace="closed", socket_timeout=PATIENT)
    await c.set("k", 1)
    await c.close()
    for call in (c.set("after", 5), c.get("k"), c.get_many(["k"]), c.delete("k")):
        with pytest.raises(TierError, match="closed"):
            await call
    assert await raw.get("closed:after") is None


async def test_stats_have_counters_latency_and_server_info(cache: RedisCache) -> None:
    await cache.set("a", 1)
    await cache.get("a")
    await cache.get("b")
    s = await cache.stats()
    assert s["hits"] == 1 and s["misses"] == 1 and s["hit_ratio"] == 0.5
    assert s["latency"]["count"] >= 3 and s["latency"]["p99_ms"] >= s["latency"]["p50_ms"]
    assert s["breaker"]["state"] == "closed"
    assert s["server"]["used_memory"] > 0
    assert "keyspace" in s["server"]


async def test_lock_counter_and_pubsub(cache: RedisCache, redis_url: str) -> None:
    token = await cache.acquire_lock("job", 5)
    assert token is not None
    assert await cache.acquire_lock("job", 5) is None
    assert await cache.lock_held("job")
    assert not await cache.release_lock("job", "not-my-token")
    assert await cache.release_lock("job", token)
    assert not await cache.lock_held("job")

    assert await cache.incr_counter("gens", "ns") == 1
    assert await cache.incr_counter("gens", "ns") == 2
    assert await cache.read_counters("gens") == {"ns": 2}
    # coordination keys live outside the cache namespace: clear() keeps them
    await cache.clear()
    assert await cache.read_counters("gens") == {"ns": 2}

    assert isinstance(cache, GenerationStore)
    assert await cache.read_generations() == {}
    assert await cache.advance_generation("m") == 1
    assert await cache.advance_generation("m", floor=10) == 10
    assert await cache.advance_generation("m", floor=3) == 11  # never backwards
    assert await cache.raise_generation("m", 5) == 11
    assert await cache.raise_generation("n", 4) == 4
    await cache.clear()
    assert await cache.read_generations() == {"m": 11, "n": 4}

    got: list[bytes] = []
    other = RedisCache(redis_url, namespace="t", socket_timeout=PATIENT)
    stop = await other.subscribe(other.channel("ev"), got.append)
    try:
        assert await cache.publish(cache.channel("ev"), b"hello") == 1
        await wait_until(lambda: got == [b"hello"])
    finally:
        await stop()
        await other.close()


async def test_a_timed_out_command_is_not_sent_again(
    proxy: ReplyDelayProxy, redis_url: str, raw: aioredis.Redis
) -> None:
    """A reply that comes after the timeout: the command ran, so re-sending it applies it twice.
    (CI once saw a HINCRBY count 1, 3 on a loaded machine: the 0.5 s timeout and a retry.)"""
    # a timeout a loaded CI machine does not reach by itself, and replies held past it
    c = RedisCache(proxy.through(redis_url), namespace="t", socket_timeout=1.0)
    try:
        assert await c.incr_counter("gens", "ns") == 1
        proxy.hold = {b"HINCRBY": 1.5, b"EVAL": 1.5}
        with pytest.raises(TierError):
            await c.incr_counter("gens", "ns")
        with pytest.raises(TierError):
            await c.advance_generation("g")
        await asyncio.sleep(1.5)  # the held replies are gone
        # Each ran once; the retry on timeout ran each twice.
        assert await raw.hgetall("__infercache__:t:gens") == {b"ns": b"2"}
        assert await raw.hgetall("__infercache__:t:generations") == {b"g": b"1"}
        proxy.hold = {}
        assert await c.incr_counter("gens", "ns") == 3
    finally:
        await c.close()


async def test_more_concurrent_calls_than_connections_wait_for_one(
    redis_url: str, raw: aioredis.Redis
) -> None:
    """redis-py's pool fails at once when exhausted: 500 concurrent sets through a 32-connection
    pool stored 32. Calls beyond max_connections now wait for a connection."""
    c = RedisCache(redis_url, namespace="pool", max_connections=4, socket_timeout=PATIENT)
    try:
        await asyncio.gather(*(c.set(f"k{i}", i) for i in range(500)))
        got = await c.get_many([f"k{i}" for i in range(500)])
        assert got == {f"k{i}": i for i in range(500)}
        assert (await c.stats())["errors"] == 0
    finally:
        await c.clear()
        await c.close()


async def test_waiting_for_a_connection_is_bounded(proxy: ReplyDelayProxy, redis_url: str) -> None:
    c = RedisCache(proxy.through(redis_url), namespace="pool", max_connections=1,
                   pool_timeout=0.2, socket_timeout=PATIENT)  # fmt: skip
    try:
        await c.ping()  # connected
        proxy.hold = {b"GET": 1.0}
        slow = asyncio.ensure_future(c.get("a"))  # holds the only connection for 1 s
        await asyncio.sleep(0.05)
        with pytest.raises(TierError, match=r"all 1 connections busy for 0\.2 s"):
            await c.get("b")
        assert await slow is None  # the held call itself completes
        proxy.hold = {}
        assert await c.get("b") is None  # and the connection is free again
        with pytest.raises(ConfigError):
            RedisCache(redis_url, max_connections=0)
    finally:
        await c.close()


async def test_a_subscriber_on_a_silent_link_reconnects_and_resyncs(
    proxy: ReplyDelayProxy, redis_url: str
) -> None:
    """A link that goes silent without closing (a partition): the subscriber used to wait on it
    forever, deaf to invalidation events. Now it pings, gives up on the silence, reconnects and
    calls on_reconnect (the caller resyncs: events sent meanwhile are lost)."""
    sub = RedisCache(proxy.through(redis_url), namespace="t", socket_timeout=PATIENT)
    sub.subscriber_ping, sub.subscriber_timeout = 0.2, 2.0
    pub = RedisCache(redis_url, namespace="t", socket_timeout=PATIENT)
    got: list[bytes] = []
    resyncs = 0

    def resync() -> None:
        nonlocal resyncs
        resyncs += 1

    stop = await sub.subscribe(sub.channel("ev"), got.append, resync)
    try:
        await pub.publish(pub.channel("ev"), b"before")
        await wait_until(lambda: got == [b"before"])
        proxy.silent = True
        await pub.publish(pub.channel("ev"), b"lost")
        await asyncio.sleep(2.5)  # past subscriber_timeout: the subscriber gives up on the link
        proxy.silent = False
        await wait_until(lambda: resyncs >= 1)
        await pub.publish(pub.channel("ev"), b"after")
        await wait_until(lambda: b"after" in got)
    finally:
        await stop()
        await sub.close()
        await pub.close()


async def test_a_lock_acquire_sent_twice_is_still_ours(redis_url: str, raw: aioredis.Redis) -> None:
    """The cluster client re-sends a timed-out command whatever we ask; acquiring must survive
    that: the re-send finds our own token and reports the lock taken, not held by someone else."""
    c = RedisCache(redis_url, namespace="t", socket_timeout=PATIENT)
    try:
        key = "__infercache__:t:lock:job"
        assert await raw.eval(_ACQUIRE_LOCK, 1, key, "tok", "5000") == 1  # type: ignore[misc]
        assert await raw.eval(_ACQUIRE_LOCK, 1, key, "tok", "5000") == 1  # type: ignore[misc]
        assert await raw.eval(_ACQUIRE_LOCK, 1, key, "other", "5000") == 0  # type: ignore[misc]
        assert 0 < await raw.pttl(key) <= 5000
        assert await c.lock_held("job")
        assert await c.acquire_lock("job", 5) is None
        assert await c.release_lock("job", "tok")
        assert await c.acquire_lock("job", 5) is not None
    finally:
        await c.close()


async def test_breaker_fails_fast_and_recovers(fresh_redis: Any) -> None:
    c = RedisCache(fresh_redis.url, namespace="t", failure_threshold=2, recovery_time=0.2)
    try:
        await c.set("k", 1)
        fresh_redis.kill()
        for _ in range(2):
            with pytest.raises(TierError) as info:
                await c.get("k")
            assert not isinstance(info.value, TierUnavailable)
        # open: no network call at all
        with pytest.raises(TierUnavailable):
            await c.get("k")
        with pytest.raises(TierUnavailable):
            await c.set("k", 2)
        assert (await c.stats())["breaker"]["state"] == "open"
        await wait_until(lambda: c.breaker.probes >= 2)  # PINGs in the background, refused
        assert c.breaker.state == "open"
        fresh_redis.start()
        # a background PING closes it: no request had to be the probe
        await wait_until(lambda: c.breaker.state == "closed", limit=10)
        assert await c.get("k") is None  # data was lost with the process, the server is back
        await c.set("k", 3)
        assert await c.get("k") == 3
        assert c.breaker.opened_count == 1
    finally:
        await c.close()


async def test_a_hung_redis_never_holds_a_request_as_the_probe(fresh_redis: Any) -> None:
    """With Redis stopped (SIGSTOP: no answer, no RST, as behind a partition), the request let
    through as the breaker's probe waited the whole socket timeout, one every recovery_time.
    The probe is now a background PING: every request fails fast while the circuit is open."""
    c = RedisCache(
        fresh_redis.url, namespace="t", failure_threshold=1, recovery_time=0.1, socket_timeout=0.5
    )
    pid = fresh_redis.pid
    try:
        await c.set("k", 1)
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(TierError):
                await c.get("k")  # waits its socket timeout, and opens the circuit
            probes = c.breaker.probes
            end = time.monotonic() + 1.5  # three socket timeouts' worth of probing
            slowest = 0.0
            while time.monotonic() < end:
                started = time.perf_counter()
                with pytest.raises(TierUnavailable):
                    await c.get("k")
                slowest = max(slowest, time.perf_counter() - started)
                await asyncio.sleep(0.01)
            assert c.breaker.probes > probes  # probed meanwhile, in the background
            # a probe request waited 0.5 s; a GC pause in a loaded suite may take 0.1 s
            assert slowest < 0.3, slowest
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_until(lambda: c.breaker.state == "closed", limit=10)
        assert await c.get("k") == 1
    finally:
        await c.close()


async def test_subscriber_survives_restart(fresh_redis: Any) -> None:
    c = RedisCache(fresh_redis.url, namespace="t")
    pub = RedisCache(fresh_redis.url, namespace="t", recovery_time=0.0)
    got: list[bytes] = []
    reconnects: list[int] = []
    stop = await c.subscribe(c.channel("ev"), got.append, lambda: reconnects.append(1))
    try:
        fresh_redis.kill()
        fresh_redis.start()
        await wait_until(lambda: reconnects)

        async def published() -> bool:
            try:
                await pub.publish(pub.channel("ev"), b"after")
            except TierError:
                return False
            return b"after" in got

        await wait_until(published)
    finally:
        await stop()
        await c.close()
        await pub.close()


# ----------------------------------------------------------------------------- cluster


@pytest.fixture
async def cluster_cache(redis_cluster: Any, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    ns = "c" + str(abs(hash(request.node.name)) % 10**8)
    c = RedisCache(redis_cluster.url, namespace=ns, cluster=True)
    yield c
    await c.clear()
    await c.close()


async def test_cluster_batches_across_slots(cluster_cache: RedisCache) -> None:
    keys = [f"key-{i}" for i in range(100)]  # spread over all three masters
    await cluster_cache.set_many({k: i for i, k in enumerate(keys)}, ttl=60)
    got = await cluster_cache.get_many([*keys, "missing"])
    assert got == {k: i for i, k in enumerate(keys)}
    with_ttl = await cluster_cache.get_many_with_ttl([*keys[:10], "missing"])
    assert set(with_ttl) == set(keys[:10])
    assert all(0 < (t or 0) <= 60 for _, t in with_ttl.values())
    assert await cluster_cache.delete_many(keys[:50]) == 50
    assert len(await cluster_cache.get_many(keys)) == 50
    assert await cluster_cache.clear() == 50
    assert await cluster_cache.get_many(keys) == {}
    await cluster_cache._probe()  # the breaker's background PING reaches every node


async def test_cluster_url_form_and_coordination(redis_cluster: Any) -> None:
    url = redis_cluster.url.replace("redis://", "redis+cluster://")
    c = RedisCache(url, namespace="cu")
    try:
        assert c.cluster
        await c.set("a", {"x": 1})
        assert await c.get("a") == {"x": 1}
        token = await c.acquire_lock("l", 2)
        assert token and await c.release_lock("l", token)
        # sent to the key's own node, so the cluster client never re-sends them on a timeout
        assert [await c.incr_counter("n", "f") for _ in range(3)] == [1, 2, 3]
        assert await c.advance_generation("g", floor=5) == 5
        assert await c.read_generations() == {"g": 5}
        got: list[bytes] = []
        stop = await c.subscribe(c.channel("ev"), got.append)
        try:
            await c.publish(c.channel("ev"), b"m")
            await wait_until(lambda: got == [b"m"])
        finally:
            await stop()
        s = await c.stats()
        assert s["backend"] == "redis-cluster" and s["hits"] == 1
        await c.clear()
    finally:
        await c.close()


async def test_readiness_names_a_tier_that_answers_too_late(
    proxy: ReplyDelayProxy, redis_url: str
) -> None:
    """/readyz's probe of a tier that hangs says so in words (a bare TimeoutError has none)."""
    from infercache.config import Settings
    from infercache.multilevel import MultiLevelCache
    from infercache.server.service import service_from_predictors
    from infercache.tiers.memory import MemoryCache

    redis = RedisCache(proxy.through(redis_url), namespace="t", socket_timeout=PATIENT)
    cache = MultiLevelCache([MemoryCache(10), redis])
    service = service_from_predictors({}, Settings(), cache=cache)
    try:
        assert await service.check_tiers(probe_timeout=1.0) == {"l1": "ok", "redis": "ok"}
        proxy.hold = {b"EXISTS": 2.0}
        tiers = await service.check_tiers(probe_timeout=0.2)
        assert tiers == {"l1": "ok", "redis": "no answer within 0.2 s"}
    finally:
        await cache.close()


async def test_a_cluster_node_behind_a_plain_url_is_named_as_such(redis_cluster: Any) -> None:
    """Every call failed with a bare "MovedError: 9297 127.0.0.1:51043"."""
    c = RedisCache(redis_cluster.url, namespace=f"plain{id(redis_cluster)}")
    try:
        errors = []
        for i in range(16):  # keys over several slots: some are another node's
            try:
                await c.set(f"k{i}", i)
            except TierError as exc:
                errors.append(str(exc))
        with pytest.raises(TierError, match=r"redis\+cluster://") as info:
            await c.set_many({f"k{i}": i for i in range(16)})
        assert "MovedError" in str(info.value)
        assert errors and all("this Redis is a cluster node" in e for e in errors)
        assert c.breaker.state == "closed"  # the server answered: not an outage
    finally:
        await c.close()
