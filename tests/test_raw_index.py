"""The request-bytes index: repeated request bytes skip decoding, but never serve a stale entry."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

pytest.importorskip("torch")

from infercache.models import InputSpec, ModelRunner
from infercache.multilevel import MultiLevelCache
from infercache.predictor import Predictor
from infercache.tiers.memory import MemoryCache


class Doubler:
    """A real numpy model that counts the items it computes."""

    def __init__(self) -> None:
        self.items = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.items += len(batch)
        return batch * 2


def runner(model: Doubler, version: str = "1") -> ModelRunner:
    return ModelRunner(model, name="double", version=version, warmup=False, freeze_gc=False,
                       input_spec=InputSpec(shape=(3,), dtype="float32"))  # fmt: skip


async def predict_body(p: Predictor, body: bytes) -> tuple[list[float], bool, str | None]:
    """What the server does: the raw-bytes path first, else decode and remember."""
    hit = p.lookup_raw(body)
    if hit is not None:
        return hit.output.tolist(), hit.cached, hit.tier
    pred = await p.predict(orjson.loads(body)["input"])
    p.remember_raw(body, pred)
    return pred.output.tolist(), pred.cached, pred.tier


async def test_repeated_bytes_are_served_from_l1_without_decoding() -> None:
    model = Doubler()
    l1 = MemoryCache(100)
    async with Predictor(runner(model), l1) as p:
        body = orjson.dumps({"input": [1.0, 2.0, 3.0]})
        assert await predict_body(p, body) == ([2.0, 4.0, 6.0], False, None)
        assert p.lookup_raw(body) is not None
        assert await predict_body(p, body) == ([2.0, 4.0, 6.0], True, "l1")
        # other bytes for the same input still share the canonical entry (a normal L1 hit)
        spaced = b'{"input": [1, 2.0, 3]}'
        assert p.lookup_raw(spaced) is None
        assert await predict_body(p, spaced) == ([2.0, 4.0, 6.0], True, "l1")
        assert model.items == 1
        stats = p.stats()  # every answer counts, the probing lookup_raw above included
        assert stats["predictions"] == 4 and stats["hits"]["l1"] == 3


async def test_invalidation_and_eviction_fall_back_to_the_full_path() -> None:
    model = Doubler()
    cache = MultiLevelCache([MemoryCache(100)])
    async with Predictor(runner(model), cache) as p:
        body = orjson.dumps({"input": [1.0, 1.0, 1.0]})
        await predict_body(p, body)
        await cache.invalidate(namespace="double")  # a new generation: every old key unreachable
        assert p.lookup_raw(body) is None
        assert await predict_body(p, body) == ([2.0, 2.0, 2.0], False, None)
        assert model.items == 2
        assert p.lookup_raw(body) is not None  # remembered under the new namespace
        assert cache.l1 is not None
        cache.l1.clear()  # the entry left L1 (eviction, TTL): the index alone answers nothing
        assert p.lookup_raw(body) is None
        assert (await predict_body(p, body))[1] is False
        assert model.items == 3


async def test_a_new_model_version_never_sees_old_bytes() -> None:
    l1 = MemoryCache(100)
    body = orjson.dumps({"input": [0.0, 1.0, 2.0]})
    async with Predictor(runner(Doubler(), "1"), l1) as old:
        await predict_body(old, body)
        assert old.lookup_raw(body) is not None
    new_model = Doubler()
    async with Predictor(runner(new_model, "2"), l1) as new:
        assert new.lookup_raw(body) is None
        assert (await predict_body(new, body))[1] is False
        assert new_model.items == 1


async def test_no_index_without_an_l1() -> None:
    async with Predictor(runner(Doubler()), None) as p:
        body = orjson.dumps({"input": [1.0, 2.0, 3.0]})
        await predict_body(p, body)
        assert p.lookup_raw(body) is None
