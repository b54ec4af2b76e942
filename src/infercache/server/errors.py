"""Mapping of every failure to a JSON error body with a stable ``error.code``.

The body is always ``{"error": {"code": ..., "message": ...}}``. Clients branch on ``code`` (never
on the message, which is for people), so codes are part of the API and never change meaning.
Anything a client sends maps to a 4xx; only the server's own faults are 5xx, and those never leak a
traceback. :class:`~infercache.errors.Overloaded` adds ``Retry-After`` so well-behaved clients back
off instead of hammering a saturated queue.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from infercache.errors import InfercacheError, Overloaded, one_line

log = logging.getLogger("infercache.server")

#: Codes for errors raised by the HTTP layer itself (not by infercache.errors classes).
HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


class APIError(Exception):
    """An error raised by a route with an explicit status and code (malformed JSON, too big...)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str, **extra: Any) -> bytes:
    """The JSON bytes of an error body."""
    err: dict[str, Any] = {"code": code, "message": message}
    err.update(extra)
    return orjson.dumps({"error": err})


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    """A JSON error response."""
    return Response(
        error_body(code, message, **extra),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` wants whole seconds; round up so clients never retry too early."""
    return str(max(1, math.ceil(seconds)))


def public_message(exc: InfercacheError) -> str:
    """The message a client gets for ``exc``: one line, bounded (:func:`one_line`); measured: a
    wrong-shape input to a ``.pt`` model answered the whole TorchScript traceback. The log gets
    everything."""
    return one_line(str(exc) or exc.code)


def infercache_error_response(exc: InfercacheError) -> Response:
    """The response for an infercache exception, from its ``.code`` and ``.http_status``."""
    headers: dict[str, str] = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = retry_after_header(exc.retry_after)
    elif exc.http_status == 503:
        headers["Retry-After"] = "1"
    if exc.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="infercache"'
    status = exc.http_status
    if status >= 500 and status not in (503, 504):
        # Our own fault (a model that raised, an encode failure): log it, say little.
        log.error("request failed: %s: %s", exc.code, exc, exc_info=exc)
    return error_response(status, exc.code, public_message(exc), headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


#: where an error handler notes the error code of its response, for the metrics middleware
#: (which sees only the status): ``infercache_errors_total{code}`` counts stable codes
ERROR_CODE_SCOPE_KEY = "infercache.error"


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so that no error, expected or not, leaves without a JSON body."""

    def noted(request: Request, code: str, response: Response) -> Response:
        request.scope[ERROR_CODE_SCOPE_KEY] = code
        return response

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        resp = error_response(exc.status, exc.code, exc.message, exc.headers)
        return noted(request, exc.code, resp)

    async def on_infercache_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, InfercacheError)
        return noted(request, exc.code, infercache_error_response(exc))

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        resp = error_response(422, "invalid_request", _validation_message(exc))
        return noted(request, "invalid_request", resp)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = HTTP_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else code
        resp = error_response(exc.status_code, code, detail, dict(exc.headers or {}))
        return noted(request, code, resp)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        resp = error_response(500, "internal_error", "internal server error")
        return noted(request, "internal_error", resp)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(InfercacheError, on_infercache_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
