"""Exception classes shared by every layer.

Each failure a caller may want to handle differently gets its own class, and each class carries a
stable ``code`` that the server puts in its JSON error body (``{"error": {"code", "message"}}``)
together with the HTTP status it maps to. Lower layers raise these; only the server translates them.
"""

from __future__ import annotations


class InfercacheError(Exception):
    """Base class: catching it catches every error infercache raises on purpose."""

    code: str = "internal_error"
    http_status: int = 500


class ConfigError(InfercacheError, ValueError):
    """A setting is invalid; the message names the setting and what was expected."""

    code = "invalid_config"
    http_status = 500


class DecodeError(InfercacheError, ValueError):
    """Bytes from a cache tier or the network are truncated, corrupted, foreign or unsigned."""

    code = "decode_error"
    http_status = 400


class EncodeError(InfercacheError, TypeError):
    """A value cannot be encoded by the safe codec (an unsupported type, say).

    From a tier's ``set_many``, ``keys`` names the values left out; the others were written.
    """

    code = "encode_error"
    http_status = 500
    keys: tuple[str, ...] = ()


class InputError(InfercacheError, ValueError):
    """A model input breaks its spec (shape, dtype, limits, NaN, batch size)."""

    code = "invalid_input"
    http_status = 422


class ModelNotFound(InfercacheError, KeyError):
    """No model is registered under the requested name."""

    code = "model_not_found"
    http_status = 404

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "model not found"


class ModelError(InfercacheError):
    """The model itself raised while computing a batch or an item."""

    code = "model_error"
    http_status = 500


class Overloaded(InfercacheError):
    """A bounded queue is full; the caller should retry later (HTTP 503 + Retry-After)."""

    code = "overloaded"
    http_status = 503

    def __init__(self, message: str = "server overloaded", *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Closed(InfercacheError):
    """The object was closed: a cache or predictor used after ``close()`` (a server shutting
    down). Its writes would be lost, so it says so instead of answering as if they were not."""

    code = "closed"
    http_status = 503


class DeadlineExceeded(InfercacheError, TimeoutError):
    """An item's deadline passed before it could be computed."""

    code = "deadline_exceeded"
    http_status = 504


class TierError(InfercacheError):
    """A cache tier failed an operation (network error, server error)."""

    code = "tier_error"
    http_status = 503


class TierUnavailable(TierError):
    """A tier's circuit breaker is open: the call failed fast without touching the network."""

    code = "tier_unavailable"
    http_status = 503


class Unauthorized(InfercacheError):
    """A request lacks the bearer token an endpoint requires, or carries a wrong one."""

    code = "unauthorized"
    http_status = 401


def one_line(text: str, limit: int = 400) -> str:
    """``text`` as one bounded line: its first and last non-empty lines. A TorchScript or ONNX
    error carries the interpreter's whole traceback, with the server's file paths, in its text;
    the error itself is its last line. For messages shown to clients and one-line CLI errors."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        text = f"{lines[0]} ... {lines[-1]}"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
