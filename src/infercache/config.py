"""Settings for ``infercache serve``: flags, ``INFERCACHE_*`` environment variables, a TOML file.

Precedence is flags > environment > file > defaults, the order an operator expects: a file holds the
deployment's baseline, the environment overrides it per container, and a flag overrides both for a
one-off run. Every value is validated once, here, at start-up: a bad setting stops the server with a
:class:`~infercache.errors.ConfigError` that names the setting, instead of surfacing as a confusing
failure on the first request.

The file is TOML; its keys are the setting names below, either all at top level or all inside an
``[infercache]`` table (both at once is an error: one of the two would be ignored). Environment
variables are the upper-cased names with an ``INFERCACHE_`` prefix
(``INFERCACHE_MAX_BATCH_SIZE=64``); list settings (``models``) take comma-separated values.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from infercache.errors import ConfigError

ENV_PREFIX = "INFERCACHE_"
CONFIG_ENV = "INFERCACHE_CONFIG"
#: Environment variable carrying the validated serve settings to uvicorn worker processes.
SERVE_SETTINGS_ENV = "INFERCACHE_SERVE_SETTINGS_JSON"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"", "none", "null", "off"}


@dataclass(frozen=True)
class Settings:
    """Everything the server needs; immutable so that workers and handlers can share one copy."""

    # -- network
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: str = "info"
    # -- models: "name=spec" or "spec"; spec is "module:factory", a TorchScript .pt or .onnx file,
    # optionally followed by the input spec: ";shape=784;dtype=float32" (see parse_model_spec).
    # Empty means the demo MLP, so that `infercache serve` with no arguments serves something.
    models: tuple[str, ...] = ()
    # -- cache tiers
    redis_url: str | None = None
    sql_url: str | None = "sqlite:///infercache.db"
    # the SQLite writer thread at Linux's SCHED_IDLE priority (tiers/sql.py, _SQLiteBackend)
    sql_idle_writer: bool = True
    l1_size: int = 10_000
    l1_policy: str = "tinylfu"
    cache_ttl: float | None = None
    write_policy: str = "behind"
    # -- batching
    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    load_wait_ms: float = 0.0
    max_queue: int = 2048
    # -- request limits
    max_body_bytes: int = 1_048_576
    max_inputs: int = 256
    request_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    # -- auth
    admin_token: str | None = None
    api_token: str | None = None
    # -- WebSocket
    ws_max_inflight: int = 64
    ws_send_queue: int = 256
    ws_slow_consumer: str = "drop_oldest"
    # -- stream processing: "topic=model@stream_key" consumes a Redis Stream (needs redis_url) in
    # consumer group ``stream_group``, publishing each window's result to WebSocket ``topic``
    streams: tuple[str, ...] = ()
    stream_group: str = "infercache"
    stream_window: str = "count"
    stream_size: int = 10
    stream_duration: float = 1.0
    stream_idle_timeout: float = 1.0
    # -- runtime
    torch_threads: int = 1
    jit: bool = True
    onnx: bool = True
    warmup: bool = True
    gc_freeze: bool = True
    require_tiers: bool = True

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied and validated."""
        return build_settings(changes, base=self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists); tokens are left in: callers must redact."""
        out = dataclasses.asdict(self)
        out["models"] = list(self.models)
        out["streams"] = list(self.streams)
        return out

    def redacted(self) -> dict[str, Any]:
        """The settings safe to print or expose: secrets replaced by ``"***"``."""
        out = self.to_dict()
        for name in ("admin_token", "api_token"):
            if out[name]:
                out[name] = "***"
        for name in ("redis_url", "sql_url"):
            out[name] = redact_url(out[name])
        return out


_SECRET_PARAMS = frozenset({"password", "pass", "passwd", "pwd", "sslpassword", "token"})


def redact_url(url: str | None) -> str | None:
    """Hide the password in ``scheme://user:password@host`` and in query parameters
    (``?password=...``, which redis-py and libpq read too) so that logs never carry it."""
    if not url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    if "?" in rest:
        rest, query = rest.split("?", 1)
        params = [
            (k, "***" if k.lower() in _SECRET_PARAMS else v)
            for k, v in parse_qsl(query, keep_blank_values=True)
        ]
        rest += "?" + urlencode(params, safe="*")
    if "@" in rest:
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":***"
        rest = f"{creds}@{host}"
    return f"{scheme}://{rest}"


def _check_redis_url(url: str) -> None:
    """What redis-py would only find out once the server runs (a port out of range was a
    traceback from inside uvicorn's start-up; a database that is not a number was ignored)."""
    from redis.connection import parse_url

    plain = url.replace("redis+cluster://", "redis://", 1)
    try:
        parsed = parse_url(plain)
    except ValueError as exc:
        raise ConfigError(f"setting 'redis_url': {exc} (in {redact_url(url)!r})") from None
    parts = urlsplit(plain)
    if parts.scheme == "unix":
        if not parsed.get("path"):
            raise ConfigError("setting 'redis_url': a unix:// URL needs the socket's path")
        return
    if not parts.hostname:
        raise ConfigError(f"setting 'redis_url': no host in {redact_url(url)!r}")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(
            f"setting 'redis_url': the database must be a number (redis://host:port/0), got {db!r}"
        )


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}


