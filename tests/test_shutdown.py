"""Graceful shutdown: every request a server has received is answered when it is told to stop.

A user-acceptance review sent SIGTERM to ``serve --workers 2`` under 32 keep-alive clients in a
closed loop: 32 of the 32 requests sent got EOF or a reset instead of an answer. uvicorn closed
each connection between two requests at once, with the client's next request unread in its
receive buffer (a reset); a connection accepted just before the listener closed was never told to
stop (served keep-alive until timeout_graceful_shutdown, then cut off); connections waiting in a
worker's own SO_REUSEPORT queue were reset with it; and a request pipelined behind the last one
was read and dropped. The in-process tests pin each; the last one is the review's own method.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

pytest.importorskip("uvloop")
pytest.importorskip("httptools")

import uvicorn

from infercache.server.accept import new_event_loop
from infercache.server.protocol import HeaderDeadlineProtocol


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro_fn())


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def read_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the server sends until it closes: the bytes and how it closed."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    except TimeoutError:
        return data, "open"
    return data, "eof"


def responses(data: bytes) -> list[tuple[int, bool, bytes]]:
    """(status, ``connection: close``, body) of each response in ``data`` (content-length)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        length = int(next(ln for ln in lines if ln.startswith(b"content-length:")).split(b":")[1])
        out.append((int(lines[0].split()[1]), b"connection: close" in lines, rest[:length]))
        data = rest[length:]
    return out


class App:
    """``/slow`` waits for :attr:`release`; anything else answers its path at once."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        if scope["path"] == "/slow":
            self.entered.set()
            await self.release.wait()
        body = scope["path"].encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def serving(app: App) -> AsyncIterator[tuple[uvicorn.Server, int]]:
    """uvicorn's Server with the protocol ``infercache serve`` gives it, in this loop."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, http=HeaderDeadlineProtocol, lifespan="off",
        log_level="warning", timeout_graceful_shutdown=5,
    )  # fmt: skip
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    try:
        yield server, server.servers[0].sockets[0].getsockname()[1]
    finally:
        if server.servers[0].is_serving():
            await server.shutdown()


def test_a_request_waiting_unread_when_the_server_stops_is_answered() -> None:
    """The client's next request is in the socket's receive buffer, not yet read, when uvicorn
    shuts its connections down: it was reset (the connection was between two requests)."""

    async def main() -> None:
        async with serving(App()) as (server, port):
            client = socket.create_connection(("127.0.0.1", port))
            client.settimeout(10)
            client.sendall(get("/first"))
            first = await asyncio.to_thread(client.recv, 65536)
            assert responses(first) == [(200, False, b"/first")]
            # the next request reaches the kernel while the loop runs nothing, and the shutdown
            # (awaited inline: it tells the connections before its first await) sees it unread
            client.sendall(get("/second"))
            time.sleep(0.05)  # noqa: ASYNC251  (keeping the loop from reading it is the point)
            reader = asyncio.ensure_future(asyncio.to_thread(read_until_closed, client))
            await server.shutdown()  # not wait_for: a task of its own would let the loop read
            data, how = await reader
            client.close()
            assert (responses(data), how) == ([(200, True, b"/second")], "eof")

    run(main)


def test_a_request_pipelined_behind_the_last_one_is_answered_too() -> None:
    """Shut down while ``/slow`` runs, then ``/fast`` arrives on the same connection: it is read
    (pipelined), so it is the one answered last; ``/slow`` had been made last and closed the
    connection, dropping ``/fast``."""

    async def main() -> None:
        app = App()
        async with serving(app) as (server, port):
            client = socket.create_connection(("127.0.0.1", port))
            client.settimeout(10)
            client.sendall(get("/slow"))
            await asyncio.wait_for(app.entered.wait(), 10)
            stopping = asyncio.ensure_future(server.shutdown())
            await asyncio.sleep(0)  # its first step: close the listener, tell the connections
            assert not server.servers[0].is_serving()
            client.sendall(get("/fast"))
            await asyncio.sleep(0.2)  # the connection reads it: queued behind /slow
            app.release.set()
            data, how = await asyncio.to_thread(read_until_closed, client)
            await asyncio.wait_for(stopping, 10)
            client.close()
            assert responses(data) == [(200, False, b"/slow"), (200, True, b"/fast")], data
            assert how == "eof"

    run(main)


