"""Safe value encoding for the remote tiers (Redis, SQLite, PostgreSQL).

The user's tutorial stores values with ``pickle`` and unpickles whatever Redis returns: anyone who
can write to Redis can then run code in every server. This codec is msgpack with numpy arrays as an
extension type, so decoding can only ever build plain data:

* None, bool, int (any size: beyond 64 bits as an extension type), float, str, bytes, lists
  (tuples come back as lists), dicts, numpy arrays of every bool/integer/float/complex dtype
  (dtype, shape and bytes exact, float16 and bool included) and numpy scalars;
* every payload starts with a format byte; anything truncated, corrupted or foreign raises
  ``DecodeError`` and nothing else;
* pickle only when the codec is built with ``allow_pickle=True`` and a secret: pickled payloads
  are HMAC-SHA256-signed, and an unsigned or tampered one raises ``DecodeError`` unread.

Decoded arrays are read-only views over the payload (no copy): cached values are shared between
callers, so nobody should mutate them in place anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import re
import struct
import sys
from typing import Any

import msgpack
import numpy as np

from infercache.errors import ConfigError, DecodeError, EncodeError

__all__ = ["Codec", "decode", "default_codec", "encode"]

_FORMAT_MSGPACK = 0x01
_FORMAT_PICKLE = 0x02
_EXT_ARRAY = 1
_EXT_SCALAR = 2
_EXT_BIGINT = 3  # an int msgpack cannot hold (beyond 64 bits): little-endian two's complement
_ARRAY_KINDS = frozenset("biufc")
_DTYPE_STR = re.compile(r"[<>|][biufc][0-9]{1,2}")
_MAC_SIZE = 32
_MIN_SECRET = 16
_hdr = struct.Struct("<B")


def _array_parts(arr: np.ndarray) -> tuple[bytes, memoryview]:
    """The header (dtype string, shape) and a zero-copy view of the data of an array."""
    dtype = arr.dtype
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None:
        raise EncodeError(f"cannot encode a numpy array of dtype {dtype}")
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    dstr = dtype.str.encode("ascii")
    shape = arr.shape
    header = struct.pack(f"<B{len(dstr)}sB{len(shape)}Q", len(dstr), dstr, len(shape), *shape)
    return header, arr.data.cast("B") if arr.size else memoryview(b"")


def _array_payload(arr: np.ndarray) -> bytes:
    """dtype string, shape and raw bytes in one flat buffer (one copy, nothing nested to parse)."""
    return b"".join(_array_parts(arr))


def _pack_array(arr: np.ndarray) -> msgpack.ExtType:
    return msgpack.ExtType(_EXT_ARRAY, _array_payload(arr))


def _ext_frame(code: int, arr: np.ndarray) -> bytes:
    """msgpack's ext framing written directly, so a top-level array is encoded with one copy."""
    header, data = _array_parts(arr)
    n = len(header) + len(data)
    if n < 0x100:
        head = struct.pack("<BBb", 0xC7, n, code)
    elif n < 0x10000:
        head = struct.pack(">BHb", 0xC8, n, code)
    else:
        head = struct.pack(">BIb", 0xC9, n, code)
    return b"".join((b"\x01", head, header, data))


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    if isinstance(obj, np.generic):
        return msgpack.ExtType(_EXT_SCALAR, _array_payload(np.asarray(obj)))
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _pack_array(obj.detach().cpu().numpy())
    if isinstance(obj, int) and not isinstance(obj, bool):  # msgpack refused it: beyond 64 bits
        return msgpack.ExtType(
            _EXT_BIGINT, obj.to_bytes(obj.bit_length() // 8 + 1, "little", signed=True)
        )
    t = type(obj)
    raise EncodeError(
        f"cannot encode a value of type {t.__module__}.{t.__qualname__}; supported: None, bool, "
        "int, float, str, bytes, list, tuple, dict, numpy arrays and scalars"
    )


def _unpack_array(data: bytes | memoryview) -> np.ndarray:
    try:
        dlen = data[0]
        dstr = bytes(data[1 : 1 + dlen]).decode("ascii")
        ndim = data[1 + dlen]
        offset = 2 + dlen + 8 * ndim
        shape = struct.unpack_from(f"<{ndim}Q", data, 2 + dlen)
    except (IndexError, UnicodeDecodeError, struct.error) as exc:
        raise DecodeError("malformed array payload") from exc
    # the encoder writes dtype.str ('<f4', '|b1'...): anything else (numpy aliases such as 'a',
    # which numpy 2 parses with a DeprecationWarning) is not ours
    if not _DTYPE_STR.fullmatch(dstr):
        raise DecodeError(f"unknown array dtype {dstr!r}")
    try:
        dtype = np.dtype(dstr)
    except TypeError as exc:
        raise DecodeError(f"unknown array dtype {dstr!r}") from exc
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise DecodeError(f"array dtype {dstr!r} is not allowed")
    if ndim > 32:
        raise DecodeError("malformed array shape")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(data) - offset:
        raise DecodeError("array payload size does not match its dtype and shape")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_ARRAY:
        return _unpack_array(data)
    if code == _EXT_SCALAR:
        arr = _unpack_array(data)
        if arr.shape != ():
            raise DecodeError("malformed scalar payload")
        return arr[()]
    if code == _EXT_BIGINT:
        if not data:
            raise DecodeError("malformed integer payload")
        return int.from_bytes(data, "little", signed=True)
    raise DecodeError(f"unknown extension type {code}")


class Codec:
    """Encodes values to bytes and back; safe by default (no pickle).

    ``allow_pickle=True`` needs ``pickle_secret`` (at least 16 bytes): values msgpack cannot
    represent are then pickled and signed with HMAC-SHA256 under that secret, and only payloads
    whose signature verifies are ever unpickled. Processes sharing a cache need the same secret.
    """

    __slots__ = ("_allow_pickle", "_packer_default", "_secret")

    def __init__(
        self, *, allow_pickle: bool = False, pickle_secret: bytes | str | None = None
    ) -> None:
        if isinstance(pickle_secret, str):
            pickle_secret = pickle_secret.encode("utf-8")
        if allow_pickle and (pickle_secret is None or len(pickle_secret) < _MIN_SECRET):
            raise ConfigError(
                f"pickle_secret: allow_pickle=True needs a secret of at least {_MIN_SECRET} bytes, "
                "so that only payloads signed by this deployment are ever unpickled"
            )
        self._allow_pickle = allow_pickle
        self._secret = pickle_secret
        self._packer_default = _default

    @property
    def allow_pickle(self) -> bool:
        return self._allow_pickle

    def encode(self, value: Any) -> bytes:
        """Return the bytes of ``value``; raises ``EncodeError`` for a type the codec can't hold."""
        if type(value) is np.ndarray:  # the common prediction: one array, framed by hand
            return _ext_frame(_EXT_ARRAY, value)
        try:
            body = msgpack.packb(value, default=self._packer_default, use_bin_type=True)
        except EncodeError:
            if not self._allow_pickle:
                raise
            return self._sign_pickle(value)
        except (TypeError, ValueError, OverflowError) as exc:
            # msgpack: dicts with unhashable/unsupported keys, nesting limits.
            if not self._allow_pickle:
                raise EncodeError(f"cannot encode value: {exc}") from exc
            return self._sign_pickle(value)
        return b"\x01" + body

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """Return the value in ``data``; raises ``DecodeError`` (only) for anything malformed."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if not data:
            raise DecodeError("empty payload")
        fmt = data[0]
        if fmt == _FORMAT_MSGPACK:
            if len(data) > 6 and data[1] == 0xC9 and data[6] == _EXT_ARRAY:
                # A big top-level array: read it in place, without msgpack copying the payload.
                (size,) = struct.unpack_from(">I", data, 2)
                if size != len(data) - 7:
                    raise DecodeError("truncated or padded array payload")
                return _unpack_array(memoryview(data)[7:])
            try:
                return msgpack.unpackb(
                    data[1:], raw=False, ext_hook=_ext_hook, strict_map_key=False, use_list=True
                )
            except DecodeError:
                raise
            except Exception as exc:  # msgpack raises many types on hostile bytes
                raise DecodeError(f"corrupted payload: {type(exc).__name__}: {exc}") from exc
        if fmt == _FORMAT_PICKLE:
            return self._verify_unpickle(data)
        raise DecodeError(f"unknown payload format 0x{fmt:02x}")

    def _sign_pickle(self, value: Any) -> bytes:
        assert self._secret is not None
        try:
            body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise EncodeError(f"cannot pickle value of type {type(value).__name__}: {exc}") from exc
        mac = hmac.new(self._secret, body, hashlib.sha256).digest()
        return b"\x02" + mac + body

    def _verify_unpickle(self, data: bytes) -> Any:
        if not self._allow_pickle or self._secret is None:
            raise DecodeError("pickle payload refused: this codec does not allow pickle")
        if len(data) < 1 + _MAC_SIZE:
            raise DecodeError("truncated pickle payload")
        mac, body = data[1 : 1 + _MAC_SIZE], data[1 + _MAC_SIZE :]
        expected = hmac.new(self._secret, body, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise DecodeError("pickle payload signature does not verify; refusing to unpickle")
        try:
            return pickle.loads(body)
        except Exception as exc:  # signed by us, yet unreadable (e.g. a class that moved)
            raise DecodeError(f"signed pickle payload failed to load: {exc}") from exc


default_codec = Codec()


def encode(value: Any) -> bytes:
    """Encode with the safe default codec (no pickle)."""
    return default_codec.encode(value)


def decode(data: bytes | bytearray | memoryview) -> Any:
    """Decode with the safe default codec (no pickle)."""
    return default_codec.decode(data)
