"""Async Python client for an infercache server: HTTP and WebSocket predictions, models, admin.

::

    async with InfercacheClient("http://127.0.0.1:8000") as client:
        result = await client.predict("mlp", [0.0] * 784)            # over HTTP
        result = await client.predict("mlp", [0.0] * 784, transport="ws")
        results = await asyncio.gather(*(client.predict("mlp", x, transport="ws") for x in xs))

Over WebSocket the client keeps one connection, gives every request an id and matches answers by
id as they arrive, so many requests share the connection without waiting for each other (the
user's ``RealTimeAIClient`` sent one request and waited for its answer before the next). Server
errors come back as :class:`ServerError` carrying the stable ``code``, whatever the transport. A
server that cannot be reached, or a connection lost mid-request, is :class:`ServerUnreachable`; no
answer within the client's ``timeout`` is :class:`ClientTimeout`. All three are
:class:`~infercache.errors.InfercacheError`, so one ``except`` covers whatever the client raises on
purpose (the transports' own exceptions, httpx's or websockets', never escape). An input that
cannot be sent as JSON raises :class:`~infercache.errors.EncodeError` (a ``TypeError`` too) naming
its type, before anything is sent, whatever the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson

from infercache.aio import stop_task
from infercache.errors import ConfigError, EncodeError, InfercacheError


class ServerError(InfercacheError):
    """The server answered with an error: ``code`` (stable), ``status`` (HTTP, or None for WS)."""

    def __init__(self, code: str, message: str, status: int | None = None,
                 retry_after: float | None = None) -> None:  # fmt: skip
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after
        if status is not None:
            self.http_status = status


class ServerUnreachable(InfercacheError, ConnectionError):
    """No connection to the server, or it closed the connection before answering."""

    code = "unreachable"


class ClientTimeout(InfercacheError, TimeoutError):
    """No answer within the client's ``timeout`` (the request may still run on the server)."""

    code = "timeout"


def _error_body(content: bytes) -> dict[str, Any]:
    """The ``error`` object of an error response, or ``{}`` when the body is not ours (a proxy's
    HTML page, an empty body, a truncated one)."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        return {}
    err = data.get("error") if isinstance(data, dict) else None
    return err if isinstance(err, dict) else {}


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header as seconds; None when absent or an HTTP date (not ours)."""
    try:
        return float(value) if value else None
    except ValueError:
        return None


_JSON_TYPES = "JSON types (dict, list, str, int, float, bool, None) and numpy arrays or scalars"


