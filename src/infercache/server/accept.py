"""A uvloop event loop that accepts every waiting connection at once.

libuv accepts one connection per event loop iteration (libuv/libuv#3696, in libuv 1.45 and so in
every uvloop since 0.18): it relies on level-triggered polling to report the next one. On an idle
server that costs nothing. On a busy one an iteration lasts as long as the work it runs (the
requests parsed, a model batch), so a burst of new connections waits one whole iteration per
connection in the kernel's accept queue, while the requests on open connections are served.

Measured here: with each iteration busy for 10 ms, 100 connections opened at once were accepted
over 1,027 ms by uvloop (the last one waited 100 iterations) and within 59 ms by asyncio's own
loop, which accepts up to ``backlog`` connections per iteration. Under Poisson load at 70 % of
``infercache serve``'s capacity, a load balancer or client pool that grows by a hundred
connections (as one does when a few requests are slow) saw them accepted at ~50 a second: every
request on a new connection waited 0.3-1.9 s, and those made the p99.

:class:`GreedyAcceptLoop` keeps uvloop for everything else and serves plain TCP listeners itself:
a reader on each listening socket accepts everything waiting (up to ``backlog``), as asyncio does,
and hands each connection to uvloop's own transport (``connect_accepted_socket``). TLS listeners,
UNIX sockets and ``start_serving=False`` go to uvloop unchanged.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvloop

__all__ = ["GreedyAcceptLoop", "new_event_loop"]

log = logging.getLogger("infercache.server")

#: accept() errors that mean "out of a resource": stop accepting for a moment (as asyncio does)
#: instead of spinning on a listening socket that stays readable
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: seconds to stop accepting after such an error
RESOURCE_PAUSE_S = 1.0


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop factory uvicorn is given (``loop="infercache.server.accept:new_event_loop"``),
    for one worker only (``server.app.uvicorn_loop`` says why)."""
    return GreedyAcceptLoop()


class GreedyAcceptLoop(uvloop.Loop):
    """uvloop, with plain TCP servers that accept every waiting connection per readiness event."""

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str | list[str] | None = None,
        port: int | None = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        start_serving: bool = True,
        **kwargs: Any,
    ) -> asyncio.AbstractServer:
        plain = ssl is None and start_serving and not kwargs.get("family")
        if sock is not None and sock.family not in (socket.AF_INET, socket.AF_INET6):
            plain = False
        if not plain:
            parent: Any = super()  # uvloop's stub types sock as None and port as int
            return await parent.create_server(
                protocol_factory,
                host,
                port,
                sock=sock,
                backlog=backlog,
                ssl=ssl,
                reuse_address=reuse_address,
                reuse_port=reuse_port,
                start_serving=start_serving,
                **kwargs,
            )
        if sock is not None:
            socks = [sock]
        else:
            socks = await self._bind(
                host, port, reuse_address=reuse_address is not False, reuse_port=bool(reuse_port)
            )
        return GreedyServer(self, protocol_factory, socks, backlog)

    async def _bind(
        self,
        host: str | list[str] | None,
        port: int | None,
        *,
        reuse_address: bool,
        reuse_port: bool,
    ) -> list[socket.socket]:
        """Listening sockets for ``host`` (None or "": every interface) and ``port``, bound as
        asyncio binds them: SO_REUSEADDR unless told not to, and IPv6 sockets for IPv6 only (a
        host that resolves to both families gets one socket each)."""
        hosts: list[str | None] = (
            [None] if host in (None, "") else [host] if isinstance(host, str) else list(host)
        )
        infos: list[Any] = []
        for h in hosts:
            infos += await self.getaddrinfo(
                h, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )  # fmt: skip
        socks: list[socket.socket] = []
        try:
            for family, kind, proto, _canon, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                if reuse_address:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"error while attempting to bind on address {address!r}: "
                        f"{(exc.strerror or str(exc)).lower()}",
                    ) from None
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks


class GreedyServer(asyncio.AbstractServer):
    """The listening side of :class:`GreedyAcceptLoop`: what uvicorn uses of an asyncio Server
    (``sockets``, ``close``, ``wait_closed``) and the rest of its interface."""

    def __init__(
        self,
        loop: GreedyAcceptLoop,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        socks: list[socket.socket],
        backlog: int,
    ) -> None:
        self._loop = loop
        self._factory = protocol_factory
        self._socks = socks
        self._backlog = max(1, backlog)
        self._connecting: set[asyncio.Task[Any]] = set()
        self._closed = loop.create_future()
        for sock in socks:
            sock.setblocking(False)
            sock.listen(self._backlog)
            loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._socks)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return bool(self._socks)

    async def start_serving(self) -> None:
        return None  # serving since construction

    async def serve_forever(self) -> None:
        await asyncio.shield(self._closed)

    def close(self) -> None:
        """Stop accepting; connections already accepted stay open (as asyncio's close())."""
        for sock in self._socks:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._socks = []
        if not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        if self._connecting:  # connections accepted but not yet handed to their protocol
            await asyncio.wait(list(self._connecting))

    def _accept(self, sock: socket.socket) -> None:
        """Accept everything waiting, up to ``backlog`` (a flood must not starve the loop)."""
        for _ in range(self._backlog):
            try:
                conn, _address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # reset by the client while it waited: next one
                continue
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    log.warning(
                        "cannot accept connections (%s); trying again in %g s",
                        exc.strerror, RESOURCE_PAUSE_S,
                    )  # fmt: skip
                    self._loop.remove_reader(sock.fileno())
                    self._loop.call_later(RESOURCE_PAUSE_S, self._resume, sock)
                else:
                    log.error("accept() on %s failed: %s", sock.getsockname(), exc)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    def _resume(self, sock: socket.socket) -> None:
        if sock in self._socks:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            # uvloop's transport takes the socket over (it closes it with the connection)
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError as exc:  # the client went away between accept() and here
            log.debug("accepted connection lost before it started: %s", exc)
            conn.close()
