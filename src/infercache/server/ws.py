"""WebSocket endpoint ``/v1/ws`` and the broadcast hub for stream results.

Protocol (JSON text frames, one object per frame):

- ``{"type": "predict", "id": ..., "model": "mlp", "input": [...]}`` ->
  ``{"type": "prediction", "id": ..., "model": ..., "model_version": ..., "output": ...,
  "cached": bool, "tier": ..., "timings_ms": {...}}``. The user's message names
  (``"type": "prediction"``, ``"model_id"``) are accepted too.
- ``{"type": "ping", "id"?: ...}`` -> ``{"type": "pong", "id": ...}``.
- ``{"type": "subscribe", "topic": "..."}`` / ``"unsubscribe"`` -> ``subscribed`` /
  ``unsubscribed``; then ``{"type": "event", "topic": ..., "data": ...}`` for each result
  published on the topic. Topic names follow :func:`topic_error`, the rule the publish route
  applies too.
- anything wrong -> ``{"type": "error", "id": ..., "code": ..., "message": ...}``; the connection
  stays open.

Why it is built this way:

- Each predict message becomes its own task, so many requests are in flight per connection and each
  answer goes out as soon as it is ready, carrying its id (the user's server awaited one prediction
  at a time per connection). ``ws_max_inflight`` bounds the tasks: when it is reached the reader
  stops reading, and TCP flow control pushes back on the client instead of memory growing.
- One writer task per connection owns the socket; everything else only appends to its outbox, so
  no two coroutines ever interleave frames and a slow socket never blocks a publisher.
- Broadcasts go to a bounded per-connection queue (``ws_send_queue``). When a subscriber cannot
  keep up, the policy ``ws_slow_consumer`` decides: ``drop_oldest`` (default) drops the oldest
  queued event and later tells the client how many it lost with ``{"type": "dropped", "count": n}``;
  ``disconnect`` closes the connection with code 1008 ("slow consumer"). Either way the publisher
  and the other subscribers never wait for a slow one (the user's ``broadcast`` awaited each send
  in turn, so one stalled client stalled everyone).
- A slow consumer's writer is usually blocked in a send (the socket buffers are full), so the
  disconnect cannot wait for it: the publisher's ``offer`` starts a closer that cancels the writer,
  sends the close frame if the transport takes it within ``_CLOSE_GRACE_S``, and otherwise, or if
  the frame is still unsent a grace later, aborts the transport (see :func:`_server_transport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from infercache.config import topic_error
from infercache.errors import InfercacheError
from infercache.server import fastjson
from infercache.server.errors import public_message

if TYPE_CHECKING:
    from infercache.server.service import Service

log = logging.getLogger("infercache.server.ws")

_SLOW_CLOSE_CODE = 1008
# How long a slow consumer's close frame may wait for the transport (and then for the client to
# take it) before the connection is aborted instead.
_CLOSE_GRACE_S = 1.0
_KNOWN_TYPES = frozenset({"predict", "prediction", "ping", "subscribe", "unsubscribe"})
# the same fields HTTP accepts (less "inputs", which has no WebSocket form), plus the envelope's
_PREDICT_FIELDS = frozenset({"type", "id", "model", "model_id", "input", "use_cache"})
_MAX_TOPICS_PER_CONNECTION = 64


def _server_transport(websocket: WebSocket) -> Any | None:
    """The server's transport under ``websocket``, or None when it cannot be found.

    Needed to abort a slow consumer: ASGI has no message for it, and a close frame cannot reach a
    client that does not read (it waits behind the unsent data), while uvicorn's own close,
    ``transport.close()``, waits for that data to leave, so the connection would stay open for as
    long as the client stays silent. uvicorn's WebSocket protocols hand the app their bound
    ``receive`` method (Starlette passes it through unwrapped) and keep the transport as
    ``.transport``. Under another server a slow consumer gets the close frame only.
    """
    owner = getattr(getattr(websocket, "_receive", None), "__self__", None)
    transport = getattr(owner, "transport", None)
    if callable(getattr(transport, "abort", None)) and callable(
        getattr(transport, "get_write_buffer_size", None)
    ):
        return transport
    return None


def dumps(obj: Any) -> bytes:
    """orjson with numpy support, the same encoder as the HTTP responses."""
    from infercache.server.encoding import dumps as _dumps

    return _dumps(obj)


class Outbox:
    """The send side of one connection: replies (bounded by the in-flight limit) and events
    (bounded by ``maxsize``, with the slow-consumer policy)."""

    def __init__(
        self,
        websocket: WebSocket,
        *,
        maxsize: int,
        policy: str,
        service: Service,
        transport: Any | None = None,
    ) -> None:
        self._ws = websocket
        self._transport = transport
        self._replies: deque[bytes] = deque()
        self._events: deque[bytes] = deque()
        self._maxsize = maxsize
        self._policy = policy
        self._service = service
        self._wake = asyncio.Event()
        self._dropped = 0
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self.closed = False
        self.topics: set[str] = set()

    @property
    def slow_closed(self) -> bool:
        """Whether this connection was (or is being) closed as a slow consumer."""
        return self._closer is not None

    def start(self) -> None:
        """Start the writer task."""
        self._writer = asyncio.create_task(self.run(), name="infercache-ws-writer")

    def reply(self, message: dict[str, Any]) -> None:
        """Queue an answer to this client's own request."""
        if self.closed:
            return
        self._replies.append(dumps(message))
        self._wake.set()

    def offer(self, data: bytes) -> bool:
        """Queue a broadcast event without ever waiting; False if it was refused."""
        if self.closed:
            return False
        if len(self._events) >= self._maxsize:
            if self._policy == "disconnect":
                self._disconnect_slow()
                return False
            self._events.popleft()
            self._dropped += 1
            self._service.metrics.ws_dropped.inc()
        self._events.append(data)
        self._wake.set()
        return True

    def _disconnect_slow(self) -> None:
        """Close this connection for the ``disconnect`` policy, counted once per connection.

        Not left to the writer: a consumer that overflows is one whose writer is blocked in a send
        (the socket buffers are full), and it would never look at a flag.
        """
        self.closed = True
        self._events.clear()
        self._replies.clear()
        self._service.metrics.ws_disconnected.inc()
        self._closer = asyncio.get_running_loop().create_task(
            self._close_slow(), name="infercache-ws-slow-close"
        )

    async def _close_slow(self) -> None:
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()  # blocked in a send, most likely: nothing half-written is lost
            await asyncio.wait([writer])
        try:
            await asyncio.wait_for(
                self._ws.close(code=_SLOW_CLOSE_CODE, reason="slow consumer"), _CLOSE_GRACE_S
            )
        except Exception:  # TimeoutError: the transport takes nothing; or already gone
            self._abort()
            return
        # The frame is queued behind whatever the client has not read yet. One that takes neither
        # within the grace will not; uvicorn would then wait for ever to flush before closing.
        asyncio.get_running_loop().call_later(_CLOSE_GRACE_S, self._abort_if_unsent)

    def _abort_if_unsent(self) -> None:
        transport = self._transport
        with contextlib.suppress(Exception):
            if transport is not None and transport.get_write_buffer_size() > 0:
                transport.abort()

    def _abort(self) -> None:
        if self._transport is None:
            log.warning("slow WebSocket consumer: no close frame sent and no transport to abort")
            return
        with contextlib.suppress(Exception):
            self._transport.abort()

    async def shutdown(self) -> None:
        """Stop the writer and wait for a slow-consumer close in progress (bounded by the grace)."""
        self.closed = True
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.wait([self._writer])
        if self._closer is not None:
            await asyncio.wait([self._closer])

    async def run(self) -> None:
        """Writer loop: the only coroutine that sends on this socket (until a slow-consumer
        closer cancels it and takes over)."""
        ws = self._ws
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._replies or self._events:
                    if self._replies:
                        data = self._replies.popleft()
                    else:
                        if self._dropped:
                            n, self._dropped = self._dropped, 0
                            await ws.send_text(f'{{"type":"dropped","count":{n}}}')
                        data = self._events.popleft()
                    await ws.send_text(data.decode())
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.closed = True
        except asyncio.CancelledError:
            self.closed = True
            raise


