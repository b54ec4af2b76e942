"""L1 MemoryCache benchmark: speed and hit ratio against theine, cachetools, cachebox,
libCacheSim and a baseline built the way the user's tutorial InMemoryCache works.

    python benchmarks/bench_l1.py            # full: 100k keys, 1M requests per trace (~4-5 min)
    python benchmarks/bench_l1.py --quick    # smaller traces and loops (~1 min)

Every figure in one table comes from the same run, and the ratios are what to read: the machine
is shared, so absolute rates move from run to run. Throughput runs first, in this process and one
at a time; the hit-ratio simulations (deterministic except theine) run afterwards in 2 worker
processes.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _traces import TRACES, next_access  # noqa: E402
from baselines.seed_inmemory import SeedInMemoryCache  # noqa: E402
from infercache.tiers.memory import MemoryCache  # noqa: E402

OUR_POLICIES = ("tinylfu", "lru", "lfu")
print = functools.partial(print, flush=True)  # progress shows while it runs


# -- adapters: one get/set shape for every library ---------------------------------------------


class LockedLRU:
    """cachetools.LRUCache behind a lock: what a thread-safe user of cachetools has to write."""

    def __init__(self, size: int) -> None:
        import cachetools

        self._c: Any = cachetools.LRUCache(size)
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            return self._c.get(key)

    def set(self, key: Any, value: Any) -> None:
        with self._lock:
            self._c[key] = value


class _CachetoolsSet:
    """cachetools.LRUCache with a ``set`` method: the memory-hierarchy reference for set scaling
    (any hash table gets slower per write from 1k to 100k entries as it outgrows CPU caches)."""

    def __init__(self, size: int) -> None:
        import cachetools

        self._c: Any = cachetools.LRUCache(size)

    def set(self, key: Any, value: Any) -> None:
        self._c[key] = value


def make_caches(size: int) -> dict[str, tuple[Callable[[Any], Any], Callable[[Any, Any], Any]]]:
    """name -> (get, set) bound methods for a fresh cache of ``size`` entries."""
    import cachebox
    import cachetools
    import theine

    out: dict[str, tuple[Callable[[Any], Any], Callable[[Any, Any], Any]]] = {}
    for policy in OUR_POLICIES:
        c = MemoryCache(size, policy=policy)
        out[f"infercache {policy}"] = (c.get, c.set)
    c = MemoryCache(size, ttl=3600)
    out["infercache tinylfu+ttl"] = (c.get, c.set)
    th = theine.Cache(size)
    out["theine"] = (th.get, th.set)
    lru = cachetools.LRUCache(size)
    out["cachetools LRUCache"] = (lru.get, lru.__setitem__)
    locked = LockedLRU(size)
    out["cachetools LRUCache+lock"] = (locked.get, locked.set)
    ttl = cachetools.TTLCache(size, ttl=3600)
    out["cachetools TTLCache"] = (ttl.get, ttl.__setitem__)
    cb = cachebox.LRUCache(size)
    out["cachebox LRUCache"] = (cb.get, cb.insert)
    seed = SeedInMemoryCache(size, ttl=3600)
    out["seed-style InMemoryCache"] = (seed.get, seed.set)
    return out


def fill(cache: Any, set_: Callable[[Any, Any], Any], keys: list[str]) -> None:
    """Fill a cache. The seed-style cache is filled behind its back: through its own set() that
    costs O(n) per key, O(n^2) in all (minutes at 100k entries), and measures nothing useful."""
    if isinstance(cache, SeedInMemoryCache):
        now = time.time()
        for k in keys:
            key = cache._key(k)
            cache._values[key] = 1
            cache._written[key] = now
        return
    for k in keys:
        set_(k, 1)


def fingerprint_like(n: int, prefix: str = "") -> list[str]:
    """``n`` distinct 32-hex-char keys like infercache.fingerprint output; one key set per prefix
    (the prefix seeds the generator), so different prefixes give different keys."""
    rnd = random.Random(f"infercache-bench-{prefix}")
    return [f"{rnd.getrandbits(128):032x}" for _ in range(n)]


def _rate(fn: Callable[[], int]) -> float:
    """ops/s of one run of ``fn`` (which returns the number of operations it did)."""
    gc.collect()
    t0 = time.perf_counter()
    ops = fn()
    return ops / (time.perf_counter() - t0)


def _best_rate(fn: Callable[[], int], repeat: int) -> float:
    """ops/s of the fastest of ``repeat`` runs (the least disturbed by other processes)."""
    return max(_rate(fn) for _ in range(repeat))


def bench_throughput(n_entries: int, n_ops: int, repeat: int) -> dict[str, tuple[float, float]]:
    """name -> (get-hit ops/s, set-into-full-cache ops/s) at ``n_entries`` entries.

    Rounds are interleaved (every cache once per round) and each cache keeps its best round, so
    all caches see the same background load; ratios between them are what this reports.
    """
    keys = fingerprint_like(n_entries)
    n_sets = max(1000, n_ops // 4)
    new_keys = [fingerprint_like(n_sets, prefix=f"new{r}") for r in range(repeat)]
    rounds = max(1, n_ops // n_entries)
    order = keys[:]
    random.Random(1).shuffle(order)
    caches = make_caches(n_entries)
    for name, (get, set_) in caches.items():
        fill(getattr(set_, "__self__", None), set_, keys)
        for k in keys:  # every key is a hit (and, for frequency policies, seen twice)
            get(k)
        assert get(keys[0]) is not None, name

    def gets(get: Callable[[Any], Any]) -> int:
        for _ in range(rounds):
            for k in order:
                get(k)
        return rounds * len(order)

    def sets(set_: Callable[[Any, Any], Any], chunk: list[str]) -> int:
        for k in chunk:
            set_(k, 1)
        return len(chunk)

    best_get = dict.fromkeys(caches, 0.0)
    best_set = dict.fromkeys(caches, 0.0)
    for _ in range(repeat):
        for name, (get, _) in caches.items():
            best_get[name] = max(best_get[name], _rate(lambda get=get: gets(get)))
    for r in range(repeat):
        for name, (_, set_) in caches.items():
            # seed-style set() is O(n) per call: a few hundred writes tell its rate
            chunk = new_keys[r][:300] if name.startswith("seed") else new_keys[r]
            best_set[name] = max(best_set[name], _rate(lambda s=set_, c=chunk: sets(s, c)))
    return {name: (best_get[name], best_set[name]) for name in caches}


def bench_set_scaling(sizes: tuple[int, int], n_ops: int, repeat: int) -> dict[str, list[float]]:
    """name -> [seconds per set into a full cache of each size] (new keys, each set evicts).

    All caches are built first and the rounds interleaved, as in bench_throughput.
    """
    variants: dict[str, Callable[[int], Any]] = {
        f"infercache {p}": (lambda n, p=p: MemoryCache(n, policy=p)) for p in OUR_POLICIES
    }
    variants["infercache tinylfu, ttl=60"] = lambda n: MemoryCache(n, ttl=60)
    variants["infercache lru, ttl=60"] = lambda n: MemoryCache(n, ttl=60, policy="lru")
    variants["cachetools LRUCache (reference)"] = lambda n: _CachetoolsSet(n)
    variants["seed-style InMemoryCache"] = lambda n: SeedInMemoryCache(n, ttl=3600)
    caches: dict[tuple[str, int], Any] = {}
    for name, factory in variants.items():
        for size in sizes:
            cache = factory(size)
            fill(cache, cache.set, fingerprint_like(size, prefix="fill"))
            caches[(name, size)] = cache
    best = dict.fromkeys(caches, float("inf"))
    for r in range(repeat):
        for (name, size), cache in caches.items():
            ops = 100 if name.startswith("seed") else n_ops
            chunk = fingerprint_like(ops, prefix=f"s{r}{size}{name}")
            gc.collect()
            t0 = time.perf_counter()
            set_ = cache.set
            for k in chunk:
                set_(k, 1)
            best[(name, size)] = min(best[(name, size)], (time.perf_counter() - t0) / ops)
    return {name: [best[(name, size)] for size in sizes] for name in variants}


# -- hit ratio ---------------------------------------------------------------------------------


def _write_oracle_trace(ids: np.ndarray, path: str) -> None:
    """libCacheSim's oracleGeneral binary format (with next-access times, for Belady)."""
    rec = np.zeros(len(ids), dtype=[("ts", "<u4"), ("id", "<u8"), ("sz", "<u4"), ("nv", "<i8")])
    rec["ts"] = np.arange(len(ids))
    rec["id"] = ids
    rec["sz"] = 1
    nv = next_access(ids)
    nv[nv < 0] = np.iinfo(np.int64).max
    rec["nv"] = nv
    rec.tofile(path)


