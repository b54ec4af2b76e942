"""Strings PostgreSQL TEXT cannot hold (NUL, lone surrogates) in SQLCache's tables.

A Predictor's generation name is ``name + "\\x00" + version``: with a PostgreSQL L3, every
model-wide invalidation failed to be stored (DataError), so a fresh process read generation 0
and retired entries came back once Redis restarted, or at once without Redis. The same held for
entry keys and namespaces. SQLite stores them as they are; the PostgreSQL backend escapes them,
leaving every other string as it was stored before.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest

from infercache.multilevel import MultiLevelCache
from infercache.tiers.memory import MemoryCache
from infercache.tiers.sql import (
    _PG_ESCAPE,
    SQLCache,
    _KeyFilter,
    _pg_text,
    _pg_texts,
    _pg_untext,
)

try:
    from servers import wait_until
except ImportError:  # pragma: no cover
    from tests.servers import wait_until  # type: ignore[no-redef]

_seq = itertools.count()

SURROGATE = "lone \udc80 surrogate"  # no UTF-8 for it
# Names TEXT cannot hold, and names that start with the escape marker: the latter must not be
# read back as what their hex spells ("\x01hex:6100" is the escape of "a\x00").
ODD = [
    "m\x00v",
    "mlp\x00d67b0c1e",
    "m\x00v\x00",
    "\x00",
    "a\x00",
    "modèle\x00v1",
    "😀\x00",
    SURROGATE,
    _PG_ESCAPE,
    _PG_ESCAPE + "6100",
    _PG_ESCAPE + "zz",
    _PG_ESCAPE + "\x00",
]
# Names stored as they are, as before the escape existed.
PLAIN = ["mlp", "mlp:v2", "modèle", "😀", "\x01", "\x01he", "x" + _PG_ESCAPE, "6100", ""]


@pytest.fixture
def ns() -> str:
    return f"gen{next(_seq)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def pg(postgres_url: str, ns: str) -> AsyncIterator[SQLCache]:
    c = SQLCache(postgres_url, namespace=ns)
    yield c
    await c.close()


def odd_for(url: str) -> list[str]:
    """ODD less what the backend cannot take: SQLite's driver refuses lone surrogates."""
    return ODD if url.startswith("postgres") else [s for s in ODD if s != SURROGATE]


def raw_generations(url: str, ns: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT name, generation FROM infercache_entries_generations WHERE namespace = %s",
            (ns,),
        ).fetchall()
    return {name: int(gen) for name, gen in rows}


def test_escape_round_trips_and_leaves_plain_strings_alone() -> None:
    for s in PLAIN:
        assert _pg_text(s) == s
    stored = [_pg_text(s) for s in ODD]
    assert len(set(stored)) == len(ODD)  # one-to-one
    for s, t in zip(ODD, stored, strict=True):
        assert "\x00" not in t and t.isascii() and t.startswith(_PG_ESCAPE)
        assert _pg_untext(t) == s
    # the one-pass batch check agrees with the key-by-key escape
    assert _pg_texts(PLAIN) == PLAIN
    for s in ODD:
        assert _pg_texts([*PLAIN, s]) == [*PLAIN, _pg_text(s)]
    # a row from before the escape that starts with the marker but is not ours reads as stored
    assert _pg_untext(_PG_ESCAPE + "zz") == _PG_ESCAPE + "zz"


async def test_nul_names_survive_into_a_fresh_process(sql_url: str, ns: str) -> None:
    odd = odd_for(sql_url)
    first = SQLCache(sql_url, namespace=ns)
    try:
        for i, name in enumerate(odd):
            for _ in range(i + 1):
                await first.advance_generation(name)
        assert await first.raise_generation("m\x00v", 50) == 50
        assert await first.advance_generation("m\x00v", floor=7) == 51
    finally:
        await first.close()
    expected = {name: i + 1 for i, name in enumerate(odd)} | {"m\x00v": 51}
    fresh = SQLCache(sql_url, namespace=ns)  # what another process reads
    try:
        assert await fresh.read_generations() == expected
    finally:
        await fresh.close()


