"""Load generator: open-loop (Poisson arrivals) and closed-loop, over HTTP and WebSocket.

Why open loop: a closed loop (N clients, each waiting for its answer before the next request)
slows down with the server, so queueing never shows in its latencies ("coordinated omission").
Here arrivals follow a Poisson process at a fixed rate whatever the server does, and each latency
is measured from the request's *scheduled* time, so time spent waiting for a free connection counts.

Why a hand-written HTTP/1.1 client: on the 2-core machines this project is measured on, the load
generator shares the CPU with the server, and a general-purpose client (httpx) costs more CPU per
request than a cached answer costs the server, which would make the generator the bottleneck. The
client below writes pre-encoded requests on keep-alive connections and reads ``Content-Length``
bodies. WebSocket load uses the ``websockets``
library with many requests in flight per connection, matched by id.

Inputs are pre-encoded from one template: a fixed random vector whose first element is replaced by
an index, so "all distinct" (the miss path) costs no per-request encoding, and Zipf(s) over K
distinct inputs draws the index from a Zipf distribution.

Safety: the generator only targets loopback (127.0.0.1, ::1, localhost), and every run is bounded
in time (``warmup`` + ``duration``) and in requests (``max_requests`` recorded, as many again at
most during warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


# --------------------------------------------------------------------------- inputs

_WORDS = ("latency", "throughput", "batch", "cache", "model", "tier", "queue", "answer")


class Inputs:
    """Pre-encoded request payloads: ``distinct`` (every request new) or ``zipf`` over ``keys``.

    Vectors of ``dim`` floats by default; ``text=True`` gives short sentences instead (for a text
    model such as MiniLM), distinct per index like the vectors.

    ``seed`` draws the template vector and, unless ``draw_seed`` is given, the Zipf draws after it;
    ``draw_seed`` lets the draw order change while the template (hence the key space) stays the
    same. ``offset`` is the first ``distinct`` index.
    """

    def __init__(
        self,
        kind: str = "distinct",
        *,
        dim: int = 784,
        keys: int = 10_000,
        zipf_s: float = 0.9,
        seed: int = 0,
        offset: int = 0,
        text: bool = False,
        draw_seed: int | None = None,
    ) -> None:
        if kind not in ("distinct", "zipf", "same"):
            raise ValueError("kind must be distinct, zipf or same")
        rng = np.random.default_rng(seed)
        vec = rng.random(dim, dtype=np.float32)
        # 4 decimals: realistic pixel values, ~7 bytes per number
        # The index goes into the first TWO elements (index // 4096, index % 4096): one element
        # holding a large index would collide once converted to float32 (24-bit mantissa).
        rest = ",".join(f"{v:.4f}" for v in vec[2:])
        self._suffix = ("," + rest + "]").encode() if dim > 2 else b"]"
        self.kind = kind
        self.keys = keys
        self.text = text
        self._counter = itertools.count(offset)
        self._rng = rng if draw_seed is None else np.random.default_rng(draw_seed)
        if kind == "zipf":
            ranks = np.arange(1, keys + 1, dtype=np.float64)
            p = ranks**-zipf_s
            self._cdf = np.cumsum(p / p.sum())
        self._draws: list[int] = []

    def next_index(self) -> int:
        if self.kind == "distinct":
            return next(self._counter)
        if self.kind == "same":
            return 0
        if not self._draws:
            u = self._rng.random(8192)
            self._draws = np.searchsorted(self._cdf, u).tolist()
        return int(self._draws.pop())

    def input_json(self, index: int) -> bytes:
        """The JSON array for input ``index`` (exact in float32 for indices below 2**36), or with
        ``text`` a JSON string."""
        if self.text:
            words = _WORDS[index % len(_WORDS)], _WORDS[(index // len(_WORDS)) % len(_WORDS)]
            return f'"request {index}: the {words[0]} {words[1]} of a cached model server"'.encode()
        return f"[{index >> 12},{index & 4095}".encode() + self._suffix

    def input_list(self, index: int) -> list[float]:
        return [float(x) for x in json.loads(self.input_json(index))]


# --------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """One load run: what was offered, what came back, latency percentiles (ms)."""

    name: str
    mode: str
    transport: str
    inputs: str
    offered_rate: float | None
    concurrency: int | None
    duration_s: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cached: int = 0
    throughput: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None
    unfinished: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finish(result: RunResult, latencies: list[float], elapsed: float) -> RunResult:
    result.duration_s = elapsed
    result.throughput = result.ok / elapsed if elapsed > 0 else 0.0
    if latencies:
        arr = np.asarray(latencies) * 1000.0
        p50, p90, p99, p999 = np.percentile(arr, [50, 90, 99, 99.9])
        result.p50_ms, result.p90_ms = float(p50), float(p90)
        result.p99_ms, result.p999_ms = float(p99), float(p999)
        result.max_ms = float(arr.max())
    return result


def _err(result: RunResult, key: str) -> None:
    result.errors[key] = result.errors.get(key, 0) + 1


# --------------------------------------------------------------------------- HTTP/1.1


class _HTTPConn:
    __slots__ = ("reader", "used", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used = False  # answered a request before: a keep-alive connection being reused

    async def request(self, data: bytes) -> tuple[int, bytes]:
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        i = lower.find(b"content-length:")
        if i < 0:
            raise ConnectionError("response without Content-Length")
        j = lower.find(b"\r\n", i)
        n = int(head[i + 15 : j])
        body = await self.reader.readexactly(n) if n else b""
        return status, body

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def _closed_unanswered(exc: BaseException) -> bool:
    """The connection was closed under the request before any byte of an answer came back."""
    if isinstance(exc, asyncio.IncompleteReadError):
        return not exc.partial
    return isinstance(exc, (ConnectionResetError, BrokenPipeError))


def _check_loopback(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host not in LOOPBACK:
        raise ValueError(f"refusing to load {host!r}: the load generator targets loopback only")
    port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    return host, port, parts.path.rstrip("/")


class HTTPTarget:
    """POSTs ``{"input": ...}`` bodies to one URL over a pool of keep-alive connections."""

    def __init__(
        self, url: str, inputs: Inputs, *, max_connections: int = 256, token: str | None = None
    ) -> None:
        self.host, self.port, self.path = _check_loopback(url)
        self.inputs = inputs
        self.max_connections = max_connections
        self._free: list[_HTTPConn] = []
        self._open = 0
        self._waiting: deque[asyncio.Future[_HTTPConn | None]] = deque()
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self._head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{auth}"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()

    def request_bytes(self, index: int) -> bytes:
        body = b'{"input":' + self.inputs.input_json(index) + b"}"
        return self._head + str(len(body)).encode() + b"\r\n\r\n" + body

    async def _acquire(self) -> _HTTPConn:
        while True:
            while self._free:
                idle = self._free.pop()
                if not idle.reader.at_eof():
                    return idle
                # The server closed it while idle (uvicorn drops keep-alive connections idle for
                # 5 s, as after a burst grew the pool): sending on it would fail the request.
                idle.close()
                self._open -= 1
            if self._open < self.max_connections:
                self._open += 1
                try:
                    r, w = await asyncio.open_connection(self.host, self.port, limit=2**22)
                except BaseException:
                    self._open -= 1
                    self._wake(None)
                    raise
                return _HTTPConn(r, w)
            fut: asyncio.Future[_HTTPConn | None] = asyncio.get_running_loop().create_future()
            self._waiting.append(fut)
            conn = await fut
            if conn is not None:
                return conn
            # None: a connection died, so a slot is free to open a new one: loop again

    def _wake(self, conn: _HTTPConn | None) -> bool:
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    async def send(self, data: bytes) -> tuple[int, bytes]:
        """One request; on a reused connection that the server closed before answering, once
        more on a new one, as HTTP clients do: uvicorn closes keep-alive connections idle for
        5 s, and a close that crosses our request on the wire is not the server failing it. The
        latency still counts from the first attempt (the caller's clock)."""
        retried = False
        while True:
            conn = await self._acquire()
            try:
                status, body = await conn.request(data)
            except BaseException as exc:
                conn.close()
                self._open -= 1
                self._wake(None)
                if retried or not conn.used or not _closed_unanswered(exc):
                    raise
                retried = True
                continue
            conn.used = True
            if not self._wake(conn):
                self._free.append(conn)
            return status, body

    async def close(self) -> None:
        for c in self._free:
            c.close()
        self._free.clear()


# --------------------------------------------------------------------------- WebSocket


class WSTarget:
    """Sends predict messages over ``connections`` WebSockets, many in flight each, by id."""

    def __init__(
        self,
        url: str,
        model: str,
        inputs: Inputs,
        *,
        connections: int = 4,
        token: str | None = None,
    ) -> None:
        _check_loopback(url)
        self.url = url
        self.token = token
        self.model = model
        self.inputs = inputs
        self.n = connections
        self._conns: list[Any] = []
        self._readers: list[asyncio.Task[None]] = []
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count(1)
        self._rr = itertools.cycle(range(connections))
        self._prefix = b'{"type":"predict","model":' + json.dumps(model).encode() + b',"id":'

    async def start(self) -> None:
        from websockets.asyncio.client import connect

        for _ in range(self.n):
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
            ws = await connect(
                self.url, max_size=2**24, compression=None, additional_headers=headers
            )
            self._conns.append(ws)
            self._readers.append(asyncio.create_task(self._read(ws)))

    async def _read(self, ws: Any) -> None:
        with contextlib.suppress(Exception):
            async for raw in ws:
                data = raw.encode() if isinstance(raw, str) else raw
                i = data.find(b'"id":')
                j = data.find(b",", i)
                if j < 0:
                    j = data.find(b"}", i)
                try:
                    msg_id = int(data[i + 5 : j])
                except ValueError:
                    continue
                fut = self._pending.pop(msg_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("websocket closed"))

    async def send(self, index: int) -> bytes:
        msg_id = next(self._ids)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        msg = self._prefix + str(msg_id).encode() + b',"input":' + self.inputs.input_json(index)
        await self._conns[next(self._rr)].send((msg + b"}").decode())
        return await fut

    async def close(self) -> None:
        for ws in self._conns:
            with contextlib.suppress(Exception):
                await ws.close()
        for t in self._readers:
            t.cancel()


# --------------------------------------------------------------------------- runs


def _classify_http(result: RunResult, status: int, body: bytes) -> bool:
    if status == 200:
        result.ok += 1
        if b'"cached":true' in body:
            result.cached += 1
        return True
    _err(result, f"http_{status}")
    return False


def _classify_ws(result: RunResult, data: bytes) -> bool:
    if b'"type":"prediction"' in data:
        result.ok += 1
        if b'"cached":true' in data:
            result.cached += 1
        return True
    i = data.find(b'"code":"')
    code = data[i + 8 : data.find(b'"', i + 8)].decode() if i >= 0 else "error"
    _err(result, f"ws_{code}")
    return False


async def run_load(
    url: str,
    *,
    model: str = "mlp",
    transport: str = "http",
    mode: str = "open",
    rate: float = 500.0,
    concurrency: int = 64,
    duration: float = 5.0,
    warmup: float = 0.5,
    inputs: Inputs | None = None,
    max_requests: int = 1_000_000,
    max_in_flight: int = 4096,
    connections: int = 256,
    ws_connections: int = 4,
    name: str = "",
    path: str | None = None,
    token: str | None = None,
) -> RunResult:
    """One bounded load run against ``url`` (server base URL). Returns a :class:`RunResult`.

    ``path`` overrides the predict path (for other servers' endpoints); the body is always
    ``{"input": [...]}``. Requests started during ``warmup`` seconds are not recorded.
    ``max_requests`` bounds the requests recorded, not counting warm-up: a budget that warm-up
    could spend left a short run with nothing measured. Warm-up sends at most as many again.
    ``token``: the server's ``--api-token``, sent as a bearer token (HTTP and WebSocket).
    """
    if mode not in ("open", "closed") or transport not in ("http", "ws"):
        raise ValueError("mode must be open/closed and transport http/ws")
    if duration <= 0 or duration > 600:
        raise ValueError("duration must be in (0, 600] seconds")
    inputs = inputs or Inputs("distinct")
    result = RunResult(
        name=name or f"{transport}-{mode}",
        mode=mode,
        transport=transport,
        inputs=inputs.kind,
        offered_rate=rate if mode == "open" else None,
        concurrency=concurrency if mode == "closed" else None,
        duration_s=duration,
    )
    latencies: list[float] = []
    base = url.rstrip("/")
    http: HTTPTarget | None = None
    ws: WSTarget | None = None
    if transport == "http":
        http = HTTPTarget(
            base + (path or f"/v1/models/{model}/predict"),
            inputs,
            max_connections=connections,
            token=token,
        )
    else:
        ws_url = "ws" + base[len("http") :] + "/v1/ws"
        ws = WSTarget(ws_url, model, inputs, connections=ws_connections, token=token)
        await ws.start()

    clock = time.perf_counter
    recording_from = clock() + warmup
    stop_at = recording_from + duration

    async def one(scheduled: float) -> None:
        index = inputs.next_index()
        record = scheduled >= recording_from
        try:
            if http is not None:
                status, body = await http.send(http.request_bytes(index))
                ok = _classify_http(result, status, body) if record else status == 200
            else:
                assert ws is not None
                data = await ws.send(index)
                ok = _classify_ws(result, data) if record else True
        except Exception as exc:
            if record:
                _err(result, type(exc).__name__)
            return
        if record:
            result.sent += 1
            if ok:
                latencies.append(clock() - scheduled)

    try:
        if mode == "open":
            await _open_loop(
                one, rate, recording_from, stop_at, max_requests, max_in_flight, result
            )
        else:
            await _closed_loop(one, concurrency, recording_from, stop_at, max_requests)
    finally:
        if http is not None:
            await http.close()
        if ws is not None:
            await ws.close()
    return _finish(result, latencies, max(1e-9, min(clock(), stop_at + 60) - recording_from))


async def _open_loop(
    one: Callable[[float], Any],
    rate: float,
    recording_from: float,
    stop_at: float,
    max_requests: int,
    max_in_flight: int,
    result: RunResult,
) -> None:
    """Poisson arrivals at ``rate``: fire each request at its scheduled time, never waiting for
    earlier ones. Requests over ``max_in_flight`` are counted as errors (``generator_overflow``)
    rather than queued, so the generator's memory stays bounded when the server stalls.

    ``max_requests`` counts the requests scheduled from ``recording_from`` on; warm-up has a
    budget of its own, as large, and once it is spent the arrivals skip to ``recording_from``
    (Poisson arrivals have no memory, so the recorded ones are still Poisson)."""
    rng = np.random.default_rng(12345)
    clock = time.perf_counter
    tasks: set[asyncio.Task[None]] = set()
    t = clock()
    warm = recorded = 0
    gaps: list[float] = []
    while recorded < max_requests:
        if not gaps:
            gaps = rng.exponential(1.0 / rate, 4096).tolist()
        t += gaps.pop()
        if t >= stop_at:
            break
        recording = t >= recording_from
        if not recording and warm >= max_requests:
            t = recording_from
            continue
        delay = t - clock()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        if len(tasks) >= max_in_flight:
            if recording:
                _err(result, "generator_overflow")
            continue
        task = asyncio.create_task(one(t))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if recording:
            recorded += 1
        else:
            warm += 1
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=30)
        result.unfinished = len(pending)
        for p in pending:
            p.cancel()


