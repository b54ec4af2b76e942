"""The real ``infercache serve`` in a subprocess, spoken to over HTTP with httpx.

One server (demo MLP + a plain-callable model from a module:factory spec, L1 + SQLite L3, an admin
token) is shared by the tests of this module; the tests use distinct inputs so that their cache
entries do not interfere.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from infercache.bench.process import ServerProcess

ADMIN = "admin-token-for-tests"
_seed = itertools.count(1000)

FACTORY = textwrap.dedent(
    """
    import datetime
    import numpy as np
    from infercache.models import ModelRunner

    def total(batch):
        return [np.asarray([float(np.sum(x))], dtype=np.float32) for x in batch]

    def make():
        return ModelRunner(total, name="summer", version="v1")

    def odd(batch):
        out = []
        for x in batch:
            k = int(np.asarray(x).ravel()[0])
            if k == 0:  # JSON can carry it, msgpack (the tiers' codec) cannot
                out.append({"at": datetime.datetime(2024, 1, 1), "k": k})
            elif k == 1:  # msgpack and JSON both cannot
                out.append(2**70)
            elif k == 2:  # an interpreter error carrying a traceback with server paths
                raise RuntimeError(
                    "The following operation failed in the interpreter.\\n"
                    "Traceback (most recent call last):\\n"
                    '  File "/srv/secret/model.py", line 3, in forward\\n'
                    "RuntimeError: boom"
                )
            else:
                out.append({"k": k})
        return out

    def make_odd():
        return ModelRunner(odd, name="odd", version="v1")
    """
)


def vector(seed: int | None = None) -> list[float]:
    """A distinct 784-float input (float32-exact values, so JSON round trips are exact)."""
    rng = np.random.default_rng(next(_seed) if seed is None else seed)
    return rng.random(784, dtype=np.float32).tolist()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("serve")
    (workdir / "mymodels.py").write_text(FACTORY)
    proc = ServerProcess.infercache(
        "--model", "mlp=demo",
        "--model", "sum=mymodels:make",
        "--model", "odd=mymodels:make_odd",
        "--admin-token", ADMIN,
        "--sql-url", f"sqlite:///{workdir / 'l3.db'}",
        "--max-inputs", "8",
        "--max-body-bytes", "200000",
        cwd=workdir,
        env={"PYTHONPATH": str(workdir)},
    )  # fmt: skip
    with proc:
        yield proc


@pytest.fixture
async def http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        yield client


def direct_mlp(x: list[float]) -> np.ndarray:
    """The demo model computed in this process, without the server."""
    from infercache.models.demo import demo_mlp

    runner = demo_mlp()
    return np.asarray(runner.predict_batch([np.asarray(x, dtype=np.float32)])[0])


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    err: dict[str, Any] = body["error"]
    return err


# --------------------------------------------------------------------------- predictions


async def test_models_lists_every_model(http: httpx.AsyncClient) -> None:
    resp = await http.get("/v1/models")
    assert resp.status_code == 200
    models = {m["name"]: m for m in resp.json()["models"]}
    assert set(models) == {"mlp", "sum", "odd"}
    assert models["sum"]["version"] == "v1"
    assert models["mlp"]["version"]
    assert models["mlp"]["input_spec"]
    assert models["mlp"]["onnx"] == "on"  # serve runs torch models on ONNX Runtime
    assert models["mlp"]["jit"] == "off: running on onnxruntime"
    one = await http.get("/v1/models/mlp")
    assert one.json()["name"] == "mlp"


async def test_prediction_equals_direct_model_output(http: httpx.AsyncClient) -> None:
    x = vector()
    resp = await http.post("/v1/models/mlp/predict", json={"input": x})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "mlp" and body["cached"] is False and body["tier"] is None
    from infercache.models.demo import demo_mlp

    assert body["model_version"] == demo_mlp().version
    np.testing.assert_allclose(np.asarray(body["output"]), direct_mlp(x), rtol=1e-5, atol=1e-6)


async def test_second_identical_request_is_cached(http: httpx.AsyncClient) -> None:
    x = vector()
    first = await http.post("/v1/models/mlp/predict", json={"input": x})
    second = await http.post("/v1/models/mlp/predict", json={"input": x})
    assert first.json()["cached"] is False
    assert second.json()["cached"] is True and second.json()["tier"] == "l1"
    assert second.json()["output"] == first.json()["output"]
    timing = second.headers["server-timing"]
    assert "decode;dur=" in timing and "cache;dur=" in timing


async def test_ints_and_floats_share_one_cache_entry(http: httpx.AsyncClient) -> None:
    """The input is converted to the model's spec (float32) before the key is computed."""
    first = await http.post("/v1/models/mlp/predict", json={"input": [3] * 784})
    resp = await http.post("/v1/models/mlp/predict", json={"input": [3.0] * 784})
    assert first.json()["cached"] is False and resp.json()["cached"] is True


