"""uvicorn's httptools protocol with a deadline for a request's headers.

uvicorn arms its keep-alive timer only after a response. A connection that opens and sends
nothing, or sends part of a request line or of its headers and stops, is held open for ever
(measured: still open after 12 s, both cases). Any client that misbehaves, or an attacker with a
few thousand sockets (slowloris), holds file descriptors and memory that way. Reverse proxies
usually enforce this; a server that is reachable directly should too.

:class:`HeaderDeadlineProtocol` closes a connection whose request headers are not complete
``header_timeout_s`` seconds after it opened or after the request's first byte, and one whose
body is not complete ``request_timeout_s`` seconds after its headers (a body sent a few bytes at a
time held the connection for ever too). Bodies are also bounded by ``max_body_bytes``; a
WebSocket upgrade happens after the headers, so it is never affected.

It also shuts a connection down gracefully (:meth:`HeaderDeadlineProtocol.shutdown`). On SIGTERM
uvicorn closes every connection between two requests at once, and on a kept-alive connection that
is where a client's next request usually is: already sent, in the socket's receive buffer, not
yet read. Closing a socket with unread data sends a reset, and one with the request still on its
way sends a FIN the client reads as the answer: 32 keep-alive clients in a closed loop lost 32 of
32 requests to SIGTERM (``serve --workers 1`` or ``2``), and 8-30 of 32 when each client first
checked that its connection was still open, as urllib3 does before it reuses one. Now none.
"""

from __future__ import annotations

import asyncio
import functools
import struct
import weakref
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from infercache.config import serve_settings_from_env
from infercache.server.errors import error_body

try:  # bytes waiting in a socket's receive buffer (SIOCINQ on Linux); not on Windows
    import fcntl
    import termios

    _FIONREAD: int | None = termios.FIONREAD
except ImportError:  # pragma: no cover
    _FIONREAD = None

__all__ = ["SHUTDOWN_IDLE_GRACE_S", "HeaderDeadlineProtocol", "deadlines"]

#: seconds a connection idle between two requests stays open once the server shuts down: a
#: request its client sent before it could see the close is read and answered (with
#: ``Connection: close``) instead of reset. uvicorn waits 0.1 s after telling the connections
#: anyway, so this adds nothing to a shutdown.
SHUTDOWN_IDLE_GRACE_S = 0.1

# one sweeper per event loop (uvicorn runs one loop per worker process)
_SWEEPERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)


@functools.cache
def deadlines() -> tuple[float, float]:
    """(``header_timeout_s``, ``request_timeout_s``) of the serve settings uvicorn's workers
    inherit, read once: how long a request's headers, then its body, may take to arrive."""
    settings = serve_settings_from_env()
    return settings.header_timeout_s, settings.request_timeout_s


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes a connection slow to send a request's headers.

    A connection notes when it started waiting for headers (opening, or a request's first byte)
    and clears it when they are in; one sweeper task per event loop closes the late ones every
    half timeout (at most a second). A timer per request would be simpler, but uvloop's
    ``call_later`` plus ``cancel`` costs 3.5 µs, about 1 % of a request here; two attribute
    writes cost nothing.
    """

    _headers_since: float | None = None
    _body_since: float | None = None
    #: a request's first byte is in and its headers are not (no cycle of its own yet)
    _in_request = False
    #: shutting down: the newest request is answered with ``Connection: close``
    _draining = False
    #: the newest request while draining, and the keep-alive it asked for
    _last_cycle: Any = None
    _last_keep_alive = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._headers_since = self.loop.time()  # until the first request's headers are in
        sweeper = _SWEEPERS.get(self.loop)
        if sweeper is None or sweeper.done():
            _SWEEPERS[self.loop] = self.loop.create_task(
                _sweep(self.connections), name="infercache-header-deadline"
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._headers_since = self.loop.time()  # a later request on a kept-alive connection
        self._in_request = True

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse (``Content-Length: -1``, a URL over its limit):
        uvicorn answers it in plain text, and every error of ours is JSON with a code."""
        body = error_body("bad_request", f"malformed HTTP request: {msg}")
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._headers_since = None
        self._in_request = False
        self._body_since = self.loop.time()  # until the body is in (at once without one)
        super().on_headers_complete()
        if self._draining and self.cycle is not None and not self.cycle.response_complete:
            self._close_after(self.cycle)

    def shutdown(self) -> None:
        """The server is shutting down: answer every request this connection has read, then
        close it.

        uvicorn's own shutdown makes the request in progress the last one (``Connection:
        close``), as here, but closes a connection between two requests at once, even when the
        client's next request is in the socket's receive buffer: the close sends a reset and the
        request is lost. Here such a connection stays open :data:`SHUTDOWN_IDLE_GRACE_S`; a
        request that arrives (or is already waiting) is read and answered with ``Connection:
        close``, and one that finds it closed is one the client sent after the server stopped.
        A connection handed over after the listener closed (server/accept.py) is told too."""
        if self._draining:
            return
        self._draining = True
        cycle = self.cycle  # uvicorn's: the newest request read, pipelined ones included
        if cycle is not None and not cycle.response_complete:
            self._close_after(cycle)
        else:
            self.loop.call_later(SHUTDOWN_IDLE_GRACE_S, self._close_if_idle)

    def _close_after(self, cycle: Any) -> None:
        """Make ``cycle``'s response the connection's last. A request pipelined behind the one
        made last before takes its place: that one keeps the keep-alive its client asked for,
        or the close would drop the request read after it."""
        previous = self._last_cycle
        if previous is not None and previous is not cycle and not previous.response_started:
            previous.keep_alive = self._last_keep_alive
        self._last_cycle, self._last_keep_alive = cycle, cycle.keep_alive
        cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        """Close the connection if it has no request: none in progress (its response closes the
        connection), none partly read, and no bytes waiting to be read (checked here because
        uvloop runs timers before it polls the sockets: on a busy loop this can run before a
        request that arrived during the grace reaches :meth:`data_received`)."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self._in_request:
            return
        if self._unread_bytes():
            self.loop.call_later(SHUTDOWN_IDLE_GRACE_S, self._close_if_idle)
            return
        self.transport.close()

    def _unread_bytes(self) -> int:
        """Bytes in the socket's receive buffer (0 where the platform cannot tell)."""
        sock = self.transport.get_extra_info("socket")
        if _FIONREAD is None or sock is None:
            return 0
        try:
            raw = fcntl.ioctl(sock.fileno(), _FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):  # closed meanwhile
            return 0
        return int(struct.unpack("i", raw)[0])

    def on_message_complete(self) -> None:
        self._body_since = None
        super().on_message_complete()


async def _sweep(connections: set[Any]) -> None:
    """Close every connection that has waited for a request's headers longer than the timeout."""
    timeout, body = deadlines()
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(min(1.0, timeout / 2, body / 2))
        now = loop.time()
        for conn in list(connections):
            since = getattr(conn, "_headers_since", None)
            late = since is not None and now - since > timeout
            if not late:
                since = getattr(conn, "_body_since", None)
                late = since is not None and now - since > body
            if late and not conn.transport.is_closing():
                conn.transport.close()
