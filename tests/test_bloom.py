"""tiers.bloom.BloomFilter: never a false "no"; false "maybe"s within the configured rate."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infercache.tiers.bloom import BloomFilter


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(), max_size=300))
def test_every_added_key_is_a_maybe(keys: list[str]) -> None:
    f = BloomFilter(capacity=16)  # tiny: forces several layers
    f.add_many(keys)
    assert all(k in f for k in keys)
    assert len(f) == len(keys)


def test_false_positive_rate_holds_as_it_grows() -> None:
    f = BloomFilter(capacity=1000, fp_rate=0.01)
    f.add_many([secrets.token_hex(16) for _ in range(30_000)])  # 5 layers
    assert len(f._layers) >= 4
    others = [secrets.token_hex(16) for _ in range(40_000)]
    rate = sum(k in f for k in others) / len(others)
    assert rate < 0.015  # the bound is 0.01; sampling noise on 40k draws is ~0.0005


def test_clear_and_odd_inputs() -> None:
    f = BloomFilter(capacity=8)
    f.add("a")
    f.add("\udcff surrogate")
    assert "a" in f and "\udcff surrogate" in f
    assert 42 not in f  # type: ignore[operator]
    f.clear()
    assert "a" not in f and len(f) == 0
    with pytest.raises(ValueError):
        BloomFilter(capacity=0)
    with pytest.raises(ValueError):
        BloomFilter(fp_rate=1.0)