class Hub:
    """Topic -> subscribers. ``publish`` never blocks: each subscriber has its own bounded queue."""

    def __init__(self) -> None:
        self._topics: dict[str, set[Outbox]] = {}
        self.published = 0

    def subscribe(self, topic: str, outbox: Outbox) -> None:
        self._topics.setdefault(topic, set()).add(outbox)
        outbox.topics.add(topic)

    def unsubscribe(self, topic: str, outbox: Outbox) -> None:
        subs = self._topics.get(topic)
        if subs is not None:
            subs.discard(outbox)
            if not subs:
                del self._topics[topic]
        outbox.topics.discard(topic)

    def unsubscribe_all(self, outbox: Outbox) -> None:
        for topic in list(outbox.topics):
            self.unsubscribe(topic, outbox)

    def subscribers(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    def counts(self) -> dict[str, int]:
        """Aggregates without topic names (names can carry user or session ids): for the
        dashboard, which anyone who can reach the server may read."""
        return {
            "topics": len(self._topics),
            "subscriptions": sum(len(s) for s in self._topics.values()),
        }

    def publish(self, topic: str, data: Any) -> int:
        """Send ``data`` to every subscriber of ``topic``; returns how many accepted it.

        Encoded once for all subscribers. Usable as a StreamProcessor sink
        (``publish=lambda r: hub.publish("topic", r)``).
        """
        subs = self._topics.get(topic)
        self.published += 1
        if not subs:
            return 0
        frame = dumps({"type": "event", "topic": topic, "data": data})
        return sum(1 for outbox in list(subs) if outbox.offer(frame))

    def stats(self) -> dict[str, Any]:
        """Subscribers per topic name: for the admin stats only (see :meth:`counts`)."""
        return {
            "topics": {t: len(s) for t, s in self._topics.items()},
            "published": self.published,
        }


def _error(msg_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "id": msg_id, "code": code, "message": message}


_ID_RULE = "id must be a string of at most 256 characters or an integer below 2**53 in magnitude"


def _valid_id(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, str) and len(value) <= 256)
        or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53)
    )


