"""Predictor: the hot path of DESIGN.md, tying the cache, coalescing and the batcher together.

```
request ─validate─▶ key = fingerprint(input, namespace=name \\0 version \\0 generation)
   ├─ L1 hit (sync, no await) ─────────────────────────────────────▶ tier "l1"
   ├─ same key in flight? await that computation ──────────────────▶ tier "coalesced"
   ├─ L2/L3 (concurrent lookups share ONE get_many_with_tier call) ▶ tier "redis"/"sqlite"/...
   └─ miss ─▶ model DynamicBatcher ─▶ runner.run_validated ─▶ cache.set_many ─▶ tier None
```

Why each piece:

- The input is validated and converted *before* the key is computed, so equal model inputs sent in
  different forms (``[1, 2]`` vs ``np.array([1., 2.])``) share an entry, and a bad input fails
  with an :class:`InputError` before it can touch a cache or a batch.
- The key carries the model's name, its version (a digest of the weights by default) and the
  cache's generation for the model, so new weights or ``invalidate(namespace=name)`` make every old
  entry unreachable at once, with no scan.
- The L1 lookup is synchronous: a hit costs a dict lookup, never a trip through the event loop.
- Coalescing: N concurrent identical requests cause one lookup and one computation; the others
  await the first one's result. It also guarantees that a batch never holds the same key twice.
- Remote lookups go through a second :class:`DynamicBatcher` over keys: while one
  ``get_many_with_tier`` round trip is out, the next lookups queue and share the next one
  (FACTS.md: an MGET of 32 keys costs ~5 µs per key against ~68 µs for a lone GET). When no tier
  crosses the network (``cache.network_lookups`` is False: L1 + an SQLite file), each request
  looks up its own key: a local lookup costs microseconds, a batcher two event-loop hops.
- Only misses reach the model batcher. The first caller of a key (the leader) runs the miss path
  itself, with no task per miss; identical requests meanwhile await its future. If the leader is
  cancelled (client gone), its queued item is dropped and the waiting requests look again: one of
  them becomes the new leader.
- Write-back goes through ``cache.set_many``: the cache applies its write policy (through, behind,
  around). With remote tiers, concurrent writes share one call through a third batcher. A failed
  write is counted and logged, never turned into a failed prediction.
- Each stage (decode, key, cache, queue, compute, write) is timed into ``Prediction.timings`` (the
  server's ``Server-Timing`` header) and into the :class:`LatencyMonitor`.
"""

from __future__ import annotations

import asyncio
import cmath
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from math import isfinite
from typing import Any

import blake3
import numpy as np

from infercache.batching import DynamicBatcher
from infercache.errors import Closed, InfercacheError
from infercache.keys import fingerprint
from infercache.monitor import LatencyMonitor, StageTimer
from infercache.tiers.memory import MemoryCache

__all__ = ["Prediction", "Predictor"]

log = logging.getLogger("infercache.predictor")


@dataclass(slots=True)
class Prediction:
    """One prediction and how it was served.

    ``tier`` is ``"l1"`` or a remote tier's name for a cache hit, ``"coalesced"`` when the request
    joined an identical in-flight computation, and None when this request computed it. ``timings``
    maps stage -> seconds.
    """

    output: Any
    cached: bool
    tier: str | None
    key: str
    model: str
    version: str
    timings: dict[str, float] = field(default_factory=dict)
    #: the key namespace (model, version, generations) ``key`` was computed in
    namespace: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = self.output
        if hasattr(out, "tolist"):
            out = out.tolist()
        return {
            "output": out,
            "cached": self.cached,
            "tier": self.tier,
            "key": self.key,
            "model": self.model,
            "version": self.version,
            "timings": dict(self.timings),
        }


