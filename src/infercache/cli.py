"""The ``infercache`` command: ``serve``, ``bench``, ``cache stats|invalidate`` and ``--version``.

Heavy imports (FastAPI, torch, httpx) happen inside the sub-commands, so ``infercache --version``
and ``infercache --help`` answer instantly. :func:`main` returns an exit code instead of exiting, so
that tests and ``python -m infercache`` can call it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

from infercache import __version__
from infercache.config import FIELDS, Settings, load_settings, unknown_env
from infercache.errors import ConfigError, InfercacheError

# setting name -> (flag, help); the type and default come from config.Settings.
_SERVE_FLAGS: dict[str, tuple[str, str]] = {
    "host": ("--host", "interface to bind (default 127.0.0.1)"),
    "port": ("--port", "TCP port (default 8000)"),
    "workers": (
        "--workers",
        "uvicorn worker processes (default 1); on Linux each listens on a socket of its own "
        "(SO_REUSEPORT) and the kernel spreads new connections over them",
    ),
    "log_level": ("--log-level", "uvicorn log level"),
    "redis_url": ("--redis-url", "Redis L2 tier, e.g. redis://127.0.0.1:6379/0 (default: none)"),
    "sql_url": (
        "--sql-url",
        "L3 tier: sqlite:///path or postgresql://... ('none' disables; default "
        "sqlite:///infercache.db)",
    ),
    "l1_size": ("--l1-size", "entries in the in-process L1 cache"),
    "l1_policy": ("--l1-policy", "L1 eviction policy: tinylfu, lru, lfu"),
    "cache_ttl": ("--cache-ttl", "seconds a cached prediction lives (default: forever)"),
    "write_policy": ("--write-policy", "through, behind or around"),
    "max_batch_size": ("--max-batch-size", "largest batch sent to the model"),
    "max_wait_ms": ("--max-wait-ms", "how long a partial batch waits for more items"),
    "load_wait_ms": (
        "--load-wait-ms",
        "under load (two or more requests per window), how long a short batch waits for "
        "company; 0 never waits (default). Lowers open-loop latency at high rates, costs a "
        "closed loop with fewer clients than the batch limit throughput",
    ),
    "max_queue": ("--max-queue", "queued items before requests get 503 Overloaded"),
    "max_body_bytes": ("--max-body-bytes", "largest request body (413 above)"),
    "max_inputs": ("--max-inputs", "largest {'inputs': [...]} list per request"),
    "request_timeout_s": ("--request-timeout", "seconds before a prediction gives up (504)"),
    "header_timeout_s": (
        "--header-timeout",
        "seconds a connection may take to send a request's headers, from its first byte or "
        "from opening; then it is closed",
    ),
    "keep_alive_s": (
        "--keep-alive",
        "seconds an idle kept-alive connection stays open; behind a load balancer, set it above "
        "the balancer's idle timeout",
    ),
    "admin_token": (
        "--admin-token",
        "bearer token for the admin endpoints, /v1/cache/* and /v1/topics/*/publish "
        "(default: admin disabled)",
    ),
    "api_token": ("--api-token", "bearer token required for predictions (default: none)"),
    "ws_max_inflight": ("--ws-max-inflight", "messages read, not yet answered, per WebSocket"),
    "ws_send_queue": ("--ws-send-queue", "messages buffered per WebSocket subscriber"),
    "ws_slow_consumer": ("--ws-slow-consumer", "drop_oldest or disconnect"),
    "torch_threads": ("--torch-threads", "torch intra-op threads per worker (default 1)"),
    "stream_group": ("--stream-group", "Redis consumer group for --stream"),
    "stream_window": ("--stream-window", "count, time or sliding"),
    "stream_size": ("--stream-size", "items per count/sliding window"),
    "stream_duration": ("--stream-duration", "seconds per time window"),
    "stream_idle_timeout": ("--stream-idle-timeout", "flush an open window after idle seconds"),
}
_BOOL_FLAGS: dict[str, tuple[str, str]] = {
    "warmup": ("--no-warmup", "skip the warm-up forward pass"),
    "jit": ("--no-jit", "run torch models eagerly, not as frozen TorchScript"),
    "onnx": ("--no-onnx", "run torch models on torch, not exported to ONNX Runtime"),
    "sql_idle_writer": ("--no-sql-idle-writer", "run the SQLite writer thread at normal priority"),
    "gc_freeze": ("--no-gc-freeze", "do not gc.freeze() after start-up"),
    "require_tiers": ("--no-require-tiers", "report ready even when a remote tier is down"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infercache",
        description="Multi-level prediction cache and dynamic batching in front of any model.",
    )
    parser.add_argument("--version", action="version", version=f"infercache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the HTTP/WebSocket prediction server",
        description="Serve models over HTTP and WebSocket. With no arguments: the demo MLP, an "
        "in-memory L1 and an SQLite L3 file (./infercache.db), on 127.0.0.1:8000. Every flag can "
        "also be set as INFERCACHE_<NAME> or in a TOML file (--config); flags win over the "
        "environment, which wins over the file.",
    )
    serve.add_argument("--config", help="TOML settings file (default: $INFERCACHE_CONFIG)")
    serve.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="[NAME=]SPEC",
        help="model to serve, repeatable: module:factory, file.pt (TorchScript), file.onnx or "
        "'demo' (default: the demo MLP); ';shape=3x224x224;dtype=uint8' after it declares the "
        "input spec (also min=, max=)",
    )
    serve.add_argument(
        "--stream",
        action="append",
        dest="streams",
        metavar="TOPIC=MODEL@KEY",
        help="consume Redis Stream KEY in windows through MODEL and publish each window's "
        "result to WebSocket topic TOPIC (repeatable; needs --redis-url)",
    )
    for name, (flag, text) in _SERVE_FLAGS.items():
        serve.add_argument(flag, dest=name, default=None, help=text)
    for name, (flag, text) in _BOOL_FLAGS.items():
        serve.add_argument(flag, dest=name, action="store_const", const=False, help=text)
    serve.add_argument(
        "--check",
        action="store_true",
        help="validate the settings, load the models, print the settings, exit",
    )

    bench = sub.add_parser("bench", help="load-test a running server (open or closed loop)")
    from infercache.bench.loadgen import add_arguments

    add_arguments(bench)

    cache = sub.add_parser("cache", help="admin: cache statistics and invalidation")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    for action, text in (("stats", "print cache statistics"), ("invalidate", "invalidate")):
        p = cache_sub.add_parser(action, help=text)
        p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
        p.add_argument(
            "--token",
            default=os.environ.get("INFERCACHE_ADMIN_TOKEN"),
            help="admin bearer token (default: $INFERCACHE_ADMIN_TOKEN)",
        )
        if action == "invalidate":
            p.add_argument("--all", action="store_true", help="invalidate every entry")
            p.add_argument("--model", help="invalidate one model (all versions)")
            p.add_argument("--version", dest="model_version", help="with --model: one version")
            p.add_argument("--key", help="invalidate one cache key")
            p.add_argument("--input", help="with --model: invalidate the entry for this JSON input")
    return parser


def _serve_settings(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {name: getattr(args, name, None) for name in FIELDS}
    if args.models:
        flags["models"] = list(args.models)
    if args.streams:
        flags["streams"] = list(args.streams)
    return load_settings(flags, config_file=args.config)


def _serve(args: argparse.Namespace) -> int:
    settings = _serve_settings(args)
    for line in unknown_env():
        print(f"infercache: {line}", file=sys.stderr)
    # `--model mymodels:encoder` names a module in the current directory (as uvicorn's
    # `--app-dir .`); a console script's sys.path starts at its own bin/ directory (`python -m
    # infercache` has the working directory already). Appended, not first: a stray fastapi.py
    # here must not replace the installed one. Workers inherit sys.path.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    from infercache.server.logs import configure as configure_logging
    from infercache.server.service import load_models, preflight, stream_models

    configure_logging(settings.log_level)
    preflight(settings)  # --check too: a model or address a real start refuses must fail here
    if args.check:
        import json

        # the models too: a factory that is not in its module, a declared spec the model
        # refuses, a file ONNX Runtime cannot read, all passed a check that only found them
        stream_models(settings, {runner.name for runner in load_models(settings)})
        print(json.dumps(settings.redacted(), indent=2))
        return 0
    from infercache.server.app import run

    return run(settings)


async def _cache_command(args: argparse.Namespace) -> int:
    import json

    from infercache.client import InfercacheClient

    payload_input = None
    if args.cache_command == "invalidate":  # check the arguments before connecting
        problem = None
        if (args.input is not None or args.model_version is not None) and not args.model:
            problem = "--input and --version need --model"
        elif not (args.all or args.model or args.key):
            problem = "give --all, --model or --key"
        elif args.input is not None:

            def no_constant(name: str) -> Any:  # NaN and Infinity are not JSON
                raise ValueError(f"{name} is not a JSON value")

            try:
                payload_input = json.loads(args.input, parse_constant=no_constant)
            except ValueError as exc:
                problem = f"--input is not valid JSON: {exc}"
        if problem:
            print(f"infercache cache invalidate: {problem}", file=sys.stderr)
            return 2
    async with InfercacheClient(args.url) as client:
        if args.cache_command == "stats":
            stats = await client.stats(token=args.token)
            print(json.dumps(stats, indent=2, default=str))
            return 0
        result = await client.invalidate(
            token=args.token,
            all=args.all,
            model=args.model,
            version=args.model_version,
            key=args.key,
            input=payload_input,
            has_input=args.input is not None,
        )
        print(json.dumps(result, indent=2, default=str))
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infercache`` command; returns the process exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: return the code, don't exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            from infercache.bench.loadgen import run_from_args

            return run_from_args(args)
        if args.command == "cache":
            if not args.cache_command:
                print("infercache cache: give an action: stats or invalidate", file=sys.stderr)
                return 2
            return asyncio.run(_cache_command(args))
    except ConfigError as exc:
        print(f"infercache: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except InfercacheError as exc:
        text = str(exc)  # a ServerError's text already starts with its code
        print(f"infercache: {text if text.startswith(exc.code) else f'{exc.code}: {text}'}",
              file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        return 130
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
