"""Predictor, DynamicBatcher and ModelRunner, in process, against the user's design in one run.

Usage: ``python benchmarks/bench_predictor.py [--quick] [--compile] [--no-minilm]``

Sections (ratios matter: the machine is shared, absolute figures move run to run):

1. all-miss closed loop at concurrency 64 (every input distinct, sent as a Python list as a JSON
   decoder would produce): the Predictor (greedy batching, and with a 5 ms fill window) vs one
   forward per request (the tutorial's ``predict_single`` via ``predict_async``) vs the tutorial's
   RequestBatcher design (benchmarks/baselines/seed_server.py). Then concurrency 1 (low load),
   where a fill window costs its whole wait and greedy dispatch costs nothing.
2. Zipf(0.9) over 10k distinct inputs at concurrency 64: throughput, p50/p99, hit ratio and model
   calls saved, Predictor + MemoryCache vs one forward per request.
3. batcher overhead per item (submit-to-result minus the batch's compute) at concurrency 1 and 64.
4. coalescing: 100 concurrent identical requests -> model calls (must be 1).
5. the MLP's forward: eager vs frozen TorchScript vs ONNX Runtime (what ``infercache serve`` runs)
   vs dynamic int8 (vs torch.compile with ``--compile``: ~1 min to compile on 2 cores).
6. MiniLM (if the extra is installed): sections 1 and 2 with short texts.

The tutorial's variants run with the garbage collector unfrozen (its design), ours after
``gc.freeze()`` (the runner's default); both use one torch thread (``torch.set_num_threads`` is
process-wide), which is generous to the tutorial's design (FACTS.md: two threads were 2.8-500x
slower under load).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import table
from _traces import zipf
from baselines.seed_server import SeedModelServer, SeedRequestBatcher, seed_batch_fn
from infercache.batching import DynamicBatcher
from infercache.models import ModelRunner
from infercache.models.demo import build_mlp, demo_mlp
from infercache.predictor import Predictor
from infercache.tiers.memory import MemoryCache

Request = Callable[[int], Awaitable[Any]]


async def closed_loop(request: Request, n: int, concurrency: int) -> dict[str, float]:
    """``concurrency`` clients, each sending its next request when the last one returns."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def client() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await request(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    arr = np.asarray(latencies) * 1000
    return {
        "rps": n / wall,
        "p50": float(np.percentile(arr, 50)),
        "p99": float(np.percentile(arr, 99)),
        "wall": wall,
    }


#: columns of the all-miss tables (MLP and MiniLM)
MISS_HEADER = ["model", "concurrency", "variant", "req/s", "p50 ms", "p99 ms", "mean batch",
               "vs 1 forward/request"]  # fmt: skip
#: columns of the Zipf tables (MLP and MiniLM)
ZIPF_HEADER = ["model", "variant", "req/s", "p50 ms", "p99 ms", "hit ratio", "computed",
               "model calls", "throughput ratio"]  # fmt: skip


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def use_seed_gc() -> None:
    gc.unfreeze()  # the tutorial never freezes: full collections traverse the model's objects


def use_our_gc() -> None:
    gc.collect()
    gc.freeze()


# -- section 1 & 2 helpers ------------------------------------------------------------------------


