"""The ``infercache`` command: --version, bad settings, serve with no arguments, admin, bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infercache import __version__
from infercache.bench.process import ServerProcess, free_port
from infercache.cli import main
from infercache.errors import ConfigError

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
        (["--max-queue", "2"], "max_inputs"),  # 256 inputs could never be queued
        (["--host", "no such host"], "host"),  # uvicorn said so after warm-up, naming nothing
        (["--host", "999.1.1.1"], "host"),
    ],
)
def test_invalid_settings_stop_serve(
    argv: list[str], setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and f"'{setting}'" in err


def test_a_redis_that_refuses_us_stops_serve_at_start(
    redis_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database out of range or a cluster URL for a standalone Redis never heals: the server
    used to start and stay unready for ever, logging that Redis "does not answer"."""
    assert main(["serve", "--redis-url", redis_server.url_for_db(99)]) == 2
    assert "DB index is out of range" in capsys.readouterr().err
    cluster = f"redis+cluster://127.0.0.1:{redis_server.port}"
    assert main(["serve", "--redis-url", cluster]) == 2
    assert "not in cluster mode" in capsys.readouterr().err


def _preflight(sql_url: str) -> None:
    # preflight() itself, not main(["serve", ...]): if a check regressed, main would start a
    # real server on port 8000 and the test would hang instead of failing
    from infercache.config import load_settings
    from infercache.server.service import preflight

    preflight(load_settings({"sql_url": sql_url}, env={}))


def test_an_sqlite_file_that_can_never_work_stops_serve_at_start(tmp_path: Path) -> None:
    """A directory, or a file that is not a database: the server started and stayed unready for
    ever ("cache tier sqlite does not answer")."""
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(ConfigError, match=r"'sql_url'.* is a directory, not an SQLite file"):
        _preflight(f"sqlite:///{tmp_path}/dir.db")
    (tmp_path / "junk.db").write_bytes(os.urandom(5000))
    with pytest.raises(ConfigError, match="not a usable SQLite database: file is not a database"):
        _preflight(f"sqlite:///{tmp_path}/junk.db")


def test_a_postgres_that_refuses_us_stops_serve_at_start(postgres_url: str) -> None:
    """A database or role that does not exist (or a wrong password) never heals: the server
    started, stayed unready, and the pool logged the refusal every few seconds, for ever."""
    base, _, _ = postgres_url.rpartition("/")
    with pytest.raises(ConfigError, match='refused us: database "no_such_db_xyz" does not exist'):
        _preflight(f"{base}/no_such_db_xyz")
    with pytest.raises(ConfigError, match='refused us: role "nobody_xyz" does not exist'):
        _preflight(postgres_url.replace("postgres@", "nobody_xyz@"))
    _preflight(postgres_url)  # the same server, as it should be: passes
    # the driver-qualified form the settings accept is checked too, and no password is shown
    base_plus = base.replace("postgresql://", "postgresql+psycopg://", 1)
    with pytest.raises(ConfigError, match="does not exist"):
        _preflight(f"{base_plus}/no_such_db_xyz")


