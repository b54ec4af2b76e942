"""SQLCache: the durable L3 tier, an SQLite file by default or PostgreSQL by URL.

Why it looks the way it does:

- One table for every namespace, ``(namespace, key)`` as primary key, the encoded value, an
  absolute ``expires_at`` (epoch seconds, NULL for never) and ``created_at``. Absolute expiry works
  across processes and restarts, unlike a monotonic clock.
- Expired rows are never returned (every read filters on ``expires_at``) and are deleted by a
  background purge in small batches, so a read never pays for cleaning up.
- ``get_many`` is one query (``IN (...)`` / ``= ANY(%s)``), ``set_many`` one UPSERT statement
  in one transaction, so the L3 costs one round trip per batch like the L2.
- SQLite is synchronous: writes run on a dedicated writer thread, other reads on a reader thread
  (WAL mode: readers, ours or other processes', are not blocked by the writer). Hot-path lookups
  run on the event loop with a connection that never waits for a lock: a cached-page lookup costs
  microseconds there, a thread hop milliseconds on a busy core; slow ones (cold pages, a slow
  disk) send lookups back to the reader thread for a while.
- Namespace generations (``invalidate(namespace=...)``) are also kept here, in a small
  ``{table}_generations`` table, so they are as durable as the entries they make unreachable:
  a Redis restart without persistence cannot bring old L3 entries back.
- With ``key_filter`` a Bloom filter of the namespace's keys spares lookups of keys never written.
  It cannot learn what other processes write, so every SQLCache on an SQLite file announces
  itself in a ``{table}_writers`` table (a heartbeat a second) and the filter is used only while
  no other writer is live (``_KeyFilter``).
- PostgreSQL goes through psycopg 3's AsyncConnectionPool with short timeouts (a lookup 0.5 s,
  like Redis's socket timeout; a write 2 s) and the same circuit breaker as Redis, probing in the
  background while it is open, so a stopped or frozen server degrades MultiLevelCache instead of
  stalling it. Its TEXT columns cannot hold NUL, which every Predictor generation name contains:
  the few strings TEXT cannot hold are stored escaped (``_PG_ESCAPE``), all others as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

from infercache.aio import raise_if_cancel_requested, stop_task
from infercache.codec import Codec
from infercache.errors import ConfigError, TierError
from infercache.tiers.base import (
    MISSING,
    TierMetrics,
    consume_outcome,
    encode_values,
    key_type_error,
    validate_ttl,
)
from infercache.tiers.bloom import BloomFilter
from infercache.tiers.breaker import CircuitBreaker

if TYPE_CHECKING:  # the postgres extra: imported at run time only for a postgresql:// URL
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

    Conn = AsyncConnection[Any]

__all__ = ["SQLCache"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Row = tuple[str, bytes, float | None]  # key, encoded value, expires_at (None: never)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_SQLITE_CHUNK = 500  # stays far below SQLite's bound-parameter limit
# Rows per upsert statement: 5 parameters a row, within the connection's bound-parameter limit
# (999 before SQLite 3.32, 32766 since), at most _UPSERT_ROWS_MAX.
_UPSERT_ROWS_MAX = 1000

# Namespace generations (GenerationStore): a few rows per namespace, beside the entries so they
# are as durable as the entries they invalidate. BIGINT: the same DDL works in both databases.
_GENERATIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS {table}_generations ("
    " namespace TEXT NOT NULL, name TEXT NOT NULL, generation BIGINT NOT NULL,"
    " PRIMARY KEY (namespace, name))"
)

# Writer presence in an SQLite file (see _KeyFilter): one row per open SQLCache, its ``seen``
# refreshed by a heartbeat. AUTOINCREMENT makes every announcement take a sequence number never
# used before, even after rows are deleted, so a process can tell that a writer came (and perhaps
# went) between two of its heartbeats.
_WRITERS_DDL = (
    "CREATE TABLE IF NOT EXISTS {table}_writers ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, seen REAL NOT NULL)"
)
_LAST_ISSUED = "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = ?), 0)"


class _Backend(Protocol):
    name: str

    async def setup(self) -> None: ...
    async def get_many(self, ns: str, keys: Sequence[str], now: float) -> list[Row]: ...
    async def upsert(self, ns: str, rows: Sequence[Row], now: float) -> None: ...
    async def delete(self, ns: str, keys: Sequence[str]) -> int: ...
    async def clear(self, ns: str) -> int: ...
    async def lookup_expiry(self, ns: str, key: str, now: float) -> tuple[bool, float | None]: ...
    async def set_expiry(self, ns: str, key: str, expires_at: float, now: float) -> bool: ...
    async def purge(self, now: float, limit: int) -> int: ...
    async def count(self, ns: str, now: float) -> int: ...
    async def keys_after(self, ns: str, after: str, limit: int) -> list[str]: ...
    async def read_generations(self, ns: str) -> dict[str, int]: ...
    async def advance_generation(self, ns: str, name: str, step: int, floor: int) -> int: ...
    async def close(self) -> None: ...


def _check_keys(keys: Collection[object]) -> None:
    """Refuse a key that is not a str before it reaches the database, as RedisCache does.

    SQLite's TEXT affinity would store ``123`` as ``'123'`` and the hit come back under a key the
    caller never asked for (``get(123)`` returned None after ``set(123, v)``); PostgreSQL fails
    the statement, which the breaker would count as an outage. A plain loop: ~0.2 µs for one key,
    ~1.4 µs for 32 (measured; ``all(map(isinstance, ...))`` was slower below a few hundred keys),
    where an inline SQLite lookup costs 15 µs or more.
    """
    for key in keys:
        if not isinstance(key, str):
            raise key_type_error("SQLCache", key)


# --------------------------------------------------------------------------- SQLite


def _chunks(keys: Sequence[str]) -> Iterator[tuple[list[str], str]]:
    """Keys in chunks that fit SQLite's bound-parameter limit, with their ``?,?,...`` marks."""
    for i in range(0, len(keys), _SQLITE_CHUNK):
        chunk = list(keys[i : i + _SQLITE_CHUNK])
        yield chunk, ",".join("?" * len(chunk))


def _can_idle() -> bool:
    return hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE")


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction taken at once (BEGIN IMMEDIATE), rolled back on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of ``path``, or None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


