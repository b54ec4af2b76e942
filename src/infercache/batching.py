"""DynamicBatcher: generic asyncio micro-batching with greedy dispatch.

Callers ``await batcher.submit(item)``; workers call ``fn(list_of_items) -> list_of_results`` and
hand each caller its own result. It is used twice on the hot path: for the model (cache misses
reach it in batches) and for the remote cache tiers (concurrent lookups share one ``MGET``).

Why greedy by default: the user's ``RequestBatcher`` (and most micro-batchers) wait ``max_wait``
after the first item for the batch to fill. Measured on this project's machine, a fixed 5 ms
window at 200 req/s gave p50 5.6 ms where one forward per request had 0.9 ms, and it caps a closed
loop at about ``concurrency / max_wait``. Here an idle worker takes whatever is queued (up to the
current batch limit) immediately: at low load a request runs alone without waiting for company;
at high load requests pile up while the model computes, so the next batch is full anyway.
``greedy=False`` restores the classic fill window (``max_wait_ms`` after the first item, or until
the batch is full), for models whose per-call cost is so high that waiting pays. With
``concurrency > 1`` and ``greedy=True``, a worker that finds the queue short while another worker
is computing waits up to ``max_wait_ms`` for company: the model is busy then, so waiting is cheap.

Waiting under load (``load_wait_ms``). Greedy dispatch keeps a single-core server's batches small
under Poisson arrivals: at 800-1,000 req/s the demo MLP's batches held 1.4-1.6 items on average
(3.7 at 1,500), and a forward of one or two items costs several times more per item than one of 32.
With ``load_wait_ms``, a worker that finds fewer than the batch limit queued waits for company, up
to that long from the oldest item's arrival, while requests arrive at least twice per window (an
EWMA of the gaps between submits) -- and only while the event loop has other work: it yields to
the loop, and a yield that comes back at once (nothing else ran) ends the wait. Waiting pays only
then, since the requests the loop is reading join the batch. Once every request that can come is
queued (a closed loop of N clients has N), a fixed window was idle time: 8 clients lost 30 % of
their throughput to it. A wait that brings no new item also turns waiting off for the next 1, 2,
4 ... 64 batches. Measured on the server (4 interleaved rounds, 2 ms against greedy): 8 clients
closed loop 1.17x the throughput (1.02-1.39x per round; the fixed window was 0.70x), 64 clients
the same, p50 at 200 req/s the same; at 900 req/s Poisson p99 8.7 against 11.9 ms, at 1,360 req/s
20.4 against 17.5 ms with 5 % more CPU per request (the yields). Within this machine's noise for
latency, so it stays off by default.

Other guarantees:

- ``max_queue`` bounds the items waiting; past it ``submit`` raises :class:`Overloaded` at once.
- Per-item deadlines: an item whose deadline passes while queued is answered with
  :class:`DeadlineExceeded` at that moment and never takes a batch slot. A caller that is cancelled
  (client went away) has its item dropped before dispatch.
- Poison input: when ``fn`` raises for a batch, the batch is bisected and retried, so only the
  item(s) that fail on their own get an error (:class:`ModelError` with the original as cause;
  infercache errors such as :class:`InputError` pass through unchanged).
- Adaptive mode (AIMD, as in Clipper, NSDI'17): with ``target_p99_ms`` the batch limit grows by
  ``additive_step`` while batches are full and latency is under target, and shrinks by
  ``backoff`` (x0.9) when a batch's oldest item exceeds the target; stats say why.
- Sync functions run in a dedicated thread pool (``concurrency`` threads), so a torch forward never
  blocks the event loop; async functions run on the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from infercache.errors import (
    Closed,
    DeadlineExceeded,
    InfercacheError,
    ModelError,
    Overloaded,
)
from infercache.monitor import LatencyMonitor

__all__ = ["BatchFn", "DynamicBatcher"]

T = TypeVar("T")
R = TypeVar("R")

BatchFn = Callable[[list[Any]], "Sequence[Any] | Awaitable[Sequence[Any]]"]

_QUEUED, _RUNNING, _DONE = 0, 1, 2


def _int_arg(name: str, value: object, low: int) -> int:
    """``value`` as an int >= ``low``, or an error naming the argument. Checked once, here: a
    float would fail deep inside (``[0] * 2.5``), a str at the first comparison with the queue,
    and a bool is a flag passed in the wrong place, not a size."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _real_arg(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a finite float >= 0 (> 0 when ``positive``), or an error naming the argument.
    NaN would compare False everywhere (never time out, never wait), infinity overflows the
    event loop's timers: None or 0 already say "no deadline" / "no window"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    in_range = number > 0.0 if positive else number >= 0.0  # NaN is in no range
    if not in_range or math.isinf(number):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return number


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Item:
    """One submitted item and its caller's future. Plain slots: created on every submit."""

    __slots__ = (
        "compute_s",
        "deadline",
        "dispatched",
        "enqueued",
        "future",
        "handle",
        "state",
        "value",
    )

    def __init__(
        self, value: Any, future: asyncio.Future[Any], enqueued: float, deadline: float | None
    ) -> None:
        self.value = value
        self.future = future
        self.enqueued = enqueued
        self.deadline = deadline
        self.dispatched = 0.0
        self.compute_s = 0.0
        self.state = _QUEUED
        self.handle: asyncio.TimerHandle | None = None


