"""The predict route as a direct ASGI path, in front of FastAPI's middleware stack.

Measured in process on the all-miss load (no HTTP), 29 % of a predict request's time went to the
layers between the ASGI entry and the route: Starlette's ServerErrorMiddleware and
ExceptionMiddleware, FastAPI's body-limit, telemetry and exit-stack middlewares, the router's
linear match over every route, and our metrics middleware. None of them does anything the predict
route needs: it reads its body with its own limit, answers every error itself as JSON, and counts
itself in the metrics. So :class:`InfercacheApp` recognises ``POST /v1/models/{name}/predict`` at
the door and runs :func:`serve_predict`; every other request (and this one when the app is mounted
under a root path, or before start-up finished) goes through FastAPI as before. The FastAPI route
stays registered, so ``/docs`` and the OpenAPI document are unchanged.

Middleware added to the app with ``add_middleware`` does not see predict requests; wrap the app
instead (ASGI middleware around ``InfercacheApp`` sees everything).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from infercache.errors import InfercacheError
from infercache.server.errors import APIError, error_response, infercache_error_response
from infercache.server.routes import (
    PREDICT_PATH,
    admit_predict,
    check_content_encoding,
    check_declared_length,
    predict_payload,
)

__all__ = ["InfercacheApp", "serve_predict"]

log = logging.getLogger("infercache.server")

_PREFIX = "/v1/models/"
_SUFFIX = "/predict"


class InfercacheApp(FastAPI):
    """FastAPI, with the predict route dispatched before the middleware stack."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path: str = scope["path"]
            if path.startswith(_PREFIX) and path.endswith(_SUFFIX):
                name = path[len(_PREFIX) : -len(_SUFFIX)]
                service = getattr(self.state, "service", None)
                if name and "/" not in name and service is not None:
                    await serve_predict(service, name, scope, receive, send)
                    return
        elif scope["type"] == "lifespan":
            send = self._lifespan_send(send)
        await super().__call__(scope, receive, send)

    def _lifespan_send(self, send: Send) -> Send:
        """``send`` with a start-up failure's message cut to the line the lifespan noted (a
        configuration error): Starlette puts the whole traceback there, and uvicorn logs it once
        per worker."""

        async def lifespan_send(message: Message) -> None:
            line = getattr(self.state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and line:
                message = {**message, "message": line}
            await send(message)

        return lifespan_send


async def serve_predict(
    service: Any, name: str, scope: Scope, receive: Receive, send: Send
) -> None:
    """Answer one predict request on raw ASGI messages; every failure becomes a JSON error."""
    start = time.perf_counter()
    try:
        authorization = None
        declared = None
        encoding = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                authorization = value.decode("latin-1")
            elif key == b"content-length":
                declared = value
            elif key == b"content-encoding":
                encoding = value
        admit_predict(service, name, authorization)
        check_content_encoding(encoding)
        body = await _receive_body(receive, declared, service.settings.max_body_bytes)
        if body is None:  # the client went away before sending its body
            return
        payload, timing = await predict_payload(service, name, body)
    except APIError as exc:
        response, code = error_response(exc.status, exc.code, exc.message, exc.headers), exc.code
    except InfercacheError as exc:
        response, code = infercache_error_response(exc), exc.code
    except Exception:
        log.exception("unhandled error on POST %s", scope["path"])
        response = error_response(500, "internal_error", "internal server error")
        code = "internal_error"
    else:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"server-timing", timing.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        service.metrics.observe_request(PREDICT_PATH, 200, time.perf_counter() - start)
        return
    await response(scope, receive, send)
    status = response.status_code
    service.metrics.observe_request(PREDICT_PATH, status, time.perf_counter() - start)
    service.metrics.errors.labels(code).inc()


async def _receive_body(receive: Receive, declared: bytes | None, limit: int) -> bytes | None:
    """The request body, refusing (413) anything over ``limit`` bytes without buffering it all:
    ``Content-Length`` is checked first, and a chunked or lying body is counted as it arrives."""
    check_declared_length(declared, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise APIError(413, "payload_too_large", f"request body over {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