async def _closed_loop(
    one: Callable[[float], Any],
    concurrency: int,
    recording_from: float,
    stop_at: float,
    max_requests: int,
) -> None:
    """``concurrency`` clients, each sending its next request when its last one is answered.

    As in the open loop, ``max_requests`` counts the requests started from ``recording_from`` on
    and warm-up has a budget of its own, as large; a client finding it spent waits for the
    recorded window."""
    clock = time.perf_counter
    warm = itertools.count()
    recorded = itertools.count()

    async def user() -> None:
        while (now := clock()) < stop_at:
            if now >= recording_from:
                if next(recorded) >= max_requests:
                    return
            elif next(warm) >= max_requests:
                await asyncio.sleep(recording_from - now)
                continue
            await one(now)

    await asyncio.gather(*(user() for _ in range(concurrency)))


# --------------------------------------------------------------------------- CLI

#: ``--keys`` at most: the Zipf draw keeps a float64 CDF of the keys (80 MB at this cap; 2**32
#: keys wanted 32 GiB and died with a traceback). Zipf keys are the indices below it, and the
#: fresh ``distinct`` ranges start above it.
MAX_KEYS = 10_000_000
#: Where a CLI run's ``distinct`` indices may start: above every zipf key and above the ranges
#: benchmarks/bench_server.py uses (10M per run), with 2**32 requests of room below 2**36, where
#: the index stops being exact in float32 (see :meth:`Inputs.input_json`).
_FRESH_LOW = 1 << 32
_FRESH_HIGH = (1 << 36) - (1 << 32)