def _sim_python(trace: list[str], name: str, size: int) -> float:
    if name.startswith("infercache "):
        c = MemoryCache(size, policy=name.split()[1])
        get, set_ = c.get, c.set
        hits = 0
        for k in trace:
            if get(k) is None:
                set_(k, 1)
            else:
                hits += 1
        return hits / len(trace)
    if name == "theine":
        import theine

        th = theine.Cache(size)
        tget, tset = th.get, th.set
        hits = 0
        for k in trace:
            if tget(k)[1]:
                hits += 1
            else:
                tset(k, 1)
        return hits / len(trace)
    if name == "cachetools LRU":
        import cachetools

        lru: Any = cachetools.LRUCache(size)
        lget = lru.get
        hits = 0
        for k in trace:
            if lget(k) is None:
                lru[k] = 1
            else:
                hits += 1
        return hits / len(trace)
    raise ValueError(name)


LCS_POLICIES = ("WTinyLFU", "S3FIFO", "LRU", "Belady")
PY_POLICIES = ("infercache tinylfu", "infercache lru", "infercache lfu", "theine", "cachetools LRU")


def _hit_ratio_job(
    args: tuple[str, int, int, tuple[float, ...], str],
) -> list[tuple[str, float, str, float]]:
    """All policies on one trace at every size: rows (trace, fraction, policy, hit ratio)."""
    trace_name, n_keys, n_req, fractions, tmpdir = args
    import libcachesim as lcs

    ids = TRACES[trace_name](n_keys, n_req)
    names = [f"{i:x}" for i in range(int(ids.max()) + 1)]
    trace = [names[i] for i in ids.tolist()]
    path = os.path.join(tmpdir, f"{trace_name}.oracleGeneral")
    _write_oracle_trace(ids, path)
    rows: list[tuple[str, float, str, float]] = []
    for frac in fractions:
        size = max(1, int(n_keys * frac))
        for pol in LCS_POLICIES:
            reader = lcs.TraceReader(path, trace_type=lcs.TraceType.ORACLE_GENERAL_TRACE)
            miss = getattr(lcs, pol)(size).process_trace(reader)[0]
            rows.append((trace_name, frac, f"libCacheSim {pol}", 1.0 - miss))
        for pol in PY_POLICIES:
            rows.append((trace_name, frac, pol, _sim_python(trace, pol, size)))
    return rows


