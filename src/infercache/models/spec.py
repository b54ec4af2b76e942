"""InputSpec: what one model input must look like, checked before anything is queued.

A request with a wrong shape must fail at once with a message naming what was expected (HTTP 422),
not deep inside a torch matmul in a worker thread, where it would also fail every other request of
its batch. Conversion uses ``np.asarray(x, dtype=...)``: FACTS.md measured ``torch.tensor(list)`` at
~30 µs for 784 floats, more than the MLP's whole forward pass at batch 32, so the runner stacks
numpy arrays and hands torch a zero-copy ``torch.from_numpy`` view.

The validated array is also what the Predictor fingerprints, so ``[1, 2]``, ``(1, 2)`` and
``np.array([1, 2], float64)`` sent to a float32 model share one cache entry: they are the same
model input.

What converts to what (JSON numbers arrive as Python ints and floats, so as int64 and float64):

- to a float spec: integers and floats; a value that becomes inf in the spec's dtype (``1e39`` for
  float32) is refused like NaN and inf are, since a model fed inf answers NaN and the NaN would be
  cached;
- to an integer spec: integers, and floats without a fractional part (``2.0`` is ``2``: Python's
  ``json.dumps`` writes numpy floats that way), when every value fits the dtype (0-255 for uint8):
  numpy's cast would wrap ``256`` to ``0`` without a word;
- to a bool spec: booleans only; booleans (``true``/``false``) are refused by every other spec.
  A list mixing booleans with numbers (``[1, true]``) reaches numpy as numbers, which reads
  ``true`` as 1: telling them apart would take a pass over every element, as long as the
  conversion itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infercache.errors import ConfigError, InputError

# Overflow while converting or checking a client's numbers is expected and handled: a value too
# large for the dtype becomes inf, which the finiteness check turns into an InputError. numpy's
# RuntimeWarning about it would only fill the server's log with what clients send. (A filter
# costs nothing per call, unlike an np.errstate block: ~2 µs.)
for _message in ("overflow encountered in cast", "overflow encountered in dot"):
    warnings.filterwarnings(
        "ignore", message=_message, category=RuntimeWarning, module=r"infercache\.models\.spec"
    )

__all__ = ["InputSpec"]

_TEXT_DTYPES = frozenset({"str", "text"})

# How an array of some source dtype becomes the spec's dtype (InputSpec._cast_mode).
_REFUSE = 0  # not at all: a wrong dtype
_CAST = 1  # astype: every value converts (int -> float, float64 -> float32, int8 -> int64)
_INT_RANGE = 2  # integers to a narrower or other-signed integer dtype: only if every value fits
_INTEGRAL = 3  # floats to an integer dtype: only if every value is integral and fits


def _describe_shape(shape: Sequence[int | None] | None) -> str:
    if shape is None:
        return "any shape"
    return "shape " + (
        "("
        + ", ".join("*" if d is None else str(d) for d in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )


@dataclass(frozen=True)
class InputSpec:
    """Shape, dtype and limits of ONE model input (a batch adds a leading dimension).

    Args:
        shape: per-item shape; ``None`` in a dimension accepts any length. ``()`` for a scalar or
            a text input. ``None`` instead of a tuple accepts any shape, rank included: what a
            runner declares when the model does not tell (the dtype and values are still
            checked).
        dtype: a numpy dtype name (``"float32"``, ``"int64"``, ...) or ``"str"`` for text.
        min / max: inclusive value limits (numeric dtypes).
        allow_nan: accept NaN and infinities (default False: they poison a model's output and,
            worse, a cached NaN is served forever).
        max_batch: the most items one ``predict_batch`` call may carry.
        max_length: the longest text accepted (characters; ``"str"`` dtype only).
    """

    shape: tuple[int | None, ...] | None = ()
    dtype: str = "float32"
    min: float | None = None
    max: float | None = None
    allow_nan: bool = False
    max_batch: int = 1024
    max_length: int | None = None
    _np_dtype: Any = field(init=False, repr=False, compare=False, default=None)
    #: the shape when no dimension is open (one tuple compare instead of a per-dimension walk)
    _fixed_shape: Any = field(init=False, repr=False, compare=False, default=None)
    #: source dtype -> how it converts to ``_np_dtype`` (``_CAST``...); np.can_cast costs ~1.5 µs
    _casts: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        fixed = None
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))
            fixed = self.shape if all(d is not None for d in self.shape) else None
        object.__setattr__(self, "_fixed_shape", fixed)
        object.__setattr__(self, "_casts", {})
        if self.max_batch < 1:
            raise ConfigError("InputSpec.max_batch must be >= 1")
        if self.is_text:
            object.__setattr__(self, "_np_dtype", None)
            return
        try:
            np_dtype = np.dtype(self.dtype)
        except TypeError as exc:
            raise ConfigError(f"InputSpec.dtype {self.dtype!r} is not a numpy dtype") from exc
        if np_dtype.kind not in "biuf":
            raise ConfigError(f"InputSpec.dtype must be numeric or 'str', got {self.dtype!r}")
        object.__setattr__(self, "_np_dtype", np_dtype)

    @property
    def is_text(self) -> bool:
        return self.dtype in _TEXT_DTYPES

    @property
    def numpy_dtype(self) -> np.dtype[Any] | None:
        """The numpy dtype inputs are converted to (None for text)."""
        return self._np_dtype

    def expected(self) -> str:
        """Human-readable description used in error messages."""
        if self.is_text:
            limit = f" of at most {self.max_length} characters" if self.max_length else ""
            return f"a string{limit}"
        return f"{self.dtype} array of {_describe_shape(self.shape)}"

    def describe(self) -> dict[str, Any]:
        """JSON-friendly form for ``GET /v1/models``."""
        return {
            "shape": None if self.shape is None else list(self.shape),
            "dtype": self.dtype,
            "min": self.min,
            "max": self.max,
            "allow_nan": self.allow_nan,
            "max_batch": self.max_batch,
            "max_length": self.max_length,
        }

    def example(self) -> Any:
        """A valid input (zeros or "example"), for warm-up; None if a dimension is open."""
        if self.is_text:
            return "example input"
        if self.shape is None or any(d is None for d in self.shape):
            return None
        value = np.zeros(tuple(d for d in self.shape if d is not None), dtype=self._np_dtype)
        if self.min is not None and self.min > 0:
            value += self.min
        elif self.max is not None and self.max < 0:
            value += self.max
        return value

    # -- validation --------------------------------------------------------------------------

    def validate(self, x: Any) -> Any:
        """Check and convert one input: an ``np.ndarray`` of the spec's dtype (or a ``str``)."""
        if self.is_text:
            return self._validate_text(x)
        arr = self._convert(x)
        self._check_shape(arr.shape, batch=False)
        self._check_values(arr)
        return arr

    def validate_batch(self, xs: Any) -> Any:
        """Check and convert a batch: an array of shape ``(n, *shape)`` (or a list of str)."""
        n = len(xs)
        if n == 0:
            raise InputError("empty batch: expected at least one input")
        if n > self.max_batch:
            raise InputError(f"batch too large: {n} inputs, at most {self.max_batch} allowed")
        if self.is_text:
            return [self._validate_text(x) for x in xs]
        arr = self._convert(xs)
        self._check_shape(arr.shape[1:], batch=True)
        self._check_values(arr)
        return arr

    def _validate_text(self, x: Any) -> str:
        if not isinstance(x, str):
            raise InputError(f"expected {self.expected()}, got {type(x).__name__}")
        if self.max_length is not None and len(x) > self.max_length:
            raise InputError(f"text too long: {len(x)} characters, expected {self.expected()}")
        return x

    def _cast_mode(self, src: np.dtype[Any]) -> int:
        mode = self._casts.get(src)
        if mode is None:
            mode = _cast_mode(src, self._np_dtype)
            if len(self._casts) < 64:
                self._casts[src] = mode
        return mode

    def _convert(self, x: Any) -> np.ndarray[Any, Any]:
        dtype = self._np_dtype
        if isinstance(x, np.ndarray):
            if x.dtype == dtype:
                return x
            arr = x
        elif isinstance(x, (str, bytes, dict)) or x is None:
            got = "null" if x is None else type(x).__name__
            raise InputError(f"expected {self.expected()}, got {got}")
        else:
            try:
                # infer first, then cast: np.asarray(["1.5"], dtype=float32) would parse strings
                # and np.asarray([1.5], dtype=int64) would truncate; both must be refused instead
                arr = np.asarray(x)
            except (ValueError, TypeError) as exc:  # ragged lists
                raise InputError(f"cannot read input as {self.expected()}: {exc}") from None
        mode = self._cast_mode(arr.dtype)
        if mode == _CAST:
            return arr.astype(dtype, copy=False)
        if mode == _REFUSE:
            raise InputError(f"wrong dtype: got {_describe_dtype(arr)}, expected {self.expected()}")
        return self._to_int(arr, mode)

    def _to_int(self, arr: np.ndarray[Any, Any], mode: int) -> np.ndarray[Any, Any]:
        """Integers (or integral floats) to the spec's integer dtype, refusing what numpy would
        wrap (``256`` as uint8 is ``0``) or truncate (``1.5`` as int64 is ``1``)."""
        if arr.size:
            if mode == _INTEGRAL and not np.array_equal(arr, np.trunc(arr)):  # NaN too
                raise InputError(
                    f"wrong dtype: got {arr.dtype} with non-integral values, expected "
                    f"{self.expected()}"
                )
            info = np.iinfo(self._np_dtype)
            lo, hi = arr.min(), arr.max()
            # ``hi >= max + 1``, not ``hi > max``: float(2**63 - 1) rounds up to 2**63
            if lo < info.min or hi >= info.max + 1:
                bad = lo if lo < info.min else hi
                raise InputError(
                    f"value {bad} out of range for {self.dtype}: expected integers from "
                    f"{info.min} to {info.max}"
                )
        return arr.astype(self._np_dtype)

    def _check_shape(self, shape: tuple[int, ...], *, batch: bool) -> None:
        if shape == self._fixed_shape:
            return
        want = self.shape
        if want is None:
            return
        if len(shape) != len(want) or any(
            w is not None and w != s for w, s in zip(want, shape, strict=True)
        ):
            what = "each batch item has" if batch else "got"
            raise InputError(
                f"wrong shape: {what} {_describe_shape(shape)}, expected {self.expected()}"
            )

    def _check_values(self, arr: np.ndarray[Any, Any]) -> None:
        if arr.size == 0:
            return
        # one reduction first: any NaN/inf makes the sum of squares non-finite; only then (or on
        # an overflow of finite values) pay for the element-wise check. A BLAS dot costs ~1 µs on
        # 784 floats, ndarray.sum() ~2.3 µs.
        if (
            arr.dtype.kind == "f"
            and not self.allow_nan
            and not np.isfinite(_sum_of_squares(arr))
            and not np.isfinite(arr).all()
        ):
            raise InputError(
                "input contains NaN or infinity (or a number too large for "
                f"{self.dtype}), which this model does not accept"
            )
        if self.min is not None:
            lo = arr.min()
            if lo < self.min:
                raise InputError(f"value {lo} below the minimum {self.min}")
        if self.max is not None:
            hi = arr.max()
            if hi > self.max:
                raise InputError(f"value {hi} above the maximum {self.max}")


