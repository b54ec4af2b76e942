"""JSON encoding for responses: orjson, with numpy arrays and scalars serialized natively.

orjson serializes C-contiguous numpy arrays of native dtypes itself (``OPT_SERIALIZE_NUMPY``),
several times faster than ``tolist()``; the ``default`` hook catches what it refuses (non-contiguous
views, float16, numpy scalars, tuples nested in odd places) so that encoding never fails on a model
output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from infercache.errors import ModelError

_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype == np.float16:
            return obj.astype(np.float32).tolist()
        return np.ascontiguousarray(obj).tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, set | frozenset):
        return list(obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).hex()
    tolist = getattr(obj, "tolist", None)  # torch tensors and other array types
    if callable(tolist):
        return tolist()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def dumps(obj: Any) -> bytes:
    """Serialize ``obj`` to JSON bytes (NaN and infinities become null, as orjson does).

    What JSON cannot carry at all (an int beyond 64 bits, an object of an unknown type) is the
    model's output, not the client's input: a ModelError (500 ``model_error``, saying so)
    rather than an unexplained ``internal_error``."""
    try:
        return orjson.dumps(obj, default=_default, option=_OPTS)
    except orjson.JSONEncodeError as exc:
        raise ModelError(f"the model's output cannot be encoded as JSON: {exc}") from exc


loads = orjson.loads