class _SQLiteBackend:
    """SQLite on three connections: a writer thread, a reader thread, and inline lookups.

    Writes (write-behind batches, their commits and WAL checkpoints with their fsyncs) run on the
    writer thread, at the lowest CPU priority by default (``idle_writer``, Linux SCHED_IDLE). An
    upsert costs ~20 µs of CPU per row here (random keys dirty about one page each, copied into
    the WAL at commit, then checkpointed), so a 256-row flush is ~5 ms of CPU; at normal priority
    the scheduler shares the core between it and the event loop for that long, and requests that
    arrive meanwhile wait. At idle priority it runs in the time the event loop leaves idle, and
    when there is none, the write-behind queue fills and its ``when_full`` policy pushes back.
    Measured on ``infercache serve`` pinned to one core (``benchmarks/ab_server.py``): p99 at
    1,200 req/s Poisson 22.6 -> 14.2 ms, p50 3.07 -> 2.51 ms. (Closed loop it made 2,392 against
    2,168 req/s, but there part of the writes is only deferred, to the queue.)

    In WAL mode readers never wait for the writer, so reads get their own thread (at normal
    priority: a lookup is on the request path) and connection instead of queueing behind a
    commit. ``get_many``, the hot path's lookup, runs on the event loop itself when it can (see
    ``_get_many_inline``). Every reader sees each transaction the writer committed before the
    read began. An in-memory database is private to its connection, so there everything runs on
    the writer thread.
    """

    name = "sqlite"
    failure_errors: tuple[type[BaseException], ...] = (sqlite3.OperationalError, OSError)
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(
        self, path: str, table: str, busy_timeout_ms: int = 5000, *, idle_writer: bool = True
    ) -> None:
        self.path = path
        self.table = table
        self.busy_timeout_ms = busy_timeout_ms
        self._shared = path == ":memory:"
        # An in-memory database's one thread answers reads too: those are on the request path.
        self.idle_writer = idle_writer and not self._shared and _can_idle()
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="infercache-sqlite",
            initializer=self._idle_priority if self.idle_writer else None,
        )
        self._conn: sqlite3.Connection | None = None
        self._file_id: tuple[int, int] | None = None  # the file the writer opened
        self._file_checked = 0.0
        self._upsert_rows = 199  # set from the writer connection's limit when it opens
        self._reader = (
            self._executor
            if self._shared
            else ThreadPoolExecutor(max_workers=1, thread_name_prefix="infercache-sqlite-read")
        )
        self._rconn: sqlite3.Connection | None = None
        self._iconn: sqlite3.Connection | None = None
        self._inline_thread: int | None = None
        self._inline_off_until = 0.0
        self._slow_streak = 0
        self.inline_lookups = 0
        self.inline_backoffs = 0

    def _idle_priority(self) -> None:
        """The writer thread's initializer: put it in Linux's SCHED_IDLE class, where it runs
        when nothing else wants the core (``pid`` 0 is the calling thread, not the process)."""
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:  # a sandbox may forbid it: the writer keeps its priority
            self.idle_writer = False  # what stats() reports
            log.debug("cannot lower the SQLite writer thread's priority: %s", exc)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, fn, *args)

    def _connect(self, busy_timeout_ms: int, *pragmas: str) -> sqlite3.Connection:
        """A connection for the calling thread only, in autocommit mode, with ``pragmas``."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
        return conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            wal = () if self._shared else ("journal_mode=WAL",)
            self._conn = self._connect(self.busy_timeout_ms, *wal, "synchronous=NORMAL")
            limit = self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            self._upsert_rows = max(1, min(_UPSERT_ROWS_MAX, limit // 5))
            if not self._shared:
                self._file_id = _file_id(self.path)
        return self._conn

    def _check_file(self) -> None:
        """Refuse to write once the file was deleted or replaced under us: the open connection
        would go on writing to the unlinked inode, every write lost with no error (found in
        review: 100 acknowledged writes, none in the file a new process opened). Checked at most
        once a second, by the writer thread: one stat() call."""
        now = time.monotonic()
        if self._shared or now - self._file_checked < 1.0:
            return
        self._file_checked = now
        if _file_id(self.path) != self._file_id:
            raise TierError(
                f"the SQLite file {self.path} was deleted or replaced while open: writes to it "
                "would be lost; restart the process to create it again"
            )

    def _rdb(self) -> sqlite3.Connection:
        """The reader thread's connection (the writer's for an in-memory database)."""
        if self._shared:
            return self._db()
        if self._rconn is None:
            self._rconn = self._connect(self.busy_timeout_ms, "query_only=1")
        return self._rconn

    def _setup(self) -> None:
        t = self.table
        db = self._db()
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {t} ("
            " namespace TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,"
            " expires_at REAL, created_at REAL NOT NULL,"
            " PRIMARY KEY (namespace, key)) WITHOUT ROWID"
        )
        db.execute(
            f"CREATE INDEX IF NOT EXISTS {t}_expires ON {t}(expires_at)"
            " WHERE expires_at IS NOT NULL"
        )
        db.execute(_GENERATIONS_DDL.format(table=t))
        if not self._shared:  # an in-memory database has no other writer to announce us to
            db.execute(_WRITERS_DDL.format(table=t))

    async def setup(self) -> None:
        await self._call(self._setup)

    def _get_many(self, ns: str, keys: Sequence[str], now: float) -> list[Row]:
        return self._select(self._rdb(), ns, keys, now)

    def _select(
        self, db: sqlite3.Connection, ns: str, keys: Sequence[str], now: float
    ) -> list[Row]:
        out: list[Row] = []
        for chunk, marks in _chunks(keys):
            cur = db.execute(
                f"SELECT key, value, expires_at FROM {self.table} WHERE namespace = ?"
                f" AND key IN ({marks}) AND (expires_at IS NULL OR expires_at > ?)",
                (ns, *chunk, now),
            )
            out.extend(cur.fetchall())
        return out

    def _keys_after(self, ns: str, after: str, limit: int) -> list[str]:
        cur = self._rdb().execute(
            f"SELECT key FROM {self.table} WHERE namespace = ? AND key > ? ORDER BY key LIMIT ?",
            (ns, after, limit),
        )
        return [k for (k,) in cur.fetchall()]

    async def keys_after(self, ns: str, after: str, limit: int) -> list[str]:
        return await self._read(self._keys_after, ns, after, limit)

    async def get_many(self, ns: str, keys: Sequence[str], now: float) -> list[Row]:
        if self._inline_ok():
            rows = self._get_many_inline(ns, keys, now)
            if rows is not None:
                return rows
        return await self._read(self._get_many, ns, keys, now)

    # Lookups on the event loop's own connection. A point lookup of 8 keys in a 100k-row table
    # takes ~15 µs (32 keys: ~35-70 µs) when its pages are cached, while handing it to a thread
    # cost the server's miss path milliseconds: the worker waits for the GIL and, on a busy core,
    # for the scheduler (sqlite latency p50 2.5-9 ms at 1,400 req/s on one core, measured). The
    # inline connection never waits: busy_timeout is 0, so a lock is an error and the lookup goes
    # to the reader thread instead; a lookup slower than INLINE_BUDGET_S (cold pages, slow disk)
    # sends lookups to the reader thread for INLINE_BACKOFF_S once INLINE_SLOW_STREAK lookups in a
    # row were that slow (one alone is usually the GIL: sqlite3 releases it while it steps, and the
    # writer thread may hold it for a switch interval, 5 ms, before handing it back).

    #: inline lookups slower than this (seconds), INLINE_SLOW_STREAK times in a row, turn inline
    #: lookups off for INLINE_BACKOFF_S
    INLINE_BUDGET_S = 0.008
    INLINE_SLOW_STREAK = 3
    INLINE_BACKOFF_S = 10.0

    def _inline_ok(self) -> bool:
        if self._shared or time.monotonic() < self._inline_off_until:
            return False
        return self._inline_thread is None or self._inline_thread == threading.get_ident()

    def _get_many_inline(self, ns: str, keys: Sequence[str], now: float) -> list[Row] | None:
        start = time.perf_counter()
        try:
            if self._iconn is None:
                self._iconn = self._connect(0, "query_only=1")
                self._inline_thread = threading.get_ident()
            rows = self._select(self._iconn, ns, keys, now)
        except sqlite3.Error as exc:  # locked, busy, a broken connection: the thread answers
            log.debug("inline sqlite lookup failed, using the reader thread: %s", exc)
            if self._iconn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._iconn.close()
            self._iconn, self._inline_thread = None, None  # reconnect after a short pause
            self._inline_off_until = time.monotonic() + 1.0
            return None
        if time.perf_counter() - start <= self.INLINE_BUDGET_S:
            self._slow_streak = 0
        else:
            self._slow_streak += 1
            if self._slow_streak >= self.INLINE_SLOW_STREAK:
                self._slow_streak = 0
                self._inline_off_until = time.monotonic() + self.INLINE_BACKOFF_S
                self.inline_backoffs += 1
        self.inline_lookups += 1
        return rows

    def _upsert(self, ns: str, rows: Sequence[Row], now: float) -> None:
        # One multi-row statement per chunk rather than executemany: sqlite3 releases the GIL
        # around every step, and each step of a busy server's writer thread meant waiting for the
        # event loop to hand the GIL back (up to a switch interval, 5 ms). A batch of 20 rows
        # took 22 steps (BEGIN, 20 rows, COMMIT); now it takes one, atomic on its own. A
        # write-behind batch (256 rows by default) fits one statement unless SQLite is older than
        # 3.32, instead of four (BEGIN, two 199-row chunks, COMMIT). Measured, that did not
        # shorten a flush on a busy core: 24-36 ms of wall time either way, the writer thread
        # mostly waiting for the one core it shares with the event loop.
        db = self._db()
        self._check_file()
        per = self._upsert_rows
        chunks = [rows[i : i + per] for i in range(0, len(rows), per)]
        if len(chunks) == 1:
            self._upsert_chunk(db, ns, chunks[0], now)
            return
        with _immediate(db):
            for chunk in chunks:
                self._upsert_chunk(db, ns, chunk, now)

    def _upsert_chunk(
        self, db: sqlite3.Connection, ns: str, rows: Sequence[Row], now: float
    ) -> None:
        params: list[Any] = []
        for k, v, e in rows:
            params += (ns, k, v, e, now)
        db.execute(
            f"INSERT INTO {self.table} (namespace, key, value, expires_at, created_at) VALUES "
            + ",".join(["(?, ?, ?, ?, ?)"] * len(rows))
            + " ON CONFLICT(namespace, key) DO UPDATE SET value = excluded.value,"
            " expires_at = excluded.expires_at, created_at = excluded.created_at",
            params,
        )

    async def upsert(self, ns: str, rows: Sequence[Row], now: float) -> None:
        await self._call(self._upsert, ns, rows, now)

    def _delete(self, ns: str, keys: Sequence[str]) -> int:
        db = self._db()
        n = 0
        for chunk, marks in _chunks(keys):
            cur = db.execute(
                f"DELETE FROM {self.table} WHERE namespace = ? AND key IN ({marks})", (ns, *chunk)
            )
            n += cur.rowcount
        return n

    async def delete(self, ns: str, keys: Sequence[str]) -> int:
        return await self._call(self._delete, ns, keys)

    def _clear(self, ns: str) -> int:
        return self._db().execute(f"DELETE FROM {self.table} WHERE namespace = ?", (ns,)).rowcount

    async def clear(self, ns: str) -> int:
        return await self._call(self._clear, ns)

    def _lookup_expiry(self, ns: str, key: str, now: float) -> tuple[bool, float | None]:
        row = (
            self._rdb()
            .execute(
                f"SELECT expires_at FROM {self.table} WHERE namespace = ? AND key = ?"
                " AND (expires_at IS NULL OR expires_at > ?)",
                (ns, key, now),
            )
            .fetchone()
        )
        return (False, None) if row is None else (True, row[0])

    async def lookup_expiry(self, ns: str, key: str, now: float) -> tuple[bool, float | None]:
        return await self._read(self._lookup_expiry, ns, key, now)

    def _set_expiry(self, ns: str, key: str, expires_at: float, now: float) -> bool:
        cur = self._db().execute(
            f"UPDATE {self.table} SET expires_at = ? WHERE namespace = ? AND key = ?"
            " AND (expires_at IS NULL OR expires_at > ?)",
            (expires_at, ns, key, now),
        )
        return cur.rowcount > 0

    async def set_expiry(self, ns: str, key: str, expires_at: float, now: float) -> bool:
        return await self._call(self._set_expiry, ns, key, expires_at, now)

    def _purge(self, now: float, limit: int) -> int:
        cur = self._db().execute(
            f"DELETE FROM {self.table} WHERE (namespace, key) IN (SELECT namespace, key"
            f" FROM {self.table} WHERE expires_at <= ? LIMIT ?)",
            (now, limit),
        )
        return cur.rowcount

    async def purge(self, now: float, limit: int) -> int:
        return await self._call(self._purge, now, limit)

    def _count(self, ns: str, now: float) -> int:
        row = (
            self._rdb()
            .execute(
                f"SELECT count(*) FROM {self.table} WHERE namespace = ?"
                " AND (expires_at IS NULL OR expires_at > ?)",
                (ns, now),
            )
            .fetchone()
        )
        return int(row[0])

    async def count(self, ns: str, now: float) -> int:
        return await self._read(self._count, ns, now)

    def _read_generations(self, ns: str) -> dict[str, int]:
        cur = self._rdb().execute(
            f"SELECT name, generation FROM {self.table}_generations WHERE namespace = ?", (ns,)
        )
        return {name: int(gen) for name, gen in cur.fetchall()}

    async def read_generations(self, ns: str) -> dict[str, int]:
        return await self._read(self._read_generations, ns)

    def _advance_generation(self, ns: str, name: str, step: int, floor: int) -> int:
        t = f"{self.table}_generations"
        with _immediate(self._db()) as db:  # read-modify-write with no writer in between
            db.execute(
                f"INSERT INTO {t} (namespace, name, generation) VALUES (?, ?, ?)"
                " ON CONFLICT(namespace, name) DO UPDATE SET"
                " generation = max(generation + ?, ?)",
                (ns, name, max(step, floor), step, floor),
            )
            row = db.execute(
                f"SELECT generation FROM {t} WHERE namespace = ? AND name = ?", (ns, name)
            ).fetchone()
        return int(row[0])

    async def advance_generation(self, ns: str, name: str, step: int, floor: int) -> int:
        return await self._call(self._advance_generation, ns, name, step, floor)

    def _heartbeat(
        self, writer: str, now: float, stale: float, forget: float
    ) -> tuple[int, int, bool]:
        """Announce ``writer`` as live at ``now`` and look at the others, in one transaction.

        Returns (other writers seen within ``stale`` seconds, the last announcement sequence
        number issued, whether this call announced ``writer`` anew and so took one of them).
        Rows not refreshed for ``forget`` seconds (a crashed process; or one stamped far in the
        future by a fake clock) are deleted here: the table stays a few rows long.
        """
        t = f"{self.table}_writers"
        with _immediate(self._db()) as db:
            cur = db.execute(f"UPDATE {t} SET seen = ? WHERE id = ?", (now, writer))
            inserted = cur.rowcount == 0  # first beat, or our row was forgotten while we stalled
            if inserted:
                db.execute(f"INSERT INTO {t} (id, seen) VALUES (?, ?)", (writer, now))
            db.execute(f"DELETE FROM {t} WHERE seen < ? OR seen > ?", (now - forget, now + forget))
            (others,) = db.execute(
                f"SELECT count(*) FROM {t} WHERE id <> ? AND seen >= ?", (writer, now - stale)
            ).fetchone()
            (issued,) = db.execute(_LAST_ISSUED, (t,)).fetchone()
        return int(others), int(issued), inserted

    async def heartbeat(
        self, writer: str, now: float, stale: float, forget: float
    ) -> tuple[int, int, bool]:
        """On the writer thread, behind the writes queued before it (see ``_heartbeat``)."""
        return await self._call(self._heartbeat, writer, now, stale, forget)

    def _leave(self, writer: str) -> None:
        self._db().execute(f"DELETE FROM {self.table}_writers WHERE id = ?", (writer,))

    async def leave(self, writer: str) -> None:
        """Withdraw ``writer``'s row: queued behind its last writes, so a process that sees the
        row gone and reloads its key filter reads every key ``writer`` stored."""
        await self._call(self._leave, writer)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _close_reader(self) -> None:
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    async def close(self) -> None:
        if self._iconn is not None and self._inline_thread == threading.get_ident():
            self._iconn.close()
            self._iconn = None
        if not self._shared:
            with contextlib.suppress(Exception):
                await self._read(self._close_reader)
            self._reader.shutdown(wait=False)
        with contextlib.suppress(Exception):
            await self._call(self._close)
        self._executor.shutdown(wait=False)

    def raw_execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run a statement on the worker thread's connection (tests corrupt rows with it)."""
        self._executor.submit(lambda: self._db().execute(sql, tuple(params))).result()


