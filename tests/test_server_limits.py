"""A server with tight limits: overload (503 + Retry-After), predict token, admin disabled."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from infercache.bench.process import ServerProcess

TOKEN = "predict-token-123"

SLOW = textwrap.dedent(
    """
    import time
    import numpy as np
    from infercache.models import ModelRunner

    def slow(batch):
        time.sleep(0.02)  # a slow model: 20 ms per batch
        return [np.asarray([float(np.sum(x))], dtype=np.float32) for x in batch]

    def make():
        return ModelRunner(slow, name="slow", version="1")
    """
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("tight")
    (workdir / "slowmodel.py").write_text(SLOW)
    proc = ServerProcess.infercache(
        "--model", "slow=slowmodel:make",
        "--max-queue", "2",
        "--max-batch-size", "1",
        "--api-token", TOKEN,
        "--sql-url", "none",
        "--max-body-bytes", "4096",
        cwd=workdir,
        env={"PYTHONPATH": str(workdir)},
    )  # fmt: skip
    with proc:
        yield proc


@pytest.fixture
async def http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=headers) as client:
        yield client


async def test_overload_is_503_with_retry_after_never_500(http: httpx.AsyncClient) -> None:
    resps = await asyncio.gather(
        *(http.post("/v1/models/slow/predict", json={"input": [float(i)]}) for i in range(40))
    )
    statuses = [r.status_code for r in resps]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    over = next(r for r in resps if r.status_code == 503)
    assert over.json()["error"]["code"] == "overloaded"
    assert int(over.headers["retry-after"]) >= 1
    # and the server recovers once the burst is over
    ok = await http.post("/v1/models/slow/predict", json={"input": [1000.0]})
    assert ok.status_code == 200


async def test_predict_requires_the_api_token(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as anon:
        r = await anon.post("/v1/models/slow/predict", json={"input": [1.0]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        wrong = {"Authorization": "Bearer nope"}
        r = await anon.post("/v1/models/slow/predict", json={"input": [1.0]}, headers=wrong)
        assert r.status_code == 401
        assert (await anon.get("/healthz")).status_code == 200  # health stays open


async def test_admin_is_disabled_without_a_token(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/cache/stats")
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


async def test_small_body_limit(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/models/slow/predict", json={"input": [0.5] * 2000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
