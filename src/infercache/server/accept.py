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

With ``--workers N`` all workers shared the one socket uvicorn's supervisor listens on, and the
kernel wakes every worker for it: a greedy worker took all 64 of 64 connections opened in a row
(four tries of four). On Linux the supervisor now binds a socket with SO_REUSEPORT and does not
listen on it (:func:`shared_port_socket`); each worker's loop, handed that socket, listens on one
of its own bound to the same address (SO_REUSEPORT), and the kernel spreads new connections over
the workers' sockets by a hash of their addresses. Each worker then accepts greedily from its own
queue. The cost, as with nginx's ``reuseport``: connections waiting in the queue of a worker that
dies are reset, where a shared queue would have handed them to another worker. A worker that shuts
down (SIGTERM) therefore accepts what waits in its queue before it closes its socket
(:meth:`GreedyServer.close`), and tells each connection it hands over after that to shut down as
uvicorn told the others.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

import uvloop

__all__ = ["REUSEPORT_BALANCES", "GreedyAcceptLoop", "new_event_loop", "shared_port_socket"]

log = logging.getLogger("infercache.server")

#: accept() errors that mean "out of a resource": stop accepting for a moment (as asyncio does)
#: instead of spinning on a listening socket that stays readable
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: seconds to stop accepting after such an error
RESOURCE_PAUSE_S = 1.0
#: Linux spreads new connections over the listening sockets bound to one address with
#: SO_REUSEPORT; elsewhere (macOS, the BSDs) the option exists but does not balance.
REUSEPORT_BALANCES = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def shared_port_socket(host: str, port: int) -> socket.socket:
    """The socket ``serve --workers N`` hands uvicorn's supervisor (as ``fd``): bound to
    ``host:port`` with SO_REUSEPORT and never listened on, so that each worker's
    :class:`GreedyAcceptLoop` listens on a socket of its own at that address (the family is
    chosen as uvicorn chooses it).

    SO_REUSEPORT would also let a second server of the same user bind the port and silently take
    half its connections, so the address is first bound without it: a port where anything
    listens, a worker of another ``serve --workers N`` included, fails here as it did without
    SO_REUSEPORT. Not caught: a second server started in the seconds before the first one's
    workers listen (its socket, bound with SO_REUSEADDR and not listening, does not conflict).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind_to(probe, (host, port))
        port = probe.getsockname()[1]  # port 0: the one the kernel chose
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _bind_to(sock, (host, port))
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_to(sock: socket.socket, address: Any) -> None:
    try:
        sock.bind(address)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"error while attempting to bind on address {address!r}: "
            f"{(exc.strerror or str(exc)).lower()}",
        ) from None


def _domain(sock: socket.socket) -> int:
    """The socket's real address family: one rebuilt from a file descriptor (uvicorn's ``fd``
    option, a socket passed to a worker process) can carry the wrong one."""
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN))
    except (AttributeError, OSError):
        return int(sock.family)


def _is_port_template(sock: socket.socket) -> bool:
    """A socket from :func:`shared_port_socket`: SO_REUSEPORT set, bound, not listening."""
    if not REUSEPORT_BALANCES:
        return False
    try:
        return bool(
            _domain(sock) in (socket.AF_INET, socket.AF_INET6)
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
        )
    except OSError:
        return False


def _own_listener(template: socket.socket) -> socket.socket:
    """A socket of this process bound where ``template`` is, in its SO_REUSEPORT group."""
    family = _domain(template)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            v6only = template.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        _bind_to(sock, template.getsockname())
    except BaseException:
        sock.close()
        raise
    return sock


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop factory uvicorn is given (``loop="infercache.server.accept:new_event_loop"``);
    ``server.app.uvicorn_loop`` says when."""
    return GreedyAcceptLoop()


class GreedyAcceptLoop(uvloop.Loop):
    """uvloop, with plain TCP servers that accept every waiting connection per readiness event.

    Given a socket from :func:`shared_port_socket`, the server listens on one of its own at the
    same address instead (one per worker process, balanced by the kernel)."""

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
        template = sock is not None and _is_port_template(sock)
        if sock is not None and sock.family not in (socket.AF_INET, socket.AF_INET6):
            plain = plain and template  # the template's own listener gets the right family
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
            socks = [_own_listener(sock) if template else sock]
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
                _bind_to(sock, address)
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
        """Stop accepting; connections already accepted stay open (as asyncio's close()).

        Connections whose handshake is done wait in the socket's queue: closing it resets them,
        and their clients may have sent a request already. They are accepted first, and like
        every connection handed over from now on (:meth:`_connect`) told to shut down.
        """
        socks, self._socks = self._socks, []
        for sock in socks:
            self._loop.remove_reader(sock.fileno())
            self._accept(sock)
            sock.close()
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
            _transport, protocol = await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError as exc:  # the client went away between accept() and here
            log.debug("accepted connection lost before it started: %s", exc)
            conn.close()
            return
        if not self._socks and callable(shutdown := getattr(protocol, "shutdown", None)):
            # The server closed while this connection was on its way to its protocol: uvicorn's
            # shutdown, which closes the server and then tells each open connection to finish,
            # did not see it. Untold, it went on being served keep-alive for all of
            # timeout_graceful_shutdown (a worker took 6 s to stop, answering a client
            # thousands of requests meanwhile), then the worker exited under its last request.
            shutdown()