# --------------------------------------------------------------------------- PostgreSQL


def _abort(conn: Conn) -> None:
    """Shut a connection's socket down both ways, so that whatever waits on it fails at once
    (OperationalError: the server closed the connection) and the server, once it runs again,
    finds the client gone.

    Cancelling the waiting task instead makes psycopg send a cancel request on a new connection
    and wait for the query to end, 5 s each against a server that does not answer (measured:
    10 s with PostgreSQL SIGSTOPped), holding the pooled connection all along; a server that
    answers no one could not cancel anything anyway. The duplicate descriptor is closed here;
    libpq's own stays open until psycopg sees the error and closes the connection, so the number
    is never reused under it.
    """
    try:
        fd = conn.pgconn.socket
    except Exception:  # already closed: nothing waits on it
        return
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    with sock, contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


async def _close(conn: Conn) -> None:
    await conn.close()


# PostgreSQL TEXT cannot hold NUL (psycopg refuses the statement: DataError) nor a lone surrogate
# (no UTF-8 for it: UnicodeEncodeError), yet a Predictor's generation name is
# ``name + "\x00" + version`` and SQLCache takes any str key: every invalidation of a model went
# unstored, and one such key failed a whole write-behind batch. Such strings are stored as
# _PG_ESCAPE plus the hex of their UTF-8; so are those that already start with _PG_ESCAPE, which
# keeps the mapping one-to-one. Every other string is stored as it is, so rows written before
# the escape existed keep their keys (a name that began with _PG_ESCAPE then is the one
# exception, which is why the marker is one no real name starts with).
_PG_ESCAPE = "\x01hex:"


