"""WebSocket ``/v1/ws`` against the real server: many in flight, ids, errors, broadcast, streams."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import socket
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect

from infercache.bench.process import ServerProcess

ADMIN = "ws-admin-token"
_seed = itertools.count(5000)

MODELS = textwrap.dedent(
    """
    import time
    import numpy as np
    from infercache.models import ModelRunner

    def slow(batch):
        time.sleep(0.3)
        return [np.asarray([float(np.sum(x))], dtype=np.float32) for x in batch]

    def make_slow():
        return ModelRunner(slow, name="slow", version="1")
    """
)


def vector() -> list[float]:
    return np.random.default_rng(next(_seed)).random(784, dtype=np.float32).tolist()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("ws")
    (workdir / "wsmodels.py").write_text(MODELS)
    proc = ServerProcess.infercache(
        "--model", "mlp=demo",
        "--model", "slow=wsmodels:make_slow",
        "--admin-token", ADMIN,
        "--sql-url", "none",
        "--ws-send-queue", "4",
        "--ws-max-inflight", "200",
        cwd=workdir,
        env={"PYTHONPATH": str(workdir)},
    )  # fmt: skip
    with proc:
        yield proc


@pytest.fixture
async def ws(server: ServerProcess) -> AsyncIterator[ClientConnection]:
    async with connect(server.url.replace("http", "ws") + "/v1/ws") as conn:
        yield conn


async def recv(conn: ClientConnection, wait: float = 10.0) -> dict[str, Any]:
    msg: dict[str, Any] = json.loads(await asyncio.wait_for(conn.recv(), wait))
    return msg


async def test_ping_pong(ws: ClientConnection) -> None:
    await ws.send(json.dumps({"type": "ping", "id": "p1"}))
    assert await recv(ws) == {"type": "pong", "id": "p1"}


async def test_many_in_flight_answered_by_id(ws: ClientConnection) -> None:
    xs = {i: vector() for i in range(60)}
    for i, x in xs.items():
        await ws.send(json.dumps({"type": "predict", "id": i, "model": "mlp", "input": x}))
    answers = [await recv(ws) for _ in xs]
    assert sorted(a["id"] for a in answers) == list(xs)
    assert all(a["type"] == "prediction" and a["cached"] is False for a in answers)
    from infercache.models.demo import demo_mlp

    runner = demo_mlp()
    for a in answers[:5]:
        want = runner.predict_batch([np.asarray(xs[a["id"]], dtype=np.float32)])[0]
        np.testing.assert_allclose(a["output"], np.asarray(want), rtol=1e-5, atol=1e-6)


async def test_answers_come_as_they_complete_out_of_order(ws: ClientConnection) -> None:
    await ws.send(json.dumps({"type": "predict", "id": "slow", "model": "slow", "input": [1.0]}))
    await ws.send(json.dumps({"type": "ping", "id": "fast-ping"}))
    x = vector()
    await ws.send(json.dumps({"type": "predict", "id": "fast", "model": "mlp", "input": x}))
    order = [(await recv(ws))["id"] for _ in range(3)]
    assert order[-1] == "slow", order  # the slow model's answer did not hold the others back
    assert set(order) == {"slow", "fast-ping", "fast"}


async def test_second_identical_request_is_cached_and_seed_message_names(
    ws: ClientConnection,
) -> None:
    x = vector()
    await ws.send(json.dumps({"type": "predict", "id": 1, "model": "mlp", "input": x}))
    first = await recv(ws)
    # the user's tutorial message: "type": "prediction", "model_id"
    await ws.send(json.dumps({"type": "prediction", "id": 2, "model_id": "mlp", "input": x}))
    second = await recv(ws)
    assert first["cached"] is False and second["cached"] is True and second["tier"] == "l1"
    assert second["output"] == first["output"]
    assert second["model_version"] == first["model_version"]


BAD: list[tuple[str | bytes, str]] = [
    ("{not json", "invalid_json"),
    (b"\xff\xfe", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ('{"type": "dance", "id": 7}', "unknown_type"),
    ('{"id": 8}', "unknown_type"),
    ('{"type": null, "id": 20}', "unknown_type"),
    ('{"type": ["ping"], "id": 21}', "unknown_type"),  # unhashable: once a TypeError
    ('{"type": "predict", "id": 9, "input": [1]}', "invalid_message"),
    ('{"type": "predict", "id": 10, "model": "mlp"}', "invalid_message"),
    ('{"type": "predict", "id": 11, "model": "nope", "input": [1]}', "model_not_found"),
    ('{"type": "predict", "id": 12, "model": "mlp", "input": [1, 2]}', "invalid_input"),
    ('{"type": "predict", "id": 13, "model": "mlp", "input": "x"}', "invalid_input"),
    ('{"type": "predict", "id": {"a": 1}, "model": "mlp", "input": [1]}', "invalid_message"),
    ('{"type": "ping", "id": ' + "9" * 40 + "}", "invalid_message"),  # too large an integer
    ('{"type": "predict", "id": 14, "model": "mlp", "input": [1], "use_cache": 1}',
     "invalid_message"),
    ('{"type": "subscribe", "id": 15}', "invalid_message"),
    # unknown fields are refused as over HTTP (same code), not silently ignored
    ('{"type": "predict", "id": 16, "model": "mlp", "input": [1], "extra": 1}',
     "invalid_request"),
    ('{"type": "predict", "id": 17, "model_id": "mlp", "input": [1], "use_cahce": false}',
     "invalid_request"),
    ('{"type": "subscribe", "id": 18, "topic": "a/b"}', "invalid_topic"),
    ('{"type": "subscribe", "id": 19, "topic": ""}', "invalid_topic"),
]  # fmt: skip


async def test_bad_messages_get_errors_and_the_connection_stays_open(
    ws: ClientConnection,
) -> None:
    for raw, code in BAD:
        await ws.send(raw)
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == code, (raw, err)
        assert isinstance(err["message"], str)
        try:
            sent = json.loads(raw)
        except ValueError:
            sent = None
        if isinstance(sent, dict) and isinstance(sent.get("id"), int):
            valid = abs(sent["id"]) < 2**53
            assert err["id"] == (sent["id"] if valid else None)
            if not valid:
                assert "below 2**53" in err["message"]
        if code == "unknown_type":  # says what is wrong, and what is expected
            missing = isinstance(sent, dict) and sent.get("type") is None
            assert ("no 'type'" in err["message"]) == missing, err
            assert "expected 'predict', 'ping'" in err["message"], err
    await ws.send(json.dumps({"type": "ping", "id": "still-open"}))
    assert (await recv(ws))["type"] == "pong"


async def test_unknown_fields_get_the_http_error_code_on_the_fast_path_too(
    server: ServerProcess, ws: ClientConnection
) -> None:
    """A predict message over 512 bytes is decoded by server.fastjson; an unknown field there is
    refused as on the orjson path and as over HTTP."""
    x = vector()
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.post("/v1/models/mlp/predict", json={"input": x, "extra": 1})
    assert r.status_code == 422
    http_code = r.json()["error"]["code"]
    message = {"type": "predict", "id": "big", "model": "mlp", "input": x, "extra": 1}
    assert len(json.dumps(message)) > 512
    await ws.send(json.dumps(message))
    err = await recv(ws)
    assert err["type"] == "error" and err["id"] == "big" and err["code"] == http_code, err
    assert "extra" in err["message"]
    del message["extra"]
    await ws.send(json.dumps(message))
    assert (await recv(ws))["type"] == "prediction"  # still open, and the same message works


async def _publish(
    url: str, topic: str, data: Any, *, status: int = 200, http: httpx.AsyncClient | None = None
) -> int:
    """POST to the publish route; pass ``http`` in loops (a new client costs ~0.1 s here)."""
    async with contextlib.AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=url))
        r = await http.post(
            f"/v1/topics/{topic}/publish",
            json=data,
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert r.status_code == status, r.text
        if status != 200:
            assert r.json()["error"]["code"] == "invalid_topic", r.text
            return 0
        delivered: int = r.json()["delivered"]
        return delivered


async def _metric(url: str, name: str) -> float:
    async with httpx.AsyncClient(base_url=url) as client:
        text = (await client.get("/metrics")).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found is not None, name
    return float(found.group(1))


async def test_subscribe_and_broadcast(server: ServerProcess, ws: ClientConnection) -> None:
    await ws.send(json.dumps({"type": "subscribe", "id": 1, "topic": "news"}))
    assert await recv(ws) == {"type": "subscribed", "id": 1, "topic": "news"}
    assert await _publish(server.url, "news", {"n": 1}) == 1
    assert await recv(ws) == {"type": "event", "topic": "news", "data": {"n": 1}}
    assert await _publish(server.url, "other", {"n": 2}) == 0
    await ws.send(json.dumps({"type": "unsubscribe", "id": 2, "topic": "news"}))
    assert (await recv(ws))["type"] == "unsubscribed"
    assert await _publish(server.url, "news", {"n": 3}) == 0


async def test_one_topic_rule_for_subscribe_and_publish(
    server: ServerProcess, ws: ClientConnection
) -> None:
    """A topic a client may subscribe to can be published to, and a name that breaks the rule is
    refused on both sides (subscribe once took "/" and 200 chars, publish could not reach "/" and
    took 300)."""
    longest = "t" * 200
    ok = ["news", "scores.v2", "user-42:feed_1", longest]
    bad = ["a/b", "a%2Fb", "t" * 201, "t" * 300, ".hidden", "with space", "ümlaut"]
    for i, topic in enumerate(ok):
        await ws.send(json.dumps({"type": "subscribe", "id": i, "topic": topic}))
        assert (await recv(ws))["type"] == "subscribed"
        assert await _publish(server.url, topic, {"i": i}) == 1
        assert await recv(ws) == {"type": "event", "topic": topic, "data": {"i": i}}
    for i, topic in enumerate(bad):
        await ws.send(json.dumps({"type": "subscribe", "id": i, "topic": topic}))
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == "invalid_topic", (topic, err)
        await _publish(server.url, topic, {"i": i}, status=422)


async def test_subscribing_again_at_the_topic_limit_is_idempotent(ws: ClientConnection) -> None:
    for i in range(64):
        await ws.send(json.dumps({"type": "subscribe", "id": i, "topic": f"limit-{i}"}))
        assert (await recv(ws))["type"] == "subscribed"
    await ws.send(json.dumps({"type": "subscribe", "id": "again", "topic": "limit-3"}))
    assert await recv(ws) == {"type": "subscribed", "id": "again", "topic": "limit-3"}
    await ws.send(json.dumps({"type": "subscribe", "id": "new", "topic": "limit-64"}))
    err = await recv(ws)
    assert err["type"] == "error" and err["code"] == "too_many_topics"


async def test_dashboard_shows_websocket_aggregates_not_topic_names(
    server: ServerProcess, ws: ClientConnection
) -> None:
    secret = "user-42-secret-session-abc123"
    await ws.send(json.dumps({"type": "subscribe", "id": 1, "topic": secret}))
    assert (await recv(ws))["type"] == "subscribed"
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.get("/dashboard/data")
    assert r.status_code == 200 and secret not in r.text
    counts = r.json()["websocket"]
    assert set(counts) == {"connections", "topics", "subscriptions"}
    assert counts["connections"] >= 1 and counts["topics"] >= 1 and counts["subscriptions"] >= 1


class ClosedByServer(ConnectionError):
    """A close frame arrived; ``code`` is its status code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"close frame {code}")
        self.code = code


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (text by default) of any length."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = np.resize(np.frombuffer(mask, dtype=np.uint8), n)
    return head + mask + (np.frombuffer(payload, dtype=np.uint8) ^ key).tobytes()


