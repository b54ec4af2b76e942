"""A server with tight limits: overload (503 + Retry-After), predict token, admin disabled,
and connections slow to send their headers."""

from __future__ import annotations

import asyncio
import json
import socket
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from infercache.bench.process import ServerProcess
from infercache.client import InfercacheClient, ServerError

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
        "--max-inputs", "2",  # no more than the queue holds (a start-up check)
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


async def test_the_client_reports_a_refused_websocket(server: ServerProcess) -> None:
    async with InfercacheClient(server.url) as anon:
        with pytest.raises(ServerError) as err:
            await anon.predict("slow", [1.0], transport="ws")
        assert err.value.code == "unauthorized" and err.value.status == 403
    async with InfercacheClient(server.url, token=TOKEN) as client:
        answer = await client.predict("slow", [1.0], transport="ws")
        assert answer["output"] == [1.0]


async def test_admin_is_disabled_without_a_token(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/cache/stats")
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


async def test_small_body_limit(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/models/slow/predict", json={"input": [0.5] * 2000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_bench_takes_the_api_token(
    server: ServerProcess, transport: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`infercache bench` against a server with --api-token got 401 on every request: it had
    no way to send one (found in review)."""
    from infercache.cli import main

    # --dim 4: the body limit here is 4 KiB
    argv = ["bench", "--url", server.url, "--model", "slow", "--transport", transport,
            "--mode", "closed", "--concurrency", "1", "--duration", "0.3",
            "--warmup", "0", "--dim", "4"]  # fmt: skip
    assert main([*argv, "--token", TOKEN, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] > 0
    capsys.readouterr()
    assert main(argv) != 0  # without it: refused, and said so, with what to do
    err = capsys.readouterr().err
    assert "(the server wants its --api-token: pass it as --token)" in err, err
    assert main([*argv, "--token", "not-the-token"]) != 0
    assert "(is --token the server's --api-token?)" in capsys.readouterr().err


async def test_health_answers_head_too(server: ServerProcess) -> None:
    """Load balancers' health checks may use HEAD: it was 405 (found in review)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for path in ("/healthz", "/readyz"):
            r = await client.head(path)
            assert r.status_code == 200 and r.content == b"", path


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v1/models/slow/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/models/slow/predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n",
    ],
)
def test_a_request_http_cannot_parse_gets_a_json_error(server: ServerProcess, head: bytes) -> None:
    """uvicorn answered these "400 text/plain Invalid HTTP request received." (found in review);
    every error is JSON with a code."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    status, _, rest = raw.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status == b"HTTP/1.1 400 Bad Request"
    assert b"content-type: application/json" in headers.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and error["message"].startswith("malformed HTTP request")


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (reads until EOF or the timeout)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        return True


async def test_connections_slow_to_send_headers_are_closed(tmp_path: Path) -> None:
    """uvicorn held a connection that sent nothing, or half a request's headers, open for ever
    (slowloris). With --header-timeout 1 both are closed; a request that arrives in time, and
    a kept-alive connection idle between requests (uvicorn's own 5 s), are served as before."""
    args = ("--sql-url", "none", "--header-timeout", "1", "--request-timeout", "2",
            "--no-warmup")  # fmt: skip
    with ServerProcess.infercache(*args, cwd=tmp_path) as srv:
        silent = socket.create_connection(("127.0.0.1", srv.port))
        partial = socket.create_connection(("127.0.0.1", srv.port))
        partial.sendall(b"POST /v1/models/mlp/predict HTTP/1.1\r\nHost: x\r\n")
        # headers in time, then a body that never completes: closed request_timeout_s later
        slow_body = socket.create_connection(("127.0.0.1", srv.port))
        slow_body.sendall(
            b"POST /v1/models/mlp/predict HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"input": ['
        )
        try:
            assert await asyncio.to_thread(_closed_within, silent, 8.0)
            assert await asyncio.to_thread(_closed_within, partial, 8.0)
            assert await asyncio.to_thread(_closed_within, slow_body, 10.0)
        finally:
            silent.close()
            partial.close()
            slow_body.close()
        async with httpx.AsyncClient(base_url=srv.url) as client:
            for _ in range(2):  # the same kept-alive connection, idle past the header timeout
                resp = await client.get("/healthz")
                assert resp.status_code == 200
                await asyncio.sleep(1.5)


async def test_keep_alive_sets_how_long_an_idle_connection_stays_open(tmp_path: Path) -> None:
    """uvicorn closes a kept-alive connection idle for 5 s. A load balancer that keeps its own
    idle connections longer (60 s is common) reuses one the server is closing and answers that
    request 502, so the setting must be raisable; here it is lowered to see it act."""
    args = ("--sql-url", "none", "--keep-alive", "0.5", "--no-warmup")
    with ServerProcess.infercache(*args, cwd=tmp_path) as srv:
        conn = socket.create_connection(("127.0.0.1", srv.port))
        try:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            conn.settimeout(5)
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
            # idle from here: closed after ~0.5 s (uvicorn's default would keep it for 5 s)
            assert await asyncio.to_thread(_closed_within, conn, 3.0)
        finally:
            conn.close()
