"""fingerprint(): canonical, type-tagged, stable and strict."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from infercache.keys import ALGORITHMS, MAX_DEPTH, fingerprint

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=6)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


def _copy(value: object) -> object:
    """A structurally equal deep copy built from fresh objects."""
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in reversed(list(value.items()))}
    if isinstance(value, float) and math.isnan(value):
        return -float("nan")  # a different NaN bit pattern must still give the same key
    return value


@settings(max_examples=200, deadline=None)
@given(json_like)
def test_equal_values_give_equal_keys(value: object) -> None:
    assert fingerprint(value) == fingerprint(_copy(value))


@settings(max_examples=200, deadline=None)
@given(json_like, json_like)
def test_distinct_values_give_distinct_keys(a: object, b: object) -> None:
    if repr(a) != repr(b):  # repr distinguishes type, -0.0, order of lists; NaNs repr equally
        assert fingerprint(a) != fingerprint(b)


def test_types_are_tagged() -> None:
    keys = {
        fingerprint([1, 2]),
        fingerprint((1, 2)),
        fingerprint(np.array([1, 2], np.int32)),
        fingerprint(np.array([1, 2], np.int64)),
        fingerprint(np.array([1.0, 2.0])),
        fingerprint([1.0, 2.0]),
        fingerprint(b"\x01\x02"),
        fingerprint("12"),
    }
    assert len(keys) == 8
    scalars = [1, 1.0, True, "1", b"1", np.int64(1), np.float64(1), None, 0, False, 0.0]
    assert len({fingerprint(s) for s in scalars}) == len(scalars)


def test_shape_counts() -> None:
    flat = np.arange(6, dtype=np.float32)
    assert fingerprint(flat) != fingerprint(flat.reshape(2, 3))
    assert fingerprint(flat.reshape(2, 3)) != fingerprint(flat.reshape(3, 2))
    assert fingerprint(np.zeros((0, 3))) != fingerprint(np.zeros((3, 0)))


def test_floats_zero_sign_and_nan() -> None:
    assert fingerprint(0.0) != fingerprint(-0.0)
    assert fingerprint(float("nan")) == fingerprint(-float("nan"))
    assert fingerprint(float("inf")) != fingerprint(float("-inf"))
    a = np.array([0.0, 1.0], np.float32)
    b = np.array([-0.0, 1.0], np.float32)
    assert fingerprint(a) != fingerprint(b)
    nan_payload = np.array([0x7FC00001], dtype=np.uint32).view(np.float32)
    assert fingerprint(np.array([np.nan], np.float32)) == fingerprint(nan_payload)
    assert fingerprint(np.array([np.nan, 1], np.float64)) == fingerprint(np.array([-np.nan, 1]))
    # one long float list with a NaN in it (the packed fast path) normalizes too
    assert fingerprint([1.0] * 9 + [float("nan")]) == fingerprint([1.0] * 9 + [-float("nan")])
    assert fingerprint(np.array([np.inf, -np.inf])) != fingerprint(np.array([np.nan, np.nan]))
    c1 = np.array([complex(np.nan, 1)], np.complex128)
    c2 = np.array([complex(-np.nan, 1)], np.complex128)
    assert fingerprint(c1) == fingerprint(c2)


def test_dict_order_is_irrelevant_but_keys_count() -> None:
    assert fingerprint({"a": 1, "b": 2}) == fingerprint(dict(OrderedDict([("b", 2), ("a", 1)])))
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint({1: "a"}) != fingerprint({"1": "a"})


def test_float_list_fast_path_is_distinct_from_mixed_lists() -> None:
    floats = [float(i) for i in range(10)]
    mixed = [*floats[:9], 9]  # last element an int
    assert fingerprint(floats) != fingerprint(mixed)
    assert fingerprint(floats) != fingerprint(tuple(floats))
    assert fingerprint(floats) != fingerprint(np.array(floats))


def test_big_ints() -> None:
    assert fingerprint(10**30) != fingerprint(10**30 + 1)
    assert fingerprint(-(10**40)) != fingerprint(10**40)
    assert fingerprint(10**5000) == fingerprint(10**5000)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from(
            [
                "bool",
                "int8",
                "uint16",
                "int32",
                "int64",
                "float16",
                "float32",
                "float64",
                "complex64",
            ]
        ),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
    )
)
def test_views_equal_copies_and_byte_order_is_irrelevant(arr: np.ndarray) -> None:
    view = arr.T
    assert fingerprint(view) == fingerprint(np.ascontiguousarray(view))
    swapped = arr.astype(arr.dtype.newbyteorder(">"))
    assert fingerprint(swapped) == fingerprint(arr)


def test_differs_in_one_element_of_a_large_array() -> None:
    """The seed's md5(str(array)) gives these two images one key; we must not."""
    img = np.zeros((3, 224, 224), np.float32)
    other = img.copy()
    other[1, 100, 100] = 1.0
    assert str(img) == str(other)
    assert fingerprint(img) != fingerprint(other)