class RawWS:
    """A minimal blocking WebSocket client that reads only when told to: a truly slow consumer
    (library clients keep reading into their own buffers). Tiny receive buffer on purpose."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        self.sock.settimeout(30.0)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, obj: Any) -> None:
        self.sock.sendall(frame(json.dumps(obj).encode()))

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> dict[str, Any]:
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._read(2), "big")
        elif n == 127:
            n = int.from_bytes(self._read(8), "big")
        data = self._read(n)
        if b0 & 0x0F == 0x8:
            raise ClosedByServer(int.from_bytes(data[:2], "big"))
        msg: dict[str, Any] = json.loads(data)
        return msg

    def close(self) -> None:
        self.sock.close()


async def test_slow_subscriber_drops_oldest_and_does_not_stall_others(
    server: ServerProcess,
) -> None:
    ws_url = server.url.replace("http", "ws") + "/v1/ws"
    blob = "x" * 100_000
    n = 80  # 8 MB: about twice what the kernel buffers for a connection that does not read
    dropped_before = await _metric(server.url, "infercache_ws_dropped_total")
    disconnects_before = await _metric(server.url, "infercache_ws_slow_disconnects_total")
    slow = await asyncio.to_thread(RawWS, server.port)
    try:
        slow.send({"type": "subscribe", "id": 0, "topic": "firehose"})
        assert (await asyncio.to_thread(slow.recv))["type"] == "subscribed"
        async with connect(ws_url) as fast:
            await fast.send(json.dumps({"type": "subscribe", "id": 0, "topic": "firehose"}))
            assert (await recv(fast))["type"] == "subscribed"
            fast_events: list[int] = []

            async def read_fast() -> None:
                while len(fast_events) < n:
                    msg = await recv(fast)
                    if msg["type"] == "event":
                        fast_events.append(msg["data"]["i"])

            reader = asyncio.create_task(read_fast())
            async with httpx.AsyncClient(base_url=server.url) as http:
                for i in range(n):  # the slow client reads nothing meanwhile
                    await _publish(server.url, "firehose", {"i": i, "blob": blob}, http=http)
            await asyncio.wait_for(reader, 30)
            assert fast_events == list(range(n))  # the fast one got everything, in order

        got: list[int] = []
        dropped = 0
        slow.sock.settimeout(2.0)
        while len(got) + dropped < n:
            msg = await asyncio.to_thread(slow.recv)
            if msg["type"] == "dropped":
                dropped += msg["count"]
            elif msg["type"] == "event":
                got.append(msg["data"]["i"])
        assert dropped > 0
        assert len(got) + dropped == n
        assert got == sorted(got) and got[-1] == n - 1  # oldest dropped, newest kept
        # the counter counts dropped events (what the client was told), nobody is disconnected
        dropped_after = await _metric(server.url, "infercache_ws_dropped_total")
        assert dropped_after - dropped_before == dropped
        disconnects = await _metric(server.url, "infercache_ws_slow_disconnects_total")
        assert disconnects == disconnects_before
    finally:
        slow.close()


@pytest.fixture(scope="module")
def disconnect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess.infercache(
        "--admin-token", ADMIN,
        "--sql-url", "none",
        "--ws-send-queue", "4",
        "--ws-slow-consumer", "disconnect",
        cwd=tmp_path_factory.mktemp("ws-disconnect"),
    )  # fmt: skip
    with proc:
        yield proc


async def _wait_metric(url: str, name: str, want: float, within: float = 10.0) -> float:
    deadline = time.monotonic() + within
    value = await _metric(url, name)
    while value != want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        value = await _metric(url, name)
    return value


def _drain(raw: RawWS) -> tuple[int, int | None]:
    """Read until the server ends the connection: (events read, close code or None)."""
    events = 0
    while True:
        try:
            msg = raw.recv()
        except ClosedByServer as closed:
            return events, closed.code
        except TimeoutError:
            raise AssertionError(f"still open after {events} events") from None
        except OSError:  # EOF or reset: the transport was aborted
            return events, None
        assert msg["type"] == "event", msg
        events += 1


async def test_disconnect_policy_closes_a_stalled_consumer_promptly(
    disconnect_server: ServerProcess,
) -> None:
    """The writer of a client that never reads is blocked in a send, so it never saw the
    overflow flag: the connection stayed open for ever and every refused event counted as a
    disconnect. Now it is closed within the grace, counted once, and a reading subscriber of the
    same topic gets every event."""
    server = disconnect_server
    blob = "x" * 100_000
    n = 80  # 8 MB, twice what the kernel buffers for a client that does not read
    slow = await asyncio.to_thread(RawWS, server.port)
    try:
        slow.send({"type": "subscribe", "id": 0, "topic": "firehose"})
        assert (await asyncio.to_thread(slow.recv))["type"] == "subscribed"
        async with connect(server.url.replace("http", "ws") + "/v1/ws") as fast:
            await fast.send(json.dumps({"type": "subscribe", "id": 0, "topic": "firehose"}))
            assert (await recv(fast))["type"] == "subscribed"
            fast_events: list[int] = []

            async def read_fast() -> None:
                while len(fast_events) < n:
                    fast_events.append((await recv(fast))["data"]["i"])

            reader = asyncio.create_task(read_fast())
            async with httpx.AsyncClient(base_url=server.url) as http:
                delivered = [
                    await _publish(server.url, "firehose", {"i": i, "blob": blob}, http=http)
                    for i in range(n)
                ]
            await asyncio.wait_for(reader, 30)
            assert fast_events == list(range(n))
            assert delivered[0] == 2 and delivered[-1] == 1, delivered  # the slow one was cut off
            assert await _wait_metric(server.url, "infercache_ws_connections", 1.0) == 1.0
            await asyncio.sleep(2 * 1.0)  # past the grace: nothing more is counted
            assert await _metric(server.url, "infercache_ws_slow_disconnects_total") == 1.0
        assert await _wait_metric(server.url, "infercache_ws_connections", 0.0) == 0.0
        slow.sock.settimeout(5.0)
        events, code = await asyncio.to_thread(_drain, slow)
        assert events < n and code in (None, 1008), (events, code)
    finally:
        slow.close()


async def test_disconnect_policy_sends_1008_to_a_consumer_that_reads_within_the_grace(
    disconnect_server: ServerProcess,
) -> None:
    """When the transport takes the close frame (the client catches up within the grace), the
    client reads its events and then a 1008 close, rather than a reset."""
    server = disconnect_server
    before = await _metric(server.url, "infercache_ws_slow_disconnects_total")
    blob = "x" * 100_000
    slow = await asyncio.to_thread(RawWS, server.port)
    try:
        slow.send({"type": "subscribe", "id": 0, "topic": "lagging"})
        assert (await asyncio.to_thread(slow.recv))["type"] == "subscribed"
        async with httpx.AsyncClient(base_url=server.url) as http:
            for i in range(200):
                if await _publish(server.url, "lagging", {"i": i, "blob": blob}, http=http) == 0:
                    break  # overflowed: the server now waits (up to 1 s) to send the close frame
            else:
                raise AssertionError("the queue never overflowed")
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        slow.sock.settimeout(5.0)
        events, code = await asyncio.to_thread(_drain, slow)
        assert code == 1008 and 0 < events <= i, (events, code)
        assert await _metric(server.url, "infercache_ws_slow_disconnects_total") == before + 1
    finally:
        slow.close()


async def _ws_stats(url: str) -> dict[str, Any]:
    """The admin stats' ``websocket`` part (one worker: every connection of the server)."""
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.get("/v1/cache/stats", headers={"Authorization": f"Bearer {ADMIN}"})
    r.raise_for_status()
    stats: dict[str, Any] = r.json()["websocket"]
    return stats


