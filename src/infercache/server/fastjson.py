"""Decode ``{"input": [n, n, ...]}`` straight into a float64 array, without Python floats.

The miss path's biggest single cost was turning JSON into the model's array: ``orjson.loads``
builds one Python float per number and ``np.asarray`` reads them back one by one (784 floats:
~37 µs + ~38 µs here). simdjson parses the same body and hands the numbers over as one C buffer
(~26 µs for both steps), and that buffer becomes the array with no per-number object.

The fast path only answers when its result is *exactly* what the general path would give, and
returns None otherwise, so the caller falls back to ``orjson`` and its error messages:

- the body is an object with the single key ``input`` whose value is a flat array of numbers (one
  ``[`` in the whole body: no nested arrays, no strings containing brackets);
- every number converts as orjson + numpy would convert it: a list of integers only, one of them
  beyond 2**53 (where int -> double -> float32 may round differently from int -> float32), falls
  back;
- anything simdjson refuses (bad JSON, ``true``, strings, NaN literals) falls back.

The caller uses it only for models whose input spec is a 1-D float array: for an integer spec the
general path keeps JSON integers as integers.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

simdjson: Any
try:  # pysimdjson is a server dependency; without it every body takes the orjson path
    import simdjson
except ImportError:  # pragma: no cover - exercised only on installs without the wheel
    simdjson = None

__all__ = ["available", "decode_input_array", "decode_message"]

_EXACT = float(2**53)
_local = threading.local()


def available() -> bool:
    """Whether the fast path is installed (pysimdjson)."""
    return simdjson is not None


def _parser() -> Any:
    # A simdjson Parser reuses its buffers between documents and is not thread-safe: one per
    # thread (the event loop's, or a test client's).
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    return parser


def decode_input_array(body: bytes) -> np.ndarray[Any, np.dtype[np.float64]] | None:
    """The float64 array of ``body`` when it is exactly ``{"input": [numbers]}``, else None."""
    found = decode_message(body)
    if found is None or found[0]:
        return None
    return found[1]


def decode_message(
    raw: bytes | str,
) -> tuple[dict[str, Any], np.ndarray[Any, np.dtype[np.float64]]] | None:
    """``(other fields, input array)`` of a JSON object whose ``input`` is a flat array of numbers
    and whose other values are all scalars (a WebSocket predict message, or with no other field
    an HTTP body); None for anything else."""
    body = raw.encode("utf-8") if isinstance(raw, str) else raw
    if simdjson is None or body.count(b"[") != 1:
        return None
    fields: dict[str, Any] = {}
    try:
        # a document is only valid until the parser's next parse: copy everything out now
        doc = _parser().parse(body)
        if not isinstance(doc, simdjson.Object):
            return None
        keys = list(doc.keys())
        if "input" not in keys or len(set(keys)) != len(keys):  # orjson keeps the last duplicate
            return None
        out = None
        for key in keys:
            value = doc[key]
            if key == "input":
                if not isinstance(value, simdjson.Array):
                    return None
                out = np.frombuffer(value.as_buffer(of_type="d"), dtype=np.float64)
            elif isinstance(value, (simdjson.Array, simdjson.Object)):
                return None
            else:
                fields[key] = value
    except Exception:  # ValueError, TypeError, RuntimeError (BIGINT_ERROR), ...: fall back
        return None
    if out is None:  # pragma: no cover - "input" is in keys
        return None
    # A list of integers only becomes int64 on the general path and is rounded once, to the
    # spec's dtype; through a double an integer beyond 2**53 is rounded twice. With a fraction or
    # an exponent anywhere in the list the general path reads doubles too.
    start = body.index(b"[")
    numbers = body[start : body.index(b"]", start)]  # a flat array: its first "]" ends it
    integers_only = b"." not in numbers and b"e" not in numbers and b"E" not in numbers
    if integers_only and out.size and not (out.min() > -_EXACT and out.max() < _EXACT):
        return None
    return fields, out
