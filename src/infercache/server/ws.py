"""WebSocket endpoint ``/v1/ws`` and the broadcast hub for stream results.

Protocol (JSON text frames, one object per frame):

- ``{"type": "predict", "id": ..., "model": "mlp", "input": [...]}`` ->
  ``{"type": "prediction", "id": ..., "model": ..., "model_version": ..., "output": ...,
  "cached": bool, "tier": ..., "timings_ms": {...}}``. The user's message names
  (``"type": "prediction"``, ``"model_id"``) are accepted too.
- ``{"type": "ping", "id"?: ...}`` -> ``{"type": "pong", "id": ...}``.
- ``{"type": "subscribe", "topic": "..."}`` / ``"unsubscribe"`` -> ``subscribed`` /
  ``unsubscribed``; then ``{"type": "event", "topic": ..., "data": ...}`` for each result
  published on the topic.
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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from infercache.errors import InfercacheError
from infercache.server import fastjson

if TYPE_CHECKING:
    from infercache.server.service import Service

log = logging.getLogger("infercache.server.ws")

_SLOW_CLOSE_CODE = 1008
_KNOWN_TYPES = frozenset({"predict", "prediction", "ping", "subscribe", "unsubscribe"})
_MAX_TOPIC_LEN = 200
_MAX_TOPICS_PER_CONNECTION = 64


def dumps(obj: Any) -> bytes:
    """orjson with numpy support, the same encoder as the HTTP responses."""
    from infercache.server.encoding import dumps as _dumps

    return _dumps(obj)


class Outbox:
    """The send side of one connection: replies (bounded by the in-flight limit) and events
    (bounded by ``maxsize``, with the slow-consumer policy)."""

    def __init__(
        self, websocket: WebSocket, *, maxsize: int, policy: str, service: Service
    ) -> None:
        self._ws = websocket
        self._replies: deque[bytes] = deque()
        self._events: deque[bytes] = deque()
        self._maxsize = maxsize
        self._policy = policy
        self._service = service
        self._wake = asyncio.Event()
        self._dropped = 0
        self.overflowed = False
        self.closed = False
        self.topics: set[str] = set()

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
                self.overflowed = True
                self._service.metrics.ws_disconnected.inc()
                self._wake.set()
                return False
            self._events.popleft()
            self._dropped += 1
            self._service.metrics.ws_dropped.inc()
        self._events.append(data)
        self._wake.set()
        return True

    async def run(self) -> None:
        """Writer loop: the only coroutine that sends on this socket."""
        ws = self._ws
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self.overflowed:
                    self.closed = True
                    await ws.close(code=_SLOW_CLOSE_CODE, reason="slow consumer")
                    return
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
        return {
            "topics": {t: len(s) for t, s in self._topics.items()},
            "published": self.published,
        }


def _error(msg_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "id": msg_id, "code": code, "message": message}


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
        outbox.reply(_error(msg_id, exc.code, str(exc) or exc.code))
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
    )
    writer = asyncio.create_task(outbox.run(), name="infercache-ws-writer")
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
                outbox.reply(_error(None, "invalid_message", "id must be a string or an integer"))
                continue
            kind = data.get("type")
            metrics.ws_messages.labels(kind if kind in _KNOWN_TYPES else "other").inc()
            if kind in ("predict", "prediction"):
                model = data.get("model", data.get("model_id"))
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
                if not isinstance(topic, str) or not 0 < len(topic) <= _MAX_TOPIC_LEN:
                    outbox.reply(_error(msg_id, "invalid_message", "'topic' must be a string"))
                    continue
                if kind == "subscribe":
                    if len(outbox.topics) >= _MAX_TOPICS_PER_CONNECTION:
                        outbox.reply(_error(msg_id, "too_many_topics", "subscription limit"))
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
        outbox.closed = True
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        if websocket.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close()