def _fast_message(service: Service, raw: str | bytes) -> dict[str, Any] | None:
    """A predict message decoded by server.fastjson (its input straight into an array), when
    the message and its model allow it; None sends it to the general orjson path."""
    if len(raw) < 512:  # small messages (ping, subscribe, short inputs): orjson is as fast
        return None
    found = fastjson.decode_message(raw)
    if found is None:
        return None
    fields, array = found
    model = fields.get("model", fields.get("model_id"))
    entry = service.models.get(model) if isinstance(model, str) else None
    if entry is None or not entry.array_json:
        return None
    fields["input"] = array
    return fields


async def _predict_task(
    service: Service, outbox: Outbox, msg_id: Any, model: str, raw_input: Any, use_cache: bool
) -> None:
    try:
        answer = await service.predict_json(model, raw_input, use_cache=use_cache, transport="ws")
        timings = answer.pop("timings", {})
        answer["type"] = "prediction"
        answer["id"] = msg_id
        answer["timings_ms"] = {k: round(v * 1000.0, 4) for k, v in timings.items()}
        outbox.reply(answer)
    except InfercacheError as exc:
        service.metrics.errors.labels(exc.code).inc()
        outbox.reply(_error(msg_id, exc.code, public_message(exc)))
    except Exception:  # never let one request kill the connection
        log.exception("websocket prediction failed")
        outbox.reply(_error(msg_id, "internal_error", "internal server error"))