def _pg_text(s: str) -> str:
    """``s`` as a PostgreSQL TEXT value may hold it (see _PG_ESCAPE)."""
    if "\x00" not in s and not s.startswith(_PG_ESCAPE):
        if s.isascii():  # the usual case (hex fingerprints), decided without encoding
            return s
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return s
    return _PG_ESCAPE + s.encode("utf-8", "surrogatepass").hex()


def _pg_texts(items: Sequence[str]) -> list[str]:
    """``_pg_text`` of each, a batch with nothing to escape (fingerprints) decided in one pass:
    32 keys one by one cost ~9 µs, ~5 % of a local round trip; joined, under 1 µs."""
    blob = "".join(items)
    if blob.isascii() and "\x00" not in blob and _PG_ESCAPE[0] not in blob:
        return list(items)
    return [_pg_text(s) for s in items]


def _pg_untext(s: str) -> str:
    """The str that ``_pg_text`` stored as ``s``."""
    if not s.startswith(_PG_ESCAPE):
        return s
    try:
        return bytes.fromhex(s[len(_PG_ESCAPE) :]).decode("utf-8", "surrogatepass")
    except ValueError:  # not one of ours: a row written before the escape, kept as it was
        return s


class _PostgresBackend:
    """psycopg 3 AsyncConnectionPool; each operation is one statement on a pooled connection.

    Every statement has a deadline, the wait for a pooled connection included: ``read_timeout``
    for lookups on the request path, ``statement_timeout`` for the rest (writes, purge, count).
    A statement on an open connection has no timeout of its own: a server that stops answering (a
    partition, a stalled host, measured with its processes SIGSTOPped) held each lookup until TCP
    gave up. At the deadline the connection is shut down (``_abort``), the call fails with
    TimeoutError, which the breaker counts, and its later calls fail fast.

    While the breaker is open its background ``probe`` checks the server on a connection of its
    own, and the pool is dropped: its connections died or hang with the server, and
    psycopg_pool's reconnection attempts back off exponentially (measured: after a 40 s outage
    the pool took 23 s more to reconnect), each failure logged. The first statement after the
    probe succeeds opens a fresh pool.
    """

    name = "postgres"

    def __init__(
        self,
        url: str,
        table: str,
        *,
        pool_min: int,
        pool_max: int,
        timeout: float,
        read_timeout: float = 0.5,
        statement_timeout: float | None = 2.0,
    ) -> None:
        try:
            import psycopg
            import psycopg_pool
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                "PostgreSQL needs the postgres extra: pip install 'infercache[postgres]'"
            ) from exc
        self._psycopg = psycopg
        self._psycopg_pool = psycopg_pool
        self.url = url
        self.table = table
        self.failure_errors: tuple[type[BaseException], ...] = (
            psycopg.OperationalError,
            psycopg.InterfaceError,
            psycopg_pool.PoolTimeout,
            psycopg_pool.PoolClosed,
            OSError,
            asyncio.TimeoutError,
        )
        self.errors: tuple[type[BaseException], ...] = (psycopg.Error, psycopg_pool.PoolTimeout)
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._timeout = timeout
        self._read_timeout = read_timeout
        self._statement_timeout = statement_timeout
        self._pool: AsyncConnectionPool[Conn] | None = None  # opened on first use
        self._pool_lock = asyncio.Lock()
        # connection -> the task running a statement on it (see _abort_owned); close() aborts
        self._busy: dict[Conn, asyncio.Task[Any]] = {}
        self._retiring: set[asyncio.Task[None]] = set()  # pools dropped, closing
        self._closed = False

    async def _get_pool(self) -> AsyncConnectionPool[Conn]:
        pool = self._pool
        if pool is not None:
            return pool
        if self._closed:
            raise self._psycopg_pool.PoolClosed("the PostgreSQL tier is closed")
        async with self._pool_lock:
            if self._pool is None:
                pool = self._psycopg_pool.AsyncConnectionPool(
                    conninfo=self.url,
                    min_size=self._pool_min,
                    max_size=self._pool_max,
                    open=False,
                    timeout=self._timeout,  # wait at most this long for a connection
                    reconnect_timeout=3600.0,
                    kwargs=self._connect_kwargs(),
                )
                await pool.open(wait=False)
                self._pool = pool
            return self._pool

    def _connect_kwargs(self) -> dict[str, Any]:
        """Connection options: autocommit, a connect timeout, and a server-side
        ``statement_timeout`` a little past our longest deadline. At our deadline the connection
        is cut (``_abort``), which frees us but not the server: a statement waiting on a lock (a
        migration holding the table) kept running there, one more backend per timed-out lookup
        until ``max_connections`` ran out. The server now ends it itself. Options already in the
        URL are kept."""
        longest = max(self._read_timeout, self._statement_timeout or 0.0)
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, round(self._timeout)),
        }
        if longest > 0:
            ms = int((longest + 0.5) * 1000)
            given = self._psycopg.conninfo.conninfo_to_dict(self.url).get("options") or ""
            if "statement_timeout" not in str(given):
                kwargs["options"] = f"{given} -c statement_timeout={ms}".strip()
        return kwargs

    def _retire_pool(self) -> None:
        """Drop the pool (see the class docstring); it closes in the background, its workers
        given the time a connection attempt may take (psycopg's connect_timeout is 2 s at
        least) so that they stop instead of being left behind with a warning."""
        pool, self._pool = self._pool, None
        if pool is not None:
            task = asyncio.get_running_loop().create_task(pool.close(timeout=3.0))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _run(self, budget: float | None, work: Callable[[Conn], Coroutine[Any, Any, T]]) -> T:
        """``work(conn)`` on a pooled connection, the statement within ``budget`` seconds (None:
        no bound). The wait for a connection has its own bound, the pool's ``timeout``: charged
        to the statement, a burst of lookups on a pool still opening its connections left the
        statements no time, and healthy connections were cut."""
        pool = await self._get_pool()
        loop = asyncio.get_running_loop()
        conn = await pool.getconn(timeout=self._timeout)
        # an aborted connection goes back too: the pool discards it and opens another
        task = loop.create_task(self._use(conn, work, pool.putconn))
        return await self._finish(conn, task, budget, budget)

    async def _use(
        self,
        conn: Conn,
        work: Callable[[Conn], Coroutine[Any, Any, T]],
        release: Callable[[Conn], Awaitable[object]],
    ) -> T:
        """``work(conn)``, the current task registered as ``conn``'s user, then ``release``."""
        me = asyncio.current_task()
        assert me is not None
        self._busy[conn] = me
        try:
            return await work(conn)
        finally:
            if self._busy.get(conn) is me:
                del self._busy[conn]
            await release(conn)

    def _abort_owned(self, conn: Conn, task: asyncio.Task[Any]) -> None:
        """Abort ``conn`` if ``task`` still runs its statement on it: once released, the pool
        may already have handed it to another statement, which must not be aborted."""
        if self._busy.get(conn) is task:
            _abort(conn)

    async def _finish(
        self, conn: Conn, task: asyncio.Task[T], left: float | None, budget: float | None
    ) -> T:
        """Wait up to ``left`` seconds for ``task``, a statement on ``conn``; at the deadline,
        abort the connection and leave the task to end, which it does at once."""
        loop = asyncio.get_running_loop()
        deadline = None if left is None else loop.time() + left
        try:
            done, _ = await asyncio.wait({task}, timeout=left)
        except asyncio.CancelledError:
            # The caller gave up (a request deadline, shutdown). The statement finishes without
            # it and its connection goes back to the pool, or it is aborted at its own deadline:
            # aborting it now would cost a healthy server a connection for every request that
            # ran out of time.
            if deadline is not None:
                timer = loop.call_at(deadline, self._abort_owned, conn, task)
                task.add_done_callback(lambda _: timer.cancel())
            task.add_done_callback(consume_outcome)
            raise
        if not done:
            self._abort_owned(conn, task)
            task.add_done_callback(consume_outcome)
            assert budget is not None  # else no deadline: ``done`` holds the task
            raise TimeoutError(f"PostgreSQL did not answer within {budget:g} s")
        try:
            return task.result()
        except self._psycopg.Error as exc:
            if self._closed:  # aborted by close(): not an outage of the server
                raise TierError("the PostgreSQL tier was closed during the statement") from exc
            raise

    async def _fetch(
        self, sql: str, params: Sequence[Any], budget: float | None
    ) -> list[tuple[Any, ...]]:
        async def work(conn: Conn) -> list[tuple[Any, ...]]:
            cur = await conn.execute(sql, params)
            return list(await cur.fetchall())

        return await self._run(budget, work)

    async def _exec(self, sql: str, params: Sequence[Any]) -> int:
        async def work(conn: Conn) -> int:
            cur = await conn.execute(sql, params)
            return int(cur.rowcount)

        return await self._run(self._statement_timeout, work)

    async def probe(self) -> None:
        """The breaker's check while its circuit is open: drop the pool, then connect once on a
        connection of our own and read one row of our table. A refused connection fails in about a
        millisecond, where a request's lookup waited the pool's whole ``timeout``; a server that
        does not answer, within ``timeout`` (connecting) plus ``read_timeout``."""
        self._retire_pool()
        connect = self._psycopg.AsyncConnection.connect(self.url, **self._connect_kwargs())
        conn = await asyncio.wait_for(connect, self._timeout)

        async def read_table(conn: Conn) -> None:
            # the table, not SELECT 1: a server that answers while our table is locked (a
            # migration) fails every lookup, and a SELECT 1 probe closed the circuit again and
            # again (one WARNING and one INFO line every ~1.5 s)
            # a missing table answers too: the next call makes it (setup never ran)
            with contextlib.suppress(self._psycopg.errors.UndefinedTable):
                await conn.execute(f"SELECT 1 FROM {self.table} LIMIT 1")

        # closed by the task, once nothing waits on its socket any more
        task = asyncio.get_running_loop().create_task(self._use(conn, read_table, _close))
        await self._finish(conn, task, self._read_timeout, self._read_timeout)

    async def setup(self) -> None:
        await self._run(self._statement_timeout, self._create)

    async def _create(self, conn: Conn) -> None:
        t = self.table
        async with conn.transaction():
            # Two processes creating the table at once would race on the catalog: serialize.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"infercache:{t}",))
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {t} ("
                " namespace TEXT NOT NULL, key TEXT NOT NULL, value BYTEA NOT NULL,"
                " expires_at DOUBLE PRECISION, created_at DOUBLE PRECISION NOT NULL,"
                " PRIMARY KEY (namespace, key))"
            )
            await conn.execute(
                f"CREATE INDEX IF NOT EXISTS {t}_expires ON {t}(expires_at)"
                " WHERE expires_at IS NOT NULL"
            )
            await conn.execute(_GENERATIONS_DDL.format(table=t))

    async def keys_after(self, ns: str, after: str, limit: int) -> list[str]:
        rows = await self._fetch(
            f"SELECT key FROM {self.table} WHERE namespace = %s AND key > %s ORDER BY key LIMIT %s",
            (_pg_text(ns), _pg_text(after), limit),
            self._statement_timeout,
        )
        return [_pg_untext(k) for (k,) in rows]

    async def get_many(self, ns: str, keys: Sequence[str], now: float) -> list[Row]:
        rows = await self._fetch(
            f"SELECT key, value, expires_at FROM {self.table} WHERE namespace = %s"
            " AND key = ANY(%s) AND (expires_at IS NULL OR expires_at > %s)",
            (_pg_text(ns), _pg_texts(keys), now),
            self._read_timeout,
        )
        found = [(k, bytes(v), e) for k, v, e in rows]
        if _PG_ESCAPE[0] in "".join([r[0] for r in found]):  # see _pg_texts
            found = [(_pg_untext(k), v, e) for k, v, e in found]
        return found

    async def upsert(self, ns: str, rows: Sequence[Row], now: float) -> None:
        # One statement for the whole batch: unnest() turns three arrays into rows. The values
        # go in binary (%b): as text, hex-escaped, 256 values of 64 KB took 1.0 s instead of
        # 0.2 s (measured, local server), a fifth of the way to statement_timeout.
        await self._exec(
            f"INSERT INTO {self.table} (namespace, key, value, expires_at, created_at)"
            " SELECT %s, u.k, u.v, u.e, %s"
            " FROM unnest(%s::text[], %b::bytea[], %s::float8[]) AS u(k, v, e)"
            " ON CONFLICT (namespace, key) DO UPDATE SET value = EXCLUDED.value,"
            " expires_at = EXCLUDED.expires_at, created_at = EXCLUDED.created_at",
            (
                _pg_text(ns),
                now,
                _pg_texts([r[0] for r in rows]),
                [r[1] for r in rows],
                [r[2] for r in rows],
            ),
        )

    async def delete(self, ns: str, keys: Sequence[str]) -> int:
        return await self._exec(
            f"DELETE FROM {self.table} WHERE namespace = %s AND key = ANY(%s)",
            (_pg_text(ns), _pg_texts(keys)),
        )

    async def clear(self, ns: str) -> int:
        return await self._exec(f"DELETE FROM {self.table} WHERE namespace = %s", (_pg_text(ns),))

    async def lookup_expiry(self, ns: str, key: str, now: float) -> tuple[bool, float | None]:
        rows = await self._fetch(
            f"SELECT expires_at FROM {self.table} WHERE namespace = %s AND key = %s"
            " AND (expires_at IS NULL OR expires_at > %s)",
            (_pg_text(ns), _pg_text(key), now),
            self._read_timeout,
        )
        return (False, None) if not rows else (True, rows[0][0])

    async def set_expiry(self, ns: str, key: str, expires_at: float, now: float) -> bool:
        n = await self._exec(
            f"UPDATE {self.table} SET expires_at = %s WHERE namespace = %s AND key = %s"
            " AND (expires_at IS NULL OR expires_at > %s)",
            (expires_at, _pg_text(ns), _pg_text(key), now),
        )
        return n > 0

    async def purge(self, now: float, limit: int) -> int:
        return await self._exec(
            f"DELETE FROM {self.table} WHERE ctid IN (SELECT ctid FROM {self.table}"
            " WHERE expires_at <= %s LIMIT %s)",
            (now, limit),
        )

    async def count(self, ns: str, now: float) -> int:
        rows = await self._fetch(
            f"SELECT count(*) FROM {self.table} WHERE namespace = %s"
            " AND (expires_at IS NULL OR expires_at > %s)",
            (_pg_text(ns), now),
            self._statement_timeout,
        )
        return int(rows[0][0])

    async def read_generations(self, ns: str) -> dict[str, int]:
        rows = await self._fetch(
            f"SELECT name, generation FROM {self.table}_generations WHERE namespace = %s",
            (_pg_text(ns),),
            self._read_timeout,
        )
        gens: dict[str, int] = {}
        for stored, gen in rows:
            name = _pg_untext(stored)
            # two rows decode to one name only beside a row from before the escape: generations
            # only rise, so the higher one is the name's
            gens[name] = max(int(gen), gens.get(name, 0))
        return gens

    async def advance_generation(self, ns: str, name: str, step: int, floor: int) -> int:
        t = f"{self.table}_generations"
        rows = await self._fetch(  # one statement: atomic under concurrent advances
            f"INSERT INTO {t} (namespace, name, generation) VALUES (%s, %s, %s)"
            " ON CONFLICT (namespace, name) DO UPDATE SET"
            f" generation = GREATEST({t}.generation + %s, %s) RETURNING generation",
            (_pg_text(ns), _pg_text(name), max(step, floor), step, floor),
            self._statement_timeout,
        )
        return int(rows[0][0])

    async def close(self) -> None:
        """Fail the statements in flight at once (a frozen server would hold each until its
        deadline) and close the pool, waiting at most a second for it."""
        self._closed = True
        for conn in list(self._busy):
            _abort(conn)
        self._retire_pool()
        if self._retiring:
            await asyncio.wait(set(self._retiring), timeout=1.0)


