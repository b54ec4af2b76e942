"""StreamProcessor: windows over an async stream or a Redis Stream, each window through a Predictor.

The user's ``StreamProcessor`` kept a list window, popped from its front (O(n)), re-processed the
last ``batch_size`` items on every arrival once the window was full, flushed on a one-second idle
timeout, and produced mock results. This one keeps the ideas and makes them dependable:

- **Windows.** ``count`` (tumbling, every ``size`` items), ``time`` (tumbling, every ``duration``
  seconds from a window's first item) and ``sliding`` (the last ``size`` items, every ``step`` new
  items). Any window still open is flushed after ``idle_timeout`` seconds without input (the user's
  behaviour) and when the source ends.
- **Predictions.** Each window's items go through a :class:`~infercache.predictor.Predictor`
  concurrently, so items cached by earlier windows or requests are cache hits and misses reach
  the model in batches; each window yields one :class:`WindowResult` with per-item outputs and a
  summary (count, cache hits, errors, latency, mean output). How an input repeated within a
  window is counted depends on timing: a repeat that arrives while the first is still computing
  joins that computation (the Predictor's coalescing) and is *not* counted in ``cached``; one
  that arrives after the result was cached is a cache hit and is. So ``summary["cached"]``
  counts cache hits, not repeats. An item that fails (bad input) is reported in the result; it
  does not sink the window. With ``fn=`` instead of a Predictor, a call that raises is reported
  for every item of its window, and the stream goes on with the next one.
- **Backpressure.** A reader task fills a bounded queue (``max_buffer``); results are produced only
  as fast as the consumer of :meth:`StreamProcessor.process` (or the ``sink`` of
  :meth:`StreamProcessor.run`) takes them. A slow sink therefore stops the reader -- and, for a
  Redis Stream, stops ``XREADGROUP`` -- instead of growing memory.
- **Stopping.** Closing :meth:`StreamProcessor.process` (``break`` out of it, ``aclose()``,
  ``run(max_windows=...)``) cancels the reader task and waits for it at most ``stop_timeout``
  seconds, repeating the cancellation meanwhile: a cancellation can be lost below the reader
  (on Python 3.11 ``asyncio.wait_for`` drops one that arrives as its inner call completes, and
  redis-py sends commands through it), and the reader would then read on forever. Both the
  reader and :class:`RedisStreamSource` also notice a lost cancellation themselves (the task's
  ``cancelling()`` count, which only an explicit ``uncancel()`` clears) before their next read.
- **Redis Streams, at-least-once.** :class:`RedisStreamSource` reads with ``XREADGROUP`` in a
  consumer group and acknowledges (``XACK``) entries only after the window that used them was
  handed on and the consumer asked for the next one (or, for ``run(max_windows=N)``, once its sink
  has handled the last one it was to handle). A consumer that crashes leaves its entries
  pending; on start and every ``claim_interval`` seconds each consumer first re-reads its own
  pending entries, then takes over other consumers' entries idle longer than
  ``claim_min_idle_ms`` with ``XAUTOCLAIM`` (never the entries it holds itself, in an open window
  and not acknowledged yet). Nothing is lost; an entry may be processed twice
  (at-least-once), which the cache makes cheap.
- **Publishing.** ``publish`` (for instance ``lambda r: hub.publish("topic", r)`` with the server's
  broadcast hub) receives every result as a dict; WebSocket subscribers of the topic get it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import math
import numbers
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infercache.aio import raise_if_cancel_requested, stop_task

__all__ = [
    "RedisStreamSource",
    "StreamItem",
    "StreamProcessor",
    "WindowResult",
    "default_extract",
]

log = logging.getLogger("infercache.streaming")

_END = object()
#: sent into :meth:`StreamProcessor.process` by :meth:`~StreamProcessor.run` when it stops after
#: a window its sink has handled: that window is acknowledged before the generator returns
_HANDLED_STOP = object()


@dataclass(slots=True)
class StreamItem:
    """One element of a stream: its payload, its id in the source (Redis entry id), a decode
    error if the payload could not be read."""

    value: Any
    id: str | None = None
    error: str | None = None


@dataclass
class WindowResult:
    """The result of one window."""

    window: int
    kind: str
    ids: list[str | None]
    outputs: list[Any]
    summary: dict[str, Any]
    reason: str  # "full", "time", "slide", "idle", "end"
    errors: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what WebSocket subscribers receive)."""
        return {
            "window": self.window,
            "kind": self.kind,
            "reason": self.reason,
            "ids": self.ids,
            "outputs": self.outputs,
            "summary": self.summary,
            "errors": {str(k): v for k, v in self.errors.items()},
        }