def _describe_dtype(arr: np.ndarray[Any, Any]) -> str:
    kind = arr.dtype.kind
    if kind in "OUSV":  # None among numbers, strings, nested objects
        return "mixed/non-numeric values"
    return "booleans" if kind == "b" else str(arr.dtype)


def _cast_mode(src: np.dtype[Any], dst: np.dtype[Any]) -> int:
    """How values of dtype ``src`` become ``dst`` (see ``_REFUSE`` ... ``_INTEGRAL``)."""
    if src.kind not in "biuf":
        return _REFUSE
    if src.kind == "b" or dst.kind == "b":  # a JSON true is no number, and a number no bool
        return _CAST if src.kind == dst.kind else _REFUSE
    if dst.kind in "iu":
        if src.kind == "f":
            return _INTEGRAL
        return _CAST if np.can_cast(src, dst, "safe") else _INT_RANGE
    return _CAST if np.can_cast(src, dst, "same_kind") else _REFUSE


def _sum_of_squares(arr: np.ndarray[Any, Any]) -> Any:
    """NaN if ``arr`` holds a NaN, inf if it holds an inf (or its squares overflow)."""
    if arr.dtype.itemsize not in (4, 8):  # no BLAS for float16: its dot would warn on overflow
        return arr.sum()
    flat = arr.reshape(-1) if arr.flags.c_contiguous else arr.ravel()
    return flat.dot(flat)