def _nonfinite(value: Any) -> bool:
    """Whether an output other than a plain ndarray holds NaN or inf anywhere.

    Models that return Python floats, numpy scalars or lists/tuples/dicts of them (JSON-shaped
    outputs: ``{"score": ...}``) can misbehave just as array models do, and a NaN cached once is
    served until the entry expires. This runs on every computed output, so floats and flat
    sequences of floats are checked here with exact-type tests and no further call; anything
    else goes to :func:`_walk_nonfinite`. Ints, bools, strings, bytes and None are never NaN.
    """
    t = type(value)
    if t is float:
        return not isfinite(value)
    if t is list or t is tuple or t is dict:
        for v in value.values() if t is dict else value:
            if type(v) is float:
                if not isfinite(v):
                    return True
            elif type(v) not in _NEVER_NONFINITE and _walk_nonfinite(v):
                return True
        return False
    if t in _SCALAR_FLOATS:
        return not isfinite(value)
    if t in _NEVER_NONFINITE:
        return False
    return _walk_nonfinite(value)


#: output types that cannot hold a NaN (exact types: a float subclass is still checked)
_NEVER_NONFINITE = frozenset({int, bool, str, bytes, type(None)})
#: numpy float scalars that math.isfinite checks exactly (np.float64 is a float subclass)
_SCALAR_FLOATS = frozenset({np.float16, np.float32, np.float64})


def _walk_nonfinite(value: Any, depth: int = 0, seen: set[int] | None = None) -> bool:
    """:func:`_nonfinite` for nested containers, numpy scalars and arrays inside containers.
    Past 100 levels it gives up (False): the codec refuses such a value anyway, and a
    self-containing list must not raise RecursionError from the write path. ``seen`` holds the
    containers already walked: ``a = [1.0]; a += [a, a]`` took 2**100 steps without it."""
    if type(value) in _SCALAR_FLOATS or isinstance(value, float):
        return not isfinite(value)  # math's check: np.isfinite on a numpy scalar costs ~1.4 µs
    if depth > 100:
        return False
    if isinstance(value, np.generic):  # complex, longdouble (which a float may not hold)
        return value.dtype.kind in "fc" and not np.isfinite(value)
    if isinstance(value, np.ndarray):  # inside a container, or a subclass
        return value.dtype.kind in "fc" and not np.isfinite(value).all()
    if isinstance(value, complex):
        return not cmath.isfinite(value)
    if isinstance(value, Mapping):
        container: Any = value.values()
    elif isinstance(value, (list, tuple)):
        container = value
    else:
        return False  # an object the codec will judge; its contents are not ours to walk
    if seen is None:
        seen = set()
    elif id(value) in seen:
        return False  # walked already (its answer was False, or the walk would have ended)
    seen.add(id(value))
    return any(
        type(v) not in _NEVER_NONFINITE and _walk_nonfinite(v, depth + 1, seen) for v in container
    )


def _has_remote(cache: Any) -> bool:
    tiers = getattr(cache, "tiers", None)
    if tiers is None:
        return False
    return len(tiers) > (1 if getattr(cache, "l1", None) is not None else 0)