async def _wait_connections(url: str, want: int, within: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    stats = await _ws_stats(url)
    while stats["connections"] != want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        stats = await _ws_stats(url)
    return stats


def _rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (Linux), None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _flood(raw: RawWS, frames: bytes, *, within: float) -> bool:
    """Send ``frames`` over and over, reading nothing, until the kernel takes nothing more for a
    second (the server stopped reading and the buffers between are full), or ``within`` seconds
    pass; whether it stopped."""
    raw.sock.settimeout(0.1)
    view = memoryview(frames)
    sent = 0
    deadline = time.monotonic() + within
    progress = time.monotonic()
    while time.monotonic() < deadline:
        try:
            sent += raw.sock.send(view[sent % len(frames) :])
            progress = time.monotonic()
        except TimeoutError:
            if time.monotonic() - progress > 1.0:
                return True
    return False


async def test_a_client_that_sends_but_never_reads_is_held_to_ws_max_inflight(
    server: ServerProcess,
) -> None:
    """A client that sent pings and predictions without reading grew the server's memory without
    limit (3 GB in 20 s): a prediction gave back its in-flight place when it finished, not when its
    answer was written, and pongs and errors had no limit at all. Now every answer holds a place
    until it is written, the reader stops reading when ws_max_inflight are owed, and TCP flow
    control stops the client; the server keeps serving everyone else, and the connection's end
    frees it."""
    limit = 200  # the fixture's --ws-max-inflight
    assert (await _wait_connections(server.url, 0))["connections"] == 0
    assert server.proc is not None
    rss_before = _rss_mb(server.proc.pid)
    x = vector()
    pings = b"".join(frame(json.dumps({"type": "ping", "id": i}).encode()) for i in range(500))
    predict = json.dumps({"type": "predict", "id": "p", "model": "mlp", "input": x}).encode()
    raw = await asyncio.to_thread(RawWS, server.port)  # 8 KiB receive buffer, never read
    try:
        frames = pings + frame(predict) + frame(b"{bad")
        stopped = await asyncio.to_thread(_flood, raw, frames, within=15.0)
        rss_after = _rss_mb(server.proc.pid)
        async with connect(server.url.replace("http", "ws") + "/v1/ws") as other:
            started = time.monotonic()
            await other.send(json.dumps({"type": "predict", "id": 1, "model": "mlp", "input": x}))
            answer = await recv(other)
            assert answer["type"] == "prediction" and answer["cached"] is True, answer
            # served while the flooding client is held, not after it: a bound, not a timing
            # (generous for a loaded CI machine)
            assert time.monotonic() - started < 10.0
            stats = await _ws_stats(server.url)
        if rss_before is not None and rss_after is not None:  # unbounded: hundreds of MB here
            assert rss_after - rss_before < 100, (rss_before, rss_after)
        assert stopped  # the server stopped reading: TCP flow control holds the client back
        assert stats["connections"] == 2
        # the reader stopped with every place taken: answers owed are bounded, and so are bytes
        assert stats["unanswered_max"] == limit, stats
        assert stats["queued_bytes_max"] <= limit * 1024, stats
    finally:
        raw.close()
    # the handler, blocked waiting for a place, ends when the client goes away
    stats = await _wait_connections(server.url, 0)
    assert stats["connections"] == 0 and stats["unanswered"] == 0, stats


async def test_an_oversized_frame_gets_its_id_and_is_counted_in_bytes(
    server: ServerProcess, ws: ClientConnection
) -> None:
    """A frame over max_body_bytes (1 MiB here) is refused without being parsed; its id was lost,
    so a client could not match the error to its request. Now the id is read from the frame's
    start when it is the first field. The limit counts bytes (it counted characters: 600,000 "é"
    are 1.2 MB), for text and binary frames alike."""
    pad = "x" * (1 << 20)
    cases: list[tuple[str | bytes, Any]] = [
        (json.dumps({"id": "big-1", "type": "ping", "pad": pad}), "big-1"),
        (json.dumps({"id": 42, "type": "ping", "pad": pad}).encode(), 42),  # a binary frame
        ('  {  "id" : -7 , "type": "ping", "pad": "' + pad + '"}', -7),
        (json.dumps({"id": 'a"b\\é', "type": "ping", "pad": pad}), 'a"b\\é'),
        (json.dumps({"id": "é" * 256, "type": "ping", "pad": pad}), "é" * 256),
        (json.dumps({"id": 7, "type": "ping", "pad": "é" * 600_000}, ensure_ascii=False), 7),
        (json.dumps({"type": "ping", "pad": pad, "id": 5}), None),  # not first: not looked for
        (json.dumps({"id": 2**60, "type": "ping", "pad": pad}), None),  # not a valid id
        (json.dumps({"id": "x" * 300, "type": "ping", "pad": pad}), None),
        (json.dumps({"id": [1], "type": "ping", "pad": pad}), None),
    ]
    for raw, want in cases:
        await ws.send(raw)
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == "payload_too_large", err
        assert err["id"] == want and err["message"] == "message over 1048576 B", (want, err)
    # just under the limit in bytes, with multi-byte characters: not refused
    under = json.dumps({"id": 8, "type": "ping", "pad": "é" * 500_000}, ensure_ascii=False)
    assert len(under.encode()) < 1 << 20
    await ws.send(under)
    assert await recv(ws) == {"type": "pong", "id": 8}

    # beyond uvicorn's ws_max_size (16 MiB) the protocol closes the connection with 1009
    async with connect(server.url.replace("http", "ws") + "/v1/ws") as conn:
        await conn.send(json.dumps({"id": 1, "type": "ping", "pad": "x" * (17 << 20)}))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.recv(), 10)
        await asyncio.wait_for(conn.wait_closed(), 10)
        assert conn.close_code == 1009


