"""server.fastjson: the simdjson decode gives exactly what orjson + the input spec give, or None."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infercache.errors import InputError
from infercache.models import InputSpec
from infercache.server import fastjson

pytestmark = pytest.mark.skipif(not fastjson.available(), reason="pysimdjson not installed")

SPEC = InputSpec(shape=(None,), dtype="float32")
numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.sampled_from([0.0, -0.0, 1e-45, 3.4028235e38, 3.5e38, 2.0**53, 2.0**60]),
)


def converted(x: object) -> bytes | str:
    """The spec's conversion as bytes (bit-identical, -0.0 included: the key depends on the
    bytes), or the error it raised."""
    try:
        return SPEC.validate(x).tobytes()
    except InputError as exc:
        return f"InputError: {exc}"


@settings(max_examples=300, deadline=None)
@given(st.lists(numbers, min_size=1, max_size=64))
def test_same_array_as_the_general_path(values: list[float]) -> None:
    body = orjson.dumps({"input": values})
    fast = fastjson.decode_input_array(body)
    if fast is None:  # allowed only for an all-integer list beyond 2**53
        assert all(isinstance(v, int) for v in values) and max(map(abs, values)) >= 2**53
        return
    assert converted(fast) == converted(orjson.loads(body)["input"])


def test_hand_written_bodies_with_spaces_and_exponents() -> None:
    body = b' { "input" : [ 1 , -0 , 2.5e-3 , -1E+2 , 0.1 ] } '
    fast = fastjson.decode_input_array(body)
    assert fast is not None
    assert converted(fast) == converted(orjson.loads(body)["input"])


@pytest.mark.parametrize(
    "body",
    [
        b'{"input": [[1, 2], [3, 4]]}',  # nested: shape is the spec's business
        b'{"input": [[], [1, 2]]}',  # ragged, flattening would hide it
        b'{"input": [1, 2], "use_cache": false}',  # other fields
        b'{"input": [1, 2], "input": [3, 4]}',  # duplicate key: orjson keeps the last
        b'{"input": [1, "2"]}',
        b'{"input": [1, true]}',
        b'{"input": [1, null]}',
        b'{"input": [NaN]}',
        b'{"input": [1e999]}',
        b'{"input": [' + b"1" * 400 + b"]}",  # beyond 64 bits
        b'{"input": [9007199254740993]}',  # beyond 2**53: int->double->float32 may differ
        b'{"input": 5}',
        b'{"inputs": [1, 2]}',
        b'{"note": "[", "input": [1]}',
        b"[1, 2]",
        b'{"input": [1, 2]',
        b"",
    ],
)
def test_falls_back_on_anything_else(body: bytes) -> None:
    assert fastjson.decode_input_array(body) is None


def test_a_failed_parse_does_not_poison_the_next_one() -> None:
    assert fastjson.decode_input_array(b'{"input": [1, 2') is None
    out = fastjson.decode_input_array(b'{"input": [1, 2]}')
    assert out is not None and out.tolist() == [1.0, 2.0]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(numbers, min_size=1, max_size=32),
    st.dictionaries(
        st.sampled_from(["type", "id", "model", "use_cache", "note"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**60), 2**60),
            st.text(max_size=8),
            st.sampled_from(["]", "a]b", "[x"]),
        ),
        max_size=5,
    ),
)
def test_message_fields_and_input_match_orjson(values: list[float], extra: dict) -> None:
    raw = orjson.dumps({**extra, "input": values}).decode()
    found = fastjson.decode_message(raw)
    general = orjson.loads(raw)
    if any("[" in s for s in extra.values() if isinstance(s, str)):
        assert found is None  # a second "[": declined, the general path decides
        return
    if found is None:  # allowed only for an all-integer list beyond 2**53
        assert all(isinstance(v, int) for v in values) and max(map(abs, values)) >= 2**53
        return
    fields, array = found
    general_input = general.pop("input")
    assert fields == general
    assert converted(array) == converted(general_input)


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "predict", "input": [1, 2], "extra": [3]}',  # another array
        '{"type": "predict", "input": [1, 2], "meta": {"a": 1}}',  # an object value
        '{"type": "predict", "id": 1, "id": 2, "input": [1]}',  # duplicate key
        '{"type": "ping", "id": 1}',  # no input
        '{"type": "predict", "input": [9007199254740993]}',  # an "e" elsewhere, ints in the list
    ],
)
def test_messages_the_fast_path_declines(raw: str) -> None:
    assert fastjson.decode_message(raw) is None