def test_torch_tensors() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert fingerprint(t) == fingerprint(t.numpy())
    assert fingerprint(t.t()) == fingerprint(t.t().contiguous())
    assert fingerprint(t) != fingerprint(t.to(torch.float64))
    bf = torch.ones(3, dtype=torch.bfloat16)
    assert fingerprint(bf) != fingerprint(torch.ones(3, dtype=torch.float16))
    assert fingerprint(bf) == fingerprint(bf.clone())
    assert fingerprint(t.requires_grad_()) == fingerprint(t.detach())


@pytest.mark.parametrize("value", [{1, 2}, object(), 1 + 2j, np.array(["a"]), np.array([object()])])
def test_unsupported_types_raise_type_error_naming_the_type(value: object) -> None:
    with pytest.raises(TypeError) as info:
        fingerprint(value)
    assert type(value).__name__ in str(info.value) or "dtype" in str(info.value)


def test_str_subclass_is_not_silently_stringified() -> None:
    class Name(str):
        pass

    with pytest.raises(TypeError, match="Name"):
        fingerprint(Name("x"))


def test_deep_or_cyclic_input_is_rejected() -> None:
    deep: list[object] = []
    node = deep
    for _ in range(MAX_DEPTH + 5):
        child: list[object] = []
        node.append(child)
        node = child
    with pytest.raises(ValueError, match="deeper"):
        fingerprint(deep)
    cyclic: list[object] = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError):
        fingerprint(cyclic)


def test_namespace_and_algorithm_separate_keys() -> None:
    x = np.arange(4, dtype=np.float32)
    assert fingerprint(x, namespace="a") != fingerprint(x, namespace="b")
    assert fingerprint(x, namespace="ab") != fingerprint([x], namespace="a")
    digests = {fingerprint(x, algorithm=a) for a in ALGORITHMS}
    assert len(digests) == len(ALGORITHMS)
    assert all(len(d) == 32 and int(d, 16) >= 0 for d in digests)
    with pytest.raises(ValueError, match="unknown fingerprint algorithm"):
        fingerprint(x, algorithm="md5")


SAMPLES = (
    "[None, True, 3, -0.0, 'héllo', b'\\x00', (1, 2), {'b': [1.5, None], 'a': 2}, "
    "np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2], np.int32), [0.5] * 20]"
)


def test_stable_across_processes() -> None:
    """Never Python's hash(): a new interpreter (new hash seed) gives the very same keys."""
    code = (
        "import numpy as np\n"
        "from infercache.keys import fingerprint, ALGORITHMS\n"
        f"for s in {SAMPLES}:\n"
        "    print(*[fingerprint(s, namespace='m', algorithm=a) for a in sorted(ALGORITHMS)])\n"
    )
    outs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("1", "2")
    ]
    samples = eval(SAMPLES, {"np": np})
    here = "".join(
        " ".join(fingerprint(s, namespace="m", algorithm=a) for a in sorted(ALGORITHMS)) + "\n"
        for s in samples
    )
    assert outs[0] == outs[1] == here


def test_known_vector_pins_the_format() -> None:
    """A stored key must stay valid across releases: changing the encoding changes this digest."""
    expected = fingerprint([1, 2], algorithm="blake2b")
    import hashlib
    import struct

    h = hashlib.blake2b(digest_size=16)
    h.update(b"infercache-fingerprint-v1\x00" + struct.pack("<Q", 0))
    h.update(
        b"l"
        + struct.pack("<Q", 2)
        + b"i"
        + struct.pack("<Q", 1)
        + b"1"
        + b"i"
        + struct.pack("<Q", 1)
        + b"2"
    )
    assert expected == h.hexdigest()


@pytest.mark.parametrize("namespace", [5, None, b"model", ["model"]], ids=repr)
def test_namespace_must_be_a_str(namespace: object) -> None:
    """An int namespace failed with AttributeError ('int' object has no attribute 'encode'),
    an unhashable one with lru_cache's bare 'unhashable type'."""
    with pytest.raises(TypeError, match="namespace must be a str"):
        fingerprint([1.0], namespace=namespace)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="namespace must be a str"):
        fingerprint(np.zeros(4, np.float32), namespace=namespace)  # type: ignore[arg-type]
    assert fingerprint([1.0], namespace="5") != fingerprint([1.0])  # a str one still works


@pytest.mark.parametrize(
    "value",
    [
        np.ma.array([1.0, 2.0], mask=[False, True]),
        np.ma.array([1.0, 2.0]),  # no element masked: refused all the same, predictably
        [np.ma.array([1, 2], mask=[True, False])],
        np.ma.masked,
    ],
    ids=["masked", "unmasked", "nested", "masked-constant"],
)
def test_masked_arrays_are_refused(value: object) -> None:
    """The mask would be dropped (and the data under it hashed): two inputs the model tells
    apart could share a key. This failed with AttributeError ('ndarray' has no 'cast')."""
    with pytest.raises(TypeError, match="cannot fingerprint a numpy masked array"):
        fingerprint(value)


def test_other_ndarray_subclasses_hash_their_data() -> None:
    class Tagged(np.ndarray):
        pass

    plain = np.arange(6.0).reshape(2, 3)
    assert fingerprint(plain.view(Tagged)) == fingerprint(plain)
    assert fingerprint([plain.view(Tagged)]) == fingerprint([plain])
