"""Interleaved A/B of server configurations: req/s, the server's CPU per request, p50 and p99.

Usage::

    python benchmarks/ab_server.py --rounds 4 --mode closed \\
        -c "onnx=" -c "torchscript=--no-onnx" -c seed-orjson
    python benchmarks/ab_server.py --rounds 4 --mode open --rate 1200 \\
        -c "l1=--sql-url none" -c "default="

A contender is ``name=ARGS`` (``infercache serve ARGS``, the demo MLP on all-distinct inputs;
leading ``VAR=value`` words set environment variables, as in a shell) or the name of one of
bench_server.py's contenders (``seed-orjson``, ``floor``, ...). Every server runs for the whole
comparison, pinned to bench_server.py's server core, paused (SIGSTOP) except while under load,
and each round measures them all back to back, so a slow period of the machine hits every
contender in that round: on this shared 2-core machine absolute figures moved by up to 2x between
runs, while the per-round ratios printed last are what to compare. CPU per request is the server
process's user + system time (``/proc``) over the requests it answered, which at a fixed
open-loop rate shows a change of cost that throughput or latency alone would hide until
saturation.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_server as bs
from infercache.bench.process import ServerProcess

nan = float("nan")
_ENV_WORD = re.compile(r"[A-Z_][A-Z0-9_]*=")


def parse_contender(spec: str) -> tuple[str, dict[str, str] | None, list[str]]:
    """``name=[VAR=value ...] serve args`` -> (name, environment, args); ``name`` alone -> (name,
    None, []): one of bench_server.py's contenders."""
    name, sep, args = spec.partition("=")
    if not sep:
        return name, None, []
    words = args.split()
    env: dict[str, str] = {}
    while words and _ENV_WORD.match(words[0]):  # leading VAR=value words, as in a shell
        var, _, value = words.pop(0).partition("=")
        env[var] = value
    return name, env, words


def _start(spec: str, workdir: Path) -> tuple[str, str, ServerProcess]:
    """(name, the PATHS entry to load-test, the started server) for one ``-c`` spec."""
    name, extra_env, words = parse_contender(spec)
    if extra_env is None:
        return name, name, bs.contender(name, workdir).start()
    argv = [sys.executable, "-m", "infercache", "serve", "--port", "{port}", "--log-level",
            "warning", *words]  # fmt: skip
    env = {**bs.ENV, **extra_env}
    return name, "infercache", ServerProcess(bs._pinned(argv), cwd=workdir, env=env).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-c", "--contender", action="append", required=True, help="name=serve args, or a name"
    )
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--rate", type=float, default=1200.0, help="open loop: requests/s")
    parser.add_argument("--concurrency", type=int, default=64, help="closed loop: clients")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = parser.parse_args(argv)
    if len(args.contender) < 2:
        parser.error("give at least two contenders")
    if bs.LOADGEN_CPU:
        os.sched_setaffinity(0, bs.LOADGEN_CPU)
    load = (
        {"mode": "closed", "concurrency": args.concurrency}
        if args.mode == "closed"
        else {"mode": "open", "rate": args.rate}
    )
    print(
        f"ab_server: {args.mode} loop ({load}), {args.rounds} rounds of {args.seconds:g} s, "
        f"server cpu {bs.SERVER_CPU or 'any'}, loadgen cpu {bs.LOADGEN_CPU or 'any'}",
        flush=True,
    )
    bench = bs.Bench(args.seconds, 1.0)
    servers: list[tuple[str, str, ServerProcess]] = []
    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ab_server-") as tmp:
        try:
            for i, spec in enumerate(args.contender):
                workdir = Path(tmp) / str(i)
                workdir.mkdir()
                name, kind, proc = _start(spec, workdir)
                if name in rows:
                    parser.error(f"contender name {name!r} given twice")
                servers.append((name, kind, proc))
                bench.fleet.append(proc)
                rows[name] = []
            for rnd in range(args.rounds):
                print(f"round {rnd + 1}", flush=True)
                for name, kind, proc in servers:
                    r = bench.run(kind, proc.url, f"{name} {args.mode}", **load)
                    cpu_us = bench.results[-1]["server_cpu_us"] or nan
                    rows[name].append((r.throughput, cpu_us, r.p50_ms or nan, r.p99_ms or nan))
        finally:
            for _, _, proc in servers:
                proc.stop()
    base = servers[0][0]
    print(
        f"\n| contender | req/s (median) | CPU µs/request | p50 ms | p99 ms "
        f"| req/s vs {base} per round |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for name, vals in rows.items():
        rps, cpu, p50, p99 = (statistics.median(v[i] for v in vals) for i in range(4))
        per_round = ", ".join(
            f"{a[0] / b[0]:.2f}" for a, b in zip(vals, rows[base], strict=True) if b[0]
        )
        print(f"| {name} | {rps:,.0f} | {cpu:,.0f} | {p50:.2f} | {p99:.2f} | {per_round} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