async def test_factory_model_without_spec(http: httpx.AsyncClient) -> None:
    resp = await http.post("/v1/models/sum/predict", json={"input": [1.5, 2.5, 4]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"] == [8.0] and resp.json()["model_version"] == "v1"


async def test_batch_inputs(http: httpx.AsyncClient) -> None:
    a, b = vector(), vector()
    resp = await http.post("/v1/models/mlp/predict", json={"inputs": [a, b, a]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["outputs"]) == 3 and len(body["cached"]) == 3 and len(body["tier"]) == 3
    assert body["outputs"][0] == body["outputs"][2]
    np.testing.assert_allclose(body["outputs"][1], direct_mlp(b), rtol=1e-5, atol=1e-6)
    single = await http.post("/v1/models/mlp/predict", json={"input": b})
    assert single.json()["cached"] is True


async def test_use_cache_false_recomputes(http: httpx.AsyncClient) -> None:
    x = vector()
    await http.post("/v1/models/mlp/predict", json={"input": x})
    resp = await http.post("/v1/models/mlp/predict", json={"input": x, "use_cache": False})
    assert resp.json()["cached"] is False


async def test_concurrent_requests_all_answered(http: httpx.AsyncClient) -> None:
    xs = [vector() for _ in range(40)]
    resps = await asyncio.gather(
        *(http.post("/v1/models/mlp/predict", json={"input": x}) for x in xs + xs[:10])
    )
    assert all(r.status_code == 200 for r in resps)
    for x, r in zip(xs[:3], resps[:3], strict=True):
        np.testing.assert_allclose(r.json()["output"], direct_mlp(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- bad input


BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("malformed json", b'{"input": [1, 2', 400, "invalid_json"),
    ("empty body", b"", 400, "invalid_json"),
    ("not utf-8", b"\xff\xfe{", 400, "invalid_json"),
    ("NaN literal", b'{"input": [NaN]}', 400, "invalid_json"),
    ("array body", b"[1, 2, 3]", 422, "invalid_request"),
    ("string body", b'"hello"', 422, "invalid_request"),
    ("missing field", b"{}", 422, "invalid_request"),
    ("unknown field", b'{"input": [1], "extra": 1}', 422, "invalid_request"),
    ("both fields", b'{"input": [1], "inputs": [[1]]}', 422, "invalid_request"),
    ("use_cache not bool", b'{"input": [1], "use_cache": "yes"}', 422, "invalid_request"),
    ("inputs not a list", b'{"inputs": 5}', 422, "invalid_request"),
    ("inputs empty", b'{"inputs": []}', 422, "invalid_request"),
    ("input a string", b'{"input": "abc"}', 422, "invalid_input"),
    ("input null", b'{"input": null}', 422, "invalid_input"),
    ("input an object", b'{"input": {"a": 1}}', 422, "invalid_input"),
    ("wrong shape", b'{"input": [1, 2, 3]}', 422, "invalid_input"),
    ("ragged", b'{"input": [[1, 2], [3]]}', 422, "invalid_input"),
    ("strings inside", b'{"input": [' + b'"a",' * 783 + b'"a"]}', 422, "invalid_input"),
    ("overflow", b'{"input": [' + b"1e39," * 783 + b"1e39]}", 422, "invalid_input"),
    ("huge int", b'{"input": [' + b"1" * 400 + b"]}", 400, "invalid_json"),
    ("one bad item in inputs", b'{"inputs": [[1, 2]]}', 422, "invalid_input"),
]


@pytest.mark.parametrize(
    ("label", "body", "status", "code"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
async def test_bad_input_gets_a_json_4xx(
    http: httpx.AsyncClient, label: str, body: bytes, status: int, code: str
) -> None:
    resp = await http.post(
        "/v1/models/mlp/predict", content=body, headers={"content-type": "application/json"}
    )
    assert_error(resp, status, code)


async def test_a_compressed_body_is_refused_by_name(http: httpx.AsyncClient) -> None:
    """A gzip body used to be read as JSON and refused as "not valid UTF-8": the wrong problem."""
    import gzip

    body = gzip.compress(b'{"input": [1.0]}')
    for encoding in ("gzip", "br, gzip"):
        headers = {"content-type": "application/json", "content-encoding": encoding}
        resp = await http.post("/v1/models/mlp/predict", content=body, headers=headers)
        assert_error(resp, 415, "unsupported_encoding")
        assert "uncompressed" in resp.json()["error"]["message"]
    ok = {"content-type": "application/json", "content-encoding": "identity"}
    resp = await http.post("/v1/models/mlp/predict", json={"input": vector()}, headers=ok)
    assert resp.status_code == 200


async def test_deeply_nested_input_to_a_model_without_spec_is_422(
    http: httpx.AsyncClient,
) -> None:
    """The key of a spec-less model's input is computed from the JSON as sent: nesting past the
    fingerprint's limit was a ValueError nothing caught, so a 500."""
    deep = b'{"input": ' + b"[" * 130 + b"]" * 130 + b"}"
    headers = {"content-type": "application/json"}
    r = await http.post("/v1/models/sum/predict", content=deep, headers=headers)
    assert "nested deeper" in assert_error(r, 422, "invalid_input")["message"]
    body = b'{"model": "sum", "input": ' + b"[" * 130 + b"]" * 130 + b"}"
    auth = {"Authorization": f"Bearer {ADMIN}", **headers}
    r = await http.post("/v1/cache/invalidate", content=body, headers=auth)
    assert_error(r, 422, "invalid_input")


async def test_too_many_inputs(http: httpx.AsyncClient) -> None:
    resp = await http.post("/v1/models/mlp/predict", json={"inputs": [vector(1)] * 9})
    assert_error(resp, 422, "invalid_input")


async def test_body_too_large(http: httpx.AsyncClient) -> None:
    resp = await http.post(
        "/v1/models/mlp/predict", content=b'{"input": [' + b"0.5," * 60_000 + b"0.5]}"
    )
    assert_error(resp, 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b" " * 4096

    resp = await http.post("/v1/models/mlp/predict", content=chunks())
    assert_error(resp, 413, "payload_too_large")


async def test_unknown_model_route_and_method(http: httpx.AsyncClient) -> None:
    # a trailing slash is a wrong URL: a JSON 404, not an empty 307 to follow
    assert_error(await http.post("/v1/models/mlp/predict/", json={"input": [1]}), 404, "not_found")
    assert_error(await http.post("/v1/models/nope/predict", json={"input": [1]}), 404,
                 "model_not_found")  # fmt: skip
    assert_error(await http.get("/v1/models/nope"), 404, "model_not_found")
    assert_error(await http.get("/v1/nothing-here"), 404, "not_found")
    assert_error(await http.get("/v1/models/mlp/predict"), 405, "method_not_allowed")


# --------------------------------------------------------------------------- admin


async def test_admin_requires_the_token(http: httpx.AsyncClient) -> None:
    err = assert_error(await http.get("/v1/cache/stats"), 401, "unauthorized")
    assert "token" in err["message"]
    wrong = {"Authorization": "Bearer not-the-token"}
    assert_error(await http.get("/v1/cache/stats", headers=wrong), 401, "unauthorized")
    basic = {"Authorization": f"Basic {ADMIN}"}
    assert_error(await http.get("/v1/cache/stats", headers=basic), 401, "unauthorized")
    assert_error(
        await http.post("/v1/cache/invalidate", json={"all": True}, headers=wrong),
        401,
        "unauthorized",
    )


async def test_admin_stats(http: httpx.AsyncClient) -> None:
    await http.post("/v1/models/mlp/predict", json={"input": vector()})
    resp = await http.get("/v1/cache/stats", headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 200
    stats = resp.json()
    assert set(stats["models"]) == {"mlp", "sum", "odd"}
    assert stats["models"]["mlp"]["batcher"]["items"] >= 1
    assert "l1" in stats["cache"]["tiers"]


async def test_invalidate_by_input_model_key_and_all(http: httpx.AsyncClient) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}

    async def cached(x: list[float]) -> bool:
        r = await http.post("/v1/models/mlp/predict", json={"input": x})
        assert r.status_code == 200
        return bool(r.json()["cached"])

    x, y = vector(), vector()
    assert not await cached(x) and await cached(x)
    assert not await cached(y) and await cached(y)
    r = await http.post("/v1/cache/invalidate", json={"model": "mlp", "input": x}, headers=auth)
    assert r.status_code == 200, r.text
    assert not await cached(x)  # recomputed
    assert await cached(y)  # untouched

    r = await http.post("/v1/cache/invalidate", json={"model": "mlp"}, headers=auth)
    assert r.status_code == 200, r.text
    assert not await cached(y)

    key = r.json().get("key")
    assert key is None
    r = await http.post("/v1/cache/invalidate", json={"all": True}, headers=auth)
    assert r.status_code == 200, r.text
    assert not await cached(x) and not await cached(y)

    for body in ({}, {"all": True, "model": "mlp"}, {"version": "v1"}, {"bogus": 1},
                 {"model": 5}, {"all": "yes"}, {"input": [1]}):  # fmt: skip
        r = await http.post("/v1/cache/invalidate", json=body, headers=auth)
        assert_error(r, 422, "invalid_request")  # the body's shape: not an invalid_input
    r = await http.post("/v1/cache/invalidate", json={"model": "nope"}, headers=auth)
    assert_error(r, 404, "model_not_found")
    # an input's key is built with the served version: another version is refused, not ignored
    body = {"model": "sum", "version": "v0", "input": [1.0]}
    r = await http.post("/v1/cache/invalidate", json=body, headers=auth)
    assert "served version 'v1'" in assert_error(r, 422, "invalid_input")["message"]
    body["version"] = "v1"
    r = await http.post("/v1/cache/invalidate", json=body, headers=auth)
    assert r.status_code == 200 and r.json()["invalidated"] == "input"
    r = await http.post("/v1/cache/invalidate", content=b"{", headers=auth)
    assert_error(r, 400, "invalid_json")


# --------------------------------------------------------------------------- health, metrics, docs


async def test_health_and_readiness(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["warmed_up"] is True
    assert all(v == "ok" for v in ready.json()["tiers"].values())


async def test_metrics(http: httpx.AsyncClient) -> None:
    x = vector()
    await http.post("/v1/models/mlp/predict", json={"input": x})
    await http.post("/v1/models/mlp/predict", json={"input": x})
    text = (await http.get("/metrics")).text
    assert 'infercache_http_requests_total{route="/v1/models/{name}/predict",status="200"}' in text
    assert 'infercache_predictions_total{model="mlp",tier="l1"}' in text
    assert 'infercache_stage_duration_seconds_bucket{le="0.0001",stage="compute"}' in text
    assert 'infercache_batch_size_bucket{le="1.0",model="mlp"}' in text or (
        'infercache_batch_size_bucket{le="1",model="mlp"}' in text
    )
    assert 'infercache_queue_depth{model="mlp"}' in text
    # the tiers below L1 and the write-behind queue, without a round trip to them
    assert 'infercache_tier_up{tier="sqlite"} 1.0' in text
    assert 'infercache_tier_errors_total{tier="sqlite"} 0.0' in text
    assert 'infercache_tier_misses_total{tier="sqlite"}' in text
    assert "infercache_write_behind_queue_depth " in text
    assert "infercache_write_behind_retrying 0.0" in text


async def test_error_metrics_count_stable_codes(http: httpx.AsyncClient) -> None:
    """``infercache_errors_total{code}`` is labelled with the codes clients see, never with
    bare HTTP statuses, on the fast predict path and on every other route alike."""
    await http.post("/v1/models/mlp/predict", json={"input": [1.0]})  # fast path
    await http.post("/v1/models/mlp/predict", json={"input": [1.0], "x": 1})  # FastAPI route
    await http.get("/no/such/route")
    await http.get("/v1/cache/stats")  # no token
    text = (await http.get("/metrics")).text
    for code in ("invalid_input", "invalid_request", "not_found", "unauthorized"):
        assert f'infercache_errors_total{{code="{code}"}}' in text, code
    assert not re.search(r'infercache_errors_total\{code="\d+"\}', text)


async def test_odd_model_outputs_are_answered_and_never_block_the_l3(
    http: httpx.AsyncClient,
) -> None:
    ok = await http.post("/v1/models/odd/predict", json={"input": [0]})
    assert ok.status_code == 200 and ok.json()["output"] == {"at": "2024-01-01T00:00:00", "k": 0}
    again = await http.post("/v1/models/odd/predict", json={"input": [0]})
    assert again.json()["cached"] is True  # from L1: the SQLite L3 cannot hold a datetime
    # JSON cannot carry an int beyond 64 bits: the model's fault, said so, not internal_error
    err = assert_error(await http.post("/v1/models/odd/predict", json={"input": [1]}), 500,
                       "model_error")  # fmt: skip
    assert "cannot be encoded as JSON" in err["message"]
    # an interpreter's traceback stays in the server's log
    err = assert_error(await http.post("/v1/models/odd/predict", json={"input": [2]}), 500,
                       "model_error")  # fmt: skip
    assert "/srv/secret" not in err["message"] and "\n" not in err["message"]
    assert err["message"].endswith("RuntimeError: boom")
    # the unencodable value was dropped from the L3's queue, and later writes still land there
    for k in range(10, 20):
        await http.post("/v1/models/odd/predict", json={"input": [k]})

    async def flushed() -> bool:
        text = (await http.get("/metrics")).text
        # one value, the datetime: 2**70 is stored (the codec's big-int extension)
        return "infercache_write_behind_unencodable_total 1.0" in text and (
            "infercache_write_behind_queue_depth 0.0" in text
        )

    for _ in range(100):
        if await flushed():
            break
        await asyncio.sleep(0.1)
    text = (await http.get("/metrics")).text
    assert "infercache_write_behind_unencodable_total 1.0" in text
    assert "infercache_write_behind_retrying 0.0" in text
    assert 'infercache_tier_errors_total{tier="sqlite"} 0.0' in text


async def test_dashboard_and_docs(http: httpx.AsyncClient) -> None:
    page = await http.get("/dashboard")
    assert page.status_code == 200 and "<canvas" in page.text
    data = (await http.get("/dashboard/data")).json()
    assert data["ready"] is True and data["predictions"] >= 0 and "mlp" in data["models"]
    assert data["tiers"]["sqlite"]["state"] == "closed" and data["write_behind_queue"] >= 0
    assert 'id="health"' in page.text
    assert (await http.get("/docs")).status_code == 200
    schema = (await http.get("/openapi.json")).json()
    assert "/v1/models/{name}/predict" in schema["paths"]
    assert (await http.get("/")).json()["models"] == ["mlp", "sum", "odd"]
    # FastAPI's own routes are labelled by their path, not "unmatched" (found in review); an
    # unknown URL still is, so that no client can add a label per URL it makes up
    await http.get("/no/such/page")
    text = (await http.get("/metrics")).text
    for route in ("/docs", "/openapi.json"):
        assert f'infercache_http_requests_total{{route="{route}",status="200"}}' in text
    assert 'infercache_http_requests_total{route="unmatched",status="404"}' in text
    assert "/no/such/page" not in text


async def test_a_tier_that_does_not_answer_is_named_at_start(tmp_path: Path) -> None:
    """A Redis that is not there, with --no-require-tiers: the server serves without it (degraded
    by design), and says so in its log at start instead of only at shutdown."""
    from infercache.bench.process import free_port

    redis_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    args = ("--redis-url", redis_url, "--sql-url", "none", "--no-require-tiers")
    with ServerProcess.infercache(*args, cwd=tmp_path) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            ready = (await client.get("/readyz")).json()
            assert ready["tiers"]["redis"] != "ok"
            body = (await client.post("/v1/models/mlp/predict", json={"input": vector()})).json()
            assert body["cached"] is False and len(body["output"]) == 10
            # and /metrics shows it: the breaker open after the failed calls, errors counted
            metrics = (await client.get("/metrics")).text
            assert 'infercache_tier_up{tier="redis"} 0.0' in metrics
            errors = re.search(r'infercache_tier_errors_total\{tier="redis"\} (\S+)', metrics)
            assert errors is not None and float(errors.group(1)) >= 1
            # past its recovery time (1 s) the circuit stays open and down, Redis probed in the
            # background: half open said 1 there, so an `infercache_tier_up == 0` alert flapped
            # or never fired (found in review)
            await asyncio.sleep(1.5)
            tiers = (await client.get("/dashboard/data")).json()["tiers"]
            assert tiers["redis"]["state"] == "open"
            metrics = (await client.get("/metrics")).text
            assert 'infercache_tier_up{tier="redis"} 0.0' in metrics
        await wait_for_log(srv, "cache tier redis does not answer")
        # our log lines carry time, level, process and logger (they were bare text, WARNING+)
        line = next(x for x in srv.log().splitlines() if "cache tier redis does not answer" in x)
        assert re.search(r"\d\d:\d\d:\d\d,\d+ WARNING \[pid \d+\] infercache\.", line), line


async def wait_for_log(srv: ServerProcess, text: str) -> None:
    for _ in range(100):
        if text in srv.log():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not in the server log:\n{srv.log()[-2000:]}")


async def test_l3_survives_a_restart(tmp_path: Path) -> None:
    """A prediction computed by one server process is served from SQLite by the next one."""
    db = f"sqlite:///{tmp_path / 'persist.db'}"
    x = vector()
    for expect_cached in (False, True):
        with ServerProcess.infercache("--sql-url", db, "--no-warmup", cwd=tmp_path) as srv:
            async with httpx.AsyncClient(base_url=srv.url) as client:
                body = (await client.post("/v1/models/mlp/predict", json={"input": x})).json()
        assert body["cached"] is expect_cached
        if expect_cached:
            assert body["tier"] == "sqlite"
