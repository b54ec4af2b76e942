"""InputSpec: what one model input must look like, checked before anything is queued.

A request with a wrong shape must fail at once with a message naming what was expected (HTTP 422),
not deep inside a torch matmul in a worker thread, where it would also fail every other request of
its batch. Conversion uses ``np.asarray(x, dtype=...)``: FACTS.md measured ``torch.tensor(list)`` at
~30 µs for 784 floats, more than the MLP's whole forward pass at batch 32, so the runner stacks
numpy arrays and hands torch a zero-copy ``torch.from_numpy`` view.

The validated array is also what the Predictor fingerprints, so ``[1, 2]``, ``(1, 2)`` and
``np.array([1, 2], float64)`` sent to a float32 model share one cache entry: they are the same
model input.
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


def _describe_shape(shape: Sequence[int | None]) -> str:
    return (
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
            a text input.
        dtype: a numpy dtype name (``"float32"``, ``"int64"``, ...) or ``"str"`` for text.
        min / max: inclusive value limits (numeric dtypes).
        allow_nan: accept NaN and infinities (default False: they poison a model's output and,
            worse, a cached NaN is served forever).
        max_batch: the most items one ``predict_batch`` call may carry.
        max_length: the longest text accepted (characters; ``"str"`` dtype only).
    """

    shape: tuple[int | None, ...] = ()
    dtype: str = "float32"
    min: float | None = None
    max: float | None = None
    allow_nan: bool = False
    max_batch: int = 1024
    max_length: int | None = None
    _np_dtype: Any = field(init=False, repr=False, compare=False, default=None)
    #: the shape when no dimension is open (one tuple compare instead of a per-dimension walk)
    _fixed_shape: Any = field(init=False, repr=False, compare=False, default=None)
    #: source dtype -> whether it casts to ``_np_dtype`` ("same_kind"); np.can_cast costs ~1.5 µs
    _casts: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
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
        return f"{self.dtype} array of shape {_describe_shape(self.shape)}"

    def describe(self) -> dict[str, Any]:
        """JSON-friendly form for ``GET /v1/models``."""
        return {
            "shape": list(self.shape),
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
        if any(d is None for d in self.shape):
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

    def _castable(self, src: np.dtype[Any]) -> bool:
        ok = self._casts.get(src)
        if ok is None:
            ok = src.kind in "biuf" and bool(np.can_cast(src, self._np_dtype, "same_kind"))
            if len(self._casts) < 64:
                self._casts[src] = ok
        return bool(ok)

    def _convert(self, x: Any) -> np.ndarray[Any, Any]:
        dtype = self._np_dtype
        if isinstance(x, np.ndarray):
            if x.dtype == dtype:
                return x
            if not self._castable(x.dtype):
                raise InputError(f"wrong dtype: got {x.dtype}, expected {self.expected()}")
            return x.astype(dtype)
        if isinstance(x, (str, bytes, dict)):
            raise InputError(f"expected {self.expected()}, got {type(x).__name__}")
        try:
            # infer first, then cast: np.asarray(["1.5"], dtype=float32) would parse strings and
            # np.asarray([1.5], dtype=int64) would truncate; both must be a dtype error instead
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:  # ragged lists
            raise InputError(f"cannot read input as {self.expected()}: {exc}") from None
        if not self._castable(arr.dtype):
            got = "mixed/non-numeric values" if arr.dtype.kind in "OUS" else str(arr.dtype)
            raise InputError(f"wrong dtype: got {got}, expected {self.expected()}")
        try:
            return arr.astype(dtype, copy=False)
        except OverflowError as exc:  # pragma: no cover - numpy wraps instead on most casts
            raise InputError(f"value out of range for {self.dtype}: {exc}") from None

    def _check_shape(self, shape: tuple[int, ...], *, batch: bool) -> None:
        if shape == self._fixed_shape:
            return
        want = self.shape
        if len(shape) != len(want) or any(
            w is not None and w != s for w, s in zip(want, shape, strict=True)
        ):
            what = "each batch item has" if batch else "got"
            raise InputError(
                f"wrong shape: {what} shape {_describe_shape(shape)}, expected {self.expected()}"
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
            raise InputError("input contains NaN or infinity, which this model does not accept")
        if self.min is not None:
            lo = arr.min()
            if lo < self.min:
                raise InputError(f"value {lo} below the minimum {self.min}")
        if self.max is not None:
            hi = arr.max()
            if hi > self.max:
                raise InputError(f"value {hi} above the maximum {self.max}")


def _sum_of_squares(arr: np.ndarray[Any, Any]) -> Any:
    """NaN if ``arr`` holds a NaN, inf if it holds an inf (or its squares overflow)."""
    if arr.dtype.itemsize not in (4, 8):  # no BLAS for float16: its dot would warn on overflow
        return arr.sum()
    flat = arr.reshape(-1) if arr.flags.c_contiguous else arr.ravel()
    return flat.dot(flat)
