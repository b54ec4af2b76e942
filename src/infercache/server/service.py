"""The server's state: models, their Predictors, the cache, metrics, the broadcast hub, auth.

Routes and the WebSocket handler stay thin and call :class:`Service`; everything that decides
*what* a prediction answer is lives here, once, so HTTP and WebSocket answer the same way.
:func:`build_service` turns :class:`~infercache.config.Settings` into a running Service (loading
models, connecting tiers); ``create_app`` can also be given ready-made Predictors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson

from infercache.aio import stop_task
from infercache.config import (
    MODEL_FILE_SUFFIXES,
    Settings,
    model_input_fields,
    parse_model_spec,
)
from infercache.errors import (
    ConfigError,
    DeadlineExceeded,
    InputError,
    ModelNotFound,
    one_line,
)
from infercache.server import fastjson
from infercache.server.auth import TokenAuth
from infercache.server.deadlines import Deadlines
from infercache.server.encoding import dumps
from infercache.server.errors import APIError
from infercache.server.metrics import ServerMetrics
from infercache.server.ws import Hub

log = logging.getLogger("infercache.server")
T = TypeVar("T")


@dataclass
class ModelEntry:
    """One served model: its Predictor and what /v1/models tells about it."""

    name: str
    predictor: Any
    runner: Any
    #: whether request bodies may be decoded by server.fastjson (see :meth:`__post_init__`)
    array_json: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        # Only a validating runner whose spec is a 1-D float array: fastjson hands over float64,
        # which such a spec converts exactly as it converts a list of numbers. An integer spec
        # would refuse floats, a callable might expect the list itself.
        spec = getattr(self.runner, "input_spec", None)
        dtype = getattr(spec, "dtype", None)
        shape = getattr(spec, "shape", None)
        try:
            is_float = dtype is not None and np.dtype(dtype).kind == "f"
        except TypeError:
            is_float = False
        self.array_json = (
            self.validates
            and is_float
            and isinstance(shape, tuple)
            and len(shape) == 1
            and not getattr(spec, "is_text", False)
            and fastjson.available()
        )

    @property
    def validates(self) -> bool:
        """Whether the predictor validates inputs itself (a ModelRunner behind it does)."""
        return callable(getattr(self.runner, "validate", None))

    @property
    def version(self) -> str:
        return str(getattr(self.runner, "version", "") or "")

    @property
    def batcher(self) -> Any:
        return getattr(self.predictor, "batcher", None)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version, "input_spec": None}
        runner_describe = getattr(self.runner, "describe", None)
        if callable(runner_describe):
            with contextlib.suppress(Exception):  # a description must never break /v1/models
                out.update(runner_describe())
            out["name"] = self.name
        spec = getattr(self.runner, "input_spec", None)
        if spec is not None and not out.get("input_spec"):
            out["input_spec"] = _describe_spec(spec)
        batcher = self.batcher
        if batcher is not None:
            out["batching"] = {
                "max_batch_size": getattr(batcher, "max_batch_size", None),
                "max_wait_ms": getattr(batcher, "max_wait_ms", None),
                "load_wait_ms": getattr(batcher, "load_wait_ms", None),
                "max_queue": getattr(batcher, "max_queue", None),
            }
        return out

    def coerce(self, raw: Any) -> Any:
        """Turn a JSON value into the model's input type, or raise :class:`InputError`.

        Done here, before the key is computed, so that ``[1, 2]`` and ``[1.0, 2.0]`` (equal once
        they are float32) share one cache entry, and a malformed input never reaches the model.
        """
        validate = getattr(self.runner, "validate", None)
        if callable(validate):  # ModelRunner.validate: the spec's conversion, or pass-through
            try:
                return validate(raw)
            except InputError:
                raise
            except (ValueError, TypeError, OverflowError) as exc:
                raise InputError(f"invalid input: {exc}") from None
        spec = getattr(self.runner, "input_spec", None)
        if spec is None:
            return raw
        coerce = getattr(spec, "coerce", None) or getattr(spec, "validate", None)
        if callable(coerce):
            try:
                return coerce(raw)
            except InputError:
                raise
            except (ValueError, TypeError, OverflowError) as exc:
                raise InputError(f"invalid input: {exc}") from None
        return _coerce_by_fields(spec, raw)


def _describe_spec(spec: Any) -> Any:
    for meth in ("to_dict", "describe", "as_dict"):
        fn = getattr(spec, meth, None)
        if callable(fn):
            try:
                return fn()
            except Exception:  # a description must never break /v1/models
                break
    out: dict[str, Any] = {}
    for attr in ("shape", "dtype", "min_value", "max_value", "allow_nan", "kind"):
        if hasattr(spec, attr):
            value = getattr(spec, attr)
            out[attr] = (
                list(value)
                if isinstance(value, tuple)
                else str(value)
                if attr == "dtype"
                else value
            )
    return out


def _coerce_by_fields(spec: Any, raw: Any) -> Any:
    """Fallback coercion for a spec object with ``shape`` and ``dtype`` attributes only."""
    dtype = np.dtype(getattr(spec, "dtype", "float32"))
    shape = tuple(getattr(spec, "shape", ()) or ())
    if isinstance(raw, bool | str | dict) or raw is None:
        raise InputError(f"input must be a number or a nested list of numbers, shape {shape}")
    try:
        arr = np.asarray(raw, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"input is not a {shape} array of {dtype}: {exc}") from None
    if shape and arr.shape != shape:
        raise InputError(f"input shape {list(arr.shape)} does not match the model's {list(shape)}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError("input contains NaN or infinity")
    return arr


@dataclass
class Service:
    """Everything the routes need, created once per app (per worker process)."""

    settings: Settings
    models: dict[str, ModelEntry]
    cache: Any = None
    monitor: Any = None
    owned: list[Any] = field(default_factory=list)  # things to close on shutdown
    hub: Hub = field(default_factory=Hub)
    ready: bool = False
    warmup_error: str | None = None
    started_at: float = field(default_factory=time.time)
    stream_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: several workers and nothing shared to carry invalidations between them
    alone: bool = False
    #: what carries invalidations between processes (the Redis tier or the SQLite event log):
    #: with several workers it relays topic publishes too (``start_relay``)
    bus: Any = None

    def __post_init__(self) -> None:
        self._relay_stop: Callable[[], Awaitable[None]] | None = None
        self._relay_channel = ""
        self._origin = os.urandom(8).hex()  # tells this process's relayed publishes apart
        several = self.settings.workers > 1
        self.metrics = ServerMetrics(
            self._metric_sources, worker=str(os.getpid()) if several else None
        )
        self.admin_auth = TokenAuth(self.settings.admin_token)
        self.deadlines = Deadlines(self.settings.request_timeout_s)
        self.api_auth = TokenAuth(self.settings.api_token)

    def _metric_sources(self) -> Mapping[str, Any]:
        l1 = getattr(self.cache, "l1", None)
        if l1 is None and self.cache is not None and hasattr(self.cache, "hits"):
            l1 = self.cache
        monitors = [getattr(e.predictor, "monitor", None) for e in self.models.values()]
        return {
            "batchers": {n: e.batcher for n, e in self.models.items()},
            "l1": l1,
            "tiers": self.cache if hasattr(self.cache, "health") else None,
            "monitors": [self.monitor, *monitors],
        }

    # -- predictions ---------------------------------------------------------------------------

    def entry(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"no model named {name[:100]!r}; see GET /v1/models")
        return entry

    def cached_json(
        self, model: str, body: bytes, digest: bytes | None = None
    ) -> dict[str, Any] | None:
        """The answer for request bytes seen before, from L1 without decoding them; None when
        the bytes are new or their entry is gone (see Predictor.lookup_raw). ``digest``: the
        bytes' ``Predictor.raw_digest``, when the caller has it already."""
        entry = self.entry(model)
        lookup = getattr(entry.predictor, "lookup_raw", None)
        if lookup is None:
            return None
        pred = lookup(body, digest)
        if pred is None:
            return None
        self.metrics.observe_prediction(entry.name, pred.tier, pred.timings)
        return _answer(entry, pred)

    async def _in_time(self, work: Awaitable[T]) -> T:
        """``await work``, or DeadlineExceeded once ``request_timeout_s`` has passed."""
        deadlines = self.deadlines
        task = deadlines.enter()
        try:
            return await work
        except asyncio.CancelledError:
            if deadlines.fired(task):
                raise DeadlineExceeded(
                    f"prediction took longer than {self.settings.request_timeout_s:g} s"
                ) from None
            raise
        finally:
            deadlines.leave(task)

    def fast_input(self, model: str, body: bytes) -> Any:
        """The input of a ``{"input": [numbers]}`` body as an array, decoded without building
        Python floats (server.fastjson); None when the model or the body does not allow it."""
        entry = self.entry(model)
        return fastjson.decode_input_array(body) if entry.array_json else None

    async def predict_json(
        self,
        model: str,
        raw: Any,
        *,
        use_cache: bool = True,
        transport: str = "http",
        body: bytes | None = None,
        digest: bytes | None = None,
    ) -> dict[str, Any]:
        """One prediction as a JSON-able dict (``output``, ``cached``, ``tier``, ``timings``).

        ``body``: the request bytes that carried exactly this input; after success they are
        remembered, so the same bytes next time are answered by :meth:`cached_json`.
        """
        entry = self.entry(model)
        # The Predictor validates and converts the input itself (ModelRunner.validate) before
        # computing the key; converting it here too would do the work twice.
        x = raw if entry.validates else entry.coerce(raw)
        pred = await self._in_time(entry.predictor.predict(x, use_cache=use_cache))
        self.metrics.observe_prediction(entry.name, pred.tier, pred.timings)
        if body is not None and use_cache:
            remember = getattr(entry.predictor, "remember_raw", None)
            if remember is not None:
                remember(body, pred, digest)
        return _answer(entry, pred)

    async def predict_many_json(
        self, model: str, raws: list[Any], *, use_cache: bool = True
    ) -> dict[str, Any]:
        """Several predictions in one call: parallel lists ``outputs``, ``cached``, ``tier``."""
        entry = self.entry(model)
        xs = raws
        if not entry.validates:
            xs = []
            for i, raw in enumerate(raws):
                try:
                    xs.append(entry.coerce(raw))
                except InputError as exc:
                    raise InputError(f"inputs[{i}]: {exc}") from None
        preds = await self._in_time(_predict_many(entry.predictor, xs, use_cache))
        timings: dict[str, float] = {}
        for p in preds:
            self.metrics.observe_prediction(entry.name, p.tier, p.timings)
            for stage, s in p.timings.items():
                timings[stage] = max(timings.get(stage, 0.0), s)
        return {
            "model": entry.name,
            "model_version": preds[0].version if preds else entry.version,
            "outputs": [p.output for p in preds],
            "cached": [p.cached for p in preds],
            "tier": [p.tier for p in preds],
            "timings": timings,
        }

    async def invalidate(
        self,
        *,
        all: bool = False,
        model: str | None = None,
        version: str | None = None,
        key: str | None = None,
        has_input: bool = False,
        input: Any = None,
    ) -> dict[str, Any]:
        """Invalidate by key, by (model, input), by model (one or every version), or everything.

        Model-wide invalidation bumps a namespace generation in the MultiLevelCache, O(1) and
        broadcast to other processes when Redis is a tier: old entries become unreachable at once
        and age out, instead of a scan that deletes them one by one.
        """
        cache = self.cache
        if cache is None:
            raise InputError("this server has no cache to invalidate")
        unsent = getattr(cache, "events_unsent", 0)
        result = await self._invalidate(
            cache, all=all, model=model, version=version, key=key, has_input=has_input, input=input
        )
        if getattr(cache, "events_unsent", 0) > unsent:
            result["broadcast"] = False
            result["warning"] = (
                "done here, but the event could not be published (Redis down): other servers "
                "drop their copies only when they reconnect and resync"
            )
        elif self.alone:
            result["broadcast"] = False
            result["warning"] = (
                "done in the worker that received it only: with several workers and neither "
                "Redis nor an SQLite file, nothing carries it to the others"
            )
        return result

    async def _invalidate(
        self,
        cache: Any,
        *,
        all: bool,
        model: str | None,
        version: str | None,
        key: str | None,
        has_input: bool,
        input: Any,
    ) -> dict[str, Any]:
        given = sum(bool(x) for x in (all, key is not None, model is not None))
        if given != 1 or (version is not None and model is None) or (has_input and model is None):
            raise APIError(  # the request's shape, not an input: as the errors table says
                422,
                "invalid_request",
                "give exactly one of: all=true, key, or model (optionally with version or input)",
            )
        if all:
            removed = await _call(cache, "invalidate", all=True)
            return {"invalidated": "all", "result": removed}
        if key is not None:
            removed = await _call(cache, "delete", key)
            return {"invalidated": "key", "key": key, "result": removed}
        assert model is not None
        entry = self.entry(model)
        if has_input:
            served = entry.predictor.runner.version
            if version is not None and version != served:  # the key is built with the served one
                raise InputError(
                    f"an input's entry can be invalidated for the served version {served!r} only; "
                    f"to retire version {version!r}, invalidate {{model, version}} without input"
                )
            x = entry.coerce(input)
            k = entry.predictor.key_for(x)
            removed = await _call(cache, "delete", k)
            return {"invalidated": "input", "model": model, "key": k, "result": removed}
        ns = f"{entry.name}\x00{version}" if version is not None else entry.name
        result = await _call(cache, "invalidate", namespace=ns)
        return {"invalidated": "model", "model": model, "version": version, "result": result}

    # -- lifecycle -----------------------------------------------------------------------------

    async def warm_up(self) -> None:
        """One forward per model (outside the cache), then ``gc.freeze()``; sets :attr:`ready`.

        The first forward pays for lazy initialisation (allocators, kernels); doing it before
        traffic keeps it out of the first user's latency. ``gc.freeze()`` afterwards moves every
        object allocated so far (torch, the model, the app) out of the collector's reach: measured
        on this machine a full collection with torch loaded took 86-117 ms, and freezing took p99
        from 119 to 11 ms.
        """
        try:
            if self.settings.warmup:
                for entry in self.models.values():
                    await _warm_one(entry)
        except Exception as exc:  # a model that cannot run is reported by /readyz, not a crash
            self.warmup_error = f"{type(exc).__name__}: {exc}"
            log.error("warm-up failed: %s", self.warmup_error)
            return
        if self.settings.gc_freeze:
            gc.collect()
            gc.freeze()
        self.ready = True
        # A tier that does not answer is skipped (the cache degrades, requests still succeed),
        # which is quiet by design: say so once at start, where the operator is looking.
        for name, state in (await self.check_tiers()).items():
            if state != "ok":
                log.warning("cache tier %s does not answer (%s): serving without it", name, state)

    async def check_tiers(self, probe_timeout: float = 1.0) -> dict[str, Any]:
        """Probe each remote tier (beyond L1) with a cheap ``exists``; name -> "ok" or the error."""
        out: dict[str, Any] = {}
        tiers = list(getattr(self.cache, "tiers", []) or [])
        for i, tier in enumerate(tiers):
            name = "l1" if i == 0 else str(getattr(tier, "name", f"tier{i}"))
            exists = getattr(tier, "exists", None)
            if i == 0 or exists is None or not asyncio.iscoroutinefunction(exists):
                out[name] = "ok"
                continue
            try:
                await asyncio.wait_for(exists("__infercache_readyz__"), probe_timeout)
                out[name] = "ok"
            except TimeoutError:  # wait_for gave up
                out[name] = f"no answer within {probe_timeout:g} s"
            except Exception as exc:
                out[name] = f"{type(exc).__name__}: {exc}"[:200]
        return out

    async def stats(self) -> dict[str, Any]:
        """Everything the admin stats endpoint and the dashboard show."""
        cache_stats: Any = None
        if self.cache is not None:
            try:
                result = self.cache.stats()
                cache_stats = await result if asyncio.iscoroutine(result) else result
            except Exception as exc:
                cache_stats = {"error": f"{type(exc).__name__}: {exc}"}
        models = {}
        for name, entry in self.models.items():
            info = entry.describe()
            batcher = entry.batcher
            if batcher is not None and hasattr(batcher, "stats"):
                info["batcher"] = batcher.stats()
            pstats = getattr(entry.predictor, "stats", None)
            if callable(pstats):
                try:
                    res = pstats()
                    info["predictor"] = await res if asyncio.iscoroutine(res) else res
                except Exception:
                    pass
            models[name] = info
        return {
            # which process answered: with --workers N each has its own L1, batcher and counters
            "worker": {"pid": os.getpid(), "workers": self.settings.workers},
            "uptime_s": time.time() - self.started_at,
            "ready": self.ready,
            "models": models,
            "cache": cache_stats,
            "latency": self.monitor.snapshot() if self.monitor is not None else None,
            "websocket": self.hub.stats(),
        }

    def stream_plan(self) -> list[tuple[str, ModelEntry, str]]:
        """(topic, model entry, stream key) per ``streams`` setting; a ConfigError naming the
        setting for a model this server does not serve (the start-up fails on it, exit 2)."""
        streams = stream_models(self.settings, self.models)
        return [(topic, self.entry(model), key) for topic, model, key in streams]

    def start_streams(self, plan: Sequence[tuple[str, ModelEntry, str]]) -> None:
        """Start one StreamProcessor per entry of :meth:`stream_plan` (Redis Stream -> model ->
        topic)."""
        for topic, entry, key in plan:
            task = asyncio.create_task(
                self._run_stream(topic, entry, key), name=f"infercache-stream-{topic}"
            )
            self.stream_tasks.append(task)

    async def _run_stream(self, topic: str, entry: ModelEntry, key: str) -> None:
        """Consume ``key`` forever; on an error (Redis down) log, wait and resume -- entries
        not acknowledged are re-read from this consumer's pending list, so none is lost."""
        import socket

        from infercache.streaming import RedisStreamSource, StreamProcessor, default_extract

        def extract(value: Any) -> Any:
            if isinstance(value, dict) and "input" not in value:
                # an entry without a "data" field arrives as its fields: "expected float32
                # array ..., got dict" did not say which field was missing
                names = ", ".join(repr(str(k)[:40]) for k in list(value)[:8])
                raise InputError(
                    "expected the entry's 'data' field to hold the input as JSON (an array, or "
                    f"an object with 'input'); got an object with the fields {names or 'none'}"
                )
            # the same conversion as HTTP inputs, so stream items and requests share cache keys
            return entry.coerce(default_extract(value))

        s = self.settings
        consumer = f"{socket.gethostname()}-{os.getpid()}"
        loop = asyncio.get_running_loop()
        failures = 0  # in a row: the traceback once, then one line each, backing off to 10 s
        while True:
            started = loop.time()
            source = RedisStreamSource(
                s.redis_url, key, s.stream_group, consumer, block_ms=500, claim_interval=5.0
            )
            proc = StreamProcessor(
                entry.predictor,
                window=s.stream_window,
                size=s.stream_size,
                duration=s.stream_duration if s.stream_window == "time" else None,
                idle_timeout=s.stream_idle_timeout,
                extract=extract,
                # relayed to the other workers' subscribers too: each worker consumes part of
                # the stream (one consumer group), and a subscriber saw its own worker's windows
                publish=functools.partial(self.publish_topic, topic),
            )
            try:
                await proc.run(source)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures = 1 if loop.time() - started > 30.0 else failures + 1
                delay = min(10.0, 2.0 ** (failures - 1))
                if failures == 1:
                    log.exception("stream %s (%s) failed; retrying in %g s", topic, key, delay)
                else:  # Redis down: a traceback a second flooded the log
                    log.warning(
                        "stream %s (%s) failed again (%d in a row): %s: %s; retrying in %g s",
                        topic, key, failures, type(exc).__name__, exc, delay,
                    )  # fmt: skip
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await source.close()

    # -- topic publishes across workers ---------------------------------------------------------

    async def start_relay(self) -> None:
        """With several workers, relay topic publishes to the other workers over ``bus``: each
        worker holds its own WebSocket connections, and a publish reached only the subscribers
        of the worker that received it."""
        bus = self.bus
        if bus is None or self.settings.workers < 2:
            return
        channel = self._relay_channel = bus.channel("topics")

        def on_message(raw: bytes) -> None:
            msg = orjson.loads(raw)
            if msg.get("o") != self._origin:  # ours went to our subscribers already
                self.hub.publish(str(msg["t"]), msg.get("d"))

        try:
            self._relay_stop = await bus.subscribe(channel, on_message)
        except Exception as exc:  # publishes stay local, and say so
            log.warning("topic publishes will reach this worker's subscribers only: %s", exc)

    async def publish_topic(self, topic: str, data: Any) -> tuple[int, bool]:
        """(subscribers of this worker it was queued for, whether it went to the others too)."""
        delivered = self.hub.publish(topic, data)
        if self._relay_stop is None:
            return delivered, self.settings.workers == 1
        try:
            # the encoder of the WebSocket events: numpy arrays in a window's outputs included
            payload = dumps({"o": self._origin, "t": topic, "d": data})
            await self.bus.publish(self._relay_channel, payload)
        except Exception as exc:
            log.warning("topic %s not relayed to the other workers: %s", topic, one_line(str(exc)))
            return delivered, False
        return delivered, True

    async def close(self) -> None:
        stop, self._relay_stop = self._relay_stop, None
        if stop is not None:
            with contextlib.suppress(Exception):
                await stop()
        await self.deadlines.close()
        for task in self.stream_tasks:
            task.cancel()
        for task in self.stream_tasks:
            # not cancelled again while its StreamProcessor stops its reader (up to its
            # stop_timeout, 5 s): a second cancellation would cut that short
            await stop_task(task, recancel_every=6.0)
        for entry in self.models.values():
            # The Predictor drains its model batcher and flushes its pending cache writes; a
            # ready-made Predictor given a batcher of the caller's leaves that one to its owner.
            target = entry.predictor if hasattr(entry.predictor, "close") else entry.batcher
            close = getattr(target, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("closing the predictor of %s failed", entry.name)
        for obj in self.owned:
            close = getattr(obj, "close", None)
            if close is None:
                continue
            try:
                res = close()
                if asyncio.iscoroutine(res):
                    await res
            except Exception:
                log.exception("closing %r failed", obj)


async def _call(obj: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    res = getattr(obj, method)(*args, **kwargs)
    if asyncio.iscoroutine(res):
        res = await res
    return res if isinstance(res, int | float | str | bool | dict | list | type(None)) else str(res)


async def _predict_many(predictor: Any, xs: list[Any], use_cache: bool) -> list[Any]:
    many = getattr(predictor, "predict_many", None)
    if many is not None:
        try:
            return list(await many(xs, use_cache=use_cache))
        except TypeError:
            if not use_cache:
                raise
            return list(await many(xs))
    return list(await asyncio.gather(*(predictor.predict(x, use_cache=use_cache) for x in xs)))


async def _warm_one(entry: ModelEntry) -> None:
    runner = entry.runner
    warm = getattr(runner, "warmup", None)
    if callable(warm):
        res = await asyncio.to_thread(warm)
        if asyncio.iscoroutine(res):
            await res
        return
    spec = getattr(runner, "input_spec", None)
    example = getattr(spec, "example", None)
    if callable(example):  # InputSpec: zeros of its shape, a string for text, None if open
        sample = example()
    else:
        shape = getattr(spec, "shape", None)
        if shape is None or any(d is None for d in shape):
            return
        sample = np.zeros(tuple(shape), dtype=np.dtype(getattr(spec, "dtype", "float32")))
    if sample is None:
        return  # nothing valid to send without knowing a dimension: the first request warms up
    await asyncio.to_thread(runner.predict_batch, [sample])


# --------------------------------------------------------------------------- building from settings


def preflight(settings: Settings) -> None:
    """Cheap checks before the server starts, so that a wrong ``--model`` stops ``serve`` with a
    message naming the setting instead of a traceback from inside uvicorn's start-up: files must
    exist and ``module:factory`` modules must be importable (found, not imported)."""
    import importlib.util

    _check_host(settings.host, settings.port)
    if settings.redis_url:
        _check_redis_answers_us(settings.redis_url)
    if settings.sql_url and settings.sql_url.startswith("sqlite:"):
        _check_sqlite_file(settings.sql_url)
    elif settings.sql_url:
        _check_postgres_answers_us(settings.sql_url)
    for spec in settings.models:
        _, body = parse_model_spec(spec)
        lower = body.lower()
        if lower == "demo":
            continue
        if lower.endswith(MODEL_FILE_SUFFIXES):
            if not Path(body).is_file():
                raise ConfigError(f"setting 'models': model file {body!r} does not exist")
            continue
        module = body.partition(":")[0]
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"setting 'models': cannot import {module!r}: {exc}") from None
        if found is None:
            raise ConfigError(f"setting 'models': no module named {module!r} (in {spec!r})")


def _check_host(host: str, port: int) -> None:
    """Stop at start on a host that is no address and resolves to none: uvicorn found out only
    after the models had loaded and warmed up, and exited 3 with "Name or service not known",
    naming no setting."""
    import ipaddress
    import socket

    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        reason = exc.args[-1] if isinstance(exc, OSError) and exc.args else exc
        raise ConfigError(
            f"setting 'host': {host!r} is no IP address and does not resolve to one ({reason})"
        ) from None


def _check_redis_answers_us(url: str) -> None:
    """Stop at start when Redis answers but refuses us: a wrong or missing password, a database
    out of range, a cluster URL for a standalone server. Those never heal; the server used to
    start, log "cache tier redis does not answer" and stay unready for ever. A Redis that does
    not answer at all may come up later, so that is left to the running server (``/readyz``)."""
    import redis
    from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError

    from infercache.config import redact_url

    cluster = url.startswith("redis+cluster://")
    plain = url.replace("redis+cluster://", "redis://", 1)
    client = redis.Redis.from_url(plain, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        client.ping()
        if cluster and not client.info("cluster").get("cluster_enabled"):
            raise ConfigError(
                f"setting 'redis_url': {redact_url(url)!r} is a cluster URL, but that Redis "
                "is not in cluster mode (use redis://)"
            )
    except (AuthenticationError, AuthorizationError, ResponseError) as exc:
        hint = ""
        if "authenticat" in str(exc).lower() or "noauth" in str(exc).lower():
            hint = " (a password goes in the URL: redis://:password@host:port/0)"
        raise ConfigError(
            f"setting 'redis_url': Redis at {redact_url(url)!r} refused us: {exc}{hint}"
        ) from None
    except redis.RedisError as exc:  # not answering (yet): the running server handles it
        log.info("Redis at %s does not answer at start: %s", redact_url(url), exc)
    finally:
        client.close()


def _check_sqlite_file(url: str) -> None:
    """Stop at start when the SQLite L3 can never work: the path is a directory, or a file that is
    not an SQLite database. The server used to start, log "cache tier sqlite does not answer"
    and stay unready for ever. A file that does not exist yet is fine: it is created."""
    import sqlite3

    from infercache.tiers.sql import sqlite_path

    raw = sqlite_path(url)
    if raw in ("", ":memory:"):
        return
    path = Path(raw)
    if path.is_dir():
        raise ConfigError(f"setting 'sql_url': {str(path)!r} is a directory, not an SQLite file")
    if not path.exists():
        return
    try:  # read-only: nothing is created or changed here
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        text = str(exc)
        if any(w in text for w in ("locked", "busy", "readonly", "unable to open")):
            # another process is writing it, or a crash left a journal that only a read-write
            # open rolls back: it may be a database after all; the tier will tell
            return
        raise ConfigError(
            f"setting 'sql_url': {str(path)!r} is not a usable SQLite database: {exc}"
        ) from None


#: what PostgreSQL says when it answers but will never let us in with this URL (as against "the
#: database system is starting up" or "too many clients", which pass)
_PG_REFUSALS = (
    "password authentication failed",
    "no password supplied",
    "does not exist",  # the database or the role
    "pg_hba.conf",
    "permission denied",
)


def _check_postgres_answers_us(url: str) -> None:
    """Stop at start when PostgreSQL answers but refuses us (a wrong password, a database or role
    that does not exist): the server used to start and stay unready for ever while the pool
    logged the refusal every few seconds. A server that does not answer may come up later, so
    that is left to the running server (``/readyz``), as for Redis."""
    try:
        import psycopg
    except ImportError:  # the SQL tier's own error names the missing extra
        return

    from urllib.parse import urlsplit

    from infercache.config import redact_url
    from infercache.tiers.sql import postgres_conninfo

    conninfo = postgres_conninfo(url)
    try:
        psycopg.connect(conninfo, connect_timeout=2).close()
    except psycopg.Error as exc:
        text = " ".join(str(exc).split())
        password = urlsplit(conninfo).password
        if password:  # libpq quotes a URL it cannot parse, password and all
            text = text.replace(password, "***")
        fatal = text.partition("FATAL:")[2].strip()
        if fatal and any(r in fatal for r in _PG_REFUSALS):
            raise ConfigError(
                f"setting 'sql_url': PostgreSQL at {redact_url(url)!r} refused us: {fatal}"
            ) from None
        log.info("PostgreSQL at %s does not answer at start: %s", redact_url(url), text)


def load_model(spec: str, *, threads: int = 1, jit: bool = False, onnx: bool = False) -> Any:
    """A ModelRunner for one ``--model`` spec (see :func:`infercache.config.parse_model_spec`).

    ``threads``, ``jit`` and ``onnx`` apply to the demo model, to TorchScript files and to an
    ``nn.Module`` a ``module:factory`` returns; a factory that builds its own runner keeps its own
    options.
    """
    from infercache.models import ModelRunner

    name, body = parse_model_spec(spec)
    lower = body.lower()
    # ";shape=...;dtype=..." after the spec, if any: over what the model itself tells
    declared = model_input_fields(spec)
    options: dict[str, Any] = {} if declared is None else {"input_spec": declared}
    try:
        if lower == "demo":
            from infercache.models.demo import demo_mlp

            return demo_mlp(name=name or "mlp", threads=threads, jit=jit, onnx=onnx, **options)
        if lower.endswith(MODEL_FILE_SUFFIXES):
            path = Path(body)
            if not path.is_file():
                raise ConfigError(f"setting 'models': model file {body!r} does not exist")
            torch_file = not lower.endswith(".onnx")
            return ModelRunner(
                str(path),
                name=name or path.stem,
                threads=threads,
                jit=jit and torch_file,
                onnx=onnx and torch_file,
                **options,
            )
        # a factory's own ModelRunner keeps its options; a bare nn.Module gets the server's
        module_options = {"threads": threads, "jit": jit, "onnx": onnx}
        runner = ModelRunner.load(body, module_options=module_options, **options)
        if name:
            runner = _renamed(runner, name)
        return runner
    except ConfigError as exc:
        if str(exc).startswith("setting "):
            raise
        text = one_line(str(exc))
        if not text.startswith("cannot load "):  # ModelRunner.load names the spec itself
            text = f"cannot load {spec!r}: {text}"
        raise ConfigError(f"setting 'models': {text}") from exc
    except Exception as exc:  # one line: a TorchScript error's text is a whole traceback
        raise ConfigError(
            f"setting 'models': cannot load {spec!r}: {type(exc).__name__}: {one_line(str(exc))}"
        ) from exc


def _renamed(runner: Any, name: str) -> Any:
    if getattr(runner, "name", None) == name:
        return runner
    try:
        runner.name = name
    except AttributeError as exc:
        raise ConfigError(f"setting 'models': cannot rename model to {name!r}: {exc}") from exc
    return runner


def _set_torch_threads(n: int) -> None:
    try:
        import torch
    except ImportError:
        return
    with contextlib.suppress(Exception):  # torch may refuse once its pool started
        torch.set_num_threads(n)


def stream_models(settings: Settings, served: Collection[str]) -> list[tuple[str, str, str]]:
    """(topic, model name, stream key) per ``streams`` setting; a ConfigError naming the setting
    for a model not in ``served``. ``serve --check`` runs it on the loaded models' names, so it
    refuses what the real start-up refuses."""
    from infercache.config import parse_stream_spec

    out = []
    for spec in settings.streams:
        topic, model, key = parse_stream_spec(spec)
        if model not in served:
            raise ConfigError(
                f"setting 'streams': {spec!r} names model {model!r}, which is not served "
                f"(served: {', '.join(sorted(served))})"
            )
        out.append((topic, model, key))
    return out


def load_models(settings: Settings) -> list[Any]:
    """The runners of ``settings.models`` (the demo MLP when none), each under its own name."""
    _set_torch_threads(settings.torch_threads)
    specs = list(settings.models) or ["demo"]
    runners = [
        load_model(s, threads=settings.torch_threads, jit=settings.jit, onnx=settings.onnx)
        for s in specs
    ]
    names = [r.name for r in runners]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"setting 'models': two models are named {', '.join(map(repr, dupes))} "
            f"(all names: {names}); give each a name with name=spec"
        )
    return runners


async def build_service(settings: Settings, runners: Sequence[Any] | None = None) -> Service:
    """Build the cache tiers and a Predictor per model; ``runners`` from :func:`load_models`
    (loaded here when None)."""
    from infercache.monitor import LatencyMonitor
    from infercache.multilevel import MultiLevelCache
    from infercache.predictor import Predictor
    from infercache.tiers.memory import MemoryCache

    if runners is None:
        runners = load_models(settings)

    tiers: list[Any] = [
        MemoryCache(max_size=settings.l1_size, ttl=settings.cache_ttl, policy=settings.l1_policy)
    ]
    redis_tier = None
    if settings.redis_url:
        from infercache.tiers.redis import RedisCache

        redis_tier = RedisCache(settings.redis_url, ttl=settings.cache_ttl)
        tiers.append(redis_tier)
    if settings.sql_url:
        from infercache.tiers.sql import SQLCache

        # A Bloom filter of the L3's keys answers "never written" without a query. On an SQLite
        # file it is used only while this process is the file's only writer (writer presence,
        # tiers/sql.py): with several workers, each the others' other writer, it would never be
        # on. PostgreSQL has no presence, and is usually shared by servers: off.
        key_filter = settings.workers == 1 and settings.sql_url.startswith("sqlite")
        tiers.append(
            SQLCache(
                settings.sql_url,
                ttl=settings.cache_ttl,
                key_filter=key_filter,
                idle_writer=settings.sql_idle_writer,
            )
        )
    events = None
    sql_url = settings.sql_url or ""
    if not settings.redis_url and sql_url.startswith("sqlite"):
        # No Redis to carry invalidations between processes: those that share the SQLite file
        # (this server's workers, or other servers started on it) get them through a table
        # there, else an invalidation reached one process's L1 only. Polling it costs four
        # indexed reads a second in a worker thread.
        from infercache.tiers.events import SQLiteEventLog
        from infercache.tiers.sql import sqlite_path

        path = sqlite_path(sql_url)
        events = None if path == ":memory:" else SQLiteEventLog(path)
    # what carries invalidations (and, with several workers, topic publishes) between processes
    bus = events if events is not None else redis_tier
    alone = settings.workers > 1 and bus is None
    if alone:
        log.warning(
            "%d workers with neither Redis nor an SQLite file: each has its own cache, and an "
            "invalidation reaches only the worker that receives it",
            settings.workers,
        )
    cache = MultiLevelCache(
        tiers=tiers,
        write=settings.write_policy,  # type: ignore[arg-type]
        events=events,
    )
    monitor = LatencyMonitor()
    models: dict[str, ModelEntry] = {}
    for runner in runners:
        # The Predictor builds the model batcher itself: it runs a cheap model (the MLP's forward
        # is ~30 µs) on the event loop and offloads only slow ones, which a thread hop per batch
        # would otherwise cost more than the forward (docs/benchmarks.md).
        predictor = Predictor(
            runner,
            cache,
            monitor=monitor,
            batch_options={
                "max_batch_size": settings.max_batch_size,
                "max_wait_ms": settings.max_wait_ms,
                "load_wait_ms": settings.load_wait_ms,
                "max_queue": settings.max_queue,
                "name": runner.name,
            },
        )
        models[runner.name] = ModelEntry(runner.name, predictor, runner)
    return Service(
        settings=settings,
        models=models,
        cache=cache,
        monitor=monitor,
        owned=[cache],
        alone=alone,
        bus=bus,
    )


def _answer(entry: ModelEntry, pred: Any) -> dict[str, Any]:
    """One prediction as the JSON-able dict the HTTP and WebSocket handlers answer with."""
    return {
        "model": entry.name,
        "model_version": pred.version,
        "output": pred.output,
        "cached": pred.cached,
        "tier": pred.tier,
        "timings": pred.timings,
    }


def service_from_predictors(
    predictors: Any, settings: Settings, *, cache: Any = None, monitor: Any = None
) -> Service:
    """A Service over ready-made Predictors (a mapping name -> Predictor, or a sequence)."""
    items: list[tuple[Any, Any]]
    if isinstance(predictors, Mapping):
        items = list(predictors.items())
    else:
        items = [(getattr(getattr(p, "runner", None), "name", None), p) for p in predictors]
    models: dict[str, ModelEntry] = {}
    for name, predictor in items:
        runner = getattr(predictor, "runner", None)
        model_name = str(name or getattr(runner, "name", "model"))
        if model_name in models:
            raise ConfigError(f"two predictors are named {model_name!r}")
        models[model_name] = ModelEntry(model_name, predictor, runner)
        if cache is None:
            cache = getattr(predictor, "cache", None)
    return Service(settings=settings, models=models, cache=cache, monitor=monitor)
