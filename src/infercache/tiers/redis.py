"""RedisCache: the shared L2 tier on Redis (standalone or Redis Cluster), via redis-py asyncio.

Why it looks the way it does:

- Round trips, not commands, are the cost (FACTS.md: an async GET ~68 µs, one MGET of 32 keys
  ~5.4 µs per key), so ``get_many`` is one MGET, ``set_many`` one pipeline, and
  ``get_many_with_ttl`` one pipeline of MGET + PTTLs. In a cluster a multi-key MGET must stay in
  one slot, so keys are grouped by slot and sent as one pipeline per node.
- Every key lives under ``{namespace}:`` and ``clear()`` deletes that prefix only (SCAN + UNLINK);
  the user's tutorial ran FLUSHDB, wiping every other application's data on the same database.
- Values go through :class:`infercache.codec.Codec` (msgpack, no pickle by default). Bytes that do
  not decode are treated as a miss and deleted: a cache must never execute what it reads back.
- Short socket timeouts and a :class:`~infercache.tiers.breaker.CircuitBreaker`: while Redis is
  down calls fail fast with TierUnavailable, MultiLevelCache skips the tier, and a background
  PING every ``recovery_time`` brings it back when Redis returns. No request is ever that probe:
  while Redis hung (stopped, partitioned: no RST), the request let through as the probe waited the
  whole socket timeout, one request every ``recovery_time``. A timed-out command is never
  re-sent: it may have run, and a counter or generation must not advance twice (a connection
  error, where it cannot have, is retried once).
- It also implements the :class:`~infercache.tiers.base.Coordinator` protocol (short locks,
  pub/sub, shared counters) that MultiLevelCache uses for cross-process single-flight, invalidation
  events, and the :class:`~infercache.tiers.base.GenerationStore` protocol for namespace
  generations. Those keys live outside the cache namespace (``__infercache__:{namespace}:...``)
  so ``clear()`` does not reset them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from infercache.aio import stop_task
from infercache.codec import Codec
from infercache.errors import ConfigError, TierError
from infercache.tiers.base import (
    MISSING,
    TierMetrics,
    encode_values,
    escape_glob,
    key_type_error,
    ttl_ms,
    validate_ttl,
)
from infercache.tiers.breaker import CircuitBreaker

__all__ = ["RedisCache"]

#: A subscriber cancelled at close closes its pubsub connection before it ends; it is cancelled
#: again (a cancellation can be lost in redis-py's get_message on Python 3.11) only after this.
_LISTENER_CLEANUP_S = 1.5

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that mean "the server is unreachable or unhealthy": they feed the circuit breaker.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    ClusterError,
    SlotNotCoveredError,
    RedisClusterException,
    OSError,
    asyncio.TimeoutError,
)

_SUBSCRIBER_ERRORS: tuple[type[BaseException], ...] = (*_CONNECTION_ERRORS, RedisError)

# SET NX PX that is safe to send twice: a re-send of our own token (a retry after a reply was
# lost) finds the lock ours and says so, where a bare SET NX would answer "held by someone else"
# and leave the caller waiting on itself until the lock expired.
_ACQUIRE_LOCK = """
local cur = redis.call('GET', KEYS[1])
if not cur then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
if cur == ARGV[1] then
    return 1
end
return 0
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# GET + PTTL of every key in one command: one reply to parse instead of a pipeline of N+1
# commands (redis-py's per-command client cost dominates on loopback, FACTS.md).
_GET_WITH_PTTL = """
local out = {}
for i, k in ipairs(KEYS) do
    out[2 * i - 1] = redis.call('GET', k)
    out[2 * i] = redis.call('PTTL', k)
end
return out
"""

# max(current + step, floor) on one hash field, atomically: a generation never goes backwards,
# and concurrent advances (step 1) all get distinct values.
_ADVANCE_FIELD = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local new = math.max(cur + tonumber(ARGV[2]), tonumber(ARGV[3]))
if new ~= cur then
    redis.call('HSET', KEYS[1], ARGV[1], new)
