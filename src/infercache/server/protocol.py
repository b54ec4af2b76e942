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
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from infercache.config import serve_settings_from_env
from infercache.server.errors import error_body

__all__ = ["HeaderDeadlineProtocol", "deadlines"]

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
        self._body_since = self.loop.time()  # until the body is in (at once without one)
        super().on_headers_complete()

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
