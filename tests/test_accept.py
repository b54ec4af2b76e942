"""GreedyAcceptLoop: uvloop with listeners that accept every waiting connection at once.

The loop runs in this process (asyncio.Runner with the loop factory uvicorn is given); clients
are real sockets. "Iterations" are counted by a callback that re-schedules itself with
call_soon, so it runs once per event loop iteration.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import importlib
import json
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

import pytest

pytest.importorskip("uvloop")

from infercache.server.accept import (
    REUSEPORT_BALANCES,
    GreedyAcceptLoop,
    GreedyServer,
    new_event_loop,
    shared_port_socket,
)


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]], factory: Any = new_event_loop) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro_fn())


class Echo(asyncio.Protocol):
    made: ClassVar[list[int]] = []
    iteration: ClassVar[int] = 0
    expect: ClassVar[int] = 0
    all_made: ClassVar[asyncio.Event | None] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        Echo.made.append(Echo.iteration)
        if len(Echo.made) == Echo.expect and Echo.all_made is not None:
            Echo.all_made.set()

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def _port_in_use() -> tuple[socket.socket, int]:
    """A socket listening on a free loopback port, and the port: what another server holds."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken, taken.getsockname()[1]


def _tick(loop: asyncio.AbstractEventLoop) -> None:
    Echo.iteration += 1
    loop.call_soon(_tick, loop)


async def _connections_made_per_iterations(n: int) -> list[int]:
    """Open ``n`` connections while the loop is blocked, then unblock it: the iteration (from
    the unblocking) at which each connection reached its protocol."""
    loop = asyncio.get_running_loop()
    Echo.made, Echo.iteration, Echo.expect, Echo.all_made = [], 0, n, asyncio.Event()
    server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=128)
    port = server.sockets[0].getsockname()[1]
    clients = []
    # the handshakes complete in the kernel (the accept queue) while the loop does nothing
    for _ in range(n):
        c = socket.socket()
        c.connect(("127.0.0.1", port))
        clients.append(c)
    time.sleep(0.05)  # noqa: ASYNC251  (blocking the loop is the point: let the queue fill)
    loop.call_soon(_tick, loop)
    await asyncio.wait_for(Echo.all_made.wait(), 10)
    server.close()
    await server.wait_closed()
    for c in clients:
        c.close()
    return Echo.made


def test_a_burst_of_connections_is_accepted_in_one_go() -> None:
    made = run(lambda: _connections_made_per_iterations(40))
    assert len(made) == 40
    # one readiness event accepts all forty; each then needs its own task step to start
    assert max(made) <= 4, made


def test_plain_uvloop_accepts_one_connection_per_iteration() -> None:
    """What the loop is for: libuv accepts one connection per iteration (libuv#3696). If a
    future libuv goes back to accepting in a loop, this fails and the override can go."""
    import uvloop

    made = run(lambda: _connections_made_per_iterations(40), uvloop.new_event_loop)
    assert len(made) == 40
    assert max(made) >= 30, made


def test_echo_over_host_port_then_close_stops_accepting() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, GreedyAcceptLoop)
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        assert isinstance(server, GreedyServer) and server.is_serving()
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        server.close()
        await server.wait_closed()
        assert not server.is_serving() and server.sockets == ()
        # the accepted connection stays open after close(), as with asyncio's servers
        writer.write(b"more")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"more"
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    run(main)


def test_a_given_socket_is_served_and_every_interface_binds() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = await loop.create_server(Echo, sock=sock)  # as uvicorn's workers call it
        assert server.sockets == (sock,)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        writer.close()
        server.close()
        # host None: every interface (IPv4, and IPv6 where the machine has it), one port each
        everywhere = await loop.create_server(Echo, None, 0)
        families = {s.family for s in everywhere.sockets}
        assert socket.AF_INET in families
        everywhere.close()

    run(main)


def test_reuse_address_as_asyncio_sets_it() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for asked, expected in ((None, True), (False, False)):
            server = await loop.create_server(Echo, "127.0.0.1", 0, reuse_address=asked)
            (sock,) = server.sockets
            assert bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)) is expected
            server.close()

    run(main)


def test_a_port_in_use_fails_with_the_address_in_the_message() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        taken, port = _port_in_use()
        with pytest.raises(OSError, match=rf"error while attempting to bind on address.*{port}"):
            await loop.create_server(Echo, "127.0.0.1", port)
        taken.close()

    run(main)