class Predictor:
    """Serve ``runner``'s predictions through ``cache`` with coalescing and dynamic batching.

    Args:
        runner: a :class:`~infercache.models.ModelRunner` (anything with ``name``, ``version``,
            ``validate(x)`` and ``run_validated(items)``).
        cache: a MultiLevelCache, a MemoryCache (wrapped in a one-tier MultiLevelCache), or None
            (no caching; coalescing and batching still apply).
        batcher: the model batcher; its function must accept validated items (the default is
            ``DynamicBatcher(runner.run_validated, **batch_options)``).
        batch_options: options for the default model batcher (``max_batch_size``,
            ``max_wait_ms``, ``max_queue``, ``timeout``, ``adaptive``, ...).
        monitor: where request and stage latencies go (a new LatencyMonitor by default).
        ttl: TTL for written predictions (None: the cache's default).
        lookup_batch_size: the most keys one remote lookup (or write) carries.
        timer: the clock for stage timings.
    """

    def __init__(
        self,
        runner: Any,
        cache: Any = None,
        *,
        batcher: DynamicBatcher[Any, Any] | None = None,
        batch_options: Mapping[str, Any] | None = None,
        monitor: LatencyMonitor | None = None,
        ttl: float | None = None,
        lookup_batch_size: int = 256,
        timer: Callable[[], float] = time.perf_counter,
        raw_index_size: int = 10_000,
    ) -> None:
        lacks = [a for a in ("name", "version", "validate") if not hasattr(runner, a)]
        if batcher is None and not callable(getattr(runner, "run_validated", None)):
            lacks.append("run_validated")
        if lacks:
            raise TypeError(
                f"runner must be a ModelRunner (or have name, version, validate() and "
                f"run_validated()): got {type(runner).__name__}, which lacks {', '.join(lacks)}"
            )
        self.runner = runner
        if cache is not None and not hasattr(cache, "get_many_with_tier"):
            from infercache.multilevel import MultiLevelCache

            cache = MultiLevelCache([cache])
        self.cache = cache
        self._l1 = getattr(cache, "l1", None) if cache is not None else None
        self._remote = cache is not None and _has_remote(cache)
        self._owns_batcher = batcher is None
        if batcher is None:
            opts: dict[str, Any] = {
                "max_batch_size": 32,
                "max_wait_ms": 5.0,
                "name": f"{runner.name}-model",
            }
            opts.update(batch_options or {})
            if "offload" not in opts:
                opts["offload"] = not self._cheap_model(runner)
            batcher = DynamicBatcher(runner.run_validated, **opts)
        self.batcher = batcher
        self._lookup: DynamicBatcher[str, Any] | None = None
        self._writer: DynamicBatcher[tuple[str, Any], None] | None = None
        if self._remote and getattr(cache, "network_lookups", True):
            self._lookup = DynamicBatcher(
                self._lookup_batch,
                max_batch_size=lookup_batch_size,
                concurrency=2,
                split_on_error=False,
                max_queue=100_000,
                name=f"{runner.name}-lookup",
            )
        # Write-behind makes set_many an L1 write plus an append to the cache's own queue, which
        # batches the slower tiers itself: a second batcher in front of it would only add a hop.
        if self._remote and getattr(cache, "write", None) != "behind":
            self._writer = DynamicBatcher(
                self._write_batch,
                max_batch_size=lookup_batch_size,
                concurrency=2,
                split_on_error=False,
                max_queue=100_000,
                name=f"{runner.name}-write",
            )
        self.monitor = monitor if monitor is not None else LatencyMonitor()
        self.ttl = ttl
        self._timer = timer
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._counts: dict[str, int] = {
            "predictions": 0,
            "computed": 0,
            "coalesced": 0,
            "errors": 0,
            "lookup_errors": 0,
            "write_errors": 0,
            "not_cached_nonfinite": 0,
        }
        self._hits: dict[str, int] = {}
        self._closed = False
        # Keys embed the cache's generations, which a fresh process must load before building
        # its first key: else it would read entries an invalidation in another process retired.
        self._cache_started = cache is None or not callable(getattr(cache, "start", None))
        # request bytes (BLAKE3-128 digest) -> (namespace, key); see lookup_raw()
        self._raw_index: MemoryCache | None = (
            MemoryCache(raw_index_size, policy="lru", name=f"{runner.name}-raw-index")
            if raw_index_size and self._l1 is not None
            else None
        )

    #: a model whose warm-up forward (2 inputs) took less than this runs on the event loop
    INLINE_BELOW_S = 0.001

    @classmethod
    def _cheap_model(cls, runner: Any) -> bool:
        """Run tiny models on the loop: measured on 2 shared cores, the MLP's all-miss load did
        1.9k req/s inline vs 1.1k in a worker thread, because with a busy loop every GIL hand-off
        inside the forward waits for the loop's switch interval (a batch of 32 took 4.4 ms in the
        thread vs 2.0 ms inline). A slow model (MiniLM: ~20 ms) goes to the thread, so the loop
        keeps serving cache hits while it computes."""
        t = getattr(runner, "warmup_batch_s", None)
        return t is not None and t < cls.INLINE_BELOW_S

    # -- keys ------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self.runner.name)

    def namespace(self) -> str:
        """The key namespace: model name, version and the cache's generation for the model.

        ``cache.invalidate(namespace=name)`` bumps the generation, so every key changes at once. A
        bump of the ``name\\0version`` namespace (the server's per-version invalidation) is
        appended only when non-zero, so the default form is exactly the documented one.
        """
        name, version = self.runner.name, self.runner.version
        cache = self.cache
        if cache is None:
            return f"{name}\x00{version}\x000"
        gen = cache.generation(name)
        ns = f"{name}\x00{version}\x00{gen}"
        gen_v = cache.generation(f"{name}\x00{version}")
        return f"{ns}\x00{gen_v}" if gen_v else ns

    def key_for(self, x: Any) -> str:
        """The cache key of input ``x`` (validated and converted first)."""
        return fingerprint(self.runner.validate(x), namespace=self.namespace())

    # -- predicting ------------------------------------------------------------------------------

    async def predict(
        self, x: Any, *, use_cache: bool = True, deadline: float | None = None
    ) -> Prediction:
        """Predict one input. ``deadline`` is absolute, on ``self.batcher.timer``'s clock.

        Raises InputError (bad input), Overloaded (queue full), DeadlineExceeded, ModelError,
        Closed (after :meth:`close`, hits included: its batchers are gone, and an answer from the
        cache alone would hide that).
        """
        if self._closed:
            raise self._closed_error()
        st = StageTimer(self._timer)
        item = self.runner.validate(x)
        st.mark("decode")
        return await self._predict_validated(item, st, use_cache, deadline)

    async def predict_many(
        self, xs: Sequence[Any], *, use_cache: bool = True, deadline: float | None = None
    ) -> list[Prediction]:
        """Predict a client's own batch: every input is validated before anything is queued
        (one bad input fails the call with an InputError naming its index); hits, duplicates and
        misses are then handled per item, and the misses share model batches."""
        if self._closed:
            raise self._closed_error()
        t0 = self._timer()
        items = []
        for i, x in enumerate(xs):
            try:
                items.append(self.runner.validate(x))
            except InfercacheError as exc:
                raise type(exc)(f"input {i}: {exc}") from exc
        decode = (self._timer() - t0) / max(1, len(items))
        timers = []
        for _ in items:
            st = StageTimer(self._timer)
            st.add("decode", decode)
            timers.append(st)
        return list(
            await asyncio.gather(
                *(
                    self._predict_validated(item, st, use_cache, deadline)
                    for item, st in zip(items, timers, strict=True)
                )
            )
        )

    async def _predict_validated(
        self, item: Any, st: StageTimer, use_cache: bool, deadline: float | None
    ) -> Prediction:
        if not self._cache_started:
            await self._start_cache()
        ns = self.namespace()
        key = fingerprint(item, namespace=ns)
        st.mark("key")
        self._counts["predictions"] += 1
        if use_cache and self._l1 is not None:
            value = self._l1.get(key)
            if value is not None:
                st.mark("cache")
                return self._done(value, True, "l1", key, st, ns)
        loop = asyncio.get_running_loop()
        while True:
            flight = self._inflight.get(key)
            if flight is None:
                break
            try:  # shield: a follower going away must not cancel the leader's computation
                value = await asyncio.shield(flight)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if flight.cancelled() and task is not None and not task.cancelling():
                    continue  # the leader went away, not us: look again (and maybe lead)
                raise
            self._counts["coalesced"] += 1
            st.mark("queue")
            return self._done(value, False, "coalesced", key, st, ns)
        # this request leads: it runs the miss path inline (no task per miss) and shares the
        # result through a future that identical requests arriving meanwhile await
        flight = loop.create_future()
        self._inflight[key] = flight
        try:
            value, tier = await self._resolve(key, item, use_cache, deadline, st)
        except BaseException as exc:
            if self._inflight.get(key) is flight:
                del self._inflight[key]
            if isinstance(exc, asyncio.CancelledError):
                flight.cancel()  # followers look again; one of them leads
            else:
                flight.set_exception(exc)
                flight.exception()  # mark retrieved: there may be no follower
                if isinstance(exc, InfercacheError):
                    self._counts["errors"] += 1
            raise
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        flight.set_result(value)
        if tier is None:
            self._counts["computed"] += 1
            return self._done(value, False, None, key, st, ns)
        return self._done(value, True, tier, key, st, ns)

    async def _resolve(
        self, key: str, item: Any, use_cache: bool, deadline: float | None, st: StageTimer
    ) -> tuple[Any, str | None]:
        """The miss path: remote lookup, model, write-back. Returns (value, tier or None)."""
        if use_cache and self._remote:
            try:
                if self._lookup is not None:
                    hit = await self._lookup.submit(key)
                elif self.cache.might_have(key):  # local tiers only (SQLite): no batcher hops
                    hit = (await self.cache.get_many_with_tier((key,))).get(key)
                else:  # certainly not there (key filters): not even an await
                    hit = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a tier failure is a miss, not a failed prediction
                self._counts["lookup_errors"] += 1
                log.warning("cache lookup failed for model %s: %s", self.runner.name, exc)
                hit = None
            st.mark("cache")
            if hit is not None:
                return hit[0], hit[1]
        else:
            st.mark("cache")
        value, _queue_s, compute_s = await self.batcher.submit_timed(item, deadline=deadline)
        waited = st.lap()
        st.add("compute", compute_s)
        st.add("queue", max(0.0, waited - compute_s))
        if use_cache and self.cache is not None and value is not None:
            await self._write(key, value)
            st.mark("write")
        return value, None

    async def _write(self, key: str, value: Any) -> None:
        # NaN or inf from a finite input: the model misbehaved (the answer goes out as null).
        # Caching it would serve it again long after the cause is fixed.
        if type(value) is np.ndarray:  # the common output: checked here, with no call
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                self._counts["not_cached_nonfinite"] += 1
                return
            if value.base is not None:
                # One row of the batch's output: cached as it is, it keeps the whole batch's
                # array alive (32x its size at the default batch), which MemoryCache(max_bytes)
                # does not see. A copy of one output row costs well under a microsecond.
                value = value.copy()
            if value.flags.writeable:
                # Every hit hands out this same array: one caller's in-place edit would become
                # every later caller's answer. (A model's own outputs are read-only already.)
                value.flags.writeable = False
        elif _nonfinite(value):
            self._counts["not_cached_nonfinite"] += 1
            return
        try:
            if self._writer is not None:
                await self._writer.submit((key, value))
            else:
                await self.cache.set_many({key: value}, ttl=self.ttl)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._counts["write_errors"] += 1
            log.warning("cache write failed for model %s: %s", self.runner.name, exc)

    async def _lookup_batch(self, keys: list[str]) -> list[tuple[Any, str] | None]:
        found = await self.cache.get_many_with_tier(keys)
        return [found.get(k) for k in keys]

    async def _write_batch(self, pairs: list[tuple[str, Any]]) -> list[None]:
        await self.cache.set_many(dict(pairs), ttl=self.ttl)
        return [None] * len(pairs)

    def _done(
        self,
        value: Any,
        cached: bool,
        tier: str | None,
        key: str,
        st: StageTimer,
        namespace: str = "",
    ) -> Prediction:
        if tier is not None:
            self._hits[tier] = self._hits.get(tier, 0) + 1
        total = st.total()
        self.monitor.record_stages(st.timings, total)
        return Prediction(
            value, cached, tier, key, self.runner.name, self.runner.version, st.timings, namespace
        )

    # -- the request-bytes index -----------------------------------------------------------------

    @staticmethod
    def raw_digest(raw: bytes) -> bytes:
        """The request-bytes index key: BLAKE3-128 of ``raw`` (compute it once per request)."""
        return bytes(blake3.blake3(raw).digest(16))

    def lookup_raw(self, raw: bytes, digest: bytes | None = None) -> Prediction | None:
        """An L1 hit for request bytes seen before, without decoding them; None otherwise.

        A server receives the same request bytes again and again (retries, popular inputs, one
        client library serializing the same input identically). Parsing 784 floats from JSON,
        converting and validating them and fingerprinting the array costs ~60 µs; hashing the
        raw bytes costs ~3 µs. The index maps BLAKE3-128(raw) to the canonical key it produced
        (and the namespace that key was computed in), so a repeat skips straight to L1. The
        canonical key stays the truth: a stale namespace (invalidated model or version) or an
        entry gone from L1 falls back to the full path, and BLAKE3 makes a forged collision with
        another client's bytes infeasible. Only the caller knows which bytes denote an input, so
        it records them with :meth:`remember_raw` after a successful prediction.
        """
        index = self._raw_index
        if index is None or self._closed:  # closed: the full path says so
            return None
        st = StageTimer(self._timer)
        found = index.get(digest if digest is not None else self.raw_digest(raw))
        if found is None:
            return None
        st.mark("key")
        ns, key = found
        l1 = self._l1
        # `in` first: a miss here goes down the full path, whose own L1 get counts it once
        if ns != self.namespace() or l1 is None or key not in l1:
            return None
        value = l1.get(key)
        if value is None:
            return None
        st.mark("cache")
        self._counts["predictions"] += 1
        return self._done(value, True, "l1", key, st, ns)

    def remember_raw(self, raw: bytes, prediction: Prediction, digest: bytes | None = None) -> None:
        """Record that request bytes ``raw`` denote ``prediction``'s input (see lookup_raw)."""
        if self._raw_index is not None and prediction.namespace:
            token = digest if digest is not None else self.raw_digest(raw)
            self._raw_index.set(token, (prediction.namespace, prediction.key))

    # -- lifecycle and stats ---------------------------------------------------------------------

    async def _start_cache(self) -> None:
        await self.cache.start()  # idempotent; loads the generations (see __init__)
        self._cache_started = True

    async def start(self) -> Predictor:
        """Start the cache (its generations) and the batchers now; they also start lazily on the
        first request."""
        if not self._cache_started:
            await self._start_cache()
        await self.batcher.start()
        for b in (self._lookup, self._writer):
            if b is not None:
                await b.start()
        return self

    async def __aenter__(self) -> Predictor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Drain and stop the batchers this predictor created (the cache is the caller's)."""
        if self._closed:
            return
        self._closed = True
        for b in (self._lookup, self.batcher if self._owns_batcher else None, self._writer):
            if b is not None:
                with contextlib.suppress(Exception):
                    await b.close()

    def _closed_error(self) -> Closed:
        return Closed(f"the predictor for model {self.runner.name!r} is closed")

    def stats(self) -> dict[str, Any]:
        """Counters (predictions, hits per tier, coalesced, model calls), batcher and latency
        statistics. ``model_calls`` counts forward passes; ``computed`` the items they served."""
        c = self._counts
        hits = sum(self._hits.get(t, 0) for t in self._hits if t != "coalesced")
        bstats = self.batcher.stats()
        out: dict[str, Any] = {
            "model": self.runner.name,
            "version": self.runner.version,
            **c,
            "hits": dict(self._hits),
            "hit_ratio": hits / c["predictions"] if c["predictions"] else 0.0,
            "in_flight": len(self._inflight),
            "model_calls": bstats["batches"],
            "batcher": bstats,
            "latency": self.monitor.get_stats(),
            "stages": self.monitor.stage_stats(),
        }
        if self._lookup is not None:
            out["lookup_batcher"] = self._lookup.stats()
        if self._writer is not None:
            out["write_batcher"] = self._writer.stats()
        return out