# --------------------------------------------------------------------------- SQLCache


def postgres_conninfo(url: str) -> str:
    """A ``postgresql+driver://`` URL (SQLAlchemy's form, which the settings accept) as the
    ``postgresql://`` libpq reads; other URLs as they are."""
    scheme = urlsplit(url).scheme
    return "postgresql" + url[len(scheme) :] if "+" in scheme else url


def sqlite_path(url: str) -> str:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs.db`` -> ``/abs.db``; ``sqlite://``
    or ``sqlite:///:memory:`` -> in-memory."""
    rest = url[len("sqlite://") :]
    if rest in ("", "/", "/:memory:"):
        return ":memory:"
    if not rest.startswith("/"):
        raise ConfigError(f"sqlite URL must look like sqlite:///path.db, got {url!r}")
    return rest[1:]


class _KeyFilter:
    """A Bloom filter of the keys in this cache's namespace, so lookups of keys never written
    here skip the query (see tiers/bloom.py for the measurement).

    It learns every key this SQLCache writes (before the write, so a lookup never skips a row that
    exists) and the keys already in the table, read in pages of ``PAGE`` keys on the reader
    thread; lookups use it only after that load. Adding a key costs ~4 µs on the event loop, so a
    page is ~8 ms of it and a table of a million keys ~5 s, spread over the first seconds of
    serving; the filter then takes ~4 MB (measured: 1M keys, 5 layers). Deleted and expired keys
    stay "maybe" (one real lookup each).

    It never learns the keys another process writes, so it is used only while this process is
    the file's only writer. Every SQLCache on an SQLite file announces itself in the
    ``{table}_writers`` table with a heartbeat (SQLCache ``WRITER_HEARTBEAT_S``), and each beat
    reports here (``observe``): the first comes before the initial load, so a process started
    beside a live writer never turns the filter on; a live writer appearing later turns it off
    (lookups query again); once no other writer is live (its row deleted at close, or not
    refreshed for ``WRITER_STALE_S`` after a crash), the table's keys are loaded again into the
    same filter and it is used again. Keys it keeps that were deleted since cost a real lookup
    each, never a wrong miss; a reload costs what the first load did. A writer that came and went
    between two beats is noticed too (its announcement took a sequence number) and causes a
    reload. What it cannot see is the time between another process's first write and our next
    beat, about a heartbeat at most: lookups of keys written then miss, and are recomputed. A
    heartbeat that fails for ``WRITER_STALE_S`` leaves us unable to tell, which counts as
    another writer; one that only waits behind our own writes (a busy core) changes nothing.
    Presence is per table, not per namespace: a writer of another namespace turns the filter off
    too, costing a reload but no wrong answer. PostgreSQL and in-memory databases have no
    presence: the filter loads once and stays on (``infercache serve`` never turns it on for
    PostgreSQL).
    """

    PAGE = 2000

    def __init__(self, cache: SQLCache) -> None:
        self.cache = cache
        self.keys = BloomFilter()
        self.ready = False  # loaded, and no other writer seen since: lookups may skip the query
        self.shared = False  # another process writes the file, or we cannot tell: filter off
        self.skipped = 0
        self.loaded = 0
        self.reloads = 0
        self._epoch = 0  # bumped whenever a load in flight must not make the filter ready
        self._said_off = False  # an INFO line said the filter is off: say when it is back
        self._loader: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Load the table's keys once (a backend without writer presence)."""
        if self._loader is None:
            self._begin()

    def _begin(self) -> None:
        self._epoch += 1
        self._loader = asyncio.create_task(self._load(self._epoch), name="infercache-key-filter")

    def _halt(self) -> None:
        """Stop using the filter, and make a load in flight end without turning it on."""
        self._epoch += 1
        self.ready = False
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()

    def observe(self, others: int | None, joined: bool) -> None:
        """A heartbeat's report: ``others`` live writers besides us (None: the heartbeat has
        failed for a while, so we cannot tell); ``joined``: a writer announced itself since our
        previous beat, so it may have written keys we never loaded, even if it is gone."""
        name, path = self.cache.name, getattr(self.cache.backend, "path", "?")
        if others != 0:
            if not self.shared:
                self.shared = True
                self._halt()
                self._said_off = True
                if others is None:
                    log.info(
                        "%s: cannot tell whether another process writes %s (heartbeat failing):"
                        " key filter off, every lookup queries",
                        name,
                        path,
                    )
                else:
                    log.info(
                        "%s: another process writes %s: key filter off, every lookup queries"
                        " until it stops",
                        name,
                        path,
                    )
            return
        if not (self.shared or joined or self._loader is None):
            return
        if joined and not self.shared and self._loader is not None:
            log.info(
                "%s: another process wrote to %s between two heartbeats: reloading the key filter",
                name,
                path,
            )
            self._said_off = True
        self.shared = False
        self._halt()
        if self._loader is not None:
            self.reloads += 1
        self._begin()

    async def _load(self, epoch: int) -> None:
        cache, after, n = self.cache, "", 0
        # Pages are read after a key, from "": a stored empty key is never in one. Always
        # "maybe", it costs a real lookup of that one key (it was skipped: a miss for ever).
        self.keys.add("")
        try:
            while True:
                page = await cache.backend.keys_after(cache.namespace, after, self.PAGE)
                self.keys.add_many(page)
                self.loaded += len(page)
                n += len(page)
                if len(page) < self.PAGE:
                    break
                after = page[-1]
        except Exception as exc:  # only an optimisation: without it every key is looked up
            log.warning("%s: key filter not loaded, every lookup queries: %s", cache.name, exc)
            return
        if epoch != self._epoch:  # another writer appeared meanwhile: not ours alone any more
            return
        self.ready = True
        if self._said_off:
            self._said_off = False
            log.info(
                "%s: no other process writes %s now: key filter on again (%d keys loaded)",
                cache.name,
                getattr(cache.backend, "path", "?"),
                n,
            )

    @property
    def other_writers(self) -> int | None:
        """Live writers besides us at the last heartbeat (the cache keeps the count)."""
        return self.cache.other_writers

    async def stop(self) -> None:
        self._epoch += 1
        await stop_task(self._loader)

    def stats(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "shared": self.shared,
            "other_writers": self.other_writers,
            "reloads": self.reloads,
            "keys": len(self.keys),
            "loaded": self.loaded,
            "bytes": self.keys.nbytes,
            "skipped_lookups": self.skipped,
        }


