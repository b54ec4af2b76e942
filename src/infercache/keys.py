"""Cache keys for model inputs: canonical, type-tagged, stable, collision-resistant digests.

The user's tutorial derives keys as ``md5(json.dumps(x))`` or ``md5(str(x))``. Both are slow (338 µs
for 784 floats) and the second is wrong: numpy abbreviates arrays over 1,000 elements with ``...``,
so two images that differ in one pixel share a key and one user is served another's prediction.

``fingerprint`` instead feeds a canonical byte encoding of the value into a hash:

* every value carries a type tag, so ``[1, 2]``, ``(1, 2)``, ``np.array([1, 2], int32)`` and the
  ``int64`` array are four different keys, and ``1``, ``1.0`` and ``True`` differ too;
* numpy arrays contribute dtype, shape and their raw buffer (zero-copy for C-contiguous arrays; a
  non-contiguous view is made contiguous, so it equals its copy); big-endian arrays are byte-swapped
  so equal values give equal keys on every machine; a masked array is refused (its mask would be
  dropped, and whatever lies under it hashed);
* floats are hashed by their IEEE bits, so ``-0.0`` and ``0.0`` differ, and every NaN is first
  replaced by one canonical NaN so all NaNs share a key;
* dict entries are sorted by their encoded key, so insertion order does not matter;
* nothing is ever stringified: an unsupported type raises ``TypeError`` naming it.

The default hash is BLAKE3 truncated to 128 bits. Inputs come from the network, and with a
non-cryptographic hash (xxh3) an attacker can forge an input whose key equals another input's,
then read or poison that entry. BLAKE3 is cryptographic and, measured in
``benchmarks/bench_keys.py``, several times faster than blake2b on large buffers (see
docs/benchmarks.md): it meets the 150 µs budget for a 3x224x224 image that blake2b misses.
``algorithm="blake2b"`` (stdlib only) and ``algorithm="xxh3"`` (trusted inputs only) exist too.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Protocol

import blake3
import numpy as np
import xxhash

from infercache.errors import InputError

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "MAX_DEPTH", "fingerprint"]

#: Deeper nesting raises ``ValueError``: it bounds recursion on hostile input (and cycles).
MAX_DEPTH = 128

_VERSION = b"infercache-fingerprint-v1\x00"
_CANONICAL_NAN = struct.pack("<d", float("nan"))
_LITTLE = sys.byteorder == "little"
_pack_len = struct.Struct("<Q").pack
_pack_double = struct.Struct("<d").pack


class _Hasher(Protocol):
    def update(self, data: Any, /) -> object: ...


def _blake2b_new(data: bytes) -> _Hasher:
    return hashlib.blake2b(data, digest_size=16)


def _xxh3_new(data: bytes) -> _Hasher:
    return xxhash.xxh3_128(data)


# name -> (constructor taking the first chunk, 128-bit hex digest of a hasher)
ALGORITHMS: dict[str, tuple[Callable[[bytes], _Hasher], Callable[[Any], str]]] = {
    "blake3": (blake3.blake3, lambda h: h.hexdigest(16)),
    "blake2b": (_blake2b_new, lambda h: h.hexdigest()),
    "xxh3": (_xxh3_new, lambda h: h.hexdigest()),
}
DEFAULT_ALGORITHM = "blake3"
_PARALLEL_BYTES = 256 * 1024

# numpy dtype kinds we accept: bool, signed, unsigned, float, complex.
_ARRAY_KINDS = frozenset("biufc")


def fingerprint(obj: Any, *, namespace: str = "", algorithm: str = DEFAULT_ALGORITHM) -> str:
    """Return the 32-hex-char cache key of ``obj`` within ``namespace``.

    Equal values give equal keys in every process and on every machine; values that differ in type,
    dtype, shape or content give different keys. ``namespace`` separates models and versions (the
    Predictor passes model name, version and cache generation).
    """
    try:
        new_hasher, hexdigest = ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(
            f"unknown fingerprint algorithm {algorithm!r}; expected one of {sorted(ALGORITHMS)}"
        ) from None
    try:
        prefix = _prefix(namespace)
    except TypeError:  # not a str (or unhashable, which lru_cache refuses before _prefix runs)
        raise _namespace_error(namespace) from None
    if type(obj) is np.ndarray:
        # Fast path for the common case, a single array: two updates, no intermediate list.
        arr, header = _array_parts(obj)
        if algorithm == "blake3" and arr.nbytes >= _PARALLEL_BYTES:
            # BLAKE3's tree hashing splits big buffers (images) over cores.
            hasher: _Hasher = blake3.blake3(prefix + header, max_threads=blake3.blake3.AUTO)
        else:
            hasher = new_hasher(prefix + header)
        if arr.size:
            hasher.update(arr.data.cast("B"))
        return hexdigest(hasher)
    parts: list[Any] = []
    _encode(obj, parts, 0)
    hasher = new_hasher(prefix)
    small: list[bytes] = []
    for part in parts:
        # Join small pieces, hand big buffers over as they are (zero-copy memoryviews).
        if isinstance(part, memoryview):
            if small:
                hasher.update(b"".join(small))
                small.clear()
            hasher.update(part)
        else:
            small.append(part)
    if small:
        hasher.update(b"".join(small))
    return hexdigest(hasher)


@lru_cache(maxsize=1024)
def _prefix(namespace: str) -> bytes:
    # Checked on a cache miss only: a namespace seen before costs nothing more.
    if not isinstance(namespace, str):
        raise _namespace_error(namespace)
    ns = namespace.encode("utf-8", "surrogatepass")
    return _VERSION + _pack_len(len(ns)) + ns


def _namespace_error(namespace: object) -> TypeError:
    t = type(namespace)
    return TypeError(
        f"fingerprint namespace must be a str, got {t.__module__}.{t.__qualname__}: "
        f"{namespace!r:.60}"
    )


def _encode(obj: Any, out: list[Any], depth: int) -> None:
    if depth > MAX_DEPTH:
        # InputError (a ValueError): it is the input that is wrong, and a server answers 422
        raise InputError(f"input nested deeper than {MAX_DEPTH} levels (or cyclic)")
    t = type(obj)
    if t is float:
        out.append(b"f")
        out.append(_CANONICAL_NAN if obj != obj else _pack_double(obj))
    elif t is int:
        out.append(b"i")
        digits = str(obj).encode("ascii") if -(10**18) < obj < 10**18 else _big_int(obj)
        out.append(_pack_len(len(digits)))
        out.append(digits)
    elif t is str:
        data = obj.encode("utf-8", "surrogatepass")
        out.append(b"s")
        out.append(_pack_len(len(data)))
        out.append(data)
    elif obj is None:
        out.append(b"N")
    elif t is bool:
        out.append(b"T" if obj else b"F")
    elif t is list or t is tuple:
        _encode_sequence(obj, b"l" if t is list else b"t", out, depth)
    elif t is dict:
        _encode_dict(obj, out, depth)
    elif t is bytes or t is bytearray or t is memoryview:
        data = bytes(obj) if t is not bytes else obj
        out.append(b"b")
        out.append(_pack_len(len(data)))
        out.append(data)
    elif t is np.ndarray:
        _encode_array(obj, out)
    elif isinstance(obj, np.ndarray):  # a subclass: np.memmap, np.matrix hash their data
        if isinstance(obj, np.ma.MaskedArray):
            # Its buffer holds whatever lies under the mask, and the mask would be dropped: two
            # inputs the model tells apart (or sees as equal) would get the wrong keys.
            raise TypeError(
                f"cannot fingerprint a numpy masked array ({t.__module__}.{t.__qualname__}): "
                "the mask would be ignored; pass arr.filled(value), or np.asarray(arr) if the "
                "mask does not matter"
            )
        _encode_array(obj, out)
    elif isinstance(obj, np.generic):
        _encode_array(np.asarray(obj), out)
    elif _is_torch_tensor(obj):
        _encode_tensor(obj, out)
    else:
        raise TypeError(
            f"cannot fingerprint a value of type {t.__module__}.{t.__qualname__}; supported: None, "
            "bool, int, float, str, bytes, list, tuple, dict, numpy arrays and torch tensors"
        )


def _big_int(value: int) -> bytes:
    # str() of a huge int is quadratic and capped by Python's int-str limit; raw bytes are neither.
    n = (value.bit_length() + 8) // 8
    return b"x" + value.to_bytes(n, "little", signed=True)


def _encode_sequence(
    seq: list[Any] | tuple[Any, ...], tag: bytes, out: list[Any], depth: int
) -> None:
    n = len(seq)
    # Fast path: a homogeneous list of floats (the common JSON model input) packs in C.
    if n >= 8 and type(seq[0]) is float and len(set(map(type, seq))) == 1:
        packed = array("d", seq)
        if not _LITTLE:  # pragma: no cover - big-endian hosts
            packed.byteswap()
        arr = np.frombuffer(packed, dtype="<f8")
        if np.isnan(arr).any():
            arr = np.where(np.isnan(arr), np.nan, arr)
            data: bytes | memoryview = arr.astype("<f8").tobytes()
        else:
            data = memoryview(packed).cast("B")
        out.append(tag + b"D")
        out.append(_pack_len(n))
        out.append(data)
        return
    out.append(tag)
    out.append(_pack_len(n))
    for item in seq:
        _encode(item, out, depth + 1)


def _encode_dict(obj: dict[Any, Any], out: list[Any], depth: int) -> None:
    entries = []
    for key, value in obj.items():
        kparts: list[Any] = []
        _encode(key, kparts, depth + 1)
        entries.append((b"".join(bytes(p) for p in kparts), value))
    entries.sort(key=lambda e: e[0])
    out.append(b"d")
    out.append(_pack_len(len(entries)))
    for kbytes, value in entries:
        out.append(_pack_len(len(kbytes)))
        out.append(kbytes)
        _encode(value, out, depth + 1)


def _encode_array(arr: np.ndarray, out: list[Any]) -> None:
    arr, header = _array_parts(arr)
    out.append(header)
    out.append(arr.data.cast("B") if arr.size else b"")


def _array_parts(arr: np.ndarray) -> tuple[np.ndarray, bytes]:
    """Return the canonical (little-endian, NaN-normalized, C-contiguous) array and its header."""
    dtype = arr.dtype
    cached = _HEADERS.get((dtype, arr.shape))
    if cached is None:
        cached = _array_header(dtype, arr.shape)
    header, swap, check_nan = cached
    if swap:
        arr = arr.astype(dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if check_nan and arr.size and _has_nan(arr):
        arr = _canonical_nans(arr)
    return arr, header


_HEADERS: dict[tuple[np.dtype[Any], tuple[int, ...]], tuple[bytes, bool, bool]] = {}


def _array_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> tuple[bytes, bool, bool]:
    """Header bytes of an array type (dtype kind + itemsize + shape), memoized: shapes repeat."""
    kind = dtype.kind
    if kind not in _ARRAY_KINDS or dtype.fields is not None:
        raise TypeError(
            f"cannot fingerprint a numpy array of dtype {dtype}; supported kinds: bool, integer, "
            "unsigned, float, complex"
        )
    desc = f"{kind}{dtype.itemsize}:{','.join(map(str, shape))}".encode("ascii")
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    header = b"a" + _pack_len(len(desc)) + desc + _pack_len(nbytes)
    swap = dtype.byteorder == ">" or (dtype.byteorder == "=" and not _LITTLE)
    entry = (header, swap, kind in "fc")
    if len(_HEADERS) < 4096:
        _HEADERS[(dtype, shape)] = entry
    return entry


def _has_nan(arr: np.ndarray) -> bool:
    # min() propagates NaN, cannot overflow, warns about nothing, and (SIMD, no temporary) is
    # cheaper than materializing np.isnan's boolean array.
    if arr.dtype.kind == "f":
        lowest = arr.min()
        return bool(lowest != lowest)
    return bool(np.isnan(arr).any())


def _canonical_nans(arr: np.ndarray) -> np.ndarray:
    """Replace every NaN (any sign, any payload) by the one NaN numpy's ``np.nan`` converts to."""
    arr = arr.copy()
    if arr.dtype.kind == "c":
        real, imag = arr.real, arr.imag
        real[np.isnan(real)] = np.nan
        imag[np.isnan(imag)] = np.nan
    else:
        arr[np.isnan(arr)] = np.nan
    return arr


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _encode_tensor(tensor: Any, out: list[Any]) -> None:
    import torch

    t = tensor.detach()
    if t.is_sparse or t.layout != torch.strided:
        t = t.to_dense()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: hash its bits under a tag of its own, NaNs made canonical first.
        t = torch.where(torch.isnan(t), torch.tensor(float("nan"), dtype=t.dtype), t)
        bits = t.contiguous().view(torch.int16).numpy()
        header = f"bf16:{','.join(map(str, bits.shape))}".encode("ascii")
        out.append(b"A")
        out.append(_pack_len(len(header)))
        out.append(header)
        out.append(_pack_len(bits.nbytes))
        out.append(bits.astype("<i2", copy=False).data.cast("B") if bits.size else b"")
        return
    try:
        arr = t.numpy()
    except TypeError as exc:
        raise TypeError(f"cannot fingerprint a torch tensor of dtype {t.dtype}") from exc
    _encode_array(arr, out)
