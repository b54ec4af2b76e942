"""The ``infercache`` command: --version, bad settings, serve with no arguments, admin, bench."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infercache import __version__
from infercache.bench.process import ServerProcess, free_port
from infercache.cli import main

TOKEN = "cli-admin-token"


def test_version_subprocess() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "infercache", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"infercache {__version__}" == "infercache 0.1.0"


def test_main_returns_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "infercache 0.1.0"
    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2
    assert main([]) == 0  # prints help


def test_serve_check_prints_validated_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--check", "--port", "9123", "--admin-token", "abcdefgh1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["port"] == 9123 and shown["admin_token"] == "***"
    assert shown["jit"] is True and shown["onnx"] is True
    assert shown["sql_idle_writer"] is True
    assert main(["serve", "--check", "--no-jit", "--no-onnx", "--no-sql-idle-writer"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["jit"] is False and shown["onnx"] is False and shown["sql_idle_writer"] is False


@pytest.mark.parametrize(
    ("argv", "setting"),
    [
        (["--max-batch-size", "0"], "max_batch_size"),
        (["--port", "eighty"], "port"),
        (["--l1-policy", "fifo"], "l1_policy"),
        (["--model", "bad"], "models"),
        (["--redis-url", "localhost:6379"], "redis_url"),
        (["--stream", "a=mlp@key"], "streams"),  # needs --redis-url
    ],
)
def test_invalid_settings_stop_serve(
    argv: list[str], setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and f"'{setting}'" in err


def test_invalid_env_setting_stops_serve_subprocess(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "infercache", "serve"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**_env(), "INFERCACHE_WORKERS": "zero"},
        timeout=60,
    )
    assert out.returncode == 2
    assert "'workers'" in out.stderr


def test_unloadable_model_stops_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "m=no_such_module_xyz:make"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err
    assert main(["serve", "--model", f"{tmp_path / 'missing.onnx'}"]) == 2


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``infercache serve`` with no arguments at all (the port and token come from the env)."""
    workdir = tmp_path_factory.mktemp("plain")
    port = free_port()
    proc = ServerProcess(
        [sys.executable, "-m", "infercache", "serve"],
        cwd=workdir,
        port=port,
        env={"INFERCACHE_PORT": str(port), "INFERCACHE_ADMIN_TOKEN": TOKEN},
    )
    with proc:
        yield proc


def test_serve_with_no_arguments_answers(plain_server: ServerProcess) -> None:
    log = plain_server.log()
    assert f"listening on http://127.0.0.1:{plain_server.port}" in log
    assert "serving mlp" in log
    assert (plain_server.cwd / "infercache.db").exists()  # the SQLite L3 file
    x = [0.25] * 784
    with httpx.Client(base_url=plain_server.url) as client:
        first = client.post("/v1/models/mlp/predict", json={"input": x}).json()
        second = client.post("/v1/models/mlp/predict", json={"input": x}).json()
    assert first["cached"] is False and second["cached"] is True


def test_cache_stats_and_invalidate_commands(
    plain_server: ServerProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERCACHE_ADMIN_TOKEN", TOKEN)
    assert main(["cache", "stats", "--url", plain_server.url, "--token", TOKEN]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert "mlp" in stats["models"]
    assert main(["cache", "invalidate", "--url", plain_server.url, "--token", TOKEN,
                 "--model", "mlp"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["invalidated"] == "model"
    assert main(["cache", "invalidate", "--url", plain_server.url, "--token", "wrong-token"]) == 2
    assert main(["cache", "invalidate", "--url", plain_server.url, "--token", "wrong-token",
                 "--all"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "unauthorized" in err and "unauthorized: unauthorized" not in err


def test_cache_commands_fail_clearly_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    assert main(["cache", "stats", "--url", closed, "--token", TOKEN]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"infercache: unreachable: cannot reach {closed}")
    assert "Traceback" not in err
    # bad arguments are refused before connecting (the URL is not even tried)
    argv = ["cache", "invalidate", "--url", closed, "--token", TOKEN, "--model", "mlp"]
    assert main([*argv, "--input", "[1, 2"]) == 2
    assert "--input is not valid JSON" in capsys.readouterr().err
    assert main(["cache", "invalidate", "--url", closed, "--key", "k", "--input", "[1]"]) == 2
    assert "need --model" in capsys.readouterr().err


def test_bench_command(plain_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--url", plain_server.url, "--rate", "100", "--duration", "0.5",
            "--warmup", "0.1", "--inputs", "zipf", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] > 0 and not result["errors"]
    assert result["p50_ms"] > 0
    assert main(["bench", "--url", "http://192.0.2.1:8000", "--duration", "0.1"]) == 2