_SEED_HELP = (
    "makes a run's inputs reproducible; default: a new random seed per run, printed with the "
    "result. distinct: the seed picks the template vector and a fresh range of indices, so runs "
    "with different seeds share no input (all misses, even against a cache kept across "
    "restarts) and a repeated seed sends the same inputs again. zipf: the seed only orders the "
    "draws; the --keys inputs are the same whatever the seed, so repeated zipf runs warm the "
    "same keys (for a cold start, `infercache cache invalidate` first). same: one fixed input"
)


def make_inputs(
    kind: str, seed: int, *, dim: int = 784, keys: int = 10_000, zipf_s: float = 0.9
) -> Inputs:
    """The inputs of one ``infercache bench`` run with ``seed`` (see ``--seed``).

    Repeated runs must measure what they say: ``distinct`` with a fixed seed and offset sent the
    same inputs every run, so a second run measured cache hits (and the SQLite L3 kept them
    across restarts). The random offset also keeps ``distinct`` clear of the zipf keys, which
    share the seed-0 template, when ``seed`` is 0.
    """
    if kind == "distinct":
        offset = int(np.random.default_rng([seed, 1]).integers(_FRESH_LOW, _FRESH_HIGH))
        return Inputs(kind, dim=dim, seed=seed, offset=offset)
    return Inputs(kind, dim=dim, keys=keys, zipf_s=zipf_s, seed=0, draw_seed=seed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``infercache bench`` flags to ``parser``."""
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server (loopback only)")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--transport", choices=["http", "ws"], default="http")
    parser.add_argument("--mode", choices=["open", "closed"], default="open")
    parser.add_argument("--rate", type=float, default=500.0, help="open loop: requests/s")
    parser.add_argument("--concurrency", type=int, default=64, help="closed loop: clients")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds recorded")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds not recorded")
    parser.add_argument(
        "--inputs",
        choices=["distinct", "zipf", "same"],
        default="distinct",
        help="distinct: every request a new input (misses); zipf: Zipf(--zipf-s) over --keys "
        "inputs; same: one input",
    )
    parser.add_argument("--keys", type=int, default=10_000, help="zipf: distinct inputs")
    parser.add_argument("--zipf-s", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=None, help=_SEED_HELP)
    parser.add_argument("--dim", type=int, default=784, help="input vector length")
    parser.add_argument(
        "--max-requests",
        type=int,
        default=1_000_000,
        help="at most N requests recorded (warm-up not counted; it sends at most N more)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--token",
        default=os.environ.get("INFERCACHE_API_TOKEN"),
        help="the server's --api-token (default: $INFERCACHE_API_TOKEN)",
    )


def run_async(coro: Coroutine[Any, Any, RunResult]) -> RunResult:
    """Run on uvloop when installed (the generator must not be slower than the server)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def format_result(r: RunResult) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    load = f"{r.offered_rate:.0f}/s offered" if r.offered_rate else f"{r.concurrency} clients"
    return (
        f"{r.name}: {load}, {r.throughput:.0f} req/s ok, p50 {f(r.p50_ms)} ms, "
        f"p99 {f(r.p99_ms)} ms, p99.9 {f(r.p999_ms)} ms, max {f(r.max_ms)} ms, "
        f"cached {r.cached}/{r.ok}, errors {r.errors or 0}"
    )


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the ``infercache bench`` arguments, or None. Checked up front: a rate of
    nan or inf never finished, 0 divided by zero, a negative one failed deep inside numpy."""
    try:
        if urlsplit(args.url).scheme not in ("http", "https"):
            return (
                "--url must be the server's http:// address (WebSocket URLs derive from it), "
                f"got {args.url!r}"
            )
        _check_loopback(args.url)
    except ValueError as exc:  # a malformed URL, a port out of range, not loopback
        return f"--url {args.url!r}: {exc}"
    positive = {"--rate": args.rate, "--duration": args.duration, "--zipf-s": args.zipf_s}
    for flag, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            return f"{flag} must be a finite number > 0, got {value}"
    if args.duration > 600:
        return f"--duration must be at most 600 seconds, got {args.duration}"
    if not (math.isfinite(args.warmup) and args.warmup >= 0):
        return f"--warmup must be a finite number >= 0, got {args.warmup}"
    counts = {"--concurrency": args.concurrency, "--max-requests": args.max_requests,
              "--keys": args.keys, "--dim": args.dim}  # fmt: skip
    for flag, count in counts.items():
        if count < 1:
            return f"{flag} must be >= 1, got {count}"
    if args.keys > MAX_KEYS:
        return f"--keys must be at most {MAX_KEYS}, got {args.keys}"
    if args.seed is not None and args.seed < 0:
        return f"--seed must be >= 0, got {args.seed}"
    return None


def _token_hint(token: str | None) -> str:
    """What to do about a 401/403: every request refused said only "http_401 x913"."""
    if token is None:
        return " (the server wants its --api-token: pass it as --token)"
    return " (is --token the server's --api-token?)"


def why_nothing_recorded(result: RunResult, args: argparse.Namespace) -> str:
    """One line on why a run recorded no answer, for the CLI's exit 1 (a bare "0 req/s ok" left
    the user guessing)."""
    if result.errors:
        errors = ", ".join(f"{key} x{n}" for key, n in result.errors.items())
        hint = ""
        if any(k.startswith(("Connection", "OSError")) for k in result.errors):
            hint = f" (is an infercache server listening at {args.url}?)"
        elif "http_404" in result.errors or "ws_model_not_found" in result.errors:
            hint = f" (does the server serve --model {args.model}?)"
        elif any(k in result.errors for k in ("http_401", "http_403", "ws_unauthorized")):
            hint = _token_hint(args.token)
        elif "http_422" in result.errors or "ws_invalid_input" in result.errors:
            hint = (
                f" (the server refused the {args.dim}-number inputs: does --dim match model "
                f"{args.model!r}'s input? GET /v1/models/{args.model} shows it)"
            )
        return f"no request succeeded: {errors}{hint}"
    if result.unfinished:
        return f"no answer came back: {result.unfinished} requests unfinished 30 s after the run"
    if args.mode == "open":
        expected = args.rate * args.duration
        if expected < 3:
            return (
                f"no request was recorded: --rate {args.rate:g}/s over --duration "
                f"{args.duration:g} s expects {expected:.2g} arrivals; raise either"
            )
    return (
        f"no request was recorded in the {args.duration:g} s after the {args.warmup:g} s warm-up "
        "(the server answered none in time)"
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``infercache bench`` and print the result."""
    problem = check_args(args)
    if problem is not None:
        print(f"infercache bench: {problem}", file=sys.stderr)
        return 2
    from websockets.exceptions import WebSocketException

    seed = secrets.randbelow(1 << 32) if args.seed is None else args.seed
    inputs = make_inputs(args.inputs, seed, dim=args.dim, keys=args.keys, zipf_s=args.zipf_s)
    try:
        result = run_async(
            run_load(
                args.url,
                model=args.model,
                transport=args.transport,
                mode=args.mode,
                rate=args.rate,
                concurrency=args.concurrency,
                duration=args.duration,
                warmup=args.warmup,
                inputs=inputs,
                max_requests=args.max_requests,
                token=args.token,
            )
        )
    except (OSError, WebSocketException) as exc:  # the WebSockets open before the run
        hint = _token_hint(args.token) if re.search(r"\bHTTP 40[13]\b", str(exc)) else ""
        print(f"infercache bench: cannot connect to {args.url}: {exc}{hint}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**result.to_dict(), "seed": seed}))
    else:
        print(f"{format_result(result)}, seed {seed}")
    if not result.ok:
        print(f"infercache bench: {why_nothing_recorded(result, args)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="python -m infercache.bench.loadgen")
    add_arguments(parser)
    sys.exit(run_from_args(parser.parse_args()))