end
return new
"""

_GENERATIONS = "generations"

_UNLINK_BATCH = 500


class RedisCache:
    """Async L2 cache on Redis; see the module docstring for the design.

    ``url`` accepts ``redis://``, ``rediss://`` (TLS) and ``unix://``; ``redis+cluster://`` (or
    ``cluster=True``) connects to a Redis Cluster through any of its nodes.
    ``ttl`` is the default TTL in seconds for ``set`` when none is given (None: no expiry).
    ``max_connections`` bounds the calls in flight at once (per node in a cluster); a call beyond
    it waits for one to finish, up to ``pool_timeout`` seconds, then fails with TierError.
    redis-py's own pools fail at once when exhausted (``MaxConnectionsError``): 500 concurrent
    ``set`` calls through MultiLevelCache stored 32, the rest dropped as a degraded tier.
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        namespace: str = "infercache",
        ttl: float | None = None,
        codec: Codec | None = None,
        cluster: bool | None = None,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        max_connections: int = 32,
        pool_timeout: float = 1.0,
        failure_threshold: int = 3,
        recovery_time: float = 1.0,
        name: str = "redis",
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if not namespace or ":" in namespace:
            raise ConfigError(f"namespace must be non-empty and contain no ':', got {namespace!r}")
        scheme = urlsplit(url).scheme
        is_cluster_url = scheme.endswith("+cluster")
        if is_cluster_url:
            url = urlunsplit(urlsplit(url)._replace(scheme=scheme.removesuffix("+cluster")))
        self.url = url
        self.cluster = bool(cluster) or is_cluster_url
        self.namespace = namespace
        self.name = name
        self.default_ttl = validate_ttl(ttl)
        self.codec = codec or Codec()
        self._prefix = namespace + ":"
        self._coord_prefix = f"__infercache__:{namespace}:"
        self.breaker = CircuitBreaker(
            f"redis {name}",
            failure_threshold=failure_threshold,
            recovery_time=recovery_time,
            timer=timer,
            probe=self._probe,
        )
        if max_connections < 1 or pool_timeout <= 0:
            raise ConfigError(
                f"max_connections must be >= 1 and pool_timeout > 0, got {max_connections} "
                f"and {pool_timeout}"
            )
        self.pool_timeout = pool_timeout
        self._slots = asyncio.Semaphore(max_connections)  # see the class docstring
        self._slots_total = max_connections
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        common: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "max_connections": max_connections,
            # One immediate retry on a connection error: a pooled connection that a Redis
            # restart closed fails once, the retry reconnects. Never on a timeout: the command
            # may have run, and re-sending a non-idempotent one (HINCRBY, a generation advance)
            # would apply it twice. More retries would only slow down failing fast.
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        }
        self._client: Any
        try:
            if self.cluster:
                self._client = AsyncRedisCluster.from_url(url, **common)
            else:
                self._client = aioredis.Redis.from_url(url, **common)
        except ValueError as exc:  # redis-py's word for a URL it cannot use
            raise ConfigError(f"RedisCache url: {exc}") from None  # the URL may hold a password
        self._m = TierMetrics()
        #: A subscriber pings Redis after this many seconds without traffic, and reconnects
        #: (then resyncs) when it has heard nothing for ``subscriber_timeout`` seconds: over a
        #: connection that went silent (a partition, no RST) it would otherwise wait forever,
        #: deaf to invalidation events, while redis-py's own health check pongs go unseen.
        self.subscriber_ping = 5.0
        self.subscriber_timeout = 15.0
        self._subscribers: list[asyncio.Task[None]] = []
        self._closed = False
        self._get_with_pttl = None if self.cluster else self._client.register_script(_GET_WITH_PTTL)

    # ----------------------------------------------------------------- plumbing

    async def _probe(self) -> None:
        """The breaker's background check while the circuit is open: a PING, bounded by the
        socket timeout (a cluster client pings every node: the tier is back when all answer)."""
        await self._client.ping()

    def _k(self, key: str) -> str:
        try:
            return self._prefix + key
        except TypeError:
            raise key_type_error("RedisCache", key) from None

    async def _once(self, key: str, *args: Any) -> Any:
        """Send a non-idempotent command at most once.

        The standalone client already never retries a timeout (see ``__init__``). A cluster
        client retries timeouts itself whatever its Retry says, except for a command sent to a
        node named by the caller: so name the node that owns ``key``. A redirect (MOVED/ASK) is
        still followed; a timeout is a TierError, the counter or generation unchanged or
        advanced once, never twice.
        """
        if self.cluster:
            await self._client.initialize()  # a no-op once the slot map is known
            node = self._client.get_node_from_key(key)
            return await self._client.execute_command(*args, target_nodes=node)
        return await self._client.execute_command(*args)

    async def _run(self, op: str, coro: Coroutine[Any, Any, T]) -> T:
        """Run one Redis call through the breaker, timing it and mapping errors to TierError
        (a RedisError is the server answering with an error: not an outage). At most
        ``max_connections`` run at once; the others wait here for a connection."""
        if self._closed:
            coro.close()
            raise TierError(f"redis {op}: the Redis tier is closed")
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), self.pool_timeout)
            except TimeoutError:
                coro.close()
                raise TierError(
                    f"redis {op}: all {self._slots_total} connections busy for "
                    f"{self.pool_timeout:g} s"
                ) from None
        else:
            await self._slots.acquire()
        try:
            return await self._m.timed(
                self.breaker.run(
                    f"redis {op}", coro, outage=_CONNECTION_ERRORS, answered=(RedisError,)
                )
            )
        except TierError as exc:
            if not self.cluster and isinstance(exc.__cause__, MovedError | AskError):
                # A cluster node behind a plain redis:// URL answers MOVED for the keys of other
                # nodes' slots: every call failed with a bare "MovedError: 8779 127.0.0.1:7001".
                raise TierError(
                    f"{exc}; this Redis is a cluster node: use a redis+cluster:// URL "
                    "(or RedisCache(cluster=True))"
                ) from exc.__cause__
            raise
        finally:
            self._slots.release()

    async def _decode_hits(self, keys: Sequence[str], raws: Sequence[Any]) -> dict[str, Any]:
        """Decode what was found for ``keys`` (None: absent) and count hits and misses.

        Undecodable bytes are a miss and are deleted: a cache never executes what it reads.
        """
        out: dict[str, Any] = {}
        corrupt: list[str] = []
        for key, raw in zip(keys, raws, strict=True):
            if raw is not None:
                value = self._m.decode(self.codec, f"redis {self.name}", key, raw, corrupt)
                if value is not MISSING:
                    out[key] = value
        if corrupt:
            with contextlib.suppress(TierError):
                await self.delete_many(corrupt)
        self._m.lookups(len(keys), len(out))
        return out

    def _effective_ttl(self, ttl: float | None) -> float | None:
        return self.default_ttl if ttl is None else validate_ttl(ttl)

    # ----------------------------------------------------------------- reads

    async def get(self, key: str) -> Any | None:
        """The value under ``key``, or None on a miss (corrupt bytes are a miss, and deleted)."""
        raw = await self._run("GET", self._client.get(self._k(key)))
        return (await self._decode_hits([key], [raw])).get(key)

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """Hits among ``keys`` in one MGET (one pipeline per node in a cluster)."""
        uniq = list(dict.fromkeys(keys))
        if not uniq:
            return {}
        full = [self._k(k) for k in uniq]
        if self.cluster:
            raws = await self._run("MGET", self._client.mget_nonatomic(full))
        else:
            raws = await self._run("MGET", self._client.mget(full))
        return await self._decode_hits(uniq, raws)

    async def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """Hits with their remaining TTL (None: no expiry), in one round trip (a Lua script;
        a pipeline per node in a cluster).

        MultiLevelCache promotes with the remaining TTL so a promoted copy never outlives the
        original.
        """
        uniq = list(dict.fromkeys(keys))
        if not uniq:
            return {}
        full = [self._k(k) for k in uniq]

        async def go() -> list[Any]:
            if self._get_with_pttl is not None:
                flat = await self._get_with_pttl(keys=full)
                return [flat[0::2], *flat[1::2]]
            # Cluster: keys of one script must share a slot; a cluster pipeline instead routes
            # per key and sends one batch per node.
            pipe = self._client.pipeline(transaction=False)
            for fk in full:
                pipe.get(fk)
            for fk in full:
                pipe.pttl(fk)
            res = await pipe.execute()
            return [res[: len(full)], *res[len(full) :]]

        res = await self._run("MGET+PTTL", go())
        raws, pttls = res[0], res[1:]
        # pttl -2: expired between the GET and the PTTL
        hits = await self._decode_hits(
            uniq, [None if p == -2 else r for r, p in zip(raws, pttls, strict=True)]
        )
        remaining = dict(zip(uniq, pttls, strict=True))
        return {
            k: (v, None if remaining[k] < 0 else remaining[k] / 1000.0) for k, v in hits.items()
        }

    async def exists(self, key: str) -> bool:
        return bool(await self._run("EXISTS", self._client.exists(self._k(key))))

    async def ttl(self, key: str) -> float | None:
        """Remaining seconds; None when the key never expires; KeyError when it is absent."""
        pttl = await self._run("PTTL", self._client.pttl(self._k(key)))
        if pttl == -2:
            raise KeyError(key)
        return None if pttl < 0 else pttl / 1000.0

    # ----------------------------------------------------------------- writes

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` (None is never stored: it is how tiers say "miss")."""
        if value is None:
            return
        raw = self.codec.encode(value)
        eff = self._effective_ttl(ttl)
        px = ttl_ms(eff) if eff is not None else None
        await self._run("SET", self._client.set(self._k(key), raw, px=px))
        self._m.sets += 1

    async def set_many(self, mapping: Mapping[str, Any], ttl: float | None = None) -> None:
        """Store every pair in one pipeline (one round trip; per node in a cluster)."""
        eff = self._effective_ttl(ttl)
        await self.set_many_with_ttl({k: (v, eff) for k, v in mapping.items()})

    async def set_many_with_ttl(self, items: Mapping[str, tuple[Any, float | None]]) -> None:
        """Store pairs that each carry their own TTL (promotion, write-behind) in one pipeline.

        A TTL of None here means "no expiry" (callers pass the effective TTL already).
        """
        rows, unencodable = encode_values(self.codec, items)
        encoded = [(self._k(k), raw, None if t is None else ttl_ms(t)) for k, raw, t in rows]
        if not encoded:
            if unencodable is not None:
                raise unencodable
            return

        if len(encoded) == 1:  # a pipeline costs more client CPU than one plain SET
            fk, raw, px = encoded[0]
            await self._run("SET", self._client.set(fk, raw, px=px))
        else:

            async def go() -> None:
                pipe = self._client.pipeline(transaction=False)
                for fk, raw, px in encoded:
                    pipe.set(fk, raw, px=px)
                await pipe.execute()

            await self._run("SET*", go())
        self._m.sets += len(encoded)
        if unencodable is not None:
            raise unencodable

    async def delete(self, key: str) -> bool:
        n = await self._run("UNLINK", self._client.unlink(self._k(key)))
        self._m.deletes += 1
        return bool(n)

    async def delete_many(self, keys: Sequence[str]) -> int:
        """UNLINK the keys (split per slot in a cluster); returns how many existed."""
        uniq = list(dict.fromkeys(keys))
        total = 0
        for i in range(0, len(uniq), _UNLINK_BATCH):
            chunk = [self._k(k) for k in uniq[i : i + _UNLINK_BATCH]]
            total += int(await self._run("UNLINK", self._client.unlink(*chunk)))
        self._m.deletes += len(uniq)
        return total

    async def expire(self, key: str, ttl: float) -> bool:
        """Set a new TTL on an existing key; False when the key is absent."""
        t = validate_ttl(ttl)
        assert t is not None
        return bool(await self._run("PEXPIRE", self._client.pexpire(self._k(key), ttl_ms(t))))

    async def clear(self) -> int:
        """Delete this namespace's keys only (SCAN MATCH + UNLINK), never FLUSHDB."""
        pattern = escape_glob(self.namespace) + ":*"

        async def go() -> int:
            removed = 0
            batch: list[Any] = []
            async for fk in self._client.scan_iter(match=pattern, count=1000):
                batch.append(fk)
                if len(batch) >= _UNLINK_BATCH:
                    removed += int(await self._client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(await self._client.unlink(*batch))
            return removed

        return await self._run("SCAN+UNLINK", go())

    # ----------------------------------------------------------------- introspection

    async def ping(self) -> bool:
        return bool(await self._run("PING", self._client.ping()))

    async def stats(self) -> dict[str, Any]:
        """Our counters and latency, the breaker, and INFO memory/keyspace when reachable."""
        out: dict[str, Any] = {
            "name": self.name,
            "backend": "redis-cluster" if self.cluster else "redis",
            "namespace": self.namespace,
            **self._m.snapshot(),
            "breaker": self.breaker.snapshot(),
        }
        try:
            memory = await self._run("INFO", self._client.info("memory"))
            keyspace = await self._run("INFO", self._client.info("keyspace"))
        except TierError as exc:
            out["info_error"] = str(exc)
            return out
        # Standalone INFO is one dict; redis-py may merge (or nest per node) cluster replies.
        out["server"] = {
            "used_memory": memory.get("used_memory"),
            "used_memory_human": memory.get("used_memory_human"),
            "maxmemory": memory.get("maxmemory"),
            "maxmemory_policy": memory.get("maxmemory_policy"),
            "keyspace": keyspace,
        }
        return out

    async def close(self) -> None:
        """Stop subscribers and close the connection pool (idempotent)."""
        if self._closed:
            return
        self._closed = True  # the listeners check it too (see subscribe())
        for task in self._subscribers:
            await stop_task(task, recancel_every=_LISTENER_CLEANUP_S)
        self._subscribers.clear()
        with contextlib.suppress(Exception):
            await self._client.aclose()

    async def __aenter__(self) -> RedisCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- Coordinator protocol

    async def acquire_lock(self, name: str, ttl: float) -> str | None:
        """Take a short lock (set-if-absent with a TTL, in a script that a re-send cannot turn
        into "held by someone else"); returns its token, or None when someone else holds it.

        The TTL is the fallback for a holder that dies: its lock simply expires.
        """
        token = secrets.token_hex(8)
        key = self._coord_prefix + "lock:" + name
        ok = await self._run(
            "EVAL", self._client.eval(_ACQUIRE_LOCK, 1, key, token, str(ttl_ms(ttl)))
        )
        return token if ok else None

    async def release_lock(self, name: str, token: str) -> bool:
        """Delete the lock only if we still hold it (compare-and-delete in Lua)."""
        key = self._coord_prefix + "lock:" + name
        res = await self._run("EVAL", self._client.eval(_RELEASE_LOCK, 1, key, token))
        return bool(res)

    async def lock_held(self, name: str) -> bool:
        key = self._coord_prefix + "lock:" + name
        return bool(await self._run("EXISTS", self._client.exists(key)))

    async def incr_counter(self, hash_name: str, field: str) -> int:
        key = self._coord_prefix + hash_name
        return int(await self._run("HINCRBY", self._once(key, "HINCRBY", key, field, 1)))

    async def read_counters(self, hash_name: str) -> dict[str, int]:
        key = self._coord_prefix + hash_name
        raw = await self._run("HGETALL", self._client.hgetall(key))
        return {(f.decode() if isinstance(f, bytes) else str(f)): int(v) for f, v in raw.items()}

    # ----------------------------------------------------------------- GenerationStore protocol

    async def read_generations(self) -> dict[str, int]:
        """Every namespace generation kept here (outside the cache namespace)."""
        return await self.read_counters(_GENERATIONS)

    async def _advance(self, name: str, step: int, floor: int) -> int:
        key = self._coord_prefix + _GENERATIONS
        res = await self._run(
            "EVAL", self._once(key, "EVAL", _ADVANCE_FIELD, 1, key, name, str(step), str(floor))
        )
        return int(res)

    async def advance_generation(self, name: str, floor: int = 0) -> int:
        """Set ``name``'s generation to ``max(current + 1, floor)`` atomically; return it."""
        return await self._advance(name, 1, floor)

    async def raise_generation(self, name: str, value: int) -> int:
        """Set ``name``'s generation to ``max(current, value)`` atomically; return it."""
        return await self._advance(name, 0, value)

    def channel(self, suffix: str) -> str:
        """A pub/sub channel name scoped to this namespace."""
        return self._coord_prefix + suffix

    async def publish(self, channel: str, message: bytes) -> int:
        return int(await self._run("PUBLISH", self._client.publish(channel, message)))

    def _pubsub_client(self) -> aioredis.Redis:
        """A dedicated connection for SUBSCRIBE, without a read timeout (it waits for messages).

        In a cluster a plain PUBLISH reaches every node, so subscribing to one node suffices.
        """
        url = self.url
        if self.cluster:
            parts = urlsplit(url)
            url = urlunsplit(parts._replace(path="/0"))
        return aioredis.Redis.from_url(
            url,
            socket_connect_timeout=self._connect_timeout,
            socket_timeout=None,
            health_check_interval=5,
            retry=Retry(NoBackoff(), 0),
        )

    async def subscribe(
        self,
        channel: str,
        on_message: Callable[[bytes], None],
        on_reconnect: Callable[[], Awaitable[None] | None] | None = None,
    ) -> Callable[[], Awaitable[None]]:
        """Call ``on_message(data)`` for each message on ``channel`` until the returned stop().

        Resubscribes after connection loss (with backoff) and then calls ``on_reconnect``:
        messages sent while disconnected are lost, so the caller must assume anything changed.
        Returns once the first attempt is over: the subscription confirmed, or the connection
        refused (then it keeps trying in the background).
        """
        attempted = asyncio.Event()
        # Cancelling alone is not enough to stop the listener: on Python 3.11 a cancellation that
        # lands while get_message()'s own timeout fires can be swallowed (asyncio.timeout turns
        # it into the TimeoutError redis-py returns None for), and the loop went on forever
        # while close() awaited it. stop() sets this flag too, and the loop checks it.
        stopped = False

        async def run() -> None:
            backoff = 0.05
            connected_before = False
            while not (stopped or self._closed):
                client = self._pubsub_client()
                pubsub = client.pubsub()
                try:
                    await pubsub.subscribe(channel)
                    # Wait for the subscribe confirmation so publishers after `ready` are seen.
                    while not (stopped or self._closed):
                        msg = await pubsub.get_message(timeout=1.0)
                        if msg is not None and msg.get("type") == "subscribe":
                            break
                    attempted.set()
                    if connected_before and on_reconnect is not None:
                        res = on_reconnect()
                        if inspect.isawaitable(res):
                            await res
                    connected_before = True
                    backoff = 0.05
                    loop = asyncio.get_running_loop()
                    heard = pinged = loop.time()
                    while not (stopped or self._closed):
                        poll = min(1.0, self.subscriber_ping)
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll)
                        now = loop.time()
                        if msg is not None:
                            heard = now  # a message or the pong of our ping: the link is alive
                            if msg.get("type") == "message":
                                try:
                                    on_message(msg["data"])
                                except Exception:  # a bad message must not kill the listener
                                    log.exception("invalidation handler failed")
                        if now - heard > self.subscriber_timeout:
                            raise RedisConnectionError(
                                f"no answer from Redis for {self.subscriber_timeout:g} s"
                            )
                        if now - max(heard, pinged) > self.subscriber_ping:
                            await pubsub.ping("infercache-liveness")
                            pinged = now
                except asyncio.CancelledError:
                    raise
                except _SUBSCRIBER_ERRORS as exc:
                    log.info("redis %s: subscriber lost connection: %s", self.name, exc)
                    connected_before = True
                    attempted.set()
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                    with contextlib.suppress(Exception):
                        await client.aclose()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

        task = asyncio.create_task(run(), name=f"infercache-sub-{channel}")
        self._subscribers.append(task)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(attempted.wait(), timeout=self._connect_timeout * 2 + 1.0)

        async def stop() -> None:
            nonlocal stopped
            stopped = True
            await stop_task(task, recancel_every=_LISTENER_CLEANUP_S)
            if task in self._subscribers:
                self._subscribers.remove(task)

        return stop