async def run_all_miss(
    label: str,
    runner: ModelRunner,
    seed: SeedModelServer,
    make_input: Callable[[int], Any],
    n: int,
    n_seed_single: int,
    concurrency: int,
    rows: list[list[Any]],
) -> None:
    results: dict[str, dict[str, float]] = {}
    batch_info: dict[str, str] = {}

    # the tutorial's one forward per request
    use_seed_gc()
    results["seed predict_single (1 forward/request)"] = await closed_loop(
        lambda i: seed.predict_async(make_input(i)), n_seed_single, concurrency
    )
    batch_info["seed predict_single (1 forward/request)"] = "1"

    # the tutorial's RequestBatcher (5 ms window, batch 32, RLock so it runs)
    sb = SeedRequestBatcher(seed_batch_fn(seed), batch_size=32, max_wait_time=0.005)
    res = await closed_loop(lambda i: sb.add_request(make_input(i), str(i)), n, concurrency)
    results["seed RequestBatcher (5 ms window)"] = res
    batch_info["seed RequestBatcher (5 ms window)"] = fmt(statistics.mean(sb.batch_sizes), 1)

    use_our_gc()
    for name, opts in (
        ("Predictor, greedy batching", {}),
        ("Predictor, 5 ms fill window", {"greedy": False, "max_wait_ms": 5.0}),
    ):
        async with Predictor(runner, MemoryCache(max_size=max(n, 10)), batch_options=opts) as p:
            res = await closed_loop(lambda i, p=p: p.predict(make_input(i)), n, concurrency)
            name = f"{name} [model on {'a thread' if p.batcher.offload else 'the loop'}]"
            results[name] = res
            batch_info[name] = fmt(p.batcher.stats()["mean_batch_size"], 1)

    base = results["seed predict_single (1 forward/request)"]["rps"]
    for name, r in results.items():
        rows.append(
            [
                label,
                concurrency,
                name,
                fmt(r["rps"], 0),
                fmt(r["p50"]),
                fmt(r["p99"]),
                batch_info[name],
                fmt(r["rps"] / base) + "x",
            ]
        )


async def run_zipf(
    label: str,
    runner: ModelRunner,
    seed: SeedModelServer,
    pool_input: Callable[[int], Any],
    n: int,
    n_keys: int,
    concurrency: int,
    rows: list[list[Any]],
) -> None:
    trace = zipf(n_keys, n, 0.9, seed=7)
    use_seed_gc()
    seed_res = await closed_loop(
        lambda i: seed.predict_async(pool_input(int(trace[i]))), n, concurrency
    )
    use_our_gc()
    async with Predictor(runner, MemoryCache(max_size=n_keys)) as p:
        ours = await closed_loop(lambda i: p.predict(pool_input(int(trace[i]))), n, concurrency)
        s = p.stats()
    distinct = len(np.unique(trace))
    rows.append(
        [
            label,
            "seed predict_single (no cache)",
            fmt(seed_res["rps"], 0),
            fmt(seed_res["p50"]),
            fmt(seed_res["p99"]),
            "0 %",
            n,
            n,
            "1.00x",
        ]
    )
    hit = (s["hits"].get("l1", 0) + s["coalesced"]) / s["predictions"]
    rows.append(
        [
            label,
            "Predictor + MemoryCache",
            fmt(ours["rps"], 0),
            fmt(ours["p50"]),
            fmt(ours["p99"]),
            f"{hit * 100:.1f} %",
            s["computed"],
            s["model_calls"],
            fmt(ours["rps"] / seed_res["rps"]) + "x",
        ]
    )
    rows.append(
        [
            label,
            f"(distinct inputs in the trace: {distinct})",
            "",
            "",
            "",
            "",
            f"saved {n - s['computed']} computations",
            f"saved {n - s['model_calls']} calls",
            "",
        ]
    )


# -- section 3 & 4 --------------------------------------------------------------------------------


async def batcher_overhead(n: int) -> list[list[Any]]:
    rows = []
    for label, fn, offload in (
        ("sync fn in a worker thread", lambda xs: xs, True),
        ("sync fn on the loop (offload=False)", lambda xs: xs, False),
    ):
        for conc in (1, 64):
            async with DynamicBatcher(fn, max_batch_size=32, offload=offload) as b:
                over: list[float] = []

                async def one(
                    i: int, b: DynamicBatcher[Any, Any] = b, over: list[float] = over
                ) -> None:
                    t0 = time.perf_counter()
                    _, _, compute = await b.submit_timed(i)
                    over.append(time.perf_counter() - t0 - compute)

                await closed_loop(one, n, conc)
                sizes = b.stats()["mean_batch_size"]
            arr = np.asarray(over) * 1e6
            rows.append(
                [
                    label,
                    conc,
                    fmt(float(np.median(arr)), 1),
                    fmt(float(np.percentile(arr, 99)), 1),
                    fmt(sizes, 1),
                    fmt(float(np.median(arr)) / sizes if conc > 1 else float(np.median(arr)), 1),
                ]
            )
    return rows


