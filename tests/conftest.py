"""Shared fixtures: real Redis (standalone and cluster) and PostgreSQL servers.

Servers are started once per session where that is safe (one redis-server, one 3-master cluster,
one PostgreSQL), and per test where a test kills or restarts its own (``fresh_redis``). Each test
that uses ``redis_url`` gets a Redis database emptied for it, so tests cannot see each other's keys.

When a server binary is missing, CI (``CI=true``) fails loudly -- a green run that skipped the
real-server tests would be a lie -- while a developer's machine skips with the reason.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

try:  # tests/ is not a package today; stay importable if someone makes it one
    from servers import (
        BinaryMissing,
        PostgresServer,
        RedisCluster,
        RedisServer,
    )
except ImportError:  # pragma: no cover
    from tests.servers import (  # type: ignore[no-redef]
        BinaryMissing,
        PostgresServer,
        RedisCluster,
        RedisServer,
    )


class _Startable(Protocol):
    def start(self) -> object: ...


S = TypeVar("S", bound=_Startable)


def _missing(exc: BinaryMissing) -> None:
    """Fail in CI, skip locally: a missing server must never pass silently in CI."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"server binary missing in CI: {exc}", pytrace=False)
    pytest.skip(f"server binary missing: {exc}")


@contextmanager
def _running(make: Callable[[], S], stop: Callable[[S], None]) -> Iterator[S]:
    """Build a server (fail in CI / skip locally if its binary is missing), start it, and stop it
    with ``stop`` however the test ends."""
    try:
        server = make()
    except BinaryMissing as exc:
        _missing(exc)
        raise  # unreachable: _missing always raises
    server.start()
    try:
        yield server
    finally:
        stop(server)


@pytest.fixture(autouse=True)
def _infercache_logging_restored() -> Iterator[None]:
    """Put the ``infercache`` logger back as it was after each test.

    A test that runs ``main(["serve", ...])`` in process configures it as the command does (its
    own handler, no propagation): later tests' ``caplog`` then saw none of its records, and its
    handler kept writing to that test's captured stderr, closed by then ("Logging error ...
    I/O operation on closed file" in CI's output).
    """
    logger = logging.getLogger("infercache")
    saved = (list(logger.handlers), logger.propagate, logger.level, logger.disabled)
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level, logger.disabled = saved[1], saved[2], saved[3]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (``.url``, ``.port``, ``.stop()``, ``.start()``,
    ``.kill()``). Tests that stop it must start it again; prefer ``fresh_redis`` for that."""
    with _running(lambda: RedisServer(tmp_path_factory.mktemp("redis")), RedisServer.stop) as s:
        yield s


_DB_CYCLE = itertools.cycle(range(1, 16))


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of an empty Redis database on the session server (db 1-15 in turn, FLUSHDB first).

    db 0 is left alone for anything that wants to share state across tests on purpose.
    """
    if not redis_server.is_running():  # a previous test stopped it and failed to restart it
        redis_server.start()
    db = next(_DB_CYCLE)
    _flush_db(redis_server, db)
    return redis_server.url_for_db(db)


def _flush_db(server: RedisServer, db: int) -> None:
    """SELECT + FLUSHDB on one connection (the test server only; the library never flushes)."""
    import socket

    payload = (f"*2\r\n$6\r\nSELECT\r\n${len(str(db))}\r\n{db}\r\n*1\r\n$7\r\nFLUSHDB\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
        s.sendall(payload)
        buf = b""
        while buf.count(b"\r\n") < 2:
            chunk = s.recv(1024)
            if not chunk:
                break
            buf += chunk
    if buf.count(b"+OK") < 2:
        raise RuntimeError(f"could not flush redis db {db}: {buf!r}")


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that kill or restart it."""
    with _running(lambda: RedisServer(tmp_path / "redis"), RedisServer.kill) as s:
        yield s


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster for the session (``.url``, ``.nodes``, ``.startup_nodes``).

    Built once: Redis makes new masters wait ~2 s before they accept writes.
    """
    workdir = tmp_path_factory.mktemp("cluster")
    with _running(lambda: RedisCluster(workdir=workdir), RedisCluster.stop) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One real PostgreSQL for the session (``.url``, ``.stop()``, ``.start()``).

    A test that stops it must start it again before returning (in a ``finally``).
    """
    # Not under tmp_path_factory: pytest's base temp dir is 0700 root, and under root the server
    # runs as the `postgres` user, who must be able to reach its data directory.
    del tmp_path_factory
    with _running(PostgresServer, PostgresServer.cleanup) as s:
        yield s


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql://postgres@127.0.0.1:PORT/postgres`` of the session server (trust auth)."""
    return postgres_server.url


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An L3 URL, once per backend: an SQLite file of the test's own, then the session's
    PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/l3.db"
    return str(request.getfixturevalue("postgres_url"))
