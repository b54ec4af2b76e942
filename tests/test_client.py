"""``infercache.client.InfercacheClient`` against the real server (HTTP and WebSocket)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest

from infercache.bench.process import ServerProcess, free_port
from infercache.client import ClientTimeout, InfercacheClient, ServerError, ServerUnreachable
from infercache.errors import EncodeError, InfercacheError

ADMIN = "client-admin-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("client")
    with ServerProcess.infercache("--admin-token", ADMIN, "--sql-url", "none", cwd=workdir) as p:
        yield p


def vec(i: int) -> list[float]:
    return np.random.default_rng(9000 + i).random(784, dtype=np.float32).tolist()


async def test_http_and_ws_predictions_agree(server: ServerProcess) -> None:
    async with InfercacheClient(server.url) as client:
        assert await client.health() and await client.ready()
        models = await client.models()
        assert [m["name"] for m in models] == ["mlp"]
        over_http = await client.predict("mlp", vec(1))
        over_ws = await client.predict("mlp", vec(1), transport="ws")
        assert over_http["cached"] is False and over_ws["cached"] is True
        assert over_ws["output"] == over_http["output"]
        many = await client.predict_many("mlp", [vec(2), vec(1)])
        assert many["cached"] == [False, True]


async def test_many_ws_requests_in_flight(server: ServerProcess) -> None:
    async with InfercacheClient(server.url) as client:
        xs = [vec(100 + i) for i in range(50)]
        answers = await asyncio.gather(*(client.predict("mlp", x, transport="ws") for x in xs))
        direct = await asyncio.gather(*(client.predict("mlp", x) for x in xs))
        for a, d in zip(answers, direct, strict=True):
            assert a["output"] == d["output"] and d["cached"] is True
        assert (await (await client.ws()).ping())["type"] == "pong"


async def test_errors_carry_codes(server: ServerProcess) -> None:
    async with InfercacheClient(server.url) as client:
        with pytest.raises(ServerError) as err:
            await client.predict("nope", [1.0])
        assert err.value.code == "model_not_found" and err.value.status == 404
        with pytest.raises(ServerError) as err:  # a model name is sent as one path segment
            await client.predict("a?b#c", [1.0])
        assert err.value.code == "model_not_found" and "a?b#c" in err.value.message
        with pytest.raises(ServerError) as err:
            await client.predict("mlp", [1.0, 2.0], transport="ws")
        assert err.value.code == "invalid_input" and err.value.status is None
        with pytest.raises(ServerError) as err:
            await client.stats(token="wrong-token")
        assert err.value.code == "unauthorized"
        with pytest.raises(ValueError):
            await client.predict("mlp", [1.0], transport="carrier-pigeon")


async def test_an_oversized_request_is_payload_too_large_on_both_transports(
    server: ServerProcess,
) -> None:
    """Over the WebSocket the server's payload_too_large error carried no id, so the caller waited
    for its timeout (30 s by default); now it gets the ServerError HTTP gives, at once."""
    big = [0.5] * 300_000  # 1.2 MB of JSON, over max_body_bytes (1 MiB)
    async with InfercacheClient(server.url, timeout=10) as client:
        with pytest.raises(ServerError) as err:
            await client.predict("mlp", big)
        assert (err.value.code, err.value.status) == ("payload_too_large", 413)
        started = time.monotonic()
        with pytest.raises(ServerError) as err:
            await client.predict("mlp", big, transport="ws")
        assert (err.value.code, err.value.status) == ("payload_too_large", None)
        assert time.monotonic() - started < 5  # answered, not timed out
        assert (await client.predict("mlp", vec(3), transport="ws"))["type"] == "prediction"


async def test_an_input_that_is_not_json_is_one_clear_error_on_both_transports(
    server: ServerProcess,
) -> None:
    """Over the WebSocket an input orjson cannot encode was reported as ServerUnreachable ('the
    WebSocket is closed'), over HTTP as a bare TypeError; both now raise EncodeError naming the
    type, before anything is sent, and the connection stays usable."""

    class Point:
        pass

    async with InfercacheClient(server.url, timeout=10) as client:
        for transport in ("http", "ws"):
            with pytest.raises(EncodeError, match=r"type 'object' as JSON") as err:
                await client.predict("mlp", object(), transport=transport)
            assert isinstance(err.value, TypeError) and isinstance(err.value, InfercacheError)
            with pytest.raises(EncodeError, match=r"test_client\..*Point'"):
                await client.predict("mlp", [Point()], transport=transport)
            with pytest.raises(EncodeError, match="Dict key must be str"):
                await client.predict("mlp", {1: 2}, transport=transport)
        ws = await client.ws()
        assert not ws._pending  # nothing left waiting for an answer that cannot come
        assert (await client.predict("mlp", vec(4), transport="ws"))["type"] == "prediction"


async def test_admin_calls_and_subscription(server: ServerProcess) -> None:
    async with InfercacheClient(server.url) as client:
        await client.predict("mlp", vec(7))
        stats = await client.stats(token=ADMIN)
        assert stats["models"]["mlp"]["batcher"]["items"] >= 1
        result = await client.invalidate(token=ADMIN, model="mlp", input=vec(7))
        assert result["invalidated"] == "input"
        assert (await client.predict("mlp", vec(7)))["cached"] is False
        assert (await client.invalidate(token=ADMIN, all=True))["invalidated"] == "all"

        sub = await client.connect_ws()
        try:
            assert (await sub.subscribe("t"))["type"] == "subscribed"
            r = await client._http.post(
                "/v1/topics/t/publish", json={"hello": 1},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )  # fmt: skip
            assert r.json()["delivered"] == 1
            events = sub.events()
            event = await asyncio.wait_for(anext(events), 10)
            assert event == {"type": "event", "topic": "t", "data": {"hello": 1}}
            await events.aclose()  # type: ignore[attr-defined]
        finally:
            await sub.close()


async def test_an_unreachable_server_is_one_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with InfercacheClient(url, timeout=5) as client:
        assert await client.health() is False and await client.ready() is False
        with pytest.raises(ServerUnreachable, match=f"cannot reach {url}"):
            await client.predict("mlp", [1.0])
        with pytest.raises(ServerUnreachable, match="cannot open a WebSocket"):
            await client.predict("mlp", [1.0], transport="ws")
        with pytest.raises(InfercacheError):  # one except covers the client's failures
            await client.stats(token=ADMIN)


async def _peer(handle: object) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)  # type: ignore[arg-type]
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_a_peer_that_is_not_infercache_gives_server_errors() -> None:
    """A proxy's HTML error page, or a 200 that is not JSON, is a ServerError naming the
    status, not a JSONDecodeError from deep inside the client."""
    answers = iter(
        [
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: 13\r\n"
            b"Retry-After: Wed, 21 Oct 2026 07:28:00 GMT\r\n\r\n<html></html>",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        ]
    )

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(next(answers))
        await writer.drain()
        writer.close()

    server, url = await _peer(answer)
    try:
        async with InfercacheClient(url, timeout=5) as client:
            with pytest.raises(ServerError) as err:
                await client.predict("mlp", [1.0])
            assert (err.value.code, err.value.status) == ("http_error", 502)
            assert err.value.message == "HTTP 502 Bad Gateway" and err.value.retry_after is None
            with pytest.raises(ServerError) as err:
                await client.predict("mlp", [1.0])
            assert (err.value.code, err.value.status) == ("bad_response", 200)
    finally:
        server.close()


async def test_a_server_that_never_answers_times_out() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, read, never answer

    server, url = await _peer(silent)
    try:
        async with InfercacheClient(url, timeout=0.3) as client:
            with pytest.raises(ClientTimeout, match=r"no answer within 0\.3 s"):
                await client.predict("mlp", [1.0])
            assert await client.health() is False
            with pytest.raises(ClientTimeout, match=r"no handshake within 0\.3 s"):
                await client.predict("mlp", [1.0], transport="ws")
    finally:
        for w in held:
            w.close()
        server.close()
