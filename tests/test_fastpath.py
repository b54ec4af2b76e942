"""server.fastpath: the predict route served before FastAPI's stack answers as the route did.

Driven in process with raw ASGI messages (what uvicorn sends), so that the cases a client library
would not produce (a lying or invalid Content-Length, a body in chunks, a client that leaves before
sending its body) can be sent as they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest

pytest.importorskip("torch")

from infercache.config import Settings
from infercache.models import InputSpec, ModelRunner
from infercache.predictor import Predictor
from infercache.server import create_app
from infercache.server.fastpath import InfercacheApp
from infercache.tiers.memory import MemoryCache

TOKEN = "predict-token"


def double(batch: np.ndarray) -> np.ndarray:
    return batch * 2


@pytest.fixture
async def app() -> AsyncIterator[InfercacheApp]:
    runner = ModelRunner(double, name="double", version="1", warmup=False, freeze_gc=False,
                         input_spec=InputSpec(shape=(3,), dtype="float32"))  # fmt: skip
    predictor = Predictor(runner, MemoryCache(100))
    settings = Settings(api_token=TOKEN, max_body_bytes=1000)
    application = create_app({"double": predictor}, settings=settings)
    assert isinstance(application, InfercacheApp)
    async with application.router.lifespan_context(application):
        yield application


async def call(
    app: Any,
    body: bytes | list[bytes],
    *,
    path: str = "/v1/models/double/predict",
    headers: dict[str, str] | None = None,
    root_path: str = "",
    disconnect: bool = False,
) -> tuple[int, dict[str, str], Any]:
    chunks = [body] if isinstance(body, bytes) else list(body)
    hdrs = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    if isinstance(body, bytes):
        hdrs["content-length"] = str(len(body))
    hdrs.update(headers or {})
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": root_path + path, "raw_path": (root_path + path).encode(),
        "root_path": root_path, "query_string": b"", "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80), "state": {},
        "headers": [(k.encode(), v.encode()) for k, v in hdrs.items()],
    }  # fmt: skip
    messages: list[dict[str, Any]] = (
        [{"type": "http.disconnect"}]
        if disconnect
        else [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]
    )

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if not sent:
        return 0, {}, None
    start = sent[0]
    response_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], response_headers, orjson.loads(payload)


async def test_prediction_cached_flag_and_server_timing(app: InfercacheApp) -> None:
    status, headers, out = await call(app, b'{"input": [1, 2, 3]}')
    assert status == 200 and out["output"] == [2.0, 4.0, 6.0] and out["cached"] is False
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) > 0 and "compute;dur=" in headers["server-timing"]
    status, _, out = await call(app, b'{"input": [1.0, 2.0, 3.0]}')  # other bytes, same input
    assert status == 200 and out["cached"] is True and out["tier"] == "l1"


async def test_chunked_body_is_joined(app: InfercacheApp) -> None:
    status, _, out = await call(app, [b'{"input": [', b"4, 5,", b" 6]}"])
    assert status == 200 and out["output"] == [8.0, 10.0, 12.0]


async def test_same_answers_as_the_fastapi_route(app: InfercacheApp) -> None:
    # mounted under a root path the request goes through FastAPI's route instead
    for body in (b'{"input": [7, 8, 9]}', b'{"input": [1, 2]}', b'{"inputs": [[1, 1, 1]]}',
                 b'{"input": [1, 2, 3], "extra": 1}', b"nope"):  # fmt: skip
        fast = await call(app, body)
        routed = await call(app, body, root_path="/mounted")
        assert fast[0] == routed[0], body
        assert fast[2].get("error") == routed[2].get("error"), body
        if fast[0] == 200:
            assert fast[2].get("output", fast[2].get("outputs")) == routed[2].get(
                "output", routed[2].get("outputs")
            )


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"headers": {"authorization": "Bearer wrong"}}, 401, "unauthorized"),
        ({"path": "/v1/models/nope/predict"}, 404, "model_not_found"),
        ({"headers": {"content-length": "12x"}}, 400, "bad_request"),
        ({"headers": {"content-length": "5000"}}, 413, "payload_too_large"),
    ],
)
async def test_errors_are_json(app: InfercacheApp, kwargs: Any, status: int, code: str) -> None:
    got, headers, out = await call(app, b'{"input": [1, 2, 3]}', **kwargs)
    assert got == status and out["error"]["code"] == code
    assert headers["content-type"] == "application/json"
    if status == 401:
        assert headers["www-authenticate"].startswith("Bearer")


async def test_chunked_body_over_the_limit_is_refused(app: InfercacheApp) -> None:
    status, _, out = await call(app, [b'{"input": [' + b"1," * 300, b"1," * 300 + b"1]}"])
    assert status == 413 and out["error"]["code"] == "payload_too_large"


async def test_client_gone_before_its_body_gets_no_answer(app: InfercacheApp) -> None:
    assert (await call(app, b"", disconnect=True))[0] == 0


async def test_fast_path_requests_are_counted_in_metrics(app: InfercacheApp) -> None:
    await call(app, b'{"input": [3, 2, 1]}')
    await call(app, b'{"input": [1]}')
    text = app.state.service.metrics.render().decode()
    route = 'route="/v1/models/{name}/predict"'
    assert f'infercache_http_requests_total{{{route},status="200"}} 1.0' in text
    assert f'infercache_http_requests_total{{{route},status="422"}} 1.0' in text
    assert app.state.service.metrics.status_counts == {200: 1, 422: 1}  # the dashboard's figures


async def test_text_and_open_shape_models_warm_up_and_become_ready() -> None:
    import asyncio

    def lengths(batch: list[str]) -> list[np.ndarray]:
        return [np.asarray([len(t)], np.float32) for t in batch]

    def total(batch: list[np.ndarray]) -> list[np.ndarray]:
        return [np.asarray([float(np.sum(x))], np.float32) for x in batch]

    text = ModelRunner(lengths, name="text", version="1", warmup=False, freeze_gc=False,
                       input_spec=InputSpec(dtype="str", max_length=50))  # fmt: skip
    ragged = ModelRunner(total, name="ragged", version="1", warmup=False, freeze_gc=False,
                         input_spec=InputSpec(shape=(None,), dtype="float32"))  # fmt: skip
    application = create_app([Predictor(text, MemoryCache(10)), Predictor(ragged, None)])
    async with application.router.lifespan_context(application):
        service = application.state.service
        for _ in range(200):
            if service.ready:
                break
            await asyncio.sleep(0.01)
        assert service.ready and service.warmup_error is None
        status, _, out = await call(
            application, b'{"input": "hello"}', path="/v1/models/text/predict"
        )
        assert status == 200 and out["output"] == [5.0]
        status, _, out = await call(
            application, b'{"input": [1, 2, 3]}', path="/v1/models/ragged/predict"
        )
        assert status == 200 and out["output"] == [6.0]