def test_a_postgres_or_sqlite_file_that_may_come_later_does_not_stop_the_start(
    tmp_path: Path,
) -> None:
    """Nothing listening (PostgreSQL not up yet) and a file not created yet pass the preflight:
    the running server serves without the tier until it answers."""
    _preflight(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    _preflight(f"sqlite:///{tmp_path}/new.db")
    assert not (tmp_path / "new.db").exists()  # the check creates nothing
    # a crash left a hot journal: a read-only open cannot roll it back, the tier's open will
    import sqlite3

    db = tmp_path / "crashed.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    (tmp_path / "crashed.db-journal").write_bytes(db.read_bytes())
    _preflight(f"sqlite:///{db}")


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
    for check in ([], ["--check"]):  # --check passed what the start refused (found in review)
        assert main(["serve", *check, "--model", "m=no_such_module_xyz:make"]) == 2
        assert "no_such_module_xyz" in capsys.readouterr().err
        assert main(["serve", *check, "--model", f"{tmp_path / 'missing.onnx'}"]) == 2
        assert "missing.onnx' does not exist" in capsys.readouterr().err


def test_the_console_script_finds_a_factory_in_the_working_directory(tmp_path: Path) -> None:
    """`infercache serve --model mymodels:encoder` from the folder holding mymodels.py: the
    console script's sys.path starts at its bin/ directory, so it said "no module named"
    (found in review), where `python -m infercache` found it."""
    _write_factories(tmp_path)
    script = Path(sys.executable).with_name("infercache")
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(script), "serve", "--check", "--model", "ic_cli_models:module"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["models"] == ["ic_cli_models:module"]


def test_a_stream_naming_no_served_model_stops_serve_with_one_line(
    redis_url: str, tmp_path: Path
) -> None:
    """It was a ModelNotFound traceback from inside the lifespan, and exit 3."""
    out = subprocess.run(
        [sys.executable, "-m", "infercache", "serve", "--port", str(free_port()),
         "--sql-url", "none", "--redis-url", redis_url, "--stream", "scores=nope@events"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert (
        "setting 'streams': 'scores=nope@events' names model 'nope', which is not served "
        "(served: mlp)"
    ) in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_check_refuses_a_stream_naming_no_served_model(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check said 0 where the real start exits 2 (found in review)."""
    argv = ["serve", "--check", "--sql-url", "none", "--redis-url", redis_url]
    assert main([*argv, "--stream", "scores=nope@events"]) == 2
    err = capsys.readouterr().err
    assert "names model 'nope', which is not served (served: mlp)" in err
    assert "Traceback" not in err
    assert main([*argv, "--stream", "scores=mlp@events"]) == 0


def test_serve_check_loads_the_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It only found them: a factory missing from its module, or a declared spec a factory's
    own ModelRunner cannot take, passed --check and stopped the real start (found in review)."""
    _write_factories(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        for spec, said in (
            ("ic_cli_models:no_such_factory", "has no attribute 'no_such_factory'"),
            ("m=json:loads;shape=16", "cannot load"),
        ):
            assert main(["serve", "--check", "--model", spec]) == 2, spec
            assert said in capsys.readouterr().err
        assert main(["serve", "--check", "--model", "ic_cli_models:module"]) == 0
    finally:
        sys.path.remove(str(tmp_path))


def test_a_factory_that_is_not_there_is_named_once() -> None:
    from infercache.server.service import load_model

    with pytest.raises(ConfigError) as info:
        load_model("json:no_such_factory")  # the module imports; the name is not in it
    assert str(info.value) == (
        "setting 'models': cannot load 'json:no_such_factory': module 'json' has no attribute "
        "'no_such_factory'"
    )


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
    assert f"starting on http://127.0.0.1:{plain_server.port}" in log
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
    # it said "give --all, --model or --key" (found in review)
    assert main(["cache", "invalidate", "--url", closed, "--version", "v1"]) == 2
    assert "--input and --version need --model" in capsys.readouterr().err
    assert main([*argv, "--input", "NaN"]) == 2  # json.loads takes it; JSON does not
    assert "NaN is not a JSON value" in capsys.readouterr().err
    for url in ("http://[::1", "http://127.0.0.1:99999", "ftp://127.0.0.1"):
        assert main(["cache", "stats", "--url", url, "--token", TOKEN]) == 2, url
        err = capsys.readouterr().err
        assert err.startswith("infercache: invalid configuration:") and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--rate", "inf"], "--rate must be a finite number > 0"),  # ran for ever
        (["--rate", "nan"], "--rate must be a finite number > 0"),  # ran for ever
        (["--rate", "0"], "--rate must be a finite number > 0"),  # ZeroDivisionError
        (["--rate", "-5"], "--rate must be a finite number > 0"),  # numpy's "scale < 0"
        (["--duration", "nan"], "--duration must be a finite number > 0"),
        (["--warmup", "-1"], "--warmup must be a finite number >= 0"),
        (["--mode", "closed", "--concurrency", "0"], "--concurrency must be >= 1"),
        (["--keys", "0"], "--keys must be >= 1"),
        (["--keys", str(2**32)], "--keys must be at most 10000000"),  # a 32 GiB CDF: traceback
        (["--url", "ws://127.0.0.1:8000", "--transport", "ws"], "http:// address"),
        (["--url", "http://[::1"], "Invalid IPv6 URL"),
        (["--url", "http://example.com:8000"], "loopback only"),
    ],
)
def test_bench_refuses_bad_arguments_with_one_line(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--duration", "0.1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infercache bench: ") and says in err, err


def test_bench_command(plain_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--url", plain_server.url, "--rate", "100", "--duration", "0.5",
            "--warmup", "0.1", "--inputs", "zipf", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] > 0 and not result["errors"]
    assert result["p50_ms"] > 0
    assert main(["bench", "--url", "http://192.0.2.1:8000", "--duration", "0.1"]) == 2


_FACTORIES = '''
import torch


def module():
    """A factory returning an nn.Module: served under its own name, "module"."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def bare():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 2))


class Reshapes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.lin(x.reshape(x.shape[0], -1))
'''


def _write_factories(where: Path) -> None:
    (where / "ic_cli_models.py").write_text(_FACTORIES)
    (where / "ic_cli_other.py").write_text(_FACTORIES)  # the same factory names, elsewhere


@pytest.fixture(scope="module")
def models_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Two nn.Module factories and TorchScript files: a Sequential (its input shape is its first
    Linear's), and a module with its own forward, served open and with a declared spec."""
    import warnings

    torch = pytest.importorskip("torch")
    workdir = tmp_path_factory.mktemp("models")
    _write_factories(workdir)
    sys.path.insert(0, str(workdir))
    try:
        import ic_cli_models
    finally:
        sys.path.remove(str(workdir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(ic_cli_models.module(), torch.zeros(1, 4)).save(str(workdir / "seq.pt"))
        torch.jit.script(ic_cli_models.Reshapes()).save(str(workdir / "net.pt"))
    proc = ServerProcess.infercache(
        "--sql-url", "none",
        "--model", "ic_cli_models:module", "--model", "ic_cli_models:bare",
        "--model", "seq.pt", "--model", "open=net.pt", "--model", "declared=net.pt;shape=2x3",
        cwd=workdir,
        env={"PYTHONPATH": str(workdir)},
    )  # fmt: skip
    with proc:
        yield proc


def test_factory_and_torchscript_models_are_named_and_validated(
    models_server: ServerProcess,
) -> None:
    valid = {
        "module": [1, 2, 3, 4],
        "bare": [1, 2, 3, 4],
        "seq": [1, 2, 3, 4],
        "open": [1, 2, 3, 4, 5, 6],
        "declared": [[1, 2, 3], [4, 5, 6]],
    }
    with httpx.Client(base_url=models_server.url) as client:
        models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        shapes = {name: m["input_spec"]["shape"] for name, m in models.items()}
        assert shapes == {"module": [4], "bare": [4], "seq": [4], "open": None, "declared": [2, 3]}

        def post(model: str, body: Any) -> httpx.Response:
            return client.post(f"/v1/models/{model}/predict", json=body)

        for model, ok in valid.items():
            assert post(model, {"input": ok}).status_code == 200, model
            for bad in ([1, 2, 3, None], [1e39, 2, 3, 4], None, [True, False, True, False]):
                r = post(model, {"input": bad})
                assert r.status_code == 422, (model, bad, r.text)
                assert r.json()["error"]["code"] == "invalid_input"
        for model in ("module", "seq", "declared"):  # a wrong shape never reaches the model
            r = post(model, {"input": [1, 2, 3]})
            assert r.status_code == 422 and "wrong shape" in r.json()["error"]["message"], model


def test_duplicate_model_names_stop_serve_with_one_line(tmp_path: Path) -> None:
    _write_factories(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "infercache", "serve", "--port", str(free_port()),
         "--sql-url", "none", "--model", "ic_cli_models:module", "--model", "ic_cli_other:module"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])},
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "infercache: invalid configuration: setting 'models': two models are named 'module'" in (
        out.stderr
    )
    assert "Traceback" not in out.stderr


def test_a_model_that_fails_its_declared_spec_stops_serve_with_one_line(tmp_path: Path) -> None:
    """A TorchScript error's text is the interpreter's whole traceback (server paths included):
    the start-up error printed all of it."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch 2.13 deprecates tracing; a user's file still loads
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(torch.nn.Linear(3, 2), torch.zeros(1, 3))
    traced.save(str(tmp_path / "lin3.pt"))
    out = subprocess.run(
        [sys.executable, "-m", "infercache", "serve", "--port", str(free_port()),
         "--sql-url", "none", "--model", "lin3.pt;shape=4"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("infercache: invalid configuration: setting 'models': cannot load")
    assert "mat1 and mat2 shapes cannot be multiplied" in last
    assert "Traceback" not in out.stderr and "File " not in out.stderr


@pytest.mark.parametrize("flag", ["--api-token", "--admin-token"])
def test_token_with_surrounding_whitespace_stops_serve(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--check", flag, "        x"]) == 2
    assert "must not begin or end with whitespace" in capsys.readouterr().err


def test_config_file_with_settings_in_both_places_stops_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c1.toml"
    path.write_text('port = 18106\nmax_batch_size = 8\nadmin_token = "filetokenxx"\n'
                    "[infercache]\nl1_size = 5\n")  # fmt: skip
    assert main(["serve", "--config", str(path), "--check"]) == 2
    assert "both at top level (admin_token, max_batch_size, port)" in capsys.readouterr().err


def test_a_model_that_fails_to_load_in_the_workers_stops_serve_with_exit_2(tmp_path: Path) -> None:
    """With ``--workers 2`` the models load in each worker: a bad one printed four tracebacks and
    uvicorn's supervisor then exited 0, which systemd and scripts read as a clean stop."""
    (tmp_path / "bad.onnx").write_text("not a model")
    out = subprocess.run(
        [sys.executable, "-m", "infercache", "serve", "--port", str(free_port()),
         "--sql-url", "none", "--workers", "2", "--model", "bad.onnx"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "infercache: invalid configuration: setting 'models': cannot load 'bad.onnx'" in (
        out.stderr
    )
    assert "Traceback" not in out.stderr and "File " not in out.stderr


def test_a_stopped_server_leaves_no_file_behind(tmp_path: Path) -> None:
    """Every SIGTERM of a one-worker server left an infercache-start-* file in /tmp (uvicorn
    re-raises the signal before any finally runs): 77 of them after a day of test runs."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = ServerProcess.infercache(
        "--sql-url", "none", "--no-warmup", cwd=tmp_path, env={"TMPDIR": str(tmpdir)}
    )
    with proc:
        assert httpx.get(f"{proc.url}/healthz", timeout=10).status_code == 200
    assert not list(tmpdir.glob("infercache-start-*"))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_start_up_failure_that_is_no_configuration_error_exits_non_zero(
    tmp_path: Path, workers: str
) -> None:
    """With several workers any failed start exited 0 (uvicorn's supervisor returns normally);
    now it is uvicorn's exit code 3, with the traceback in the log: not a user's slip."""
    (tmp_path / "sitecustomize.py").write_text(
        "import infercache.server.service as s\n"
        "async def broken(*a, **k):\n"
        "    raise RuntimeError('the disk is on fire')\n"
        "s.build_service = broken\n"
        "import infercache.server.app as a\n"
        "a.build_service = broken\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "infercache", "serve", "--port", str(free_port()),
         "--sql-url", "none", "--workers", workers],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])},
    )  # fmt: skip
    assert out.returncode == 3, out.stderr[-2000:]
    assert "the disk is on fire" in out.stderr
