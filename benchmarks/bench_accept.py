"""A burst of new connections against busy servers: uvloop's listener vs ours (server/accept.py).

    python benchmarks/bench_accept.py              # 3 rounds, 100 connections
    python benchmarks/bench_accept.py --rounds 5 --connections 200

Each server process runs an event loop kept busy 10 ms per iteration (as a loop running model
batches is), answering one byte to each connection's first message. The client opens all the
connections at once and times each one until its answer. Contenders, measured back to back in
every round:

- ``uvloop``: one process, uvloop's listener (libuv accepts one connection per loop iteration);
- ``greedy``: one process, ``GreedyAcceptLoop`` (accepts everything waiting per event);
- ``uvloop x2``: two processes on one listening socket, as ``serve --workers 2`` ran before: the
  kernel wakes both, each accepts one per iteration;
- ``greedy x2``: two processes, each listening on its own socket bound with SO_REUSEPORT from
  the template ``shared_port_socket`` makes (Linux only), as ``serve --workers 2`` runs now.

The servers share the last core (two workers take turns on it, as on a machine with more workers
than cores); the client runs on the others. Printed: time to the first, median and last answer,
how the connections split between the workers, and the ratio of last answers against uvloop's.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_server, beside it

import uvloop

from bench_server import LOADGEN_CPU, SERVER_CPU  # the same cores as the server benchmark
from infercache.server.accept import (
    REUSEPORT_BALANCES,
    new_event_loop,
    shared_port_socket,
)

BUSY_S = 0.010


class _Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(str(os.getpid()).encode() + b"\n")


async def _serve(sock: socket.socket, ready: Any, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Answer, sock=sock, backlog=2048)
    ready.set()
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:  # busy 10 ms per loop iteration
        spin = time.perf_counter()
        while time.perf_counter() - spin < BUSY_S:
            pass
        await asyncio.sleep(0)
    server.close()


def _worker(sock: socket.socket, greedy: bool, ready: Any, seconds: float) -> None:
    if SERVER_CPU:
        os.sched_setaffinity(0, SERVER_CPU)
    factory = new_event_loop if greedy else uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(sock, ready, seconds))


async def _burst(port: int, n: int) -> tuple[list[float], Counter[str]]:
    async def one() -> tuple[float, str]:
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hi")
        pid = (await reader.readline()).decode().strip()
        writer.close()
        return time.perf_counter() - t0, pid

    results = await asyncio.gather(*(one() for _ in range(n)))
    return sorted(t for t, _ in results), Counter(pid for _, pid in results)


def measure(name: str, n: int) -> tuple[list[float], Counter[str]]:
    workers = 2 if name.endswith("x2") else 1
    greedy = name.startswith("greedy")
    if greedy and workers > 1:
        sock = shared_port_socket("127.0.0.1", 0)  # bound, never listened on: each worker's own
    else:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(2048)  # one queue that every worker waits on
    ctx = mp.get_context("fork")
    events = [ctx.Event() for _ in range(workers)]
    procs = [ctx.Process(target=_worker, args=(sock, greedy, e, 30.0)) for e in events]
    for p in procs:
        p.start()
    try:
        for e in events:
            if not e.wait(30):
                raise RuntimeError(f"{name}: a worker did not start")
        time.sleep(0.3)
        return asyncio.run(_burst(sock.getsockname()[1], n))
    finally:
        for p in procs:
            p.terminate()
            p.join()
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=100)
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.connections <= 1000:
        parser.error("--rounds must be >= 1 and --connections 1..1000")
    if LOADGEN_CPU:
        os.sched_setaffinity(0, LOADGEN_CPU)
    names = ["uvloop", "greedy", "uvloop x2"]
    if REUSEPORT_BALANCES:
        names.append("greedy x2")
    else:
        print("greedy x2: SO_REUSEPORT does not balance on this platform: left out")
    last: dict[str, list[float]] = {n: [] for n in names}
    print(f"bench_accept: {args.connections} connections at once, loops busy "
          f"{BUSY_S * 1000:g} ms per iteration, servers on cpu {SERVER_CPU or 'any'}")  # fmt: skip
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}")
        for name in names:
            times, split = measure(name, args.connections)
            last[name].append(times[-1])
            print(f"  {name:10s} first {times[0] * 1000:6.0f} ms  median "
                  f"{statistics.median(times) * 1000:6.0f} ms  last {times[-1] * 1000:6.0f} ms  "
                  f"per worker {sorted(split.values(), reverse=True)}")  # fmt: skip
    print("\nlast answer, median over rounds (ratio: uvloop's listener / ours, same workers)")
    for name in names:
        print(f"  {name:10s} {statistics.median(last[name]) * 1000:6.0f} ms")
    for ours, theirs in (("greedy", "uvloop"), ("greedy x2", "uvloop x2")):
        if ours in last:
            ratio = statistics.median(last[theirs]) / statistics.median(last[ours])
            print(f"  {theirs} / {ours}: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
