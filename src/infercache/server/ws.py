"""WebSocket endpoint ``/v1/ws`` and the broadcast hub for stream results.

Protocol (one JSON object per frame; a binary frame's payload is read as UTF-8 JSON as well):

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
  at a time per connection).
- ``ws_max_inflight`` bounds the requests a connection has unanswered: read, and their answer
  (prediction, pong, error, ...) not yet handed to the socket. The reader waits for a place
  (:meth:`Outbox.room`) before it reads a frame and the writer gives it back once the answer is
  written, so when they are all taken the reader stops reading and TCP flow control pushes back on
  the client. Releasing a place when the prediction finished, or queueing pongs and errors without
  a place, let a client that sends but never reads grow the server's memory without limit
  (gigabytes of queued pongs in seconds).
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
import re
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
_TYPES_TEXT = "'predict', 'ping', 'subscribe' or 'unsubscribe'"
# the same fields HTTP accepts (less "inputs", which has no WebSocket form), plus the envelope's
_PREDICT_FIELDS = frozenset({"type", "id", "model", "model_id", "input", "use_cache"})
_MAX_TOPICS_PER_CONNECTION = 64
# An oversized frame is not parsed; its id is read from its start when it is the first field (as
# the Python client sends it). 2 KiB covers the longest id (256 characters, escaped).
_ID_PREFIX = 2048
_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*(-?[0-9]{1,20}|"(?:[^"\\]|\\.)*")\s*[,}]')


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
    """The send side of one connection: replies (at most ``max_unanswered`` requests read and not
    yet answered on the socket, see :meth:`room`) and events (bounded by ``maxsize``, with the
    slow-consumer policy)."""

    def __init__(
        self,
        websocket: WebSocket,
        *,
        maxsize: int,
        policy: str,
        service: Service,
        max_unanswered: int,
        transport: Any | None = None,
    ) -> None:
        self._ws = websocket
        self._transport = transport
        self._replies: deque[bytes] = deque()
        self._events: deque[bytes] = deque()
        self._maxsize = maxsize
        self._policy = policy
        self._service = service
        self._max_unanswered = max_unanswered
        self.unanswered = 0  # frames read whose answer is not written yet
        self._room = asyncio.Event()
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

    @property
    def queued_bytes(self) -> int:
        """Bytes of replies and events waiting for the writer (for the admin stats)."""
        return sum(map(len, self._replies)) + sum(map(len, self._events))

    async def room(self) -> None:
        """Wait until fewer than ``max_unanswered`` answers are owed, or the connection closed.

        The reader waits here before it reads each frame, and every frame read is owed exactly one
        :meth:`reply` (counted by :meth:`owe`), whose place the writer gives back once the answer
        is on the socket. So the answers waiting for a client that does not read are bounded, and
        such a client is slowed by TCP flow control (the reader stops reading) instead of being
        buffered for.
        """
        while self.unanswered >= self._max_unanswered and not self.closed:
            self._room.clear()
            await self._room.wait()

    def owe(self) -> None:
        """Count a frame just read as owed an answer (only the reader calls this, after
        :meth:`room`, so the bound holds without a lock)."""
        self.unanswered += 1

    def _answered(self) -> None:
        self.unanswered -= 1
        self._room.set()

    def reply(self, message: dict[str, Any]) -> None:
        """Queue the answer owed to a frame (its place is given back once it is written)."""
        if self.closed:
            self._answered()
            return
        self._replies.append(dumps(message))
        self._wake.set()

    def _mark_closed(self) -> None:
        """Nothing more will be sent: wake a reader waiting in :meth:`room`."""
        self.closed = True
        self._room.set()

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
        self._mark_closed()
        self._events.clear()
        self.unanswered -= len(self._replies)
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
        self._mark_closed()
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
                        await ws.send_text(self._replies[0].decode())
                        # popped once written: a reply counts against the bound until then
                        self._replies.popleft()
                        self._answered()
                        continue
                    if self._dropped:
                        n, self._dropped = self._dropped, 0
                        await ws.send_text(f'{{"type":"dropped","count":{n}}}')
                    data = self._events.popleft()
                    await ws.send_text(data.decode())
        except (WebSocketDisconnect, RuntimeError, OSError):
            self._mark_closed()
        except asyncio.CancelledError:
            self._mark_closed()
            raise


class Hub:
    """Topic -> subscribers. ``publish`` never blocks: each subscriber has its own bounded queue."""

    def __init__(self) -> None:
        self._topics: dict[str, set[Outbox]] = {}
        self._connections: set[Outbox] = set()
        self.published = 0

    def attach(self, outbox: Outbox) -> None:
        """Count a connection in :meth:`stats` (until :meth:`detach`)."""
        self._connections.add(outbox)

    def detach(self, outbox: Outbox) -> None:
        """Forget a closed connection: its subscriptions and its place in the stats."""
        self.unsubscribe_all(outbox)
        self._connections.discard(outbox)

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
        """Subscribers per topic name: for the admin stats only (see :meth:`counts`). Also what
        this worker's connections hold: requests unanswered (running, or answered and not yet
        written) and bytes queued for their writers, the largest per connection and in all."""
        conns = self._connections
        unanswered = [c.unanswered for c in conns]
        queued = [c.queued_bytes for c in conns]
        return {
            "topics": {t: len(s) for t, s in self._topics.items()},
            "published": self.published,
            "connections": len(conns),
            "unanswered": sum(unanswered),
            "unanswered_max": max(unanswered, default=0),
            "queued_bytes": sum(queued),
            "queued_bytes_max": max(queued, default=0),
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


def _too_large(raw: str | bytes, limit: int) -> bool:
    """Whether the frame is over ``limit`` bytes, as HTTP counts ``max_body_bytes``.

    A text frame arrives decoded; its UTF-8 length (1 to 4 bytes a character) is computed only
    when its length in characters cannot decide.
    """
    if isinstance(raw, bytes) or len(raw) > limit:
        return len(raw) > limit
    return len(raw) * 4 > limit and len(raw.encode("utf-8", "surrogatepass")) > limit


def _leading_id(raw: str | bytes) -> Any:
    """The id of a frame too large to parse, when it is the frame's first field; else None.

    Bounded work: only the first :data:`_ID_PREFIX` characters are looked at, so the client can
    still match the ``payload_too_large`` error to its request.
    """
    head = raw[:_ID_PREFIX]
    found = _LEADING_ID.match(
        head.encode("utf-8", "surrogatepass") if isinstance(head, str) else head
    )
    if found is None:
        return None
    try:
        value = orjson.loads(found.group(1))
    except orjson.JSONDecodeError:
        return None
    return value if _valid_id(value) else None


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
        max_unanswered=settings.ws_max_inflight,
        transport=_server_transport(websocket),
    )
    service.hub.attach(outbox)
    outbox.start()
    tasks: set[asyncio.Task[None]] = set()

    try:
        while True:
            # backpressure: no frame is read while ws_max_inflight answers are owed (running, or
            # queued for a client that does not read); each frame read gets exactly one reply
            await outbox.room()
            if outbox.closed:
                break
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes")
            if raw is None:
                continue
            outbox.owe()
            if _too_large(raw, settings.max_body_bytes):
                metrics.ws_messages.labels("invalid").inc()
                outbox.reply(
                    _error(
                        _leading_id(raw),
                        "payload_too_large",
                        f"message over {settings.max_body_bytes} B",
                    )
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
            known = isinstance(kind, str) and kind in _KNOWN_TYPES
            metrics.ws_messages.labels(kind if known else "other").inc()
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
                # its place (see Outbox.room) is given back once its answer is written
                task = asyncio.create_task(
                    _predict_task(service, outbox, msg_id, model, data["input"], use_cache)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
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
                got = "no 'type'" if kind is None else f"unknown message type {str(kind)[:40]!r}"
                outbox.reply(_error(msg_id, "unknown_type", f"{got}; expected {_TYPES_TEXT}"))
    except WebSocketDisconnect:
        pass
    finally:
        metrics.ws_closed()
        service.hub.detach(outbox)
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