async def test_plain_names_are_stored_exactly_as_before(
    pg: SQLCache, postgres_url: str, ns: str
) -> None:
    for name in PLAIN:
        await pg.advance_generation(name)
    assert raw_generations(postgres_url, ns) == dict.fromkeys(PLAIN, 1)
    # the escaped ones are stored apart from them, each once
    for name in ODD:
        await pg.advance_generation(name)
    raw = raw_generations(postgres_url, ns)
    assert len(raw) == len(PLAIN) + len(ODD)
    assert {k: v for k, v in raw.items() if k in PLAIN} == dict.fromkeys(PLAIN, 1)


async def test_a_deployment_keeps_the_generations_it_stored(
    pg: SQLCache, postgres_url: str, ns: str
) -> None:
    await pg.read_generations()  # creates the tables
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # rows from before the fix
        conn.execute(
            "INSERT INTO infercache_entries_generations (namespace, name, generation)"
            " VALUES (%s, 'mlp', 4), (%s, 'modèle', 9)",
            (ns, ns),
        )
    assert await pg.read_generations() == {"mlp": 4, "modèle": 9}
    assert await pg.advance_generation("mlp") == 5
    assert raw_generations(postgres_url, ns) == {"mlp": 5, "modèle": 9}


async def test_invalidating_a_model_survives_into_a_new_cache(postgres_url: str, ns: str) -> None:
    name = "m\x00v\x00"
    first = MultiLevelCache([MemoryCache(), SQLCache(postgres_url, namespace=ns)])
    try:
        assert await first.invalidate(namespace=name) == 1
        assert await first.invalidate(namespace=name) == 2
    finally:
        await first.close()
    # no Redis: a restarted server learns the generation from PostgreSQL alone
    again = MultiLevelCache([MemoryCache(), SQLCache(postgres_url, namespace=ns)])
    try:
        await again.start()
        assert again.generation(name) == 2
        assert again.generation("m\x00v") == 0
    finally:
        await again.close()


async def test_entry_keys_and_namespaces_of_any_str(sql_url: str, ns: str) -> None:
    # one odd key used to fail the whole batch on PostgreSQL: a write-behind flush lost them all
    odd = odd_for(sql_url)
    keys = [*odd, *PLAIN, "0123456789abcdef0123456789abcdef"]
    for namespace in (ns, ns + "\x00odd", _PG_ESCAPE + ns):
        c = SQLCache(sql_url, namespace=namespace)
        try:
            await c.set_many({k: i for i, k in enumerate(keys)}, ttl=60)
            assert await c.get_many([*keys, "absent\x00"]) == {k: i for i, k in enumerate(keys)}
            for k in odd:
                assert await c.exists(k)
                assert await c.expire(k, 30)
                assert 0 < await c.ttl(k) <= 30
            assert await c.delete_many(odd[:3]) == 3
            assert await c.get_many(odd[:4]) == {odd[3]: 3}
            assert await c.clear() == len(keys) - 3
        finally:
            await c.close()


async def test_key_filter_pages_through_escaped_keys(
    postgres_url: str, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_KeyFilter, "PAGE", 2)  # a page boundary on escaped keys too
    keys = [*ODD, *(k for k in PLAIN if k)]  # "" is never loaded: the scan starts after ""
    writer = SQLCache(postgres_url, namespace=ns)
    try:
        await writer.set_many(dict.fromkeys(keys, 1))
    finally:
        await writer.close()
    reader = SQLCache(postgres_url, namespace=ns, key_filter=True)
    try:
        await reader.get("absent")  # sets up, and starts loading the filter
        flt = reader._filter
        assert flt is not None
        await wait_until(lambda: flt.ready)
        assert flt.loaded == len(keys)
        assert all(reader.might_contain(k) for k in keys)
        assert await reader.get_many(keys) == dict.fromkeys(keys, 1)
    finally:
        await reader.close()