def _dumps(obj: Any) -> bytes:
    """``obj`` as JSON, or :class:`EncodeError` naming what cannot be sent, for both transports
    alike (HTTP raised orjson's bare TypeError, the WebSocket a misleading ServerUnreachable)."""

    def default(o: Any) -> Any:
        tolist = getattr(o, "tolist", None)
        if callable(tolist):
            return tolist()
        kind = type(o)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        raise EncodeError(f"cannot send a value of type {name!r} as JSON; supported: {_JSON_TYPES}")

    try:
        return orjson.dumps(obj, default=default, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:  # orjson.JSONEncodeError; our EncodeError is its __cause__
        if isinstance(exc.__cause__, EncodeError):
            raise exc.__cause__ from None
        raise EncodeError(f"cannot send the request as JSON: {exc}") from None


class WSConnection:
    """One WebSocket to ``/v1/ws`` with id-matched requests and topic subscriptions."""

    def __init__(self, ws: Any, *, event_queue: int = 1024, timeout: float | None = None) -> None:
        self._ws = ws
        #: seconds to wait for an answer (None: for ever); the HTTP client's timeout, so that
        #: ``predict(transport="ws")`` gives up when ``predict()`` over HTTP would
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(event_queue)
        self._reader = asyncio.create_task(self._read(), name="infercache-client-ws")
        self.dropped = 0  # events the server reported dropped for this (slow) connection
        self.closed_reason: str | None = None

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                msg = orjson.loads(raw)
                kind = msg.get("type")
                if kind in ("event", "dropped"):
                    if kind == "dropped":
                        self.dropped += int(msg.get("count", 0))
                    with contextlib.suppress(asyncio.QueueFull):
                        self._events.put_nowait(msg)
                    continue
                fut = self._pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except Exception as exc:  # connection closed: fail everyone still waiting
            self.closed_reason = f"{type(exc).__name__}: {exc}"
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    reason = self.closed_reason or "closed"
                    fut.set_exception(
                        ServerUnreachable(f"the WebSocket closed before answering ({reason})")
                    )
            self._pending.clear()

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` with a fresh id and return the answer with that id (raw dict).

        The id goes first: the server reads it from the start of a frame too large to parse, so
        that its ``payload_too_large`` answer reaches this request. Encoded before anything is
        sent, so that an input that is not JSON raises :class:`EncodeError`, not a send failure.
        """
        msg_id = next(self._ids)
        body = {"id": msg_id, **{k: v for k, v in message.items() if k != "id"}}
        text = _dumps(body).decode()
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            try:
                await self._ws.send(text)
            except Exception as exc:  # websockets' ConnectionClosed: the reader saw it too
                raise ServerUnreachable(f"the WebSocket is closed: {exc}") from exc
            try:
                return await asyncio.wait_for(fut, self.timeout)
            except TimeoutError:
                raise ClientTimeout(
                    f"no answer to {message.get('type')!r} #{msg_id} within {self.timeout:g} s"
                ) from None
        finally:
            self._pending.pop(msg_id, None)

    async def predict(self, model: str, input: Any, *, use_cache: bool = True) -> dict[str, Any]:
        """One prediction; raises :class:`ServerError` on an error answer."""
        msg: dict[str, Any] = {"type": "predict", "model": model, "input": input}
        if not use_cache:
            msg["use_cache"] = False
        answer = await self.request(msg)
        if answer.get("type") == "error":
            raise ServerError(answer.get("code", "error"), answer.get("message", ""))
        return answer

    async def ping(self) -> dict[str, Any]:
        return await self.request({"type": "ping"})

    async def subscribe(self, topic: str) -> dict[str, Any]:
        return await self.request({"type": "subscribe", "topic": topic})

    async def unsubscribe(self, topic: str) -> dict[str, Any]:
        return await self.request({"type": "unsubscribe", "topic": topic})

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Broadcast events (and ``dropped`` notices) as they arrive, until the socket closes."""
        while True:
            if self._reader.done() and self._events.empty():
                return
            get = asyncio.create_task(self._events.get())
            done, _ = await asyncio.wait({get, self._reader}, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                yield get.result()
            else:
                get.cancel()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()
        await stop_task(self._reader)


class InfercacheClient:
    """Async client. ``token`` is sent as a bearer token on prediction requests (``--api-token``);
    admin calls take their own token."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, token: str | None = None,
                 timeout: float = 30.0, max_connections: int = 100) -> None:  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout  # per request, over HTTP and over the WebSocket alike
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            parts = urlsplit(self.base_url)
            if parts.scheme not in ("http", "https"):
                raise ConfigError(f"the server URL must be http:// or https://, got {base_url!r}")
            _ = parts.port  # raises for a port out of range, which httpx lets through
            self._http = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=timeout,
                headers=headers,
                limits=httpx.Limits(max_connections=max_connections,
                                    max_keepalive_connections=max_connections),
            )  # fmt: skip
        except (httpx.InvalidURL, ValueError) as exc:  # http://[::1 is not a URL at all
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"invalid server URL {base_url!r}: {exc}") from None
        self._ws: WSConnection | None = None
        self._ws_lock = asyncio.Lock()

    async def __aenter__(self) -> InfercacheClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        await self._http.aclose()

    # -- HTTP --------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, *, body: Any = None,
                       token: str | None = None) -> Any:  # fmt: skip
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        content = None if body is None else _dumps(body)
        try:
            resp = await self._http.request(method, path, content=content, headers=headers)
        except httpx.TimeoutException as exc:
            raise ClientTimeout(
                f"{method} {self.base_url}{path}: no answer within {self.timeout:g} s"
            ) from exc
        except httpx.TransportError as exc:
            raise ServerUnreachable(
                f"cannot reach {self.base_url} ({type(exc).__name__}: {exc or 'no detail'})"
            ) from exc
        if resp.status_code >= 400:
            err = _error_body(resp.content)
            retry = resp.headers.get("retry-after")
            raise ServerError(
                str(err.get("code", "http_error")),
                str(err.get("message") or f"HTTP {resp.status_code} {resp.reason_phrase}"),
                resp.status_code,
                _seconds(retry),
            )
        try:
            return orjson.loads(resp.content) if resp.content else None
        except orjson.JSONDecodeError as exc:
            raise ServerError(
                "bad_response",
                f"{method} {path} answered {resp.status_code} with a body that is not JSON",
                resp.status_code,
            ) from exc

    async def predict(self, model: str, input: Any, *, transport: str = "http",
                      use_cache: bool = True) -> dict[str, Any]:  # fmt: skip
        """One prediction: ``{"output", "cached", "tier", "model_version", ...}``."""
        if transport == "ws":
            ws = await self.ws()
            return await ws.predict(model, input, use_cache=use_cache)
        if transport != "http":
            raise ValueError("transport must be 'http' or 'ws'")
        return await self._predict(model, {"input": input}, use_cache)

    async def predict_many(self, model: str, inputs: list[Any], *,
                           use_cache: bool = True) -> dict[str, Any]:  # fmt: skip
        """Several inputs in one HTTP request: ``{"outputs", "cached", "tier", ...}``."""
        return await self._predict(model, {"inputs": inputs}, use_cache)

    async def _predict(self, model: str, body: dict[str, Any], use_cache: bool) -> dict[str, Any]:
        if not use_cache:
            body["use_cache"] = False
        # quoted: a model name is one path segment, never a way to reach another endpoint
        path = f"/v1/models/{quote(model, safe='')}/predict"
        result: dict[str, Any] = await self._request("POST", path, body=body)
        return result

    async def models(self) -> list[dict[str, Any]]:
        data = await self._request("GET", "/v1/models")
        models: list[dict[str, Any]] = data["models"]
        return models

    async def health(self) -> bool:
        try:
            await self._request("GET", "/healthz")
        except InfercacheError:  # an error answer, unreachable, or too slow: not healthy
            return False
        return True

    async def ready(self) -> bool:
        try:
            await self._request("GET", "/readyz")
        except InfercacheError:
            return False
        return True

    async def stats(self, token: str | None = None) -> dict[str, Any]:
        """Admin: cache, batcher and latency statistics."""
        result: dict[str, Any] = await self._request("GET", "/v1/cache/stats", token=token)
        return result

    async def invalidate(self, *, token: str | None = None, all: bool = False,
                         model: str | None = None, version: str | None = None,
                         key: str | None = None, input: Any = None,
                         has_input: bool | None = None) -> dict[str, Any]:  # fmt: skip
        """Admin: invalidate ``all``, one ``key``, a ``model`` (one ``version``), or one ``input``
        of a model (``has_input`` lets you invalidate the input ``None`` itself)."""
        body: dict[str, Any] = {}
        if all:
            body["all"] = True
        if model is not None:
            body["model"] = model
        if version is not None:
            body["version"] = version
        if key is not None:
            body["key"] = key
        if has_input or (has_input is None and input is not None):
            body["input"] = input
        result: dict[str, Any] = await self._request(
            "POST", "/v1/cache/invalidate", body=body, token=token
        )
        return result

    # -- WebSocket ---------------------------------------------------------------------------

    async def ws(self) -> WSConnection:
        """The shared WebSocket connection (opened on first use)."""
        async with self._ws_lock:
            if self._ws is None or self._ws._reader.done():
                self._ws = await self.connect_ws()
            return self._ws

    async def connect_ws(self) -> WSConnection:
        """A new, separate WebSocket connection (the caller closes it)."""
        import websockets

        url = "ws" + self.base_url[len("http") :] + "/v1/ws"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            ws = await asyncio.wait_for(
                websockets.connect(url, additional_headers=headers, max_size=2**24), self.timeout
            )
        except TimeoutError as exc:
            raise ClientTimeout(f"WebSocket {url}: no handshake within {self.timeout:g} s") from exc
        except websockets.InvalidStatus as exc:  # the server refused the upgrade
            status = exc.response.status_code
            code = "unauthorized" if status in (401, 403) else "http_error"
            refused = f"WebSocket upgrade refused with HTTP {status}"
            raise ServerError(code, refused, status) from exc
        except (OSError, websockets.InvalidHandshake) as exc:
            raise ServerUnreachable(f"cannot open a WebSocket to {url} ({exc})") from exc
        return WSConnection(ws, timeout=self.timeout)
