"""server.deadlines: one reaper task enforces every request's timeout."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from infercache.errors import DeadlineExceeded
from infercache.server.deadlines import Deadlines


async def guarded(deadlines: Deadlines, work: float) -> str:
    """What Service._in_time does around a prediction."""
    task = deadlines.enter()
    try:
        await asyncio.sleep(work)
        return "done"
    except asyncio.CancelledError:
        if deadlines.fired(task):
            raise DeadlineExceeded("too slow") from None
        raise
    finally:
        deadlines.leave(task)


async def test_overdue_requests_fail_and_the_others_finish() -> None:
    d = Deadlines(0.1, tick=0.01)
    start = time.monotonic()
    results = await asyncio.gather(
        guarded(d, 0.02), guarded(d, 2.0), guarded(d, 0.05), return_exceptions=True
    )
    elapsed = time.monotonic() - start
    assert results[0] == "done" and results[2] == "done"
    assert isinstance(results[1], DeadlineExceeded)
    assert 0.1 <= elapsed < 1.0  # at the timeout, not after the slow work (2 s)
    assert d.expired == 1 and not d._due and not d._fired
    await d.close()


async def test_a_task_answering_after_its_deadline_can_still_await() -> None:
    d = Deadlines(0.05, tick=0.01)

    async def handler() -> str:
        try:
            return await guarded(d, 1.0)
        except DeadlineExceeded:
            await asyncio.sleep(0.01)  # e.g. sending the 504: no stray cancellation left
            return "answered 504"

    assert await handler() == "answered 504"
    await d.close()


async def test_other_cancellations_stay_cancellations() -> None:
    d = Deadlines(10.0, tick=0.01)
    task = asyncio.create_task(guarded(d, 5.0))
    await asyncio.sleep(0.02)
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task
    assert d.expired == 0 and not d._due
    await d.close()


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Deadlines(0)


async def test_server_answers_504_for_a_slow_model() -> None:
    pytest.importorskip("torch")
    from infercache.config import Settings
    from infercache.models import InputSpec, ModelRunner
    from infercache.predictor import Predictor
    from infercache.server import create_app

    def slow(batch: np.ndarray) -> np.ndarray:
        time.sleep(1.5)  # in the batcher's worker thread (offload)
        return batch

    runner = ModelRunner(slow, name="slow", version="1", warmup=False, freeze_gc=False,
                         input_spec=InputSpec(shape=(2,), dtype="float32"))  # fmt: skip
    predictor = Predictor(runner, None, batch_options={"offload": True})
    app = create_app({"slow": predictor}, settings=Settings(request_timeout_s=0.1))
    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            start = time.monotonic()
            resp = await client.post("/v1/models/slow/predict", json={"input": [1, 2]})
            assert time.monotonic() - start < 1.0  # the 0.1 s deadline, not the 1.5 s model
            assert resp.status_code == 504
            assert resp.json()["error"]["code"] == "deadline_exceeded"
            await asyncio.sleep(0.5)  # the worker finishes; the server still answers
            resp = await client.get("/healthz")
            assert resp.status_code == 200