class DynamicBatcher(Generic[T, R]):
    """Async micro-batcher: ``await submit(item)`` -> ``fn([... item ...])[i]``.

    Args:
        fn: called with a list of items, returns a sequence of results of the same length, in the
            same order. A coroutine function runs on the event loop; a plain function in a worker
            thread (unless ``offload=False``).
        max_batch_size: the largest batch ``fn`` ever sees (the adaptive limit stays below it).
        max_wait_ms: the fill window when ``greedy=False``; with ``greedy=True`` only used while
            another worker is computing (``concurrency > 1``).
        max_queue: items allowed to wait; one more raises :class:`Overloaded` immediately.
        concurrency: batches computed at the same time (worker tasks, and threads for sync fns).
            For a CPU model on few cores keep 1 (FACTS.md: two torch threads beside a busy
            server ran batches 2.8-500x slower).
        timeout: default per-item deadline in seconds from submit, > 0 (None: no deadline).
        greedy: dispatch what is queued as soon as a worker is idle (default) instead of waiting.
        load_wait_ms: with ``greedy``, the longest a short batch waits for company while
            requests arrive at least twice per this window and the event loop is busy (0:
            never; see the module doc).
        direct: a sync function run on the loop (``offload=False``) computes a lone item at once,
            in its caller, when nothing is queued or running and submits come far apart (the
            gap before it and the average gap over four times the average batch's compute): no
            task hop, and no batching is lost, since at that rate batches hold one item anyway;
            the rest of a burst still queues behind its first item. Only with
            ``greedy`` and without ``adaptive``.
        adaptive / target_p99_ms: AIMD on the batch limit against a per-item latency target.
        min_batch_size: the adaptive limit's lower bound.
        split_on_error: bisect a failing batch so only poison items fail (default True).
        offload: run a sync ``fn`` in a thread (default True); False runs it on the loop, for
            functions too cheap to pay a thread hop.
        timer: monotonic clock (seconds); deadlines given to ``submit`` use it.
        name: shown in stats and thread names.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R] | Awaitable[Sequence[R]]],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 10_000,
        concurrency: int = 1,
        timeout: float | None = None,
        greedy: bool = True,
        load_wait_ms: float = 0.0,
        direct: bool = True,
        adaptive: bool = False,
        target_p99_ms: float | None = None,
        min_batch_size: int = 1,
        additive_step: int = 1,
        backoff: float = 0.9,
        split_on_error: bool = True,
        offload: bool = True,
        timer: Callable[[], float] = time.monotonic,
        name: str = "batcher",
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        # Every numeric argument is checked here, once, so submit() needs no checks of its own.
        max_batch_size = _int_arg("max_batch_size", max_batch_size, 1)
        min_batch_size = _int_arg("min_batch_size", min_batch_size, 1)
        if min_batch_size > max_batch_size:
            raise ValueError(
                f"min_batch_size must be between 1 and max_batch_size ({max_batch_size}), "
                f"got {min_batch_size}"
            )
        max_wait_ms = _real_arg("max_wait_ms", max_wait_ms)
        load_wait_ms = _real_arg("load_wait_ms", load_wait_ms)
        max_queue = _int_arg("max_queue", max_queue, 1)
        concurrency = _int_arg("concurrency", concurrency, 1)
        if timeout is not None:
            timeout = _real_arg("timeout", timeout, positive=True)
        if target_p99_ms is not None:
            target_p99_ms = _real_arg("target_p99_ms", target_p99_ms, positive=True)
        elif adaptive:
            raise ValueError("adaptive=True needs a positive target_p99_ms")
        additive_step = _int_arg("additive_step", additive_step, 1)
        backoff = _real_arg("backoff", backoff, positive=True)
        if not backoff < 1:
            raise ValueError(f"backoff must be in (0, 1), got {backoff}")
        self._fn = fn
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
        )
        self.max_batch_size = max_batch_size
        self.min_batch_size = min_batch_size
        self.max_wait_ms = max_wait_ms
        self.max_queue = max_queue
        self.concurrency = concurrency
        self.timeout = timeout
        self.greedy = greedy
        self.adaptive = adaptive
        self.target_p99_ms = target_p99_ms
        self.additive_step = additive_step
        self.backoff = backoff
        self.split_on_error = split_on_error
        self.offload = offload
        self.name = name
        self._timer = timer

        # current limits (the adaptive controller moves these; fixed otherwise)
        self._limit = max_batch_size
        self._wait_s = max_wait_ms / 1000.0

        # waiting under load: the window, an EWMA of the gaps between submits (seconds), and
        # how many batches to dispatch without waiting after a wait that brought no one
        self.load_wait_ms = load_wait_ms
        self._load_wait_s = load_wait_ms / 1000.0
        self._gap = -1.0  # no gap measured yet
        self._last_gap = -1.0  # the latest gap alone: the first item of a burst may run directly
        # a fill window (greedy=False) or the AIMD controller want every item through the queue
        self._direct = direct and greedy and not adaptive
        self._compute_avg = -1.0  # EWMA of a batch's compute time; none measured yet
        self._direct_runs = 0
        self._direct_tasks: set[asyncio.Future[None]] = set()
        self._last_submit = -1.0
        self._no_wait = 0
        self._no_wait_next = 1
        self._load_waits = 0
        self._load_waits_fruitless = 0
        self._queue: deque[_Item] = deque()
        self._live = 0  # queued items not yet cancelled/expired (what max_queue counts)
        self._busy = 0  # workers computing now
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._wakeup: asyncio.Event | None = None
        self._fill_waiters: set[asyncio.Future[None]] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._closed = False

        # stats
        self._sizes = [0] * (max_batch_size + 1)
        self._batches = 0
        self._items = 0
        self._rejected = 0
        self._timeouts = 0
        self._cancelled = 0
        self._errors = 0
        self._splits = 0
        self._increases = 0
        self._decreases = 0
        self._last_decision = "initial"
        # strict=False: these are fed from the batcher's own clock inside a worker, where a
        # raise (a clock that stepped back) would strand the batch's callers; bad values are
        # dropped and counted in the monitor's ``rejected`` instead
        self.queue_wait = LatencyMonitor(window_size=1024, timer=timer, strict=False)
        self.compute_time = LatencyMonitor(window_size=1024, timer=timer, strict=False)
        self._item_latency: deque[float] = deque(maxlen=512)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> DynamicBatcher[T, R]:
        """Start the workers on the running loop (``submit`` also starts them lazily)."""
        self._ensure_started()
        return self

    def _ensure_started(self) -> None:
        if self._workers:
            return
        if self._closed or self._closing:
            raise Closed(f"{self.name} is closed")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._wakeup = asyncio.Event()
        if not self._is_async and self.offload and self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix=f"infercache-{self.name}"
            )
        self._workers = [
            loop.create_task(self._worker(), name=f"{self.name}-worker-{i}")
            for i in range(self.concurrency)
        ]

    async def __aenter__(self) -> DynamicBatcher[T, R]:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, *, drain: bool = True) -> None:
        """Stop accepting items; with ``drain`` finish what is queued, else fail it (Closed)."""
        if self._closed:
            return
        self._closing = True
        if not drain:
            while self._queue:
                item = self._queue.popleft()
                if item.state == _QUEUED and not item.future.done():
                    self._forget(item)
                    item.future.set_exception(Closed(f"{self.name} closed before computing it"))
        if self._wakeup is not None:
            self._wakeup.set()
        self._resolve_fill_waiters()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        if self._direct_tasks:  # awaitables a direct run handed to the loop
            await asyncio.gather(*self._direct_tasks, return_exceptions=True)
        self._workers = []
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed or self._closing

    # -- submitting ------------------------------------------------------------------------------

    async def submit(self, item: T, *, deadline: float | None = None) -> R:
        """Queue ``item`` and return its result.

        ``deadline`` is an absolute time on the batcher's ``timer`` clock (``batcher.timer() + s``);
        the batcher's own ``timeout`` also applies, and the earlier one wins. Raises
        :class:`Overloaded` when the queue is full, :class:`Closed` once the batcher closes,
        :class:`DeadlineExceeded` when the deadline passes before dispatch, :class:`ModelError`
        when ``fn`` fails on it.
        """
        entry = self._enqueue(item, deadline)
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._drop_cancelled(entry)
            raise

    async def submit_timed(
        self, item: T, *, deadline: float | None = None
    ) -> tuple[R, float, float]:
        """Like :meth:`submit`, also returning (queue wait, compute time of its batch) in seconds.

        The Predictor uses it for its ``queue`` and ``compute`` stage timings.
        """
        entry = self._enqueue(item, deadline)
        try:
            result = await entry.future
        except asyncio.CancelledError:
            self._drop_cancelled(entry)
            raise
        return result, entry.dispatched - entry.enqueued, entry.compute_s

    async def submit_many(self, items: Iterable[T], *, deadline: float | None = None) -> list[R]:
        """Submit several items at once; results in order (the first failure is raised)."""
        entries = [self._enqueue(it, deadline) for it in items]
        try:
            return list(await asyncio.gather(*(e.future for e in entries)))
        except BaseException:
            for e in entries:
                if not e.future.done():
                    e.future.cancel()
                self._drop_cancelled(e)
            raise

    def _enqueue(self, value: T, deadline: float | None) -> _Item:
        if not self._workers:
            self._ensure_started()
        elif self._closing:
            raise Closed(f"{self.name} is closed")
        if self._live >= self.max_queue:
            self._rejected += 1
            raise Overloaded(
                f"{self.name}: queue full ({self.max_queue} items waiting)", retry_after=0.1
            )
        loop = self._loop
        assert loop is not None
        now = self._timer()
        if self._last_submit >= 0:  # the first gap seeds the average, later ones move it
            gap = min(now - self._last_submit, 1.0)
            self._gap = gap if self._gap < 0 else self._gap + 0.1 * (gap - self._gap)
            self._last_gap = gap
        self._last_submit = now
        timeout = self.timeout
        if timeout is not None:
            by_timeout = now + timeout
            deadline = by_timeout if deadline is None else min(deadline, by_timeout)
        entry = _Item(value, loop.create_future(), now, deadline)
        if deadline is not None and deadline <= now:
            self._timeouts += 1
            entry.state = _DONE
            entry.future.set_exception(DeadlineExceeded(f"{self.name}: deadline already passed"))
            return entry
        if self._direct_now():
            self._run_direct(entry)
            return entry
        if deadline is not None:
            entry.handle = loop.call_later(deadline - now, self._expire, entry)
        self._queue.append(entry)
        self._live += 1
        wakeup = self._wakeup
        assert wakeup is not None
        if not wakeup.is_set():
            wakeup.set()
        if self._fill_waiters and self._live >= self._limit:
            self._resolve_fill_waiters()
        return entry

    #: run a lone item at once, in its caller, when the gap before it and the average gap between
    #: submits are both at least this many times the average batch's compute time (``direct``)
    DIRECT_GAP_FACTOR = 4.0

    def _direct_now(self) -> bool:
        return (
            self._direct
            and self._live == 0
            and self._busy == 0
            and self._executor is None
            and not self._is_async
            and 0.0 <= self.DIRECT_GAP_FACTOR * self._compute_avg < min(self._gap, self._last_gap)
            and not 2.0 * self._gap <= self._load_wait_s  # load_wait_ms would wait for company
        )

    def _run_direct(self, entry: _Item) -> None:
        """Compute ``entry`` alone, now, in the caller: its future is done when this returns
        (the same bookkeeping as a queued batch of one, with no time in the queue)."""
        batch = [entry]
        entry.state = _RUNNING
        self._direct_runs += 1
        self._begin(batch, entry.enqueued)
        self._busy += 1
        t0 = self._timer()
        try:
            results = self._fn([entry.value])
            if type(results) is not list and inspect.isawaitable(results):
                # a sync function that returned an awaitable: it cannot finish here, so finish
                # it on the loop, and queue from now on
                self._direct = False
                task = asyncio.ensure_future(self._finish_direct(batch, results, t0))
                self._direct_tasks.add(task)
                task.add_done_callback(self._direct_tasks.discard)
                return
            self._check_count(results, batch)
        except Exception as exc:
            self._busy -= 1
            self._fail(batch, exc)
        else:
            self._busy -= 1
            self._settle(batch, results, self._timer() - t0, top=True)
        self._end(batch)

    async def _finish_direct(self, batch: list[_Item], pending: Any, t0: float) -> None:
        try:
            results = await pending
            self._check_count(results, batch)
        except Exception as exc:
            self._fail(batch, exc)
        else:
            self._settle(batch, results, self._timer() - t0, top=True)
        finally:
            self._busy -= 1
        self._end(batch)

    def _forget(self, entry: _Item) -> None:
        """Take a queued item out of the live count (it stays in the deque; workers skip it)."""
        entry.state = _DONE
        self._live -= 1
        if entry.handle is not None:
            entry.handle.cancel()
            entry.handle = None
        # dead entries stay in the deque until a worker pops them; if callers keep cancelling
        # while nothing is dispatched, compact so the deque cannot grow without bound
        if len(self._queue) > 2 * self._live + 1024:
            self._queue = deque(e for e in self._queue if e.state == _QUEUED)

    def _drop_cancelled(self, entry: _Item) -> None:
        if entry.state == _QUEUED:
            self._cancelled += 1
            self._forget(entry)

    def _expire(self, entry: _Item) -> None:
        entry.handle = None
        if entry.state != _QUEUED:
            return  # already dispatched: the caller gets its result
        self._forget(entry)
        self._timeouts += 1
        if not entry.future.done():
            entry.future.set_exception(
                DeadlineExceeded(
                    f"{self.name}: deadline passed after "
                    f"{(self._timer() - entry.enqueued) * 1000:.1f} ms in the queue"
                )
            )

    def _resolve_fill_waiters(self) -> None:
        for w in self._fill_waiters:
            _wake(w)

    # -- workers ---------------------------------------------------------------------------------

    def _take(self, limit: int) -> list[_Item]:
        """Pop up to ``limit`` live items, skipping cancelled/expired ones (they hold no slot)."""
        batch: list[_Item] = []
        queue = self._queue
        while queue and len(batch) < limit:
            entry = queue.popleft()
            if entry.state != _QUEUED:
                continue
            if entry.future.done():  # cancelled by its caller before _drop_cancelled ran
                self._cancelled += 1
                self._forget(entry)
                continue
            entry.state = _RUNNING
            self._live -= 1
            if entry.handle is not None:
                entry.handle.cancel()
                entry.handle = None
            batch.append(entry)
        return batch

    def _should_wait_for_load(self) -> bool:
        """Whether a greedy worker should wait for company now (see ``load_wait_ms``)."""
        if self._live >= self._limit or self._closing:
            return False
        if self._no_wait:
            self._no_wait -= 1
            return False
        return 0.0 <= 2.0 * self._gap <= self._load_wait_s

    #: a yield to the event loop that comes back sooner than this ran nothing else: the loop is
    #: idle, nobody is being read or parsed, and waiting longer would only idle the CPU
    IDLE_YIELD_S = 30e-6

    async def _wait_under_load(self) -> None:
        before = self._live
        if not await self._wait_while_busy(self._load_wait_s):
            return  # the oldest item already waited a window (behind the last batch)
        self._load_waits += 1
        if self._live > before:
            self._no_wait_next = 1
        else:  # nobody came (a closed loop, say): skip the next 1, 2, 4 ... 64 windows
            self._load_waits_fruitless += 1
            self._no_wait = self._no_wait_next
            self._no_wait_next = min(64, 2 * self._no_wait_next)

    async def _wait_while_busy(self, wait_s: float) -> bool:
        """Wait for company while the event loop has other work (requests being read, parsed and
        submitted), yielding to it: stop when a yield finds the loop idle, the batch limit is
        queued, or the window (from the oldest item) ends. False when nothing was waited for.

        Waiting pays only while the loop is busy: then the requests it is reading join this
        batch, and the core does the reading it would do anyway. Once every request that can
        come is queued (a closed loop of N clients has at most N), a fixed window was pure idle
        time: 8 clients lost 30 % of their throughput to it."""
        oldest = next((e for e in self._queue if e.state == _QUEUED), None)
        if oldest is None:
            return False
        end = oldest.enqueued + wait_s
        timer = self._timer
        waited = False
        while self._live < self._limit and not self._closing:
            start = timer()
            if start >= end:
                break
            queued = self._live
            await asyncio.sleep(0)
            waited = True
            if self._live == queued and timer() - start < self.IDLE_YIELD_S:
                break
        return waited

    async def _wait_for_company(self, wait_s: float | None = None) -> bool:
        """Wait until the batch limit is queued or the wait window (from the oldest item) ends;
        False when there was nothing to wait for."""
        oldest = next((e for e in self._queue if e.state == _QUEUED), None)
        if oldest is None:
            return False
        window = self._wait_s if wait_s is None else wait_s
        remaining = oldest.enqueued + window - self._timer()
        if remaining <= 0 or self._live >= self._limit:
            return False
        loop = self._loop
        assert loop is not None
        waiter: asyncio.Future[None] = loop.create_future()
        self._fill_waiters.add(waiter)
        handle = loop.call_later(remaining, _wake, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._fill_waiters.discard(waiter)
        return True

    async def _worker(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
        while True:
            while self._live == 0:
                if self._closing:
                    return
                wakeup.clear()
                await wakeup.wait()
            if (
                self._wait_s > 0
                and (not self.greedy or (self.concurrency > 1 and self._busy > 0))
                and not self._closing
            ):
                await self._wait_for_company()
            elif self._load_wait_s and self.greedy and self._should_wait_for_load():
                await self._wait_under_load()
            batch = self._take(self._limit)
            if not batch:
                continue
            if self._live and not wakeup.is_set():
                wakeup.set()  # let another idle worker take the rest
            self._busy += 1
            try:
                await self._run(batch)
            finally:
                self._busy -= 1

    async def _run(self, batch: list[_Item]) -> None:
        self._begin(batch, self._timer())
        await self._compute(batch, top=True)
        self._end(batch)

    def _begin(self, batch: list[_Item], now: float) -> None:
        """Stamp a batch as dispatched at ``now`` and count it."""
        waits = []
        for entry in batch:
            entry.dispatched = now
            waits.append(now - entry.enqueued)
        self.queue_wait.record_many(waits)
        self._batches += 1
        self._items += len(batch)
        self._sizes[len(batch)] += 1

    def _end(self, batch: list[_Item]) -> None:
        """Record a finished batch's item latencies and let the controller see them."""
        done = self._timer()
        # the oldest item's latency drives the controller (Clipper looks at the batch's latency)
        worst = done - min(e.enqueued for e in batch)
        self._item_latency.extend(done - e.enqueued for e in batch)
        if self.adaptive:
            self._adapt(len(batch), worst)

    async def _call(self, values: list[Any]) -> tuple[Sequence[Any], float]:
        if self._is_async:
            t0 = self._timer()
            result = await self._fn(values)  # type: ignore[misc]
            return result, self._timer() - t0
        if self._executor is None:
            t0 = self._timer()
            result = self._fn(values)
            # a list (what runners return) is never awaitable: skip the ABC check (~1 µs)
            if type(result) is not list and inspect.isawaitable(result):
                result = await result
            return result, self._timer() - t0
        loop = self._loop
        assert loop is not None
        return await loop.run_in_executor(self._executor, self._timed_call, values)

    def _timed_call(self, values: list[Any]) -> tuple[Sequence[Any], float]:
        t0 = self._timer()
        result = self._fn(values)
        return result, self._timer() - t0  # type: ignore[return-value]

    async def _compute(self, batch: list[_Item], *, top: bool) -> None:
        """Run ``fn`` on ``batch``; on failure bisect so only failing items get the error."""
        values = [e.value for e in batch]
        try:
            results, elapsed = await self._call(values)
            self._check_count(results, batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the model failed: find out for whom
            if self.split_on_error and len(batch) > 1:
                self._splits += 1
                mid = len(batch) // 2
                await self._compute(batch[:mid], top=False)
                await self._compute(batch[mid:], top=False)
                return
            self._fail(batch, exc)
            return
        self._settle(batch, results, elapsed, top=top)

    def _check_count(self, results: Any, batch: list[_Item]) -> None:
        """Refuse a result that is not one result per item, in order: results are handed out by
        position, so a dict would give callers its keys and a str its characters. A list (what
        runners return) or a tuple passes on one type test; anything else must be an ordered,
        sized, indexable collection (a numpy array or a tensor qualifies) but not a str, bytes or
        a mapping."""
        if (
            type(results) is not list
            and type(results) is not tuple
            and (
                isinstance(results, str | bytes | bytearray | Mapping)
                or not hasattr(results, "__len__")
                or not hasattr(results, "__getitem__")
            )
        ):
            raise ModelError(
                f"{self.name}: fn must return a sequence with one result per item (a list), "
                f"got {type(results).__name__}"
            )
        if len(results) != len(batch):
            raise ModelError(
                f"{self.name}: fn returned {len(results)} results for {len(batch)} items"
            )

    def _fail(self, batch: list[_Item], exc: Exception) -> None:
        """Answer every item of ``batch`` with ``exc`` (wrapped unless an infercache error)."""
        self._errors += len(batch)
        err = self._wrap(exc, len(batch))
        for entry in batch:
            entry.state = _DONE
            if not entry.future.done():
                entry.future.set_exception(err)

    def _settle(
        self, batch: list[_Item], results: Sequence[Any], elapsed: float, *, top: bool
    ) -> None:
        """Hand each item its result; a whole batch (``top``) also counts its compute time."""
        if top:
            self.compute_time.record(elapsed)
            avg = self._compute_avg
            self._compute_avg = elapsed if avg < 0 else avg + 0.1 * (elapsed - avg)
        for entry, result in zip(batch, results, strict=True):
            entry.state = _DONE
            entry.compute_s = elapsed
            if not entry.future.done():  # its caller may have gone away meanwhile
                entry.future.set_result(result)

    def _wrap(self, exc: Exception, n: int) -> BaseException:
        if isinstance(exc, InfercacheError):
            return exc
        what = "item" if n == 1 else f"batch of {n}"
        err = ModelError(f"{self.name}: model failed on this {what}: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err

    # -- adaptive control (AIMD) -----------------------------------------------------------------

    def _adapt(self, size: int, worst_s: float) -> None:
        assert self.target_p99_ms is not None
        target = self.target_p99_ms / 1000.0
        if worst_s > target:
            new = max(self.min_batch_size, math.floor(self._limit * self.backoff))
            if new == self._limit and new > self.min_batch_size:
                new -= 1  # x0.9 of a small limit rounds back to itself; still back off
            if new != self._limit:
                self._decreases += 1
            self._limit = new
            self._wait_s = self._wait_s * 0.5
            self._last_decision = (
                f"decrease: batch latency {worst_s * 1000:.2f} ms > target "
                f"{self.target_p99_ms:.2f} ms"
            )
        elif size >= self._limit:
            new = min(self.max_batch_size, self._limit + self.additive_step)
            if new != self._limit:
                self._increases += 1
            self._limit = new
            self._wait_s = min(
                self.max_wait_ms / 1000.0, self._wait_s + 0.1 * self.max_wait_ms / 1000.0
            )
            self._last_decision = (
                f"increase: full batch of {size} within target "
                f"({worst_s * 1000:.2f} <= {self.target_p99_ms:.2f} ms)"
            )

    # -- introspection ---------------------------------------------------------------------------

    @property
    def timer(self) -> Callable[[], float]:
        """The batcher's clock: deadlines passed to ``submit`` are on it."""
        return self._timer

    @property
    def batch_limit(self) -> int:
        """The batch size a worker takes now (== max_batch_size unless adaptive)."""
        return self._limit

    @property
    def wait_ms(self) -> float:
        """The current fill window in milliseconds."""
        return self._wait_s * 1000.0

    def queued(self) -> int:
        """Items waiting now (cancelled and expired ones excluded)."""
        return self._live

    def recent_p99(self) -> float | None:
        """p99 of submit-to-result latency over the last 512 items (seconds), None if none."""
        items = sorted(self._item_latency)
        if not items:
            return None
        return items[min(len(items) - 1, math.ceil(len(items) * 0.99) - 1)]

    def batch_sizes(self) -> dict[int, int]:
        """Histogram: batch size -> how many batches had it (sizes never seen omitted)."""
        return {size: n for size, n in enumerate(self._sizes) if n}

    def stats(self) -> dict[str, Any]:
        """Counters, the batch-size histogram, queue-wait and compute latencies, current limits."""
        rp99 = self.recent_p99()
        return {
            "name": self.name,
            "batches": self._batches,
            "items": self._items,
            "mean_batch_size": (self._items / self._batches) if self._batches else 0.0,
            "batch_sizes": self.batch_sizes(),
            "queued": self._live,
            "busy_workers": self._busy,
            "rejected": self._rejected,
            "timeouts": self._timeouts,
            "cancelled": self._cancelled,
            "errors": self._errors,
            "splits": self._splits,
            "offload": bool(self.offload and not self._is_async),  # the model runs in a thread
            "direct_runs": self._direct_runs,
            "queue_wait": self.queue_wait.get_stats(),
            "compute": self.compute_time.get_stats(),
            "limits": {
                "greedy": self.greedy,
                "adaptive": self.adaptive,
                "batch_limit": self._limit,
                "min_batch_size": self.min_batch_size,
                "max_batch_size": self.max_batch_size,
                "wait_ms": self._wait_s * 1000.0,
                "max_wait_ms": self.max_wait_ms,
                "load_wait_ms": self.load_wait_ms,
                "load_waits": self._load_waits,
                "load_waits_fruitless": self._load_waits_fruitless,
                "target_p99_ms": self.target_p99_ms,
                "recent_p99_ms": None if rp99 is None else rp99 * 1000.0,
                "increases": self._increases,
                "decreases": self._decreases,
                "last_decision": self._last_decision,
            },
        }
