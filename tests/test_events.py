"""Invalidation events through an SQLite file (SQLiteEventLog): processes with no Redis."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import textwrap
from pathlib import Path

import httpx
import pytest

from infercache.bench.process import ServerProcess
from infercache.multilevel import MultiLevelCache
from infercache.tiers.events import SQLiteEventLog
from infercache.tiers.memory import MemoryCache
from infercache.tiers.sql import SQLCache

try:
    from servers import wait_until
except ImportError:  # pragma: no cover
    from tests.servers import wait_until  # type: ignore[no-redef]


def _process(db: Path) -> MultiLevelCache:
    """What one worker process builds: its own L1, the shared SQLite file, its own event log."""
    return MultiLevelCache(
        [MemoryCache(100), SQLCache(f"sqlite:///{db}", purge_interval=None)],
        events=SQLiteEventLog(str(db), poll_interval=0.05),
    )


async def test_deletes_generations_and_clears_reach_the_other_processes_l1(
    tmp_path: Path,
) -> None:
    db = tmp_path / "l3.db"
    a, b = _process(db), _process(db)
    await a.start()
    await b.start()
    try:
        await a.set_many({"x": 1, "y": 2})
        assert await b.get_many(["x", "y"]) == {"x": 1, "y": 2}  # now in b's L1 too
        assert b.l1 is not None and "x" in b.l1
        await a.delete("x")
        await wait_until(lambda: "x" not in b.l1, 5)
        assert await b.get("x") is None
        assert await a.invalidate(namespace="model") == 1
        await wait_until(lambda: b.generation("model") == 1, 5)
        await a.invalidate(all=True)
        await wait_until(lambda: "y" not in b.l1, 5)
        assert (await b.stats())["events"]["received"] >= 3
        assert (await a.stats())["events"]["received"] == 0  # its own are skipped
    finally:
        await a.close()
        await b.close()


async def test_a_subscriber_that_missed_pruned_events_resyncs(tmp_path: Path) -> None:
    db = str(tmp_path / "ev.db")
    writer = SQLiteEventLog(db)
    reader = SQLiteEventLog(db, poll_interval=0.3)
    got: list[bytes] = []
    resyncs: list[int] = []
    stop = await reader.subscribe("c", got.append, lambda: resyncs.append(1))
    try:
        await writer.publish("c", b"1")
        await writer.publish("c", b"2")
        with sqlite3.connect(db) as conn:  # pruned before the reader saw them
            conn.execute("DELETE FROM infercache_events")
        await writer.publish("c", b"3")
        await writer.publish("other", b"not ours")
        await wait_until(lambda: got == [b"3"], 5)
        assert resyncs == [1]
        await writer.publish("c", b"4")
        await wait_until(lambda: got == [b"3", b"4"], 5)
        assert resyncs == [1]  # no gap this time
    finally:
        await stop()
        await writer.close()
        await reader.close()
    with pytest.raises(ValueError):
        SQLiteEventLog(db, poll_interval=1.0, retention=0.5)


CLOCK = textwrap.dedent(
    """
    import time
    import numpy as np
    from infercache.models import ModelRunner

    def make():
        return ModelRunner(lambda batch: [np.asarray([time.time()]) for _ in batch],
                           name="clock", version="1")
    """
)


async def test_an_admin_invalidation_reaches_every_worker(tmp_path: Path) -> None:
    """``serve --workers 2`` on the default tiers (no Redis): the invalidation used to clear the
    L1 of the worker that received it only; the other answered the old entry for ever."""
    (tmp_path / "clockmodel.py").write_text(CLOCK)
    token = "workers-admin-token"
    proc = ServerProcess.infercache(
        "--model", "clock=clockmodel:make", "--workers", "2", "--admin-token", token,
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    with proc:

        async def outputs(n: int) -> set[float]:
            seen = set()
            for _ in range(n):  # a new connection each time: either worker may take it
                async with httpx.AsyncClient(base_url=proc.url, timeout=30) as c:
                    r = await c.post("/v1/models/clock/predict", json={"input": [1.0]})
                    seen.add(r.json()["output"][0])
            return seen

        before = await outputs(30)  # both workers have the entry in their L1 by now
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as c:
            r = await c.post(
                "/v1/cache/invalidate",
                json={"model": "clock", "input": [1.0]},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 200
        await asyncio.sleep(1.0)  # events are polled every 0.25 s
        after = await outputs(30)
        assert not before & after, (before, after)


async def test_separate_servers_on_one_sqlite_file_share_invalidations(tmp_path: Path) -> None:
    """Two single-worker servers started in one directory share its SQLite file: an
    invalidation on one used to leave the other answering from its L1 (and, for a model, from
    the old generation's rows) until it restarted."""
    (tmp_path / "clockmodel.py").write_text(CLOCK)
    token = "shared-file-token"
    args = ("--model", "clock=clockmodel:make", "--admin-token", token)
    env = {"PYTHONPATH": str(tmp_path)}
    with (
        ServerProcess.infercache(*args, cwd=tmp_path, env=env) as a,
        ServerProcess.infercache(*args, cwd=tmp_path, env=env) as b,
    ):
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
        ):
            for body in ({"model": "clock", "input": [1.0]}, {"model": "clock"}, {"all": True}):
                old = (await on_b.post("/v1/models/clock/predict", json={"input": [1.0]})).json()
                again = await on_b.post("/v1/models/clock/predict", json={"input": [1.0]})
                assert again.json()["output"] == old["output"]  # B has it now
                r = await on_a.post(
                    "/v1/cache/invalidate", json=body, headers={"Authorization": f"Bearer {token}"}
                )
                assert r.status_code == 200 and "broadcast" not in r.json()
                await asyncio.sleep(1.0)
                new = (await on_b.post("/v1/models/clock/predict", json={"input": [1.0]})).json()
                assert new["output"] != old["output"], body