async def coalescing(runner: ModelRunner) -> list[list[Any]]:
    rows = []
    x = np.random.default_rng(3).standard_normal(784).astype(np.float32)
    async with Predictor(runner, MemoryCache()) as p:
        preds = await asyncio.gather(*(p.predict(x) for _ in range(100)))
        s = p.stats()
    tiers: dict[str, int] = {}
    for pr in preds:
        tiers[str(pr.tier)] = tiers.get(str(pr.tier), 0) + 1
    rows.append(
        [
            "100 concurrent identical",
            s["model_calls"],
            s["computed"],
            ", ".join(f"{k}: {v}" for k, v in sorted(tiers.items())),
        ]
    )
    return rows


# -- section 5 ------------------------------------------------------------------------------------


def forward_costs(with_compile: bool, quick: bool) -> list[list[Any]]:
    rows = []
    x = np.random.default_rng(5).standard_normal((32, 784)).astype(np.float32)
    eager = demo_mlp(freeze_gc=False)
    variants: list[tuple[str, ModelRunner, float]] = [("eager", eager, 0.0)]
    t0 = time.perf_counter()
    j = demo_mlp(jit=True, freeze_gc=False)
    variants.append(
        (f"frozen TorchScript (jit {j.describe()['jit']})", j, time.perf_counter() - t0)
    )
    t0 = time.perf_counter()
    o = demo_mlp(onnx=True, freeze_gc=False)
    variants.append((f"ONNX Runtime (onnx {o.describe()['onnx']})", o, time.perf_counter() - t0))
    if eager.device == "cpu":  # dynamic int8 runs on the CPU only
        t0 = time.perf_counter()
        q = demo_mlp(quantize="dynamic-int8", freeze_gc=False)
        variants.append(("dynamic int8", q, time.perf_counter() - t0))
    if with_compile:
        t0 = time.perf_counter()
        c = demo_mlp(compile=True, freeze_gc=False)
        for size in (1, 2, 7, 16, 32):  # compile the dynamic-shape graph before timing
            c.predict_batch(x[:size])
        variants.append(("torch.compile(dynamic=True)", c, time.perf_counter() - t0))
    ref = eager.predict_batch(x)
    reps = 200 if quick else 1000
    base: dict[int, float] = {}
    for name, r, load_s in variants:
        per = {}
        for size in (1, 2, 32):
            batch = x[:size]
            r.predict_batch(batch)
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(reps // 5):
                    r._forward(batch, size)
                runs.append((time.perf_counter() - t) / (reps // 5))
            per[size] = statistics.median(runs) * 1e6
        err = float(np.abs(r.predict_batch(x) - ref).max())
        base = base or per  # the first variant, eager, is the baseline
        rows.append(
            [
                name,
                fmt(per[1], 1),
                fmt(per[2], 1),
                fmt(per[32], 1),
                " / ".join(f"{base[n] / per[n]:.2f}x" for n in (1, 2, 32)),
                fmt(per[32] / 32, 2),
                fmt(per[1] / per[32] * 32, 1) + "x",
                f"{err:.1e}",
                fmt(load_s, 1),
            ]
        )
    return rows


# -- main -----------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    quick = args.quick
    n_miss = 3000 if quick else 12000
    n_seed_single = 1500 if quick else 6000
    n_zipf = 6000 if quick else 30000
    print(f"# bench_predictor ({'quick' if quick else 'full'}), python {sys.version.split()[0]}")
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} -> 1")
    runner = demo_mlp()  # sets one torch thread and freezes the GC
    seed = SeedModelServer(build_mlp(), threads=1)
    pool = np.random.default_rng(11).standard_normal((10_000, 784)).astype(np.float32)
    miss_pool = np.random.default_rng(12).standard_normal((n_miss, 784)).astype(np.float32)

    rows: list[list[Any]] = []
    await run_all_miss(
        "mlp", runner, seed, lambda i: miss_pool[i].tolist(), n_miss, n_seed_single, 64, rows
    )
    await run_all_miss(
        "mlp", runner, seed, lambda i: miss_pool[i].tolist(), n_miss // 10, n_miss // 10, 1, rows
    )
    print("\n## 1. all-miss closed loop (inputs sent as Python lists of 784 floats)\n")
    print(
        table(
            rows,
            MISS_HEADER,
        )
    )

    zrows: list[list[Any]] = []
    await run_zipf("mlp", runner, seed, lambda k: pool[k].tolist(), n_zipf, 10_000, 64, zrows)
    print(f"\n## 2. Zipf(0.9) over 10k distinct inputs, {n_zipf} requests, concurrency 64\n")
    print(
        table(
            zrows,
            ZIPF_HEADER,
        )
    )

    print("\n## 3. batcher overhead per item (submit-to-result minus compute), µs\n")
    print(
        table(
            await batcher_overhead(3000 if quick else 20000),
            [
                "function",
                "concurrency",
                "median µs",
                "p99 µs",
                "mean batch",
                "median µs per item of a batch",
            ],
        )
    )

    print("\n## 4. coalescing\n")
    print(table(await coalescing(runner), ["requests", "model calls", "items computed", "tiers"]))

    print("\n## 5. MLP forward per call (µs), one torch thread\n")
    print(
        table(
            forward_costs(args.compile, quick),
            [
                "variant",
                "batch 1 µs",
                "batch 2 µs",
                "batch 32 µs",
                "vs eager at 1 / 2 / 32",
                "µs/sample @32",
                "batching gain",
                "max |diff| vs eager",
                "load s",
            ],
        )
    )
    seed.close()

    from infercache.models import minilm

    if args.no_minilm or not minilm.available():
        print("\n(MiniLM skipped: extra not installed or --no-minilm)")
        return
    texts = [
        f"sentence number {i} about topic {i % 97} and item {i * 7919 % 10007}"
        for i in range(10_000)
    ]
    m = minilm.minilm()

    class SeedText:
        """The tutorial's one-forward-per-request pattern for the text model."""

        def __init__(self) -> None:
            from concurrent.futures import ThreadPoolExecutor

            import torch

            self.executor = ThreadPoolExecutor(
                max_workers=4, initializer=torch.set_num_threads, initargs=(1,)
            )

        def predict_single(self, text: str) -> Any:
            return m.predict_batch([text]).tolist()

        def predict_batch(self, batch: list[str]) -> dict[str, Any]:
            return {"predictions": m.predict_batch(batch).tolist()}

        async def predict_async(self, text: str) -> Any:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self.predict_single, text)

    st: Any = SeedText()
    mrows: list[list[Any]] = []
    n_text = 200 if quick else 600
    await run_all_miss("minilm", m, st, lambda i: texts[i], n_text, n_text // 2, 64, mrows)
    print("\n## 6a. MiniLM all-miss closed loop (short texts)\n")
    print(
        table(
            mrows,
            MISS_HEADER,
        )
    )
    mz: list[list[Any]] = []
    await run_zipf("minilm", m, st, lambda k: texts[k], 600 if quick else 2000, 10_000, 64, mz)
    print("\n## 6b. MiniLM Zipf(0.9) over 10k distinct texts, concurrency 64\n")
    print(
        table(
            mz,
            ZIPF_HEADER,
        )
    )
    st.executor.shutdown(wait=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (~1-2 min)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also measure torch.compile (compiling takes ~1 min on 2 cores)",
    )
    parser.add_argument("--no-minilm", action="store_true", help="skip the MiniLM sections")
    asyncio.run(main(parser.parse_args()))