def test_tls_and_unix_listeners_are_left_to_uvloop(tmp_path: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(str(tmp_path / "s"))
        server = await loop.create_server(Echo, sock=unix)
        assert not isinstance(server, GreedyServer)
        server.close()
        paused = await loop.create_server(Echo, "127.0.0.1", 0, start_serving=False)
        assert not isinstance(paused, GreedyServer)
        paused.close()

    run(main)


def test_out_of_file_descriptors_pauses_accepting_then_resumes() -> None:
    """EMFILE: the listening socket stays readable, so accepting again at once would spin the
    loop. The server logs, pauses a second, and accepts again once descriptors are free."""
    script = textwrap.dedent(
        """
        import asyncio, logging, resource, socket, sys
        from infercache.server import accept
        accept.RESOURCE_PAUSE_S = 0.2
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")

        class Hold(asyncio.Protocol):
            def connection_made(self, t):
                held.append(t)

        held = []

        async def main():
            loop = asyncio.get_running_loop()
            server = await loop.create_server(Hold, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            import os
            used = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (used + 12, hard))
            clients = []
            for _ in range(10):  # each costs a client fd here and a server fd when accepted
                c = socket.socket(); c.setblocking(False)
                try:
                    c.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
                except OSError:
                    break
                clients.append(c)
            await asyncio.sleep(0.5)
            print("held", len(held), "waiting", len(clients) - len(held))
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await asyncio.sleep(0.6)
            print("held", len(held), "waiting", len(clients) - len(held))

        asyncio.Runner(loop_factory=accept.new_event_loop).run(main())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("cannot accept connections" in line for line in lines), out.stdout
    first, last = [line for line in lines if line.startswith("held")]
    assert int(first.split()[3]) > 0  # some waited: the limit was hit
    assert int(last.split()[3]) == 0, out.stdout  # all accepted after the limit was lifted


reuseport = pytest.mark.skipif(not REUSEPORT_BALANCES, reason="SO_REUSEPORT balances on Linux")


@reuseport
def test_several_workers_each_listen_on_their_own_socket_and_share_the_connections() -> None:
    """``serve --workers N``: the supervisor's socket (bound, SO_REUSEPORT, never listened on)
    makes each worker's server listen on a socket of its own at that address, and the kernel
    spreads connections over them. On one shared socket a greedy worker took all 64 of 64 in
    four tries of four. Two servers in one loop stand in for two workers here."""

    class Counted(asyncio.Protocol):
        def __init__(self, tally: list[int]) -> None:
            self.tally = tally

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.tally.append(1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        template = shared_port_socket("127.0.0.1", 0)
        address = template.getsockname()
        tallies: list[list[int]] = [[], []]
        servers = [
            await loop.create_server(functools.partial(Counted, t), sock=template) for t in tallies
        ]
        try:
            own = [s.sockets[0] for s in servers]
            assert template not in own and own[0] is not own[1]
            assert all(s.getsockname() == address for s in own)
            assert not template.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            clients = [await asyncio.open_connection(*address) for _ in range(64)]
            for _ in range(100):
                if sum(map(len, tallies)) == 64:
                    break
                await asyncio.sleep(0.01)
            for _, writer in clients:
                writer.close()
            counts = [len(t) for t in tallies]
            assert sum(counts) == 64 and min(counts) >= 12, counts
        finally:
            for server in servers:
                server.close()
        try:  # the workers' sockets closed with their servers; the template takes nothing
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*address)
        finally:
            template.close()

    run(main)


@reuseport
def test_the_shared_port_socket_refuses_a_port_in_use_even_by_another_shared_one() -> None:
    """SO_REUSEPORT alone would let a second ``serve --workers N`` of the same user bind the
    port and take half of the first one's connections without a word."""

    async def main() -> None:
        first = shared_port_socket("127.0.0.1", 0)
        port = first.getsockname()[1]
        server = await asyncio.get_running_loop().create_server(Echo, sock=first)  # a worker
        with pytest.raises(OSError, match=rf"error while attempting to bind on address.*{port}"):
            shared_port_socket("127.0.0.1", port)
        server.close()
        first.close()

    run(main)
    taken, port = _port_in_use()
    with pytest.raises(OSError, match="address already in use"):
        shared_port_socket("127.0.0.1", port)
    taken.close()


def test_the_loop_uvicorn_is_given() -> None:
    from infercache.server.app import uvicorn_loop

    factory = uvicorn_loop("uvloop", 1)
    module, _, name = factory.partition(":")
    loop = getattr(importlib.import_module(module), name)()
    try:
        assert isinstance(loop, GreedyAcceptLoop)
    finally:
        loop.close()
    # several workers: greedy only where each can have its own socket (see the test above)
    assert (uvicorn_loop("uvloop", 2) == factory) is REUSEPORT_BALANCES
    assert uvicorn_loop("asyncio", 1) == "asyncio"  # no uvloop installed: asyncio's own


@reuseport
async def test_serve_with_two_workers_shares_new_connections_between_them(tmp_path: Any) -> None:
    """The real server: once both workers listen, 64 new connections are shared."""
    from infercache.bench.process import ServerProcess

    token = "workers-accept-token"

    async def worker_of_a_new_connection(port: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"GET /v1/cache/stats HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            return int(json.loads(await reader.readexactly(length))["worker"]["pid"])
        finally:
            writer.close()

    proc = ServerProcess.infercache(
        "--workers", "2", "--sql-url", "none", "--no-warmup", "--admin-token", token,
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    with proc:
        seen: set[int] = set()
        deadline = time.monotonic() + 90
        while len(seen) < 2:  # the second worker listens once its model is loaded
            assert time.monotonic() < deadline, "the second worker never took a connection"
            seen.add(await worker_of_a_new_connection(proc.port))
            await asyncio.sleep(0.05)
        pids = await asyncio.gather(*(worker_of_a_new_connection(proc.port) for _ in range(64)))
        counts = sorted(collections.Counter(pids).values())
        assert len(counts) == 2 and counts[0] >= 12, counts


@reuseport
def test_serve_with_two_workers_on_a_port_in_use_says_so_and_exits_3(tmp_path: Any) -> None:
    taken, port = _port_in_use()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "infercache", "serve", "--workers", "2", "--sql-url", "none",
             "--port", str(port)],
            capture_output=True, text=True, cwd=tmp_path, timeout=60,
        )  # fmt: skip
    finally:
        taken.close()
    assert out.returncode == 3, out.stderr[-2000:]
    assert "address already in use" in out.stderr
    assert "Traceback" not in out.stderr
