"""SQLiteEventLog: invalidation events between processes that share an SQLite file, no Redis.

``infercache serve --workers 4`` on the embedded default (L1 + an SQLite L3, no Redis) runs four
processes, each with its own L1. Without a way to tell the others, an admin invalidation reached
the one worker that received it; the other three kept answering the invalidated entry from their
L1 for as long as it lived there (found in review: "A after: None / B after: l1").

This is the publish/subscribe half of the :class:`~infercache.tiers.base.Coordinator` protocol,
which is all :class:`~infercache.multilevel.invalidation.EventBus` needs, over a table in the
same SQLite file: ``publish`` appends a row, and each subscriber polls for rows past the last id
it has seen (every ``poll_interval`` seconds, 0.25 by default: an invalidation reaches every
worker within about that). A poll is one indexed read in a worker thread; rows older than
``retention`` seconds are deleted now and then. A subscriber that falls further behind than that
(a process stopped for minutes) cannot know what it missed, so it calls ``on_reconnect``, where
MultiLevelCache drops its L1 and reloads generations, as after a Redis reconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable

from infercache.aio import stop_task

__all__ = ["SQLiteEventLog"]

log = logging.getLogger(__name__)

_TABLE = "infercache_events"
_LAST_ISSUED = "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = ?), 0)"


class SQLiteEventLog:
    """Events in an SQLite table, polled by subscribers (see the module docstring)."""

    def __init__(
        self,
        path: str,
        *,
        namespace: str = "infercache",
        poll_interval: float = 0.25,
        retention: float = 300.0,
        busy_timeout_ms: int = 5000,
    ) -> None:
        if poll_interval <= 0 or retention <= poll_interval:
            raise ValueError("need poll_interval > 0 and retention > poll_interval")
        self.path = path
        self.namespace = namespace
        self.poll_interval = poll_interval
        self.retention = retention
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = asyncio.Lock()  # one statement at a time on the shared connection
        self._conn: sqlite3.Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_prune = 0.0

    def channel(self, suffix: str) -> str:
        return f"__infercache__:{self.namespace}:{suffix}"

    # ----------------------------------------------------------------- the table

    def _db(self) -> sqlite3.Connection:
        """The connection (made on first use, in the worker thread that uses it: sqlite3
        connections are created with check_same_thread=False and used one call at a time)."""
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {_TABLE} (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "channel TEXT NOT NULL, payload BLOB NOT NULL, at REAL NOT NULL)"
            )
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[[sqlite3.Connection], object]) -> object:
        async with self._lock:
            return await asyncio.to_thread(lambda: fn(self._db()))

    async def publish(self, channel: str, message: bytes) -> int:
        """Append an event; returns 1 (subscribers are not counted: they poll)."""

        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                f"INSERT INTO {_TABLE} (channel, payload, at) VALUES (?, ?, ?)",
                (channel, message, time.time()),
            )

        await self._run(insert)
        return 1

    async def _last_id(self) -> int:
        """The last id ever issued (AUTOINCREMENT never reuses one, even after a prune)."""
        row = await self._run(lambda db: db.execute(_LAST_ISSUED, (_TABLE,)).fetchone())
        assert isinstance(row, tuple)
        return int(row[0])

    async def _read_after(self, channel: str, after: int) -> tuple[int, list[bytes], bool]:
        """(new last id, payloads on ``channel`` past ``after``, whether events past ``after``
        were pruned before we read them). Ids are consecutive unless rows were deleted, and
        only the prune deletes."""

        def read(db: sqlite3.Connection) -> tuple[int, list[bytes], bool]:
            rows = db.execute(
                f"SELECT id, channel, payload FROM {_TABLE} WHERE id > ? ORDER BY id LIMIT 10000",
                (after,),
            ).fetchall()
            if rows:
                return (
                    rows[-1][0],
                    [bytes(p) for _, ch, p in rows if ch == channel],
                    (rows[0][0] > after + 1),
                )
            issued = int(db.execute(_LAST_ISSUED, (_TABLE,)).fetchone()[0])
            return max(after, issued), [], issued > after

        result = await self._run(read)
        assert isinstance(result, tuple)
        return result

    async def _prune(self) -> None:
        now = time.time()
        if now - self._last_prune < self.retention / 10:
            return
        self._last_prune = now
        cutoff = now - self.retention
        await self._run(lambda db: db.execute(f"DELETE FROM {_TABLE} WHERE at < ?", (cutoff,)))

    # ----------------------------------------------------------------- subscribing

    async def subscribe(
        self,
        channel: str,
        on_message: Callable[[bytes], None],
        on_reconnect: Callable[[], Awaitable[None] | None] | None = None,
    ) -> Callable[[], Awaitable[None]]:
        """Call ``on_message`` for every event published on ``channel`` from now on, by any
        process using the file (this one included: EventBus skips its own by origin)."""
        after = await self._last_id()

        async def poll() -> None:
            nonlocal after
            while True:
                await asyncio.sleep(self.poll_interval)
                try:
                    after, payloads, missed = await self._read_after(channel, after)
                    await self._prune()
                except Exception as exc:  # a locked or broken file: try again next time
                    log.warning("invalidation events not read from %s: %s", self.path, exc)
                    continue
                if missed and on_reconnect is not None:
                    res = on_reconnect()
                    if inspect.isawaitable(res):
                        await res
                for payload in payloads:
                    try:
                        on_message(payload)
                    except Exception:
                        log.exception("invalidation event handler failed")

        task = asyncio.get_running_loop().create_task(poll(), name="infercache-sqlite-events")
        self._tasks.append(task)

        async def stop() -> None:
            await stop_task(task)
            with contextlib.suppress(ValueError):
                self._tasks.remove(task)

        return stop

    async def close(self) -> None:
        for task in list(self._tasks):
            await stop_task(task)
        self._tasks.clear()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            async with self._lock:
                await asyncio.to_thread(conn.close)
