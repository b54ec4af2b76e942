"""codec: exact round trips, no pickle unless signed, DecodeError for every bad payload."""

from __future__ import annotations

import contextlib
import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from infercache.codec import Codec, decode, encode
from infercache.errors import ConfigError, DecodeError, EncodeError

SECRET = b"0123456789abcdef-test-secret"

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too: the big-int extension
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.binary(max_size=30),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)

array_dtypes = st.sampled_from(
    [
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
        ">f4",
        ">i2",
    ]
)
arrays = hnp.arrays(
    dtype=array_dtypes, shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
)


@settings(max_examples=200, deadline=None)
@given(plain)
def test_plain_values_round_trip(value: object) -> None:
    assert decode(encode(value)) == value


@settings(max_examples=200, deadline=None)
@given(arrays)
def test_arrays_round_trip_exactly(arr: np.ndarray) -> None:
    out = decode(encode(arr))
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype
    assert out.shape == arr.shape
    assert out.tobytes() == np.ascontiguousarray(arr).tobytes()  # bit-exact, NaN payloads too


def test_nested_arrays_scalars_and_views() -> None:
    logits = np.array([0.1, -0.0, np.nan, np.inf], np.float16)
    value = {"logits": logits, "label": 3, "probs": [np.float32(0.25), np.bool_(True)]}
    out = decode(encode(value))
    assert out["label"] == 3
    assert out["logits"].dtype == np.float16
    assert out["logits"].tobytes() == logits.tobytes()
    assert out["probs"][0] == np.float32(0.25) and type(out["probs"][0]) is np.float32
    assert type(out["probs"][1]) is np.bool_
    view = np.arange(12, dtype=np.int32).reshape(3, 4).T
    assert np.array_equal(decode(encode(view)), view)


def test_tuples_come_back_as_lists() -> None:
    assert decode(encode((1, (2, 3)))) == [1, [2, 3]]


def test_decoded_arrays_are_read_only() -> None:
    out = decode(encode(np.zeros(3)))
    with pytest.raises(ValueError):
        out[0] = 1.0


@pytest.mark.parametrize(
    "value",
    [2**64, 2**64 - 1, -(2**63) - 1, -(2**63), 2**70, -(3**300), [1, 2**100, {"k": -(2**65)}]],
)
def test_ints_of_any_size_round_trip(value: object) -> None:
    """msgpack holds -2**63 .. 2**64-1; the rest used to fail with "cannot encode a value of
    type builtins.int; supported: ... int ..." (found in review)."""
    assert decode(encode(value)) == value


def test_a_malformed_big_int_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="malformed integer"):
        decode(b"\x01" + msgpack.packb(msgpack.ExtType(3, b"")))


@pytest.mark.parametrize("value", [{1, 2}, object(), np.array(["x"]), np.array([object()])])
def test_unsupported_values_raise_encode_error(value: object) -> None:
    with pytest.raises(EncodeError):
        encode(value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


@settings(max_examples=200, deadline=None)
@given(plain | arrays, st.data())
def test_truncated_or_flipped_payloads_never_escape_decode_error(
    value: object, data: st.DataObject
) -> None:
    payload = bytearray(encode(value))
    cut = data.draw(st.integers(0, len(payload) - 1))
    with contextlib.suppress(DecodeError):
        decode(bytes(payload[:cut]))
    pos = data.draw(st.integers(0, len(payload) - 1))
    payload[pos] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(DecodeError):
        decode(bytes(payload))


def test_hostile_array_headers_are_rejected() -> None:
    import msgpack

    def ext(fields: object) -> bytes:
        return b"\x01" + msgpack.packb(
            msgpack.ExtType(1, msgpack.packb(fields, use_bin_type=True)), use_bin_type=True
        )

    for fields in (
        ["O", [1], b"\x00" * 8],  # object dtype: would be arbitrary objects
        ["<f4", [1000000000], b"\x00" * 4],  # claims far more than it carries
        ["<f4", [-1], b""],
        ["V8", [1], b"\x00" * 8],
        ["not a dtype", [1], b"\x00"],
        "just a string",
    ):
        with pytest.raises(DecodeError):
            decode(ext(fields))
    with pytest.raises(DecodeError):
        decode(b"\x01" + msgpack.packb(msgpack.ExtType(99, b"x")))
    with pytest.raises(DecodeError):
        decode("a str, not bytes")  # type: ignore[arg-type]


def test_pickle_payloads_are_refused_by_default() -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, ...]:
            return (exec, ("raise SystemExit('pwned')",))

    raw_pickle = pickle.dumps(Boom())
    for payload in (raw_pickle, b"\x02" + b"\x00" * 32 + raw_pickle):
        with pytest.raises(DecodeError):
            decode(payload)


def test_signed_pickle_round_trip_and_tamper_detection() -> None:
    codec = Codec(allow_pickle=True, pickle_secret=SECRET)
    value = {"a set": {1, 2, 3}, "complex": 1 + 2j}
    payload = codec.encode(value)
    assert codec.decode(payload) == value
    # msgpack-able values still use msgpack, never pickle
    assert codec.encode([1, 2])[0] == 0x01
    tampered = bytearray(payload)
    tampered[-1] ^= 1
    with pytest.raises(DecodeError, match="signature"):
        codec.decode(bytes(tampered))
    other = Codec(allow_pickle=True, pickle_secret=b"another-secret-of-16+")
    with pytest.raises(DecodeError, match="signature"):
        other.decode(payload)
    with pytest.raises(DecodeError, match="does not allow pickle"):
        decode(payload)
    with pytest.raises(DecodeError):
        codec.decode(payload[:20])


def test_pickle_needs_a_real_secret() -> None:
    with pytest.raises(ConfigError, match="pickle_secret"):
        Codec(allow_pickle=True)
    with pytest.raises(ConfigError):
        Codec(allow_pickle=True, pickle_secret="short")


@pytest.mark.parametrize("dstr", [b"a", b"|S3", b"<M8", b"O", b"<f4 ", b"f4"])
def test_array_dtype_strings_other_than_the_encoders_are_refused_quietly(dstr: bytes) -> None:
    import warnings

    from infercache import codec

    payload = bytes([len(dstr)]) + dstr + bytes([0])  # a 0-d array, no data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy must not even be asked about an alias
        with pytest.raises(DecodeError):
            codec._unpack_array(payload)