def default_extract(value: Any) -> Any:
    """A stream item's model input: ``item["input"]`` for a dict that has it, else the item."""
    if isinstance(value, dict) and "input" in value:
        return value["input"]
    return value


def _error_text(exc: BaseException) -> str:
    """How a failed item is reported: the error's ``code`` (InfercacheErrors) or its type, and
    its message."""
    return f"{getattr(exc, 'code', type(exc).__name__)}: {exc}"


def _check_int(name: str, value: Any) -> None:
    """``value`` is an integer >= 1 (bool is not: ``size=True`` is a mistake, not 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, not {value!r}")


def _check_seconds(name: str, value: Any, *, none_hint: bool = False) -> None:
    """``value`` is a finite number of seconds > 0 (NaN would pass a ``<= 0`` test and then
    never expire; infinity never expires either)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        hint = " (None: never)" if none_hint else ""
        raise ValueError(f"{name} must be a finite number of seconds > 0{hint}, not {value!r}")


def _mean_output(outputs: Sequence[Any]) -> Any:
    """Element-wise mean of numeric outputs of one shape; None when they are not numeric."""
    values = [o for o in outputs if o is not None]
    if not values:
        return None
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        return None
    if arr.dtype.kind not in "fiub" or arr.size == 0:
        return None
    mean = arr.mean(axis=0)
    return mean.tolist() if isinstance(mean, np.ndarray) else float(mean)


