"""bench.loadgen.Inputs: the payloads the load generator sends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from infercache.bench.loadgen import Inputs


def test_distinct_vectors_stay_distinct_in_float32() -> None:
    inputs = Inputs("distinct", offset=(1 << 30) - 5)
    arrays = [np.asarray(inputs.input_list(inputs.next_index()), np.float32) for _ in range(10)]
    assert len({a.tobytes() for a in arrays}) == 10
    assert all(a.shape == (784,) for a in arrays)


def test_text_inputs_are_distinct_json_strings() -> None:
    inputs = Inputs("distinct", text=True)
    texts = [json.loads(inputs.input_json(inputs.next_index())) for _ in range(100)]
    assert all(isinstance(t, str) and 20 < len(t) < 200 for t in texts)
    assert len(set(texts)) == 100
    same = Inputs("same", text=True)
    assert same.input_json(same.next_index()) == same.input_json(same.next_index())


def test_zipf_draws_favour_low_ranks() -> None:
    inputs = Inputs("zipf", keys=1000, seed=3)
    draws = [inputs.next_index() for _ in range(5000)]
    assert all(0 <= d < 1000 for d in draws)
    assert sum(d < 10 for d in draws) > sum(d >= 990 for d in draws) * 5
    with pytest.raises(ValueError):
        Inputs("uniform")
