"""An SQLite L3 file written by several processes: the key filter is used only while its
process is the file's only writer (writer presence in ``{table}_writers``, see tiers/sql.py).

Two SQLCache instances on one file stand for two processes: each has its own connections and
writer id. The last test runs two real ``infercache serve`` processes on one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from infercache.bench.process import ServerProcess
from infercache.tiers.sql import SQLCache

try:
    from servers import wait_until
except ImportError:  # pragma: no cover
    from tests.servers import wait_until  # type: ignore[no-redef]

WRITERS = "infercache_entries_writers"


def fast(cache: SQLCache) -> SQLCache:
    """Heartbeats every 0.05 s, a writer gone after 1 s unheard: the tests wait less."""
    cache.WRITER_HEARTBEAT_S = 0.05
    cache.WRITER_STALE_S = 1.0
    return cache


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'shared.db'}"


@pytest.fixture
async def opened() -> AsyncIterator[Callable[..., SQLCache]]:
    """``opened(url, **kwargs)``: a fast-beating SQLCache, closed at the end of the test."""
    caches: list[SQLCache] = []

    def make(url: str, **kwargs: Any) -> SQLCache:
        cache = fast(SQLCache(url, purge_interval=None, **kwargs))
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        await cache.close()


def writer_rows(url: str) -> dict[str, float]:
    """id -> seen, read straight from the file."""
    with contextlib.closing(sqlite3.connect(url[len("sqlite:///") :])) as db:
        return dict(db.execute(f"SELECT id, seen FROM {WRITERS}").fetchall())


async def filtering(cache: SQLCache) -> SQLCache:
    """Set ``cache`` up (its first call) and wait until its key filter is in use."""
    await cache.get("set-up")
    flt = cache._filter
    assert flt is not None
    await wait_until(lambda: flt.ready)
    return cache


async def beats(cache: SQLCache, n: int) -> None:
    """Wait until ``cache`` has made ``n`` more heartbeats."""
    target = cache._beats + n
    await wait_until(lambda: cache._beats >= target)


def kf(stats: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = stats["key_filter"]
    return out


async def test_a_second_writers_entries_are_found_by_a_filtering_cache(
    url: str, opened: Callable[..., SQLCache]
) -> None:
    """The bug: A's filter, loaded before B wrote, skipped the lookup of B's key forever."""
    a = await filtering(opened(url, key_filter=True))
    b = opened(url)  # no filter (a --workers N worker, a script): a writer all the same
    await b.set("k", "from b")

    async def a_finds_it() -> bool:
        return await a.get("k") == "from b"

    await wait_until(a_finds_it, limit=5)
    st = kf(await a.stats())
    assert st["shared"] is True and st["other_writers"] == 1 and st["ready"] is False
    assert (await b.stats())["other_writers"] == 1
    assert set(writer_rows(url)) == {a._writer_id, b._writer_id}
    await b.set("k2", "later")  # while B lives, A queries: found at once
    assert await a.get("k2") == "later"


async def test_a_cache_started_beside_a_live_writer_never_turns_its_filter_on(
    url: str, opened: Callable[..., SQLCache]
) -> None:
    a = opened(url, key_filter=True)
    await a.set("before", 1)
    b = opened(url, key_filter=True)
    assert await b.get("before") == 1  # set up: its first heartbeat saw A
    assert b._filter is not None and b._filter._loader is None  # never loaded
    st = kf(await b.stats())
    assert st["shared"] is True and st["other_writers"] == 1 and st["ready"] is False
    await beats(b, 3)
    await a.set("after", 2)
    assert await b.get("after") == 2
    assert kf(await b.stats())["skipped_lookups"] == 0
    assert not b._filter.ready and b._filter._loader is None


async def test_the_filter_comes_back_when_the_other_writer_leaves(
    url: str, opened: Callable[..., SQLCache]
) -> None:
    a = await filtering(opened(url, key_filter=True))
    flt = a._filter
    assert flt is not None
    b = opened(url)
    await b.set("k", "from b")
    await wait_until(lambda: flt.shared)
    await b.close()  # withdraws its row, behind its writes
    assert set(writer_rows(url)) == {a._writer_id}
    await wait_until(lambda: flt.ready)  # reloaded from the table
    st = kf(await a.stats())
    assert (st["shared"], st["other_writers"], st["reloads"]) == (False, 0, 1)
    assert a.might_contain("k")  # the reload read B's key
    assert await a.get("k") == "from b"
    before = flt.skipped
    assert await a.get_many([f"unknown{i}" for i in range(50)]) == {}
    assert flt.skipped - before >= 48  # skipped again (a false "maybe" or two aside)


async def test_a_writer_that_came_and_went_between_two_heartbeats_is_noticed(
    url: str, opened: Callable[..., SQLCache]
) -> None:
    """A short script writes and closes between two of A's heartbeats: A never sees its row,
    but its announcement took a sequence number, and A reloads."""
    a = opened(url, key_filter=True)
    a.WRITER_HEARTBEAT_S = 3600.0  # A beats only when the test says so
    await filtering(a)
    flt = a._filter
    assert flt is not None
    async with fast(SQLCache(url, purge_interval=None)) as script:
        await script.set("k", "from the script")
    assert not a.might_contain("k")
    await a._beat()
    assert not flt.ready and not flt.shared  # reloading, nobody else live
    await wait_until(lambda: flt.ready)
    assert flt.reloads == 1 and await a.get("k") == "from the script"
    await a._beat()  # nothing new since: no reload
    assert flt.ready and flt.reloads == 1


async def test_stale_rows_of_crashed_writers_are_ignored_and_old_ones_deleted(
    url: str, opened: Callable[..., SQLCache]
) -> None:
    async with SQLCache(url, purge_interval=None) as first:  # creates the tables
        await first.set("old", 1)
    now = time.time()
    with contextlib.closing(sqlite3.connect(url[len("sqlite:///") :])) as db, db:
        db.execute(f"INSERT INTO {WRITERS} (id, seen) VALUES ('crashed', ?)", (now - 30,))
        db.execute(f"INSERT INTO {WRITERS} (id, seen) VALUES ('ancient', ?)", (now - 3600,))
    a = await filtering(opened(url, key_filter=True))
    assert set(writer_rows(url)) == {a._writer_id, "crashed"}  # the ancient one deleted
    await beats(a, 3)
    st = kf(await a.stats())
    assert (st["ready"], st["shared"], st["other_writers"], st["reloads"]) == (True, False, 0, 0)
    assert await a.get("old") == 1 and not a.might_contain("never")


async def test_a_failing_heartbeat_turns_the_filter_off_and_never_breaks_the_cache(
    url: str, opened: Callable[..., SQLCache]
) -> None:
    a = await filtering(opened(url, key_filter=True))
    flt = a._filter
    assert flt is not None
    a.backend.raw_execute(f"DROP TABLE {WRITERS}")  # every heartbeat fails from now on
    await a.set("k", "v")
    assert await a.get("k") == "v"
    await wait_until(lambda: flt.shared)  # after WRITER_STALE_S: cannot tell who writes
    assert flt.other_writers is None and not flt.ready
    await a.set("k2", "v2")
    assert await a.get_many(["k", "k2"]) == {"k": "v", "k2": "v2"}
    await a.backend.setup()  # the table again: the heartbeat works, the filter comes back
    await wait_until(lambda: flt.ready)
    assert not flt.shared and flt.other_writers == 0 and await a.get("k2") == "v2"


async def test_a_heartbeat_held_up_by_our_own_busy_writer_leaves_the_filter_on(
    url: str, opened: Callable[..., SQLCache]
) -> None:
    """On a saturated core the beat waits behind queued write batches (the writer thread runs
    at idle priority). That is no sign of another writer: the filter stays in use, where
    turning it off would cost every miss a lookup just when the server is busiest."""
    a = await filtering(opened(url, key_filter=True))
    flt = a._filter
    assert flt is not None
    a.WRITER_STALE_S = 0.2  # the beat's own time limit
    beats_before = a._beats
    held = asyncio.ensure_future(a.backend._call(time.sleep, 0.6))  # the writer thread, busy
    await asyncio.sleep(0.5)  # the beats of this time wait past their limit
    assert a._beats == beats_before  # none went through ...
    assert flt.ready and not flt.shared  # ... and the filter is still in use
    await held
    await beats(a, 1)
    assert flt.ready and not flt.shared


async def test_in_memory_databases_have_no_writer_presence() -> None:
    async with SQLCache("sqlite://", key_filter=True, purge_interval=None) as c:
        await c.set("k", 1)
        assert c._filter is not None and c._filter._loader is not None
        await asyncio.wait_for(c._filter._loader, 10)
        assert c._filter.ready and c._heartbeat is None
        assert "other_writers" not in await c.stats()
        assert not c.might_contain("never") and await c.get("k") == 1


# --------------------------------------------------------------------------- two servers

ADMIN = "shared-file-admin"


def vector(seed: int) -> list[float]:
    """A 784-float input for the demo MLP (float32-exact, so JSON round trips are exact)."""
    return np.random.default_rng(seed).random(784, dtype=np.float32).tolist()


async def key_filter_of(client: httpx.AsyncClient) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    stats = (await client.get("/v1/cache/stats", headers=auth)).json()
    return kf(stats["cache"]["tiers"]["sqlite"]["tier"])


async def test_two_servers_on_one_file_share_their_entries(tmp_path: Path) -> None:
    """Server 2 computes an input; server 1, whose key filter was loaded before, answers it
    from the file instead of recomputing (it used to skip the lookup: cached false)."""
    db = tmp_path / "shared.db"
    args = ("--sql-url", f"sqlite:///{db}", "--admin-token", ADMIN, "--no-warmup")
    x = vector(1)
    with ServerProcess.infercache(*args, cwd=tmp_path) as s1:
        async with httpx.AsyncClient(base_url=s1.url, timeout=30) as c1:
            warm = await c1.post("/v1/models/mlp/predict", json={"input": vector(2)})
            assert warm.json()["cached"] is False
            await wait_until(lambda: _ready(c1))
            with ServerProcess.infercache(*args, cwd=tmp_path) as s2:
                async with httpx.AsyncClient(base_url=s2.url, timeout=30) as c2:
                    first = await c2.post("/v1/models/mlp/predict", json={"input": x})
                assert first.json()["cached"] is False
                await wait_until(lambda: _rows(db) >= 2)  # server 2's write-behind landed
                # Server 1's next heartbeat (within about a second) sees server 2. Polled
                # without failing here: what the test asserts is the answer below.
                with contextlib.suppress(AssertionError):
                    await wait_until(lambda: _shared(c1), limit=10)
                body = (await c1.post("/v1/models/mlp/predict", json={"input": x})).json()
                assert body["cached"] is True and body["tier"] == "sqlite", body
                assert body["output"] == first.json()["output"]
            # server 2 stopped: server 1's filter comes back (reloaded, server 2's key in it)
            await wait_until(lambda: _ready(c1))
            st = await key_filter_of(c1)
            assert st["shared"] is False and st["other_writers"] == 0 and st["reloads"] >= 1


async def _shared(client: httpx.AsyncClient) -> bool:
    await asyncio.sleep(0.05)  # wait_until polls every 5 ms: a stats request each is too many
    return bool((await key_filter_of(client)).get("shared"))


async def _ready(client: httpx.AsyncClient) -> bool:
    await asyncio.sleep(0.05)
    st = await key_filter_of(client)
    return bool(st["ready"])


def _rows(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        try:
            (n,) = conn.execute("SELECT count(*) FROM infercache_entries").fetchone()
        except sqlite3.OperationalError:  # not created yet
            return 0
    return int(n)