# --------------------------------------------------------------------------- parsing of one value


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"setting {name!r}: expected true/false, got {value!r}")


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"setting {name!r}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            pass
    raise ConfigError(f"setting {name!r}: expected an integer, got {value!r}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"setting {name!r}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise ConfigError(f"setting {name!r}: expected a number, got {value!r}") from None
    else:
        raise ConfigError(f"setting {name!r}: expected a number, got {value!r}")
    if out != out or out in (float("inf"), float("-inf")):
        raise ConfigError(f"setting {name!r}: expected a finite number, got {value!r}")
    return out


def _as_str(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"setting {name!r}: expected a string, got {value!r}")


def _as_specs(name: str, value: Any, parse: Callable[[str], object], what: str) -> tuple[str, ...]:
    """A comma-separated string or a list of specs, each checked by ``parse`` (ConfigError)."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, list | tuple):
        items = [_as_str(name, v).strip() for v in value]
    else:
        raise ConfigError(f"setting {name!r}: expected a list of {what} specs, got {value!r}")
    items = [v for v in items if v]
    for spec in items:
        parse(spec)
    return tuple(items)


def _as_models(name: str, value: Any) -> tuple[str, ...]:
    return _as_specs(name, value, parse_model_spec, "model")


def _as_streams(name: str, value: Any) -> tuple[str, ...]:
    return _as_specs(name, value, parse_stream_spec, "stream")


MAX_TOPIC_LEN = 200
_TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def topic_error(topic: str) -> str | None:
    """Why ``topic`` is not a valid topic name, or None when it is.

    The one rule for ``subscribe`` and ``POST /v1/topics/{topic}/publish``, so that every topic a
    client can subscribe to can be published to: the name is one URL path segment (no ``/``, which
    ends the segment even as ``%2F``, no ``%``, ``?``, ``#`` or spaces) and does not start with a
    dot (clients collapse ``.`` and ``..`` segments before sending).
    """
    if not 0 < len(topic) <= MAX_TOPIC_LEN:
        return f"topic must be 1 to {MAX_TOPIC_LEN} characters long, not {len(topic)}"
    if _TOPIC.fullmatch(topic) is None:
        return (
            "topic may hold only letters, digits and . _ : - and must start with a letter or digit"
        )
    return None


def parse_stream_spec(spec: str) -> tuple[str, str, str]:
    """``"topic=model@stream_key"`` -> (topic, model, stream_key); the topic follows
    :func:`topic_error`, checked here so that a bad one stops ``serve`` at start rather than
    failing each window's publish."""
    topic, eq, rest = spec.partition("=")
    model, at, key = rest.partition("@")
    if not (eq and at and topic.strip() and model.strip() and key.strip()):
        raise ConfigError(f"setting 'streams': {spec!r} is not topic=model@stream_key")
    problem = topic_error(topic.strip())
    if problem:
        raise ConfigError(f"setting 'streams': {spec!r}: {problem}")
    return topic.strip(), model.strip(), key.strip()


def _parser_for(f: dataclasses.Field[Any]) -> tuple[Callable[[str, Any], Any], bool]:
    """(parser, optional) for a field, from its annotation string."""
    ann = str(f.type).replace(" ", "")
    optional = ann.endswith("|None")
    base = ann.removesuffix("|None")
    parsers: dict[str, Callable[[str, Any], Any]] = {
        "bool": _as_bool,
        "int": _as_int,
        "float": _as_float,
        "str": _as_str,
        "tuple[str,...]": _as_models if f.name == "models" else _as_streams,
    }
    return parsers[base], optional


def _parse(name: str, value: Any) -> Any:
    f = FIELDS.get(name)
    if f is None:
        raise ConfigError(f"unknown setting {name!r}")
    parser, optional = _parser_for(f)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
        return None
    if value is None:
        raise ConfigError(f"setting {name!r}: a value is required")
    return parser(name, value)


# --------------------------------------------------------------------------- validation


_CHOICES: dict[str, tuple[str, ...]] = {
    "l1_policy": ("tinylfu", "lru", "lfu"),
    "write_policy": ("through", "behind", "around"),
    "ws_slow_consumer": ("drop_oldest", "disconnect"),
    "stream_window": ("count", "time", "sliding"),
    "log_level": ("critical", "error", "warning", "info", "debug", "trace"),
}

_MIN: dict[str, float] = {
    "port": 0,
    "workers": 1,
    "l1_size": 1,
    "max_batch_size": 1,
    "max_wait_ms": 0,
    "load_wait_ms": 0,
    "max_queue": 1,
    "max_body_bytes": 64,
    "max_inputs": 1,
    "request_timeout_s": 0.001,
    "header_timeout_s": 0.001,
    "keep_alive_s": 0.001,
    "ws_max_inflight": 1,
    "ws_send_queue": 1,
    "torch_threads": 1,
    "cache_ttl": 0.001,
    "stream_size": 1,
    "stream_duration": 0.001,
    "stream_idle_timeout": 0.001,
}


def _validate(s: Settings) -> None:
    for name, choices in _CHOICES.items():
        if getattr(s, name) not in choices:
            raise ConfigError(
                f"setting {name!r}: expected one of {', '.join(choices)}, got {getattr(s, name)!r}"
            )
    for name, low in _MIN.items():
        value = getattr(s, name)
        if value is not None and value < low:
            raise ConfigError(f"setting {name!r}: must be >= {low:g}, got {value!r}")
    if s.port > 65535:
        raise ConfigError(f"setting 'port': must be <= 65535, got {s.port}")
    if not s.host:
        raise ConfigError("setting 'host': must not be empty")
    if s.redis_url is not None and not s.redis_url.startswith(
        ("redis://", "rediss://", "unix://", "redis+cluster://")
    ):
        raise ConfigError(
            "setting 'redis_url': expected redis://, rediss:// or unix:// URL, "
            f"got {redact_url(s.redis_url)!r}"
        )
    if s.redis_url is not None:
        _check_redis_url(s.redis_url)
    if s.sql_url is not None and not s.sql_url.startswith(
        ("sqlite://", "postgresql://", "postgres://", "postgresql+psycopg://")
    ):
        raise ConfigError(
            "setting 'sql_url': expected sqlite:///path or postgresql:// URL, "
            f"got {redact_url(s.sql_url)!r}"
        )
    if s.sql_url is not None and s.sql_url.startswith("sqlite://"):
        _check_sqlite_dir(s.sql_url)
    for name in ("admin_token", "api_token"):
        token = getattr(s, name)
        if token is not None and token != token.strip():
            # HTTP strips the header value's ends (and so does server.auth): it could never match
            raise ConfigError(f"setting {name!r}: a token must not begin or end with whitespace")
        if token is not None and len(token) < 8:
            raise ConfigError(f"setting {name!r}: a token must be at least 8 characters")
    if s.max_inputs > s.max_queue:
        raise ConfigError(
            f"setting 'max_inputs': must not exceed 'max_queue' ({s.max_inputs} > {s.max_queue}): "
            "a request with more inputs than the queue holds could never be served, and would be "
            "told to retry for ever"
        )
    if s.streams and not s.redis_url:
        raise ConfigError("setting 'streams': stream processing needs 'redis_url'")
    if not s.stream_group:
        raise ConfigError("setting 'stream_group': must not be empty")
    names = [parse_model_spec(spec)[0] for spec in s.models]
    dupes = {n for n in names if n is not None and names.count(n) > 1}
    if dupes:
        raise ConfigError(f"setting 'models': duplicate model name(s) {sorted(dupes)}")


def _check_sqlite_dir(url: str) -> None:
    """Stop at start when the SQLite file's directory is missing: the tier would otherwise fail
    on every write for the server's whole life (a cache that degrades quietly), and the usual
    cause is ``sqlite:///abs/path`` (three slashes: a path relative to here) meant as
    ``sqlite:////abs/path``."""
    from infercache.tiers.sql import sqlite_path  # here: other commands need no SQL tier

    try:
        path = Path(sqlite_path(url))
    except ConfigError:
        return  # a malformed URL is the SQL tier's to report
    if str(path) == ":memory:" or path.parent.is_dir():
        return
    where = str(path)
    if not path.is_absolute():
        where += (
            f" relative to {Path.cwd()} (for an absolute path write four slashes: sqlite:////...)"
        )
    raise ConfigError(
        f"setting 'sql_url': the directory of the SQLite file does not exist: {where}"
    )


#: model files ``--model`` takes (any case): ONNX, and TorchScript under its usual names
MODEL_FILE_SUFFIXES = (".onnx", ".pt", ".pth", ".ts", ".jit")

#: what may follow a model spec after ``;`` (InputSpec fields)
_MODEL_OPTIONS = ("shape", "dtype", "min", "max")


def parse_model_spec(spec: str) -> tuple[str | None, str]:
    """Split ``"name=spec;options"`` into (name, spec); (None, spec) when no name is given.

    A spec is ``module:factory`` (a callable returning a ModelRunner, an ``nn.Module`` or a batch
    callable), a TorchScript ``.pt``/``.pth`` file, an ``.onnx`` file, or ``demo`` (the demo MLP).
    It may be followed by the model's input spec, ``;key=value`` each (see
    :func:`model_input_spec`), which is checked here and left out of the returned spec.
    Only the shape is checked here; loading happens when the server starts.
    """
    name, body, options = _split_model_spec(spec)
    if options:
        _input_spec(spec, options)
    return name, body


def model_input_spec(spec: str) -> Any:
    """The :class:`~infercache.models.InputSpec` a model spec declares, or None.

    ``"net=model.pt;shape=3x224x224;dtype=uint8"``: ``shape`` is the dimensions of one input
    joined by ``x`` (``*`` for any length, ``()`` for a scalar; left out: any shape), ``dtype``
    a numpy dtype or ``str`` (default float32), ``min``/``max`` inclusive value limits. Dimensions
    are joined by ``x``, not commas, because ``INFERCACHE_MODELS`` separates models by commas.
    The server uses :func:`model_input_fields` instead: what is left out there comes from the
    model.
    """
    _, _, options = _split_model_spec(spec)
    return _input_spec(spec, options) if options else None


def model_input_fields(spec: str) -> dict[str, Any] | None:
    """The :class:`~infercache.models.InputSpec` fields a model spec declares (checked as
    :func:`model_input_spec` checks them), or None: given to the runner as overrides of what it
    infers, so ``"ids=emb.onnx;min=0;max=99"`` keeps the graph's shape and int64 dtype (a whole
    declared spec dropped them: the shape check was lost, and a wrong length became a 500 from
    the model), and a text model keeps its ``max_length``."""
    _, _, options = _split_model_spec(spec)
    if not options:
        return None
    declared = _input_spec(spec, options)
    return {key: getattr(declared, key) for key in options}


def _split_model_spec(spec: str) -> tuple[str | None, str, dict[str, str]]:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("setting 'models': empty model spec")
    head, _, tail = spec.strip().partition(";")
    options: dict[str, str] = {}
    for part in tail.split(";") if tail else ():
        key, eq, value = (p.strip() for p in part.partition("="))
        if not eq or not key or not value:
            raise ConfigError(f"setting 'models': {part.strip()!r} in {spec!r} is not key=value")
        if key not in _MODEL_OPTIONS:
            raise ConfigError(
                f"setting 'models': unknown option {key!r} in {spec!r} "
                f"(expected {', '.join(_MODEL_OPTIONS)})"
            )
        if key in options:
            raise ConfigError(f"setting 'models': option {key!r} given twice in {spec!r}")
        options[key] = value
    name: str | None = None
    body = head.strip()
    if "=" in body:
        name, body = (p.strip() for p in body.split("=", 1))
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(
                f"setting 'models': invalid model name {name!r} (letters, digits, - _ . only)"
            )
    if not body:
        raise ConfigError(f"setting 'models': empty spec in {spec!r}")
    lower = body.lower()
    if lower == "demo" or lower.endswith(MODEL_FILE_SUFFIXES):
        return name, body, options
    module, sep, attr = body.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(
            f"setting 'models': {body!r} is not module:factory, a .pt/.onnx file or 'demo'"
        )
    return name, body, options


def _input_spec(spec: str, options: Mapping[str, str]) -> Any:
    from infercache.models.spec import InputSpec  # here: numpy only for a spec that has options

    kwargs: dict[str, Any] = {"shape": None}
    shape = options.get("shape")
    if shape is not None and shape != "()":
        dims: list[int | None] = []
        for d in shape.split("x"):
            d = d.strip()
            if d == "*":
                dims.append(None)
            elif d.isascii() and d.isdigit():
                dims.append(int(d))
            else:
                raise ConfigError(
                    f"setting 'models': shape {shape!r} in {spec!r} is not dimensions joined by "
                    "'x' (a number or * each, e.g. 3x224x224 or *x16)"
                )
        kwargs["shape"] = tuple(dims)
    elif shape == "()":
        kwargs["shape"] = ()
    if "dtype" in options:
        kwargs["dtype"] = options["dtype"]
        if options["dtype"] in ("str", "text") and kwargs["shape"] not in (None, ()):
            # a text input is one string: a shape would be shown by GET /v1/models, never used
            raise ConfigError(
                f"setting 'models': a text input (dtype={options['dtype']}) is one string and "
                f"takes no shape, got shape={shape!r} in {spec!r}"
            )
    for key in ("min", "max"):
        if key in options and options.get("dtype") in ("str", "text"):
            raise ConfigError(
                f"setting 'models': {key} limits numbers; a text input (dtype="
                f"{options['dtype']}) takes none, got {key}={options[key]!r} in {spec!r}"
            )
        if key in options:
            try:
                kwargs[key] = _as_float("models", options[key])
            except ConfigError:
                raise ConfigError(
                    f"setting 'models': {key} {options[key]!r} in {spec!r} is not a finite number"
                ) from None
    try:
        return InputSpec(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"setting 'models': {spec!r}: {exc}") from None


# --------------------------------------------------------------------------- sources


def settings_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Raw values from ``INFERCACHE_<NAME>`` variables (unparsed; unknown names are ignored).

    Unknown ``INFERCACHE_*`` variables are ignored rather than rejected, because the same prefix is
    used by tools around the server (``INFERCACHE_CONFIG``, test harnesses).
    """
    env = os.environ if env is None else env
    out: dict[str, Any] = {}
    for name in FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in env:
            out[name] = env[key]
    return out


#: ``INFERCACHE_*`` variables that are no setting but belong to tools around the server
_TOOL_ENV = frozenset(
    {
        CONFIG_ENV,
        SERVE_SETTINGS_ENV,
        "INFERCACHE_STARTUP_FAILURE_FILE",  # server.app: a worker's failed start, for its parent
        "INFERCACHE_TORCH_INDEX",  # scripts/bootstrap
        "INFERCACHE_TORCH_VERSION",
    }
)


def unknown_env(env: Mapping[str, str] | None = None) -> list[str]:
    """A warning per ``INFERCACHE_*`` variable that is no setting, with the setting it is
    closest to: unknown variables are ignored (see :func:`settings_from_env`), so a typo such as
    ``INFERCACHE_MAX_BATCHSIZE`` went unnoticed, where the same typo in a file stops the start."""
    import difflib

    env = os.environ if env is None else env
    names = sorted(name.upper() for name in FIELDS)
    lines = []
    for key in sorted(env):
        if key.startswith(ENV_PREFIX) and key not in _TOOL_ENV:
            name = key[len(ENV_PREFIX) :]
            if name in names:
                continue
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
            hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
            lines.append(f"ignoring {key}: no such setting{hint}")
    return lines


def settings_from_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Raw values from a TOML file; unknown keys are an error (a typo must not pass silently).

    The settings are either all at top level (a file of its own) or all in one table,
    ``[infercache]`` or ``[tool.infercache]`` (``pyproject.toml``). A file with our table may be
    shared with other tools, so its other tables are theirs and are left alone; a setting at top
    level beside our table is refused (reading one place silently dropped the other's settings,
    an admin_token among them).
    """
    p = Path(path)
    where = f"in config file {str(p)!r}"
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"setting 'config': file {str(p)!r} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"setting 'config': cannot read {str(p)!r}: {exc}") from None
    tool = data.get("tool")
    tables = {
        "[infercache]": data.get("infercache"),
        "[tool.infercache]": tool.get("infercache") if isinstance(tool, dict) else None,
    }
    found = {name: t for name, t in tables.items() if t is not None}
    for name, t in found.items():
        if not isinstance(t, dict):
            raise ConfigError(f"setting 'config': {name} {where} must be a table")
    if len(found) > 1:
        raise ConfigError(
            f"setting 'config': {str(p)!r} has both [infercache] and [tool.infercache]; "
            "use one table"
        )
    if not found:
        if any(_is_table(v) for v in data.values()):
            where += " (it has no [infercache] or [tool.infercache] table)"
        _refuse_unknown(data, where)
        return dict(data)
    name, table = next(iter(found.items()))
    # top-level scalars beside our table: ours in the wrong place, or typos; tables: other tools'
    top = {k: v for k, v in data.items() if k != "infercache" and not _is_table(v)}
    _refuse_unknown({**top, **table}, where)
    if top:
        raise ConfigError(
            f"setting 'config': {str(p)!r} has settings both at top level "
            f"({', '.join(sorted(top))}) and in its {name} table; put them all in one place"
        )
    return dict(table)


def _is_table(value: Any) -> bool:
    """A TOML table, or an array of tables (``[[servers]]``): another tool's, beside ours."""
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _refuse_unknown(values: Mapping[str, Any], where: str) -> None:
    unknown = sorted(k for k in values if k not in FIELDS)
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise ConfigError(f"unknown setting{plural} {names} {where}")


def build_settings(values: Mapping[str, Any], *, base: Settings | None = None) -> Settings:
    """Parse and validate ``values`` on top of ``base`` (defaults when None)."""
    parsed = {name: _parse(name, value) for name, value in values.items()}
    settings = dataclasses.replace(base or Settings(), **parsed)
    _validate(settings)
    return settings


def serve_settings_from_env() -> Settings:
    """The settings ``infercache serve`` validated and put in :data:`SERVE_SETTINGS_ENV` for
    uvicorn's worker processes (the app factory and the HTTP protocol read them there)."""
    raw = os.environ.get(SERVE_SETTINGS_ENV)
    return build_settings(json.loads(raw)) if raw else Settings()


def load_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> Settings:
    """Merge the sources (flags > env > file > defaults) and validate the result.

    ``flags`` holds only the settings given on the command line (``None`` values are skipped, so
    argparse defaults of ``None`` do not mask lower sources). The file is ``config_file`` or else
    ``$INFERCACHE_CONFIG``.
    """
    env_map = os.environ if env is None else env
    merged: dict[str, Any] = {}
    path = config_file if config_file is not None else env_map.get(CONFIG_ENV)
    if path:
        merged.update(settings_from_file(path))
    merged.update(settings_from_env(env_map))
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})
    return build_settings(merged)


__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "MODEL_FILE_SUFFIXES",
    "SERVE_SETTINGS_ENV",
    "Settings",
    "build_settings",
    "load_settings",
    "model_input_fields",
    "model_input_spec",
    "parse_model_spec",
    "parse_stream_spec",
    "serve_settings_from_env",
    "settings_from_env",
    "settings_from_file",
    "topic_error",
    "unknown_env",
]