async def test_binary_frames_are_read_as_json_and_answered_in_text(ws: ClientConnection) -> None:
    await ws.send(json.dumps({"type": "ping", "id": "bin"}).encode())
    answer = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(answer, str) and json.loads(answer) == {"type": "pong", "id": "bin"}


async def test_stream_results_reach_subscribers(redis_url: str, tmp_path_factory: Any) -> None:
    """XADD to a Redis Stream -> the server's StreamProcessor -> WebSocket subscribers."""
    import redis.asyncio as aioredis

    workdir = tmp_path_factory.mktemp("stream")
    proc = ServerProcess.infercache(
        "--redis-url", redis_url,
        "--sql-url", "none",
        "--stream", "digits=mlp@infercache:test:digits",
        "--stream-size", "4",
        "--stream-idle-timeout", "0.2",
        cwd=workdir,
    )  # fmt: skip
    with proc:
        async with connect(proc.url.replace("http", "ws") + "/v1/ws") as conn:
            await conn.send(json.dumps({"type": "subscribe", "topic": "digits"}))
            assert (await recv(conn))["type"] == "subscribed"
            client = aioredis.Redis.from_url(redis_url)
            xs = [vector() for _ in range(6)]
            for x in xs + xs[:2]:
                await client.xadd("infercache:test:digits", {"data": json.dumps({"input": x})})
            windows = [await recv(conn, wait=20) for _ in range(2)]
            assert [w["type"] for w in windows] == ["event", "event"]
            first, second = windows[0]["data"], windows[1]["data"]
            assert first["summary"]["count"] == 4 and second["summary"]["count"] == 4
            assert second["summary"]["cached"] == 2  # xs[0], xs[1] again
            assert len(first["outputs"]) == 4 and isinstance(first["outputs"][0], list)
            for _ in range(100):  # acknowledged once the window was handed on
                pending = await client.xpending("infercache:test:digits", "infercache")
                if pending["pending"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert pending["pending"] == 0
            # an entry without the "data" field: the error names the field (it said "expected
            # float32 array of shape (784,), got dict", found in review)
            await client.xadd("infercache:test:digits", {"payload": "[1, 2]"})
            third = (await recv(conn, wait=20))["data"]
            assert third["summary"]["count"] == 1 and third["summary"]["errors"] == 1
            assert third["errors"]["0"] == (
                "extract failed: InputError: expected the entry's 'data' field to hold the input "
                "as JSON (an array, or an object with 'input'); got an object with the fields "
                "'payload'"
            )
            await client.aclose()


async def test_stream_results_reach_the_subscribers_of_every_worker(
    redis_url: str, tmp_path_factory: Any
) -> None:
    """With two workers each consumes part of the stream; a subscriber saw only the windows of
    the worker it was connected to. Every window now reaches every subscriber."""
    import redis.asyncio as aioredis

    key = "infercache:test:digits2"
    proc = ServerProcess.infercache(
        "--workers", "2",
        "--redis-url", redis_url,
        "--sql-url", "none",
        "--stream", f"digits2=mlp@{key}",
        "--stream-size", "1",
        cwd=tmp_path_factory.mktemp("stream2"),
    )  # fmt: skip
    with proc:
        conns = [await connect(proc.url.replace("http", "ws") + "/v1/ws") for _ in range(6)]
        try:
            for conn in conns:
                await conn.send(json.dumps({"type": "subscribe", "topic": "digits2"}))
                assert (await recv(conn))["type"] == "subscribed"
            client = aioredis.Redis.from_url(redis_url)
            for _ in range(8):
                # one at a time: Redis hands each entry to the consumer that has waited longest,
                # so both workers compute some of the windows
                await client.xadd(key, {"data": json.dumps({"input": vector()})})
                await asyncio.sleep(0.3)
            await client.aclose()
            for conn in conns:  # all eight windows, whichever worker computed each
                windows = [await recv(conn, wait=20) for _ in range(8)]
                assert all(w["type"] == "event" for w in windows)
                assert sum(w["data"]["summary"]["count"] for w in windows) == 8
        finally:
            for conn in conns:
                await conn.close()


async def test_client_timeout_holds_over_the_websocket_too(server: ServerProcess) -> None:
    """``InfercacheClient(timeout=...)`` bounded HTTP requests only; over the WebSocket a request
    the server was slow to answer waited for ever. Now both give up at the same timeout, and
    the late answer does not disturb the next request."""
    from infercache.client import InfercacheClient

    fresh = [vector()[0] + 10.0, vector()[0] + 20.0]  # never seen: not answered from the cache
    async with InfercacheClient(server.url, timeout=0.1) as client:  # the model sleeps 0.3 s
        with pytest.raises(TimeoutError, match=r"within 0\.1 s"):
            await client.predict("slow", [fresh[0]], transport="ws")
        with pytest.raises(TimeoutError, match=r"within 0\.1 s"):  # ClientTimeout, both ways
            await client.predict("slow", [fresh[1]])
        await asyncio.sleep(0.5)  # the late answer arrives and is dropped
        assert (await client.predict("mlp", vector(), transport="ws"))["type"] == "prediction"


async def test_a_stream_whose_redis_is_down_logs_one_traceback_then_lines(
    fresh_redis: Any, tmp_path: Path
) -> None:
    """With Redis down the stream loop logged a ~27-line traceback every second; now the first
    failure has its traceback and later ones a line each, backing off; it resumes once Redis
    is back."""
    import redis.asyncio as aioredis

    proc = ServerProcess.infercache(
        "--redis-url", fresh_redis.url, "--sql-url", "none", "--no-require-tiers",
        "--stream", "down=mlp@infercache:test:down", "--stream-size", "1",
        cwd=tmp_path,
    )  # fmt: skip
    with proc:
        fresh_redis.kill()
        await asyncio.sleep(4.5)  # failures at about 0, 1, 3 s: one traceback, then lines
        log = proc.log()
        # one logged traceback: a chained one (a reset read, then redis-py's ConnectionError)
        # prints "Traceback" once per exception in the chain
        chained = log.count("During handling of the above exception") + log.count(
            "The above exception was the direct cause"
        )
        assert log.count("Traceback") - chained == 1, log[-3000:]
        assert "failed again (2 in a row)" in log
        fresh_redis.start()
        async with connect(proc.url.replace("http", "ws") + "/v1/ws") as conn:
            await conn.send(json.dumps({"type": "subscribe", "topic": "down"}))
            assert (await recv(conn))["type"] == "subscribed"
            client = aioredis.Redis.from_url(fresh_redis.url)
            try:
                for _ in range(40):  # until the loop's next try finds Redis back
                    await client.xadd(
                        "infercache:test:down", {"data": json.dumps({"input": vector()})}
                    )
                    try:
                        event = await recv(conn, wait=0.5)
                    except TimeoutError:
                        continue
                    assert event["type"] == "event"
                    break
                else:
                    raise AssertionError("the stream did not resume")
            finally:
                await client.aclose()