class SQLCache:
    """Async L3 cache in SQL; see the module docstring for the design.

    ``url``: ``sqlite:///infercache.db`` (relative), ``sqlite:////abs/path.db``,
    ``sqlite:///:memory:``, or ``postgresql://user@host:port/db``. ``ttl`` is the default TTL
    in seconds (None: no expiry). ``timer`` is wall-clock epoch seconds (expiry is stored as an
    absolute time shared with other processes); tests inject a fake one to expire rows.
    ``key_filter``: keep a Bloom filter of the namespace's keys so that lookups of keys never
    written skip the query. With an SQLite file it is used only while no other process writes the
    file (every SQLCache there announces itself with a heartbeat, see ``_KeyFilter``); with
    PostgreSQL always, so only for a table this process alone writes.
    ``idle_writer``: run SQLite's writer thread at the lowest CPU priority (Linux SCHED_IDLE;
    see ``_SQLiteBackend``), so that on a busy core writes take only the time requests leave.
    PostgreSQL: ``timeout`` bounds the wait for a pooled connection (and for the breaker's probe
    to connect). ``read_timeout`` bounds a lookup's statement (``get``, ``get_many``, ``exists``,
    ``ttl``, generations): it is on the request path, so a server that stops answering must cost
    a request about Redis's 0.5 s socket timeout before the breaker opens and requests skip the
    tier. ``statement_timeout`` (None: none) bounds the other statements: writes, purge,
    ``clear`` and ``count``. Longer, as they are off the request path and a write-behind flush
    is one statement for a whole batch (256 values of 64 KB: ~0.3 s on a local server), but
    short, as the server's shutdown flushes write-behind first and a frozen server holds that
    flush for as long. The server also ends our statements itself a little past the longer of
    the two (``statement_timeout`` in the connection's options), so that none runs on there
    once we gave up.
    """

    def __init__(
        self,
        url: str = "sqlite:///infercache.db",
        *,
        namespace: str = "infercache",
        ttl: float | None = None,
        codec: Codec | None = None,
        table: str = "infercache_entries",
        name: str | None = None,
        pool_size: int = 8,
        timeout: float = 1.0,
        read_timeout: float = 0.5,
        statement_timeout: float | None = 2.0,
        purge_interval: float | None = 60.0,
        purge_batch: int = 1000,
        failure_threshold: int = 3,
        recovery_time: float = 1.0,
        timer: Callable[[], float] = time.time,
        key_filter: bool = False,
        idle_writer: bool = True,
    ) -> None:
        if not namespace:
            raise ConfigError("namespace must be non-empty")
        if not _IDENT.match(table):
            raise ConfigError(f"table must be a plain SQL identifier, got {table!r}")
        if timeout <= 0 or read_timeout <= 0:
            raise ConfigError(
                f"timeout and read_timeout must be > 0, got {timeout} and {read_timeout}"
            )
        if statement_timeout is not None and statement_timeout <= 0:
            raise ConfigError(f"statement_timeout must be > 0 or None, got {statement_timeout}")
        scheme = urlsplit(url).scheme.lower()
        self.backend: _SQLiteBackend | _PostgresBackend
        if scheme == "sqlite":
            self.backend = _SQLiteBackend(sqlite_path(url), table, idle_writer=idle_writer)
        elif scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
            self.backend = _PostgresBackend(
                postgres_conninfo(url),
                table,
                pool_min=1,
                pool_max=pool_size,
                timeout=timeout,
                read_timeout=read_timeout,
                statement_timeout=statement_timeout,
            )
        else:
            raise ConfigError(f"SQLCache url must be sqlite:/// or postgresql://, got {url!r}")
        self.url = url
        self.namespace = namespace
        self.name = name or self.backend.name
        #: lookups of an SQLite file are local (and usually inline); PostgreSQL is a round trip
        self.network_lookups = self.backend.name != "sqlite"
        self.default_ttl = validate_ttl(ttl)
        self.codec = codec or Codec()
        self.table = table
        self.purge_interval = purge_interval
        self.purge_batch = purge_batch
        self._timer = timer
        # PostgreSQL is probed in the background: a request made the probe waited the pool's
        # whole timeout for a connection that was refused at once. SQLite, a local file, has no
        # pool to wait for: a request probes it.
        probe = self.backend.probe if isinstance(self.backend, _PostgresBackend) else None
        self.breaker = CircuitBreaker(
            f"sql {self.name}",
            failure_threshold=failure_threshold,
            recovery_time=recovery_time,
            probe=probe,
        )
        self._ready = False
        self._setup_lock: asyncio.Lock | None = None
        self._purger: asyncio.Task[None] | None = None
        self._closed = False
        self._m = TierMetrics()
        self._purged = 0
        self._filter = _KeyFilter(self) if key_filter else None
        # Writer presence (SQLite files only; see _KeyFilter): filter or not, every instance
        # writes, so every one announces itself while open.
        self._presence = isinstance(self.backend, _SQLiteBackend) and not self.backend._shared
        self._writer_id = uuid.uuid4().hex
        self._heartbeat: asyncio.Task[None] | None = None
        self._issued: int | None = None  # the last announcement sequence number seen
        self._beat_ok_at: float | None = None  # time.monotonic() of the last good heartbeat
        self._beat_failing = False
        self._announced = False  # a heartbeat was sent: close() withdraws our row
        self._beats = 0  # heartbeats that succeeded
        #: live writers of the SQLite file besides this instance at the last heartbeat (None:
        #: not known yet, or the heartbeat fails)
        self.other_writers: int | None = None

    #: Writer presence in an SQLite file: seconds between heartbeats; a writer not heard from
    #: for WRITER_STALE_S is gone (a few beats missed: a crash, or a process stalled that long);
    #: rows older than WRITER_FORGET_S are deleted by whoever beats. Tests shorten them.
    WRITER_HEARTBEAT_S = 1.0
    WRITER_STALE_S = 5.0
    WRITER_FORGET_S = 60.0

    # ----------------------------------------------------------------- plumbing

    async def _guarded(self, op: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` (a coroutine factory) through the breaker; map errors to TierError."""
        if self._closed:
            raise TierError(f"{self.name} cache is closed")

        async def call() -> Any:
            if not self._ready:
                await self._setup()
            return await fn()

        backend = self.backend
        return await self._m.timed(
            self.breaker.run(
                f"{self.name} {op}",
                call(),
                outage=backend.failure_errors,
                answered=backend.errors,
            )
        )

    async def _setup(self) -> None:
        if self._setup_lock is None:
            self._setup_lock = asyncio.Lock()
        async with self._setup_lock:
            if self._ready:
                return
            await self.backend.setup()
            if self._presence and self._heartbeat is None:
                # Announce ourselves before our first write, and look before the filter's first
                # load: beside a live writer it stays off. (Ready only after it: cancelled while
                # beating, the next call sets up again.)
                await self._beat()
                self._heartbeat = asyncio.create_task(
                    self._heartbeat_loop(), name=f"infercache-writers-{self.name}"
                )
            self._ready = True
            if self._filter is not None and not self._presence:
                self._filter.start()
            if self.purge_interval is not None and self._purger is None:
                self._purger = asyncio.create_task(
                    self._purge_loop(), name=f"infercache-purge-{self.name}"
                )

    async def _beat(self) -> None:
        """One heartbeat (see ``_KeyFilter``), reported to the key filter. Never raises: a
        failure is logged (a WARNING when the heartbeat starts failing, DEBUG while it goes on)
        and, once the last good beat is WRITER_STALE_S old, turns the filter off, as we can no
        longer see who writes. Bounded by WRITER_STALE_S, as the writer thread may be busy; a
        beat that only waited that long changes nothing."""
        backend = self.backend
        assert isinstance(backend, _SQLiteBackend)
        stale = self.WRITER_STALE_S
        self._announced = True
        try:
            others, issued, inserted = await asyncio.wait_for(
                backend.heartbeat(self._writer_id, self._timer(), stale, self.WRITER_FORGET_S),
                timeout=stale,
            )
        except TimeoutError:
            # The writer thread is busy: the beat waits behind queued write batches, and runs at
            # idle priority on a saturated core. That says nothing about other writers, and
            # turning the filter off (then reloading it) because we are busy would cost the
            # busiest moments a lookup per miss: keep what the last beat said.
            log.debug("%s: writer heartbeat waited %g s behind writes", self.name, stale)
            return
        except Exception as exc:
            desc = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not self._beat_failing:
                self._beat_failing = True
                log.warning("%s: writer heartbeat in %s failed: %s", self.name, backend.path, desc)
            else:
                log.debug("%s: writer heartbeat failed again: %s", self.name, desc)
            last_ok = self._beat_ok_at
            if last_ok is None or time.monotonic() - last_ok >= stale:
                self.other_writers = None
                if self._filter is not None:
                    self._filter.observe(None, joined=False)
            return
        if self._beat_failing:
            self._beat_failing = False
            log.info("%s: writer heartbeat in %s works again", self.name, backend.path)
        self._beat_ok_at = time.monotonic()
        self._beats += 1
        last, self._issued = self._issued, issued
        # announcements since our last beat, our own (re-)announcement aside
        joined = last is not None and issued - last - int(inserted) > 0
        self.other_writers = others
        if self._filter is not None:
            self._filter.observe(others, joined)

    async def _heartbeat_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.WRITER_HEARTBEAT_S)
            raise_if_cancel_requested()
            try:
                await self._beat()
            except Exception:  # never let the heartbeat die silently
                log.exception("%s: writer heartbeat failed", self.name)

    async def _purge_loop(self) -> None:
        assert self.purge_interval is not None
        while not self._closed:
            await asyncio.sleep(self.purge_interval)
            raise_if_cancel_requested()
            try:
                await self.purge_expired()
            except TierError as exc:
                log.info("%s: background purge skipped: %s", self.name, exc)
            except Exception:  # never let the purger die silently
                log.exception("%s: background purge failed", self.name)

    def _expires_at(self, ttl: float | None, now: float) -> float | None:
        eff = self.default_ttl if ttl is None else validate_ttl(ttl)
        return None if eff is None else now + eff

    def _decode_rows(
        self, rows: list[Row]
    ) -> tuple[dict[str, tuple[Any, float | None]], list[str]]:
        out: dict[str, tuple[Any, float | None]] = {}
        corrupt: list[str] = []
        for key, raw, exp in rows:
            value = self._m.decode(self.codec, self.name, key, raw, corrupt)
            if value is not MISSING:
                out[key] = (value, exp)
        return out, corrupt

    # ----------------------------------------------------------------- reads

    async def get(self, key: str) -> Any | None:
        hit = await self.get_many_with_ttl([key])
        entry = hit.get(key)
        return None if entry is None else entry[0]

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        return {k: v for k, (v, _) in (await self.get_many_with_ttl(keys)).items()}

    async def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """Unexpired hits with their remaining TTL, in one query."""
        uniq = list(dict.fromkeys(keys))
        if not uniq:
            return {}
        _check_keys(uniq)
        asked = len(uniq)
        if self._filter is not None:
            uniq = [k for k in uniq if self.might_contain(k)]
            self._filter.skipped += asked - len(uniq)
            if not uniq:  # none was ever written here: no query at all
                self._m.lookups(asked, 0)
                return {}
        now = self._timer()
        rows = await self._guarded(
            "select", lambda: self.backend.get_many(self.namespace, uniq, now)
        )
        found, corrupt = self._decode_rows(rows)
        if corrupt:
            with contextlib.suppress(TierError):
                await self.delete_many(corrupt)
        self._m.lookups(asked, len(found))
        return {
            k: (v, None if exp is None else max(exp - now, 0.0)) for k, (v, exp) in found.items()
        }

    def might_contain(self, key: str) -> bool:
        """False only when ``key`` was certainly never written here (the key filter says so);
        lets a caller skip even the await of a lookup."""
        flt = self._filter
        return flt is None or not flt.ready or key in flt.keys

    async def exists(self, key: str) -> bool:
        if not isinstance(key, str):
            raise key_type_error("SQLCache", key)
        now = self._timer()
        found, _ = await self._guarded(
            "exists", lambda: self.backend.lookup_expiry(self.namespace, key, now)
        )
        return bool(found)

    async def ttl(self, key: str) -> float | None:
        """Remaining seconds; None when the key never expires; KeyError when it is absent."""
        if not isinstance(key, str):
            raise key_type_error("SQLCache", key)
        now = self._timer()
        found, exp = await self._guarded(
            "ttl", lambda: self.backend.lookup_expiry(self.namespace, key, now)
        )
        if not found:
            raise KeyError(key)
        return None if exp is None else max(exp - now, 0.0)

    # ----------------------------------------------------------------- writes

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        await self.set_many({key: value}, ttl)

    async def set_many(self, mapping: Mapping[str, Any], ttl: float | None = None) -> None:
        """UPSERT every pair in one transaction (None values are skipped: None means miss)."""
        eff = self.default_ttl if ttl is None else validate_ttl(ttl)
        await self.set_many_with_ttl({k: (v, eff) for k, v in mapping.items()})

    async def set_many_with_ttl(self, items: Mapping[str, tuple[Any, float | None]]) -> None:
        """UPSERT pairs that carry their own TTL (None: no expiry) in one transaction."""
        _check_keys(items)  # before anything is encoded or written: the batch fails whole
        now = self._timer()
        encoded, unencodable = encode_values(self.codec, items)
        rows: list[Row] = []
        for k, raw, t in encoded:
            t = validate_ttl(t)
            rows.append((k, raw, None if t is None else now + t))
        if rows:
            if self._filter is not None:  # before the write: a lookup never misses a written row
                self._filter.keys.add_many(r[0] for r in rows)
            await self._guarded("upsert", lambda: self.backend.upsert(self.namespace, rows, now))
            self._m.sets += len(rows)
        if unencodable is not None:
            raise unencodable

    async def delete(self, key: str) -> bool:
        return bool(await self.delete_many([key]))

    async def delete_many(self, keys: Sequence[str]) -> int:
        uniq = list(dict.fromkeys(keys))
        if not uniq:
            return 0
        _check_keys(uniq)
        n = await self._guarded("delete", lambda: self.backend.delete(self.namespace, uniq))
        self._m.deletes += len(uniq)
        return int(n)

    async def expire(self, key: str, ttl: float) -> bool:
        if not isinstance(key, str):
            raise key_type_error("SQLCache", key)
        t = validate_ttl(ttl)
        assert t is not None
        now = self._timer()
        return bool(
            await self._guarded(
                "expire", lambda: self.backend.set_expiry(self.namespace, key, now + t, now)
            )
        )

    async def clear(self) -> int:
        """Delete this namespace's rows only."""
        return int(await self._guarded("clear", lambda: self.backend.clear(self.namespace)))

    # ----------------------------------------------------------------- GenerationStore protocol

    async def read_generations(self) -> dict[str, int]:
        """Every namespace generation stored under this cache's namespace."""
        return dict(
            await self._guarded(
                "generations", lambda: self.backend.read_generations(self.namespace)
            )
        )

    async def advance_generation(self, name: str, floor: int = 0) -> int:
        """Set ``name``'s generation to ``max(current + 1, floor)`` atomically; return it."""
        return int(
            await self._guarded(
                "generations",
                lambda: self.backend.advance_generation(self.namespace, name, 1, floor),
            )
        )

    async def raise_generation(self, name: str, value: int) -> int:
        """Set ``name``'s generation to ``max(current, value)`` atomically; return it."""
        return int(
            await self._guarded(
                "generations",
                lambda: self.backend.advance_generation(self.namespace, name, 0, value),
            )
        )

    async def purge_expired(self) -> int:
        """Delete expired rows (every namespace) in batches; returns how many were removed."""
        total = 0
        while True:
            now = self._timer()
            batch = functools.partial(self.backend.purge, now, self.purge_batch)
            n = int(await self._guarded("purge", batch))
            total += n
            if n < self.purge_batch:
                break
            await asyncio.sleep(0)  # let other work run between batches
        self._purged += total
        return total

    # ----------------------------------------------------------------- introspection

    async def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "backend": self.backend.name,
            "namespace": self.namespace,
            **self._m.snapshot(),
            "purged": self._purged,
            "breaker": self.breaker.snapshot(),
        }
        if self._filter is not None:
            out["key_filter"] = self._filter.stats()
        if self._presence:
            out["other_writers"] = self.other_writers
        for counter in ("inline_lookups", "inline_backoffs", "idle_writer"):
            if hasattr(self.backend, counter):
                out[counter] = getattr(self.backend, counter)
        try:
            now = self._timer()
            out["entries"] = await self._guarded(
                "count", lambda: self.backend.count(self.namespace, now)
            )
        except TierError as exc:
            out["entries_error"] = str(exc)
        return out

    async def close(self) -> None:
        """Stop the purger and close the connection / pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._filter is not None:
            await self._filter.stop()
        # Cancelled again until it ends: a cancellation that lands as a bounded beat completes
        # is lost in Python 3.11's wait_for, and the loop beat on while close() waited forever.
        await stop_task(self._heartbeat)
        self._heartbeat = None
        if self._announced and isinstance(self.backend, _SQLiteBackend):
            # behind our last writes on the writer thread: whoever sees the row gone and reloads
            # its key filter reads them all
            try:
                await self.backend.leave(self._writer_id)
            except Exception as exc:  # it goes stale in WRITER_STALE_S anyway
                log.debug("%s: writer row not withdrawn: %s", self.name, exc)
        await stop_task(self._purger)
        self._purger = None
        await self.breaker.close()
        await self.backend.close()

    async def __aenter__(self) -> SQLCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
