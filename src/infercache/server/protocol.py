"""uvicorn's httptools protocol with a deadline for a request's headers.

uvicorn arms its keep-alive timer only after a response. A connection that opens and sends
nothing, or sends part of a request line or of its headers and stops, is held open for ever
(measured: still open after 12 s, both cases). Any client that misbehaves, or an attacker with a
few thousand sockets (slowloris), holds file descriptors and memory that way. Reverse proxies
usually enforce this; a server that is reachable directly should too.

:class:`HeaderDeadlineProtocol` closes a connection whose request headers are not complete
``header_timeout_s`` seconds after it opened or after the request's first byte. Once the headers
are in, nothing changes: bodies are bounded by ``max_body_bytes`` and the prediction by
``request_timeout_s``; a WebSocket upgrade happens after the headers, so it is never affected.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from infercache.config import SERVE_SETTINGS_ENV

__all__ = ["HeaderDeadlineProtocol", "header_timeout"]

_DEFAULT = 10.0
_timeout: float | None = None


def header_timeout() -> float:
    """``header_timeout_s`` from the serve settings uvicorn's workers inherit (read once)."""
    global _timeout
    if _timeout is None:
        try:
            raw = json.loads(os.environ.get(SERVE_SETTINGS_ENV) or "{}")
            _timeout = float(raw.get("header_timeout_s", _DEFAULT))
        except (ValueError, TypeError, AttributeError):
            _timeout = _DEFAULT
    return _timeout


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes a connection slow to send a request's headers."""

    _header_deadline: asyncio.TimerHandle | None = None

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(header_timeout(), self._headers_late)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()  # until the first request's headers are in

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()  # a later request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)