class StreamProcessor:
    """Windows over a stream; one :class:`WindowResult` per window.

    Args:
        predictor: a Predictor (``await predict(x)`` returning a Prediction); or None with ``fn``.
        fn: instead of a predictor, ``fn(list_of_inputs) -> list_of_outputs`` (sync or async).
            With neither, outputs are the extracted inputs themselves (pure windowing). A call
            that raises (or returns the wrong number of outputs) is reported as the error of
            every item it was given; the stream goes on with the next window.
        window: ``"count"``, ``"time"`` or ``"sliding"``.
        size: items per count window, or the sliding window's length (time windows ignore it).
        step: new items between sliding windows (default 1; sliding windows only).
        duration: seconds per time window (time windows only, and required there).
        idle_timeout: flush the open window after this many seconds without input (None: never).
        extract: item payload -> model input (default: ``payload["input"]`` for dicts that have
            it, else the payload).
        summarize: ``(payloads, outputs) -> dict`` merged into each window's summary.
        max_buffer: items read ahead of processing (the backpressure bound).
        publish: called with each result's dict (sync or async), e.g. a WebSocket hub.
        timer: monotonic clock for window deadlines.
        stop_timeout: seconds that closing :meth:`process` waits for its reader task to end
            before it gives up on it with a warning (see :meth:`_stop_reader`).
    """

    def __init__(
        self,
        predictor: Any = None,
        *,
        fn: Callable[[list[Any]], Sequence[Any] | Awaitable[Sequence[Any]]] | None = None,
        window: str = "count",
        size: int = 10,
        step: int | None = None,
        duration: float | None = None,
        idle_timeout: float | None = 1.0,
        extract: Callable[[Any], Any] = default_extract,
        summarize: Callable[[list[Any], list[Any]], dict[str, Any]] | None = None,
        max_buffer: int = 1024,
        publish: Callable[[dict[str, Any]], Any] | None = None,
        timer: Callable[[], float] = time.monotonic,
        stop_timeout: float = 5.0,
    ) -> None:
        self._validate(
            predictor=predictor,
            fn=fn,
            window=window,
            size=size,
            step=step,
            duration=duration,
            idle_timeout=idle_timeout,
            extract=extract,
            summarize=summarize,
            max_buffer=max_buffer,
            publish=publish,
            timer=timer,
            stop_timeout=stop_timeout,
        )
        self.predictor = predictor
        self.fn = fn
        self.window = window
        self.size = int(size)
        self.step = 1 if step is None else int(step)
        self.duration = None if duration is None else float(duration)
        self.idle_timeout = None if idle_timeout is None else float(idle_timeout)
        self.extract = extract
        self.summarize = summarize
        self.max_buffer = int(max_buffer)
        self.publish = publish
        self.timer = timer
        self.stop_timeout = float(stop_timeout)
        self._seq = itertools.count()
        self.windows = 0
        self.items = 0

    @staticmethod
    def _validate(
        *,
        predictor: Any,
        fn: Any,
        window: Any,
        size: Any,
        step: Any,
        duration: Any,
        idle_timeout: Any,
        extract: Any,
        summarize: Any,
        max_buffer: Any,
        publish: Any,
        timer: Any,
        stop_timeout: Any,
    ) -> None:
        """Reject bad arguments here, naming them: otherwise a wrong type fails windows later
        (inside the reader or at the first comparison) and an argument that does not apply to
        the window kind is silently ignored, so the caller never learns the window is not the
        one they asked for."""
        if not isinstance(window, str):
            raise TypeError(f"window must be a str, not {type(window).__name__}")
        if window not in ("count", "time", "sliding"):
            raise ValueError(f"window must be 'count', 'time' or 'sliding', not {window!r}")
        _check_int("size", size)
        if step is not None:
            _check_int("step", step)
            if window != "sliding":
                raise ValueError(f"step applies to sliding windows only, not to window={window!r}")
        if window == "time":
            if duration is None:
                raise ValueError("a time window needs duration (seconds > 0)")
            _check_seconds("duration", duration)
        elif duration is not None:
            raise ValueError(f"duration applies to time windows only, not to window={window!r}")
        if idle_timeout is not None:
            _check_seconds("idle_timeout", idle_timeout, none_hint=True)
        _check_int("max_buffer", max_buffer)
        _check_seconds("stop_timeout", stop_timeout)
        if predictor is not None and fn is not None:
            raise ValueError("give a predictor or fn, not both (fn would be ignored)")
        if predictor is not None and not callable(getattr(predictor, "predict", None)):
            raise TypeError(
                f"predictor must have a predict(x) method; {type(predictor).__name__} has none"
            )
        for name, value in (("fn", fn), ("summarize", summarize), ("publish", publish)):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable or None, not {type(value).__name__}")
        for name, value in (("extract", extract), ("timer", timer)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, not {type(value).__name__}")

    # -- the public loops ----------------------------------------------------------------------

    async def process(self, source: AsyncIterable[Any]) -> AsyncGenerator[WindowResult, object]:
        """Yield one result per window until ``source`` ends.

        Items of a window are acknowledged to the source (when it has ``ack``) once the consumer
        asks for the next result, i.e. after it has handled this one: at-least-once.
        """
        queue: asyncio.Queue[Any] = asyncio.Queue(self.max_buffer)
        reader = asyncio.create_task(self._read(source, queue), name="infercache-stream-reader")
        ack = getattr(source, "ack", None)
        buffer: deque[StreamItem] = deque()
        since_emit = 0  # sliding: new items since the last window
        window_deadline: float | None = None
        try:
            while True:
                timeout = self._next_timeout(window_deadline)
                try:
                    if timeout is None:
                        got = await queue.get()
                    else:
                        # asyncio.timeout, not wait_for: no task per get, and Python 3.11's
                        # wait_for can swallow a cancellation of this consumer that races it.
                        async with asyncio.timeout(max(0.0, timeout)):
                            got = await queue.get()
                except TimeoutError:
                    got = None
                if got is _END:
                    if buffer and (self.window != "sliding" or since_emit):
                        yield await self._emit(list(buffer), "end")
                    if ack is not None and buffer:
                        await ack([it.id for it in buffer if it.id is not None])
                    return
                if isinstance(got, BaseException):
                    raise got
                if got is None:  # a timeout: idle flush or a time window's end
                    if not buffer:
                        window_deadline = None
                        continue
                    reason = (
                        "time"
                        if window_deadline is not None and self.timer() >= window_deadline
                        else "idle"
                    )
                    if self.window == "sliding" and not since_emit:
                        continue
                    items = list(buffer)
                    buffer.clear()
                    since_emit = 0
                    window_deadline = None
                    sent = yield await self._emit(items, reason)
                    await _ack(ack, items)
                    if sent is _HANDLED_STOP:
                        return
                    continue
                item: StreamItem = got
                self.items += 1
                if self.window == "time":
                    if window_deadline is not None and self.timer() >= window_deadline and buffer:
                        items = list(buffer)
                        buffer.clear()
                        window_deadline = None
                        sent = yield await self._emit(items, "time")
                        await _ack(ack, items)
                        if sent is _HANDLED_STOP:  # `item` is in no window: it stays pending
                            return
                    if window_deadline is None:
                        assert self.duration is not None
                        window_deadline = self.timer() + self.duration
                    buffer.append(item)
                elif self.window == "count":
                    buffer.append(item)
                    if len(buffer) >= self.size:
                        items = list(buffer)
                        buffer.clear()
                        sent = yield await self._emit(items, "full")
                        await _ack(ack, items)
                        if sent is _HANDLED_STOP:
                            return
                else:  # sliding
                    evicted: list[StreamItem] = []
                    buffer.append(item)
                    while len(buffer) > self.size:
                        evicted.append(buffer.popleft())
                    since_emit += 1
                    if len(buffer) >= self.size and since_emit >= self.step:
                        since_emit = 0
                        sent = yield await self._emit(list(buffer), "slide")
                        if sent is _HANDLED_STOP:  # every item of the window was handled
                            await _ack(ack, [*evicted, *buffer])
                            return
                    await _ack(ack, evicted)
        finally:
            await self._stop_reader(reader)

    async def run(
        self,
        source: AsyncIterable[Any],
        sink: Callable[[WindowResult], Any] | None = None,
        *,
        max_windows: int | None = None,
    ) -> int:
        """Process ``source`` to its end (or ``max_windows``), awaiting ``sink`` per result.

        Returns the number of windows. A slow ``sink`` slows the reading (backpressure).
        Stopping at ``max_windows`` acknowledges the last window once ``sink`` has handled it:
        a job that runs ``run(max_windows=N)`` again and again got that window again every time
        (breaking out of :meth:`process` leaves it pending, as the loop cannot tell whether it was
        handled).
        """
        n = 0
        gen = self.process(source)
        try:
            result = await gen.__anext__()
            while True:
                if sink is not None:
                    res = sink(result)
                    if inspect.isawaitable(res):
                        await res
                n += 1
                if max_windows is not None and n >= max_windows:
                    with contextlib.suppress(StopAsyncIteration):
                        await gen.asend(_HANDLED_STOP)
                    break
                result = await gen.asend(None)
        except StopAsyncIteration:
            pass
        finally:
            await gen.aclose()
        return n

    # -- internals -----------------------------------------------------------------------------

    async def _stop_reader(self, reader: asyncio.Task[None]) -> None:
        """Cancel the reader task and wait for it to end, at most ``stop_timeout`` seconds.

        A bare ``reader.cancel(); await reader`` waited forever when the cancellation was lost
        below the reader (see :mod:`infercache.aio`): the reader went on reading and
        nothing cancelled it again. So :func:`~infercache.aio.stop_task` repeats the
        cancellation while waiting, and a reader that still has not ended after ``stop_timeout``
        is left behind with a warning rather than block the consumer's exit. Either way nothing
        is lost: entries the reader delivered and no window acknowledged stay pending in the
        consumer group, re-read by this consumer when it restarts or claimed by another.

        stop_task neither raises the reader's outcome (a failure was already queued for the
        consumer) nor swallows a cancellation of the consumer itself (``suppress(BaseException)``
        around ``await reader`` did both), so cancelling a consumer that is stopping still
        cancels it.
        """
        if not await stop_task(reader, give_up_after=self.stop_timeout):
            log.warning(
                "stream reader did not stop within %.3g s of being cancelled; left behind "
                "(entries it read and nobody acknowledged stay pending)",
                self.stop_timeout,
            )

    def _next_timeout(self, window_deadline: float | None) -> float | None:
        timeouts = []
        if self.idle_timeout is not None:
            timeouts.append(self.idle_timeout)
        if window_deadline is not None:
            timeouts.append(window_deadline - self.timer())
        return min(timeouts) if timeouts else None

    async def _read(self, source: AsyncIterable[Any], queue: asyncio.Queue[Any]) -> None:
        """Reader task: fills the bounded queue, blocking when it is full (backpressure)."""
        try:
            async for raw in source:
                raise_if_cancel_requested()  # a cancellation the source lost: stop here
                item = raw if isinstance(raw, StreamItem) else StreamItem(raw)
                await queue.put(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surface the source's failure to the consumer
            await queue.put(exc)
            return
        await queue.put(_END)

    async def _outputs(self, inputs: list[Any]) -> tuple[list[Any], list[bool], dict[int, str]]:
        errors: dict[int, str] = {}
        if self.predictor is not None:
            results = await asyncio.gather(
                *(self.predictor.predict(x) for x in inputs), return_exceptions=True
            )
            outputs: list[Any] = []
            cached: list[bool] = []
            for i, r in enumerate(results):
                if isinstance(r, BaseException):
                    if isinstance(r, asyncio.CancelledError):
                        raise r
                    errors[i] = _error_text(r)
                    outputs.append(None)
                    cached.append(False)
                else:
                    outputs.append(r.output)
                    cached.append(bool(r.cached))
            return outputs, cached, errors
        if self.fn is not None:
            try:
                res = self.fn(inputs)
                if inspect.isawaitable(res):
                    res = await res
                outs = list(res)
                if len(outs) != len(inputs):
                    raise ValueError(f"fn returned {len(outs)} outputs for {len(inputs)} inputs")
            except Exception as exc:
                # One failing call must not end the stream (and, for a Redis Stream, stop the
                # worker with the entries pending, to fail again on every restart): it is
                # reported like a Predictor's per-item failure, for every item of the call.
                # CancelledError is not an Exception and still propagates.
                n = len(inputs)
                return [None] * n, [False] * n, dict.fromkeys(range(n), _error_text(exc))
            return outs, [False] * len(inputs), errors
        return list(inputs), [False] * len(inputs), errors

    async def _emit(self, items: list[StreamItem], reason: str) -> WindowResult:
        start = time.perf_counter()
        errors: dict[int, str] = {}
        inputs: list[Any] = []
        positions: list[int] = []
        for i, it in enumerate(items):
            if it.error is not None:
                errors[i] = it.error
                continue
            try:
                inputs.append(self.extract(it.value))
                positions.append(i)
            except Exception as exc:
                errors[i] = f"extract failed: {type(exc).__name__}: {exc}"
        outs, cached, errs = await self._outputs(inputs)
        outputs: list[Any] = [None] * len(items)
        hits = 0
        for j, pos in enumerate(positions):
            outputs[pos] = outs[j]
            hits += cached[j]
            if j in errs:
                errors[pos] = errs[j]
        outputs = [o.tolist() if isinstance(o, np.ndarray) else o for o in outputs]
        n = len(items)
        summary: dict[str, Any] = {
            "count": n,
            "cached": hits,
            "hit_ratio": hits / n if n else 0.0,
            "errors": len(errors),
            "latency_ms": (time.perf_counter() - start) * 1000.0,
            "mean_output": _mean_output([o for i, o in enumerate(outputs) if i not in errors]),
        }
        values = [it.value.get("value") for it in items if isinstance(it.value, dict)]
        numeric = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if numeric:  # the user's summary: the average of the items' "value" fields
            summary["avg"] = sum(numeric) / len(numeric)
        if self.summarize is not None:
            summary.update(self.summarize([it.value for it in items], outputs))
        result = WindowResult(
            window=next(self._seq),
            kind=self.window,
            ids=[it.id for it in items],
            outputs=outputs,
            summary=summary,
            reason=reason,
            errors=errors,
        )
        self.windows += 1
        if self.publish is not None:
            res = self.publish(result.to_dict())
            if inspect.isawaitable(res):
                await res
        return result


async def _ack(ack: Callable[[list[str]], Awaitable[Any]] | None, items: list[StreamItem]) -> None:
    if ack is None or not items:
        return
    ids = [it.id for it in items if it.id is not None]
    if ids:
        await ack(ids)


def _entry_id(entry_id: Any) -> str:
    """A Redis entry id as str (redis-py returns bytes): the form acks and the in-flight set use."""
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


class RedisStreamSource:
    """A Redis Stream read in a consumer group (``XREADGROUP``), acknowledged after processing.

    Args:
        redis: a ``redis.asyncio.Redis`` client or a URL.
        stream: the stream key.
        group: the consumer group (created at ``start_id`` with MKSTREAM when missing).
        consumer: this consumer's name; a restarted consumer with the same name first re-reads its
            own pending entries.
        field: the entry field holding a JSON payload; entries without it yield their whole field
            map (decoded as UTF-8 strings).
        count: entries per XREADGROUP / XAUTOCLAIM call.
        block_ms: how long one XREADGROUP waits for new entries.
        claim_min_idle_ms: pending entries of other consumers idle this long are taken over
            (entries this source delivered and has not acknowledged yet are never re-delivered).
        claim_interval: seconds between XAUTOCLAIM passes.
        stop_when_empty: end the iteration when nothing is new and nothing is claimable (batch
            jobs, tests); otherwise iterate forever.
    """

    def __init__(
        self,
        redis: Any,
        stream: str,
        group: str,
        consumer: str,
        *,
        field: str = "data",
        count: int = 64,
        block_ms: int = 1000,
        claim_min_idle_ms: int = 30_000,
        claim_interval: float = 5.0,
        start_id: str = "0",
        stop_when_empty: bool = False,
    ) -> None:
        if isinstance(redis, str):
            import redis.asyncio as aioredis

            redis = aioredis.Redis.from_url(redis)
            self._owns_client = True
        else:
            self._owns_client = False
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.field = field.encode()
        self.count = count
        self.block_ms = block_ms
        self.claim_min_idle_ms = claim_min_idle_ms
        self.claim_interval = claim_interval
        self.start_id = start_id
        self.stop_when_empty = stop_when_empty
        self.acked = 0
        self.claimed = 0
        # Entries this source delivered and nobody acknowledged yet: they sit in an open window
        # (or the read-ahead queue) and are acked with it. XAUTOCLAIM cannot leave out our own
        # consumer, so its passes skip these instead of delivering them a second time.
        self._in_flight: set[str] = set()

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless it exists."""
        from redis.exceptions import ResponseError

        try:
            await self.redis.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _item(self, entry_id: Any, fields: dict[Any, Any] | None) -> StreamItem:
        eid = _entry_id(entry_id)
        self._in_flight.add(eid)
        if fields is None:  # deleted while pending
            return StreamItem(None, eid, "entry was deleted")
        raw = fields.get(self.field)
        if raw is None:
            raw = fields.get(self.field.decode())
        if raw is None:
            return StreamItem(
                {
                    (k.decode() if isinstance(k, bytes) else k): (
                        v.decode(errors="replace") if isinstance(v, bytes) else v
                    )
                    for k, v in fields.items()
                },
                eid,
            )
        import orjson

        try:
            return StreamItem(orjson.loads(raw), eid)
        except orjson.JSONDecodeError as exc:
            return StreamItem(None, eid, f"invalid JSON payload: {exc}")

    async def _own_pending(self) -> AsyncIterator[StreamItem]:
        last = "0"
        while True:
            raise_if_cancel_requested()
            resp = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: last}, count=self.count
            )
            entries = resp[0][1] if resp else []
            if not entries:
                return
            for entry_id, fields in entries:
                yield self._item(entry_id, fields)
            last = entries[-1][0]

    async def _claim(self) -> AsyncIterator[StreamItem]:
        cursor: Any = "0-0"
        while True:
            raise_if_cancel_requested()
            resp = await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                self.claim_min_idle_ms,
                start_id=cursor,
                count=self.count,
            )
            cursor, entries = resp[0], resp[1]
            for entry_id, fields in entries:
                # Ours and still in a window: already delivered, acked with that window. (The
                # pass did reset its idle time, which keeps other consumers from taking an
                # entry a live consumer holds in a slow-filling window.)
                if _entry_id(entry_id) in self._in_flight:
                    continue
                self.claimed += 1
                yield self._item(entry_id, fields)
            # An empty page with a non-zero cursor is possible: keep scanning until 0-0.
            if cursor in (b"0-0", "0-0"):
                return

    async def __aiter__(self) -> AsyncIterator[StreamItem]:
        await self.ensure_group()
        # A new iteration re-reads all of our pending entries (below): whatever an earlier one
        # delivered and never acknowledged is no longer held by anyone.
        self._in_flight.clear()
        async for item in self._own_pending():
            yield item
        async for item in self._claim():
            yield item
        last_claim = time.monotonic()
        while True:
            # Every round starts with a Redis command that redis-py may send through Python
            # 3.11's wait_for, which can lose a cancellation; without this check a cancelled
            # consumer went on issuing XREADGROUP ... BLOCK forever (see the function).
            raise_if_cancel_requested()
            resp = await self.redis.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: ">"},
                count=self.count,
                block=self.block_ms,
            )
            entries = resp[0][1] if resp else []
            for entry_id, fields in entries:
                yield self._item(entry_id, fields)
            now = time.monotonic()
            if not entries or now - last_claim >= self.claim_interval:
                last_claim = now
                claimed = 0
                async for item in self._claim():
                    claimed += 1
                    yield item
                if not entries and not claimed and self.stop_when_empty:
                    return

    async def ack(self, ids: Sequence[str]) -> int:
        """XACK the ids (after their window was processed)."""
        if not ids:
            return 0
        n = int(await self.redis.xack(self.stream, self.group, *ids))
        self.acked += n
        self._in_flight.difference_update(ids)
        return n

    async def pending(self) -> int:
        """Entries delivered to some consumer of the group and not acknowledged yet."""
        info = await self.redis.xpending(self.stream, self.group)
        return int(info["pending"] if isinstance(info, dict) else info[0])

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()