async def websocket_endpoint(websocket: WebSocket) -> None:
    """The ``/v1/ws`` handler (see the module docstring for the protocol)."""
    service: Service = websocket.app.state.service
    settings = service.settings
    if service.api_auth.enabled:
        header = websocket.headers.get("authorization")
        token = websocket.query_params.get("token")
        if not (service.api_auth.matches(header) or service.api_auth.matches(f"Bearer {token}")):
            await websocket.close(code=_SLOW_CLOSE_CODE, reason="unauthorized")
            return
    await websocket.accept()
    metrics = service.metrics
    metrics.ws_opened()
    outbox = Outbox(
        websocket,
        maxsize=settings.ws_send_queue,
        policy=settings.ws_slow_consumer,
        service=service,
        transport=_server_transport(websocket),
    )
    outbox.start()
    slots = asyncio.Semaphore(settings.ws_max_inflight)
    tasks: set[asyncio.Task[None]] = set()

    def _done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        slots.release()

    try:
        while not outbox.closed:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes")
            if raw is None:
                continue
            if len(raw) > settings.max_body_bytes:
                metrics.ws_messages.labels("invalid").inc()
                outbox.reply(
                    _error(None, "payload_too_large", f"message over {settings.max_body_bytes} B")
                )
                continue
            data = _fast_message(service, raw)
            if data is None:
                try:
                    data = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    metrics.ws_messages.labels("invalid").inc()
                    outbox.reply(_error(None, "invalid_json", f"message is not valid JSON: {exc}"))
                    continue
            if not isinstance(data, dict):
                metrics.ws_messages.labels("invalid").inc()
                outbox.reply(_error(None, "invalid_message", "message must be a JSON object"))
                continue
            msg_id = data.get("id")
            if not _valid_id(msg_id):
                outbox.reply(_error(None, "invalid_message", _ID_RULE))
                continue
            kind = data.get("type")
            metrics.ws_messages.labels(kind if kind in _KNOWN_TYPES else "other").inc()
            if kind in ("predict", "prediction"):
                model = data.get("model", data.get("model_id"))
                if not _PREDICT_FIELDS.issuperset(data):  # as HTTP: a misspelt field is an error
                    extra = sorted(data.keys() - _PREDICT_FIELDS)[:5]
                    text = f"unknown field(s) {extra}; expected 'model', 'input', 'id', 'use_cache'"
                    outbox.reply(_error(msg_id, "invalid_request", text))
                    continue
                if not isinstance(model, str):
                    outbox.reply(_error(msg_id, "invalid_message", "'model' must be a string"))
                    continue
                if "input" not in data:
                    outbox.reply(_error(msg_id, "invalid_message", "'input' is required"))
                    continue
                use_cache = data.get("use_cache", True)
                if not isinstance(use_cache, bool):
                    outbox.reply(_error(msg_id, "invalid_message", "'use_cache' must be a boolean"))
                    continue
                await slots.acquire()  # backpressure: stop reading while the connection is full
                task = asyncio.create_task(
                    _predict_task(service, outbox, msg_id, model, data["input"], use_cache)
                )
                tasks.add(task)
                task.add_done_callback(_done)
            elif kind == "ping":
                outbox.reply({"type": "pong", "id": msg_id})
            elif kind in ("subscribe", "unsubscribe"):
                topic = data.get("topic")
                if not isinstance(topic, str):
                    outbox.reply(_error(msg_id, "invalid_message", "'topic' must be a string"))
                    continue
                problem = topic_error(topic)
                if problem is not None:
                    outbox.reply(_error(msg_id, "invalid_topic", problem))
                    continue
                if kind == "subscribe":
                    if (
                        topic not in outbox.topics  # subscribing again is a no-op, not a new one
                        and len(outbox.topics) >= _MAX_TOPICS_PER_CONNECTION
                    ):
                        outbox.reply(
                            _error(
                                msg_id,
                                "too_many_topics",
                                f"at most {_MAX_TOPICS_PER_CONNECTION} topics per connection",
                            )
                        )
                        continue
                    service.hub.subscribe(topic, outbox)
                else:
                    service.hub.unsubscribe(topic, outbox)
                outbox.reply({"type": f"{kind}d", "id": msg_id, "topic": topic})
            else:
                outbox.reply(
                    _error(msg_id, "unknown_type", f"unknown message type {str(kind)[:40]!r}")
                )
    except WebSocketDisconnect:
        pass
    finally:
        metrics.ws_closed()
        service.hub.unsubscribe_all(outbox)
        for task in list(tasks):
            task.cancel()
        await outbox.shutdown()
        if (
            not outbox.slow_closed
            and websocket.client_state == WebSocketState.CONNECTED
            and websocket.application_state == WebSocketState.CONNECTED
        ):
            with contextlib.suppress(Exception):  # bounded: the client may not be reading
                await asyncio.wait_for(websocket.close(), _CLOSE_GRACE_S)
