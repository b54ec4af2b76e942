"""``create_app``: the FastAPI application, and :func:`run` behind ``infercache serve``.

``create_app`` takes either ready-made Predictors (embedding, tests) or
:class:`~infercache.config.Settings` (the CLI), in which case the models and cache tiers are built
when the app starts. Start-up then warms each model up in the background: ``/healthz`` answers at
once, ``/readyz`` only after the warm-up (and ``gc.freeze()``) finished and the tiers answer, which
is what a load balancer should wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infercache import __version__
from infercache.aio import stop_task
from infercache.config import SERVE_SETTINGS_ENV, Settings, serve_settings_from_env
from infercache.errors import ConfigError, one_line
from infercache.server.errors import ERROR_CODE_SCOPE_KEY, install_error_handlers
from infercache.server.fastpath import InfercacheApp
from infercache.server.logs import uvicorn_log_config
from infercache.server.routes import router
from infercache.server.service import (
    Service,
    build_service,
    load_models,
    service_from_predictors,
)
from infercache.server.ws import websocket_endpoint

log = logging.getLogger("infercache.server")

#: where a worker that failed to start leaves its one-line message, for the parent (``run``):
#: uvicorn's supervisor stops on a worker's start-up failure but returns normally, so
#: ``serve --workers N`` exited 0 after one
STARTUP_FAILURE_ENV = "INFERCACHE_STARTUP_FAILURE_FILE"
_CONFIG_FAILURE = "infercache: invalid configuration: "
#: start-up failures of this process's apps (the one worker of ``serve``, or tests)
_failures: list[str] = []


class _MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware task hop): counts requests by route template
    and status and observes their latency. Labels use the route template
    (``/v1/models/{name}/predict``), never the raw path, so clients cannot blow up cardinality."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("infercache.route") or getattr(scope.get("route"), "path", None)
            if path is None and scope.get("endpoint") is not None and not scope.get("path_params"):
                # a Starlette route (FastAPI's /docs, /openapi.json) notes no "route"; matched
                # and without parameters, its path is its template: no label per URL
                path = scope.get("path")
            path = path or "unmatched"
            app = scope.get("app")
            service = getattr(getattr(app, "state", None), "service", None)
            if service is not None:
                service.metrics.observe_request(path, status, time.perf_counter() - start)
                # an error response's stable code, noted by the handler that made it; answers
                # that are not errors of the request (a 503 from /readyz) carry none
                code = scope.get(ERROR_CODE_SCOPE_KEY)
                if code is not None:
                    service.metrics.errors.labels(code).inc()


def create_app(
    predictors: Mapping[str, Any] | Sequence[Any] | Settings | None = None,
    *,
    settings: Settings | None = None,
    cache: Any = None,
    monitor: Any = None,
    banner: bool = False,
    runners: Sequence[Any] | None = None,
) -> FastAPI:
    """The infercache FastAPI app.

    Args:
        predictors: a mapping name -> :class:`~infercache.predictor.Predictor`, a sequence of them
            (named after their runners), or Settings (models and tiers built at start-up). None
            means default Settings: the demo MLP over L1 + SQLite.
        settings: limits, auth and WebSocket policy when ``predictors`` are given.
        cache: the cache behind the predictors, for stats, invalidation and readiness (defaults to
            the first predictor's ``cache``).
        monitor: a LatencyMonitor to report in stats.
        banner: print where the server listens and what it serves once started.
        runners: with Settings, the models already loaded (``service.load_models``).
    """
    if isinstance(predictors, Settings):
        settings, predictors = predictors, None
    settings = settings or Settings()
    given = predictors

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            if given is None:
                service = await build_service(settings, runners)
            else:
                service = service_from_predictors(given, settings, cache=cache, monitor=monitor)
            try:
                streams = service.stream_plan()  # one naming no served model stops the start
            except ConfigError:
                await service.close()
                raise
        except ConfigError as exc:
            _startup_failed(app, f"{_CONFIG_FAILURE}{exc}", replace=True)
            raise
        except Exception as exc:  # the traceback stays in the log: this is not a user's slip
            _startup_failed(app, f"infercache: start-up failed: {type(exc).__name__}: "
                            f"{one_line(str(exc))}", replace=False)  # fmt: skip
            raise
        app.state.service = service
        await service.start_relay()
        service.start_streams(streams)
        warm = asyncio.create_task(service.warm_up(), name="infercache-warmup")
        if banner:
            _print_banner(service)
        try:
            yield
        finally:
            await stop_task(warm)
            await service.close()

    extra: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        # FastAPI's native OpenTelemetry hooks check the global providers on every request;
        # infercache exports its own metrics (/metrics), so switch them off (~10 % of a hit).
        extra["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = InfercacheApp(
        title="infercache",
        version=__version__,
        description="Cached, batched model predictions over HTTP and WebSocket.",
        lifespan=lifespan,
        **extra,
    )
    install_error_handlers(app)
    # a trailing slash is a wrong URL (404 with a JSON body), not an empty 307 to follow
    app.router.redirect_slashes = False
    app.include_router(router)
    app.add_api_websocket_route("/v1/ws", websocket_endpoint)
    app.add_middleware(_MetricsMiddleware)
    return app


def _startup_failed(app: FastAPI, line: str, *, replace: bool) -> None:
    """Note a start-up failure for ``run``'s exit code: in this process, and with several
    workers in :data:`STARTUP_FAILURE_ENV`'s file, which the parent reads. ``replace``: the line
    is all the user needs (a configuration error), so InfercacheApp puts it in uvicorn's
    ``lifespan.startup.failed`` message in place of the traceback uvicorn would log."""
    if replace:
        app.state.startup_error = line
    _failures.append(line)
    path = os.environ.get(STARTUP_FAILURE_ENV)
    if path:
        with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def _print_banner(service: Service) -> None:
    s = service.settings
    models = ", ".join(f"{n} (version {e.version or '?'})" for n, e in service.models.items())
    tiers = [type(t).__name__ for t in (getattr(service.cache, "tiers", None) or [])]
    lines = [
        f"infercache {__version__} (pid {os.getpid()}): serving {models}",
        f"  cache tiers: {' -> '.join(tiers) or 'none'}"
        + (f"; L3 {s.redacted()['sql_url']}" if s.sql_url else ""),
        f"  predict: POST http://{s.host}:{s.port}/v1/models/<name>/predict  "
        f"websocket: ws://{s.host}:{s.port}/v1/ws",
        f"  docs: http://{s.host}:{s.port}/docs  dashboard: /dashboard  metrics: /metrics",
    ]
    print("\n".join(lines), flush=True)


def app_from_env() -> FastAPI:
    """uvicorn factory for ``infercache serve``: settings come from
    :data:`~infercache.config.SERVE_SETTINGS_ENV`.

    With ``--workers N`` uvicorn imports the app in each worker process by name, so the validated
    settings travel through the environment rather than being re-parsed from flags.
    """
    settings = serve_settings_from_env()
    # With one worker the models load here rather than in the lifespan: a ConfigError (a model
    # that does not load, two models under one name) then reaches `infercache serve`, which
    # prints it on one line and exits 2, where the lifespan's became uvicorn's traceback and exit
    # code 3. A worker process must fail in its lifespan instead: uvicorn's supervisor restarts
    # a worker that dies loading the app, for ever, but stops on one that fails to start.
    runners = load_models(settings) if settings.workers == 1 else None
    return create_app(settings, banner=True, runners=runners)


def run(settings: Settings) -> int:
    """Run uvicorn with ``settings`` (blocking); the exit code: 2 when the server or a worker
    failed to start on a configuration error (it logged the line), 3 (uvicorn's) on another
    start-up failure. uvloop and httptools are used when installed."""
    import uvicorn

    os.environ[SERVE_SETTINGS_ENV] = json.dumps(settings.to_dict())
    loop = "uvloop" if _has("uvloop") else "asyncio"
    http: Any = "h11"
    if _has("httptools"):
        from infercache.server.protocol import HeaderDeadlineProtocol

        http = HeaderDeadlineProtocol  # httptools, closing connections slow to send headers
    print(
        f"infercache {__version__}: starting on http://{settings.host}:{settings.port} "
        f"({settings.workers} worker{'s' if settings.workers > 1 else ''}, loop={loop}, "
        f"http={'h11' if http == 'h11' else 'httptools'})",
        file=sys.stderr,
        flush=True,
    )
    if settings.workers == 1:  # the app runs in this process: it notes failures in _failures
        del _failures[:]
        try:
            _run_uvicorn(uvicorn, settings, loop, http)
        except SystemExit:  # uvicorn's exit 3 for a failed start: ours is 2, as for flags
            if not any(f.startswith(_CONFIG_FAILURE) for f in _failures):
                raise
            return 2
        return 0
    # Several workers: uvicorn's supervisor stops on a worker's failed start but returns
    # normally, so the workers leave their line in a file. (A file for one worker too would be
    # left behind by every SIGTERM: uvicorn re-raises the signal before any finally runs.)
    fd, failure_file = tempfile.mkstemp(prefix="infercache-start-")
    os.close(fd)
    os.environ[STARTUP_FAILURE_ENV] = failure_file  # the workers inherit the environment
    try:
        _run_uvicorn(uvicorn, settings, loop, http)
        lines = _read_failure(failure_file).splitlines()
    finally:
        os.environ.pop(STARTUP_FAILURE_ENV, None)
        with contextlib.suppress(OSError):
            os.unlink(failure_file)
    if any(line.startswith(_CONFIG_FAILURE) for line in lines):
        return 2
    return 3 if lines else 0


def _read_failure(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


#: uvicorn's ``loop`` for uvloop with our listener (server/accept.py)
GREEDY_LOOP = "infercache.server.accept:new_event_loop"


def uvicorn_loop(loop: str, workers: int) -> str:
    """What uvicorn is given for the ``loop`` name: uvloop with a listener that accepts every
    waiting connection at once (libuv accepts one per loop iteration; see server/accept.py).

    With ``--workers N`` that needs a listening socket per worker (:func:`_listen_args`), which
    balances only on Linux. Elsewhere the workers share the supervisor's socket, the kernel wakes
    them all for it, and a greedy one takes everything waiting: measured with two workers and 64
    connections opened in a row, four tries each, it took all 64 every time, where uvloop's one
    per iteration split them 34/30, 39/25, 61/3 and 64/0. There they keep uvloop's."""
    if loop != "uvloop":
        return loop
    from infercache.server.accept import REUSEPORT_BALANCES

    if workers == 1 or REUSEPORT_BALANCES:
        return GREEDY_LOOP
    return loop


def _listen_args(settings: Settings, loop: str) -> tuple[dict[str, Any], socket.socket | None]:
    """uvicorn's arguments for where to listen, and the socket to close after it returns.

    With several workers and the greedy listener, the socket uvicorn's supervisor hands its
    workers is one bound with SO_REUSEPORT and never listened on (``fd``): each worker listens
    on a socket of its own at that address, and the kernel balances new connections over them
    (tests/test_accept.py; benchmarks/bench_accept.py)."""
    where: dict[str, Any] = {"host": settings.host, "port": settings.port}
    if settings.workers == 1 or loop != GREEDY_LOOP:
        return where, None
    from infercache.server.accept import shared_port_socket

    sock = shared_port_socket(settings.host, settings.port)
    return {**where, "fd": sock.fileno()}, sock


def _run_uvicorn(uvicorn: Any, settings: Settings, loop: str, http: Any) -> None:
    loop = uvicorn_loop(loop, settings.workers)
    try:
        where, sock = _listen_args(settings, loop)
    except OSError as exc:  # the port is in use: as uvicorn says it, with its exit code
        print(f"ERROR:    {exc}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    try:
        uvicorn.run(
            "infercache.server.app:app_from_env",
            factory=True,
            **where,
            workers=settings.workers,
            loop=loop,
            http=http,
            log_level=settings.log_level,
            log_config=uvicorn_log_config(settings.log_level),
            access_log=False,
            timeout_graceful_shutdown=5,
            # uvicorn types it int but only hands it to call_later: fractions work
            timeout_keep_alive=settings.keep_alive_s,
            # The server never uses the client's address (no access log, no per-client limits),
            # so uvicorn's X-Forwarded-For rewriting would be one more ASGI layer per request.
            proxy_headers=False,
            server_header=False,
        )
    finally:
        if sock is not None:
            sock.close()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