async def test_workers_with_nothing_shared_say_an_invalidation_stays_local(tmp_path: Path) -> None:
    token = "alone-admin-token"
    proc = ServerProcess.infercache(
        "--workers", "2", "--sql-url", "none", "--admin-token", token, cwd=tmp_path
    )
    with proc:
        assert "invalidation reaches only the worker that receives it" in proc.log()
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as c:
            r = await c.post(
                "/v1/cache/invalidate",
                json={"all": True},
                headers={"Authorization": f"Bearer {token}"},
            )
        assert r.status_code == 200
        assert r.json()["broadcast"] is False and "worker that received it" in r.json()["warning"]
        # ... and so does a publish, and the metrics and stats say which worker answered
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as c:
            auth = {"Authorization": f"Bearer {token}"}
            r = await c.post("/v1/topics/news/publish", json={"x": 1}, headers=auth)
            assert r.status_code == 200
            assert r.json()["broadcast"] is False and "one of 2" in r.json()["warning"]
            pids = set()
            for _ in range(12):
                stats = (await c.get("/v1/cache/stats", headers=auth)).json()
                assert stats["worker"]["workers"] == 2
                text = (await c.get("/metrics")).text
                # every sample names its worker: unlabelled, two workers' counters read as resets
                samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
                labelled = [re.search(r'worker="(\d+)"', ln) for ln in samples]
                workers = {m.group(1) for m in labelled if m is not None}
                assert all(labelled) and len(workers) == 1  # one process answered, all its samples
                pids.add(stats["worker"]["pid"])
            assert all(isinstance(p, int) for p in pids)


@pytest.mark.parametrize("bus", ["sqlite", "redis"])
async def test_a_publish_reaches_the_subscribers_of_every_worker(
    tmp_path: Path, bus: str, request: pytest.FixtureRequest
) -> None:
    """Each worker holds its own WebSocket connections: a publish reached only the subscribers
    of the worker that received it (3 of 6 in a review). It is now relayed over what carries the
    invalidations: the SQLite file's event log, or Redis."""
    from websockets.asyncio.client import connect

    token = "relay-admin-token"
    extra: list[str] = []
    if bus == "redis":
        extra = ["--redis-url", request.getfixturevalue("redis_server").url, "--sql-url", "none"]
    proc = ServerProcess.infercache("--workers", "2", "--admin-token", token, *extra, cwd=tmp_path)
    with proc:
        ws_url = proc.url.replace("http://", "ws://") + "/v1/ws"
        clients = [await connect(ws_url) for _ in range(8)]
        try:
            for ws in clients:
                await ws.send('{"type": "subscribe", "topic": "news"}')
                assert '"subscribed"' in str(await asyncio.wait_for(ws.recv(), 10))
            async with httpx.AsyncClient(base_url=proc.url, timeout=30) as c:
                r = await c.post(
                    "/v1/topics/news/publish",
                    json={"n": 1},
                    headers={"Authorization": f"Bearer {token}"},
                )
            assert r.status_code == 200 and r.json()["broadcast"] is True, r.json()
            for ws in clients:  # every one, whichever worker holds it, once
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert event == {"type": "event", "topic": "news", "data": {"n": 1}}
            for ws in clients:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(ws.recv(), 0.6)  # no second copy
        finally:
            for ws in clients:
                await ws.close()