def test_connections_waiting_in_the_queue_are_accepted_and_told_to_finish() -> None:
    """The listener's queue at close(): accepted and handed over, each told to shut down, where
    closing the socket reset them (with the request their clients had sent)."""

    class Finishing(asyncio.Protocol):
        made: list[Finishing] = []  # noqa: RUF012

        def __init__(self) -> None:
            self.told = self.echoed = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            Finishing.made.append(self)

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)
            self.echoed = True
            if self.told:
                self.transport.close()

        def shutdown(self) -> None:  # what uvicorn calls on each connection when it stops
            self.told = True
            if self.echoed:
                self.transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Finishing, "127.0.0.1", 0, backlog=64)
        port = server.sockets[0].getsockname()[1]
        clients = []
        for _ in range(8):  # the handshakes complete in the kernel; the loop runs nothing
            c = socket.create_connection(("127.0.0.1", port))
            c.settimeout(10)
            c.sendall(b"ping")
            clients.append(c)
        server.close()  # before the loop ever polled the listener
        await asyncio.wait_for(server.wait_closed(), 10)
        got = await asyncio.gather(*(asyncio.to_thread(read_until_closed, c) for c in clients))
        for c in clients:
            c.close()
        assert got == [(b"ping", "eof")] * 8
        assert len(Finishing.made) == 8 and all(p.told for p in Finishing.made)

    run(main)


def test_sigterm_to_serve_with_two_workers_answers_every_request_sent(tmp_path: Any) -> None:
    """The review's method: 32 raw keep-alive clients in a closed loop, SIGTERM to the
    supervisor, and no new connections after it. Every request sent must get an answer (the
    last one with ``Connection: close``); 32 of 32 got EOF or a reset."""
    from infercache.bench.process import ServerProcess

    proc = ServerProcess.infercache(
        "--workers", "2", "--sql-url", "none", "--no-warmup", cwd=tmp_path, timeout=90
    )
    counter = iter(range(10**9))
    stopped = threading.Event()
    outcomes: list[tuple[int, int, str]] = []  # per client: answered, lost, how it ended

    def request() -> bytes:
        n = next(counter)
        body = json.dumps({"input": [((n * 7919 + j) % 100) / 100 for j in range(784)]}).encode()
        return (
            b"POST /v1/models/mlp/predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    def client(port: int) -> None:
        answered = lost = 0
        end = "stopped"
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(15)
            buf = b""
            while True:
                if stopped.is_set() and select.select([sock], [], [], 0)[0]:
                    end = "closed before a request"  # idle when the server closed it: fine
                    break
                sock.sendall(request())
                try:
                    while b"\r\n\r\n" not in buf:
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise ConnectionError("EOF")
                        buf += chunk
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    while len(buf) < length:
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise ConnectionError("EOF")
                        buf += chunk
                    buf = buf[length:]
                except (OSError, ConnectionError) as exc:
                    lost += 1
                    end = f"lost: {exc!r}"
                    break
                answered += 1
                assert head.startswith(b"HTTP/1.1 200"), head
                if b"connection: close" in head.lower():
                    end = "close"
                    break
        outcomes.append((answered, lost, end))

    with proc:
        threads = [threading.Thread(target=client, args=(proc.port,)) for _ in range(32)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        assert proc.proc is not None
        stopped.set()
        os.kill(proc.proc.pid, signal.SIGTERM)  # the supervisor only, as systemd or kill would
        code = proc.proc.wait(30)
        for t in threads:
            t.join(30)
    assert len(outcomes) == 32, outcomes
    assert sum(o[0] for o in outcomes) > 32, outcomes  # the loop ran before the signal
    assert [o for o in outcomes if o[1]] == [], outcomes
    assert code == 0, proc.log()[-3000:]