def bench_hit_ratio(
    n_keys: int, n_req: int, fractions: tuple[float, ...], workers: int
) -> dict[tuple[str, float], dict[str, float]]:
    table: dict[tuple[str, float], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(workers) as pool:
        jobs = [(t, n_keys, n_req, fractions, tmp) for t in TRACES]
        for rows in pool.map(_hit_ratio_job, jobs):
            for trace, frac, pol, hr in rows:
                table.setdefault((trace, frac), {})[pol] = hr
    return table


# -- report ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller traces and loops")
    ap.add_argument("--workers", type=int, default=2, help="processes for hit-ratio simulation")
    ap.add_argument("--skip-hit-ratio", action="store_true")
    args = ap.parse_args(argv)
    quick = args.quick
    n_ops = 50_000 if quick else 200_000
    repeat = 3 if quick else 5
    t_start = time.perf_counter()

    print(
        f"# bench_l1 {'--quick ' if quick else ''}| Python {platform.python_version()} "
        f"| {platform.machine()} | {os.cpu_count()} CPUs | {time.strftime('%Y-%m-%d %H:%M')}"
    )

    print(f"\n## Throughput, 10k entries, 32-hex-char str keys, one thread (best of {repeat})\n")
    tp = bench_throughput(10_000, n_ops, repeat)
    th_get, th_set = tp["theine"]
    ct_get, _ = tp["cachetools TTLCache"]
    sd_get, sd_set = tp["seed-style InMemoryCache"]
    print(
        "| cache | get-hit M/s | x theine | x cachetools TTL | x seed | set (evicting) M/s "
        "| x theine | x seed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (g, s) in tp.items():
        print(
            f"| {name} | {g / 1e6:.2f} | {g / th_get:.2f} | {g / ct_get:.2f} | {g / sd_get:.1f} "
            f"| {s / 1e6:.3f} | {s / th_set:.2f} | {s / sd_set:.0f} |"
        )

    small, large = (1_000, 100_000)
    print(
        f"\n## set() into a full cache: {small:,} vs {large:,} entries "
        f"(µs per set, best of {2 * repeat})\n"
    )
    sc = bench_set_scaling((small, large), 10_000 if quick else 20_000, 2 * repeat)
    print(f"| cache | {small:,} | {large:,} | ratio |")
    print("|---|---:|---:|---:|")
    for name, (a, b) in sc.items():
        print(f"| {name} | {a * 1e6:.2f} | {b * 1e6:.2f} | {b / a:.2f} |")

    if not args.skip_hit_ratio:
        n_keys, n_req = (20_000, 200_000) if quick else (100_000, 1_000_000)
        fractions = (0.01, 0.1)
        print(f"\n## Hit ratio (%), {n_keys:,} keys, {n_req:,} requests\n")
        hr = bench_hit_ratio(n_keys, n_req, fractions, args.workers)
        pols = [f"libCacheSim {p}" for p in LCS_POLICIES] + list(PY_POLICIES)
        short = {p: p.replace("libCacheSim ", "lcs ").replace("infercache ", "ours ") for p in pols}
        print(
            "| trace | size | "
            + " | ".join(short[p] for p in pols)
            + " | ours - best(theine, lcs WTinyLFU) | ours lru - cachetools LRU |"
        )
        print("|---|---|" + "---:|" * (len(pols) + 2))
        for (trace, frac), row in hr.items():
            best = max(row["theine"], row["libCacheSim WTinyLFU"])
            gap = row["infercache tinylfu"] - best
            lru_gap = row["infercache lru"] - row["cachetools LRU"]
            cells = " | ".join(f"{row[p] * 100:.2f}" for p in pols)
            print(f"| {trace} | {frac:.0%} | {cells} | {gap * 100:+.2f} | {lru_gap * 100:+.2f} |")

    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
