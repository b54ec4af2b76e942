"""Settings: precedence (flags > env > file > defaults), parsing and validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from infercache.config import Settings, load_settings, parse_model_spec
from infercache.errors import ConfigError


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "infercache.toml"
    path.write_text(text)
    return path


def test_defaults_serve_the_embedded_setup() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert (s.host, s.port, s.redis_url) == ("127.0.0.1", 8000, None)
    assert s.sql_url == "sqlite:///infercache.db"
    assert s.models == ()


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    path = _toml(tmp_path, "port = 7000\nmax_batch_size = 8\nl1_size = 5\nhost = '0.0.0.0'\n")
    env = {"INFERCACHE_PORT": "7100", "INFERCACHE_MAX_BATCH_SIZE": "16"}
    s = load_settings({"port": 7200, "host": None}, env=env, config_file=path)
    assert s.port == 7200  # flag
    assert s.max_batch_size == 16  # env over file
    assert s.l1_size == 5  # file over default
    assert s.host == "0.0.0.0"  # a None flag does not mask the file
    assert s.max_queue == Settings().max_queue  # default


def test_config_file_from_env_and_infercache_table(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[infercache]\nmodels = ['a=demo', 'b=pkg.mod:make']\nwarmup = false\n")
    s = load_settings(env={"INFERCACHE_CONFIG": str(path)})
    assert s.models == ("a=demo", "b=pkg.mod:make")
    assert s.warmup is False


def test_env_parsing_of_types() -> None:
    env = {
        "INFERCACHE_MODELS": "x=demo, y=model.onnx",
        "INFERCACHE_CACHE_TTL": "2.5",
        "INFERCACHE_GC_FREEZE": "no",
        "INFERCACHE_REDIS_URL": "redis://127.0.0.1:6379/0",
        "INFERCACHE_SQL_URL": "none",
        "INFERCACHE_UNRELATED": "ignored",
    }
    s = load_settings(env=env)
    assert s.models == ("x=demo", "y=model.onnx")
    assert s.cache_ttl == 2.5
    assert s.gc_freeze is False
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.sql_url is None


@pytest.mark.parametrize(
    ("source", "setting"),
    [
        ({"port": "http"}, "port"),
        ({"port": 70000}, "port"),
        ({"workers": 0}, "workers"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"max_wait_ms": "soon"}, "max_wait_ms"),
        ({"cache_ttl": "nan"}, "cache_ttl"),
        ({"l1_policy": "random"}, "l1_policy"),
        ({"write_policy": "sideways"}, "write_policy"),
        ({"ws_slow_consumer": "block"}, "ws_slow_consumer"),
        ({"redis_url": "http://x"}, "redis_url"),
        ({"redis_url": "redis://127.0.0.1:99999/0"}, "redis_url"),  # was a uvicorn traceback
        ({"redis_url": "redis://127.0.0.1:6379/abc"}, "redis_url"),  # was ignored
        ({"redis_url": "redis://127.0.0.1:6379/0?db=x"}, "redis_url"),
        ({"redis_url": "redis://:6379/0"}, "redis_url"),
        ({"sql_url": "mysql://x"}, "sql_url"),
        ({"admin_token": "short"}, "admin_token"),
        ({"models": ["nocolon"]}, "models"),
        ({"models": ["a=demo", "a=demo"]}, "models"),
        ({"models": ["bad name=demo"]}, "models"),
        ({"warmup": "maybe"}, "warmup"),
        ({"max_body_bytes": True}, "max_body_bytes"),
        # a topic subscribe would refuse: every window's publish failed, after a clean start
        ({"streams": ["bad topic=mlp@s"], "redis_url": "redis://127.0.0.1:6379/0"}, "streams"),
        ({"streams": [".hidden=mlp@s"], "redis_url": "redis://127.0.0.1:6379/0"}, "streams"),
    ],
)
def test_invalid_settings_name_the_setting(source: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigError, match=f"'{setting}'"):
        load_settings(source, env={})


def test_invalid_env_value_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="'max_queue'"):
        load_settings(env={"INFERCACHE_MAX_QUEUE": "lots"})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_settings(env={}, config_file=_toml(tmp_path, "prot = 1\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(env={}, config_file=_toml(tmp_path, "port = \n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env={}, config_file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="'port'"):
        load_settings(env={}, config_file=_toml(tmp_path, "port = 'eighty'\n"))


def test_model_specs() -> None:
    assert parse_model_spec("demo") == (None, "demo")
    assert parse_model_spec("m=pkg.mod:factory") == ("m", "pkg.mod:factory")
    assert parse_model_spec("net=/models/net.onnx") == ("net", "/models/net.onnx")
    assert parse_model_spec("/models/script.pt") == (None, "/models/script.pt")
    for bad in ("", "=demo", "m=", "pkg.mod", "m=pkg:"):
        with pytest.raises(ConfigError):
            parse_model_spec(bad)


def test_redacted_hides_secrets() -> None:
    s = load_settings(
        {
            "admin_token": "s3cret-token",
            "redis_url": "redis://user:pw@127.0.0.1:6379/0",
            "sql_url": "postgresql://app:hunter2@db/x",
        },
        env={},
    )
    shown = s.redacted()
    assert shown["admin_token"] == "***"
    assert "pw" not in shown["redis_url"] and "hunter2" not in shown["sql_url"]
    # in the query string too, where redis-py and libpq read a password as well
    for url in ("unix:///tmp/r.sock?password=s3cretpw&db=0", "redis://h:6379/0?password=s3cretpw"):
        shown = load_settings({"redis_url": url}, env={}).redacted()
        assert "s3cretpw" not in shown["redis_url"] and "password=***" in shown["redis_url"]
    shown = load_settings({"sql_url": "postgresql://db/x?sslmode=require&password=s3cretpw"},
                          env={}).redacted()  # fmt: skip
    assert shown["sql_url"] == "postgresql://db/x?sslmode=require&password=***"
    assert s.replace(port=9000).port == 9000
    with pytest.raises(ConfigError):
        s.replace(port=-1)


def test_sqlite_file_in_a_missing_directory_stops_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # three slashes: relative to here, so "tmp/x/cache.db" under tmp_path -- the classic slip
    with pytest.raises(ConfigError, match=r"'sql_url'.*relative to .*four slashes"):
        load_settings({"sql_url": "sqlite:///no/such/dir/cache.db"}, env={})
    with pytest.raises(ConfigError, match=r"'sql_url'.*does not exist"):
        load_settings({"sql_url": f"sqlite:///{tmp_path}/missing/cache.db"}, env={})
    (tmp_path / "here").mkdir()
    ok = [f"sqlite:///{tmp_path}/here/cache.db", "sqlite:///here/cache.db", "sqlite:///a.db"]
    for url in [*ok, "sqlite:///:memory:", "sqlite://"]:
        assert load_settings({"sql_url": url}, env={}).sql_url == url


def test_file_with_settings_both_at_top_level_and_in_the_table_is_refused(tmp_path: Path) -> None:
    # reading only the table dropped port, max_batch_size and the admin token without a word
    text = (
        'port = 18106\nmax_batch_size = 8\nadmin_token = "filetokenxx"\n[infercache]\nl1_size = 5\n'
    )
    with pytest.raises(
        ConfigError, match=r"both at top level \(admin_token, max_batch_size, port\)"
    ):
        load_settings(env={}, config_file=_toml(tmp_path, text))
    # unknown keys are named wherever they are, all of them
    with pytest.raises(ConfigError, match="unknown settings 'prot', 'warmpu'"):
        load_settings(env={}, config_file=_toml(tmp_path, "prot = 1\n[infercache]\nwarmpu = 0\n"))
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_settings(env={}, config_file=_toml(tmp_path, "[infercache]\nprot = 1\n"))
    with pytest.raises(ConfigError, match="must be a table"):
        load_settings(env={}, config_file=_toml(tmp_path, "infercache = 1\n"))
    with pytest.raises(ConfigError, match=r"both \[infercache\] and \[tool.infercache\]"):
        load_settings(env={}, config_file=_toml(tmp_path, "[infercache]\n[tool.infercache]\n"))
    # either place alone still works
    s = load_settings(env={}, config_file=_toml(tmp_path, "[infercache]\nport = 7001\n"))
    assert s.port == 7001
    assert load_settings(env={}, config_file=_toml(tmp_path, "port = 7002\n")).port == 7002


@pytest.mark.parametrize(
    "token", ["        x", " abcdefgh", "abcdefgh ", "abcdefgh\n", "\tabcdefgh"]
)
@pytest.mark.parametrize("setting", ["admin_token", "api_token"])
def test_tokens_with_surrounding_whitespace_are_refused(token: str, setting: str) -> None:
    # the server strips the presented header value, so such a token could never match
    with pytest.raises(ConfigError, match=f"'{setting}': a token must not begin or end with white"):
        load_settings({setting: token}, env={})
    with pytest.raises(ConfigError, match=f"'{setting}'"):
        load_settings(env={f"INFERCACHE_{setting.upper()}": token})
    assert getattr(load_settings({setting: "in side token"}, env={}), setting) == "in side token"


def test_model_spec_declares_the_input_spec() -> None:
    from infercache.config import model_input_spec
    from infercache.models import InputSpec

    spec = "net=/m/net.pt;shape=3x224x224;dtype=uint8"
    assert parse_model_spec(spec) == ("net", "/m/net.pt")
    assert model_input_spec(spec) == InputSpec(shape=(3, 224, 224), dtype="uint8")
    assert model_input_spec("pkg.mod:make; shape=*x16") == InputSpec(shape=(None, 16))
    assert model_input_spec("demo;shape=()") == InputSpec(shape=())
    ids = model_input_spec("pkg.mod:make;dtype=int64;min=0;max=9")
    assert ids == InputSpec(shape=None, dtype="int64", min=0, max=9)  # no shape: any shape
    assert model_input_spec("net=/m/net.pt") is None
    # the env var separates models by commas: dimensions are joined by x
    s = load_settings(env={"INFERCACHE_MODELS": "a=/m/a.pt;shape=784, b=demo"})
    assert s.models == ("a=/m/a.pt;shape=784", "b=demo")
    for bad, match in [
        ("m.pt;shape=3,4", "joined by 'x'"),
        ("m.pt;shape=-1", "joined by 'x'"),
        ("m.pt;size=4", "unknown option 'size'"),
        ("m.pt;shape", "not key=value"),
        ("m.pt;shape=4;shape=5", "given twice"),
        ("m.pt;dtype=complex64", "numeric or 'str'"),
        ("m.pt;dtype=float33", "not a numpy dtype"),
        ("m.pt;min=low", "min 'low'"),
        ("m:f;dtype=str;shape=2", "takes no shape"),  # was shown, never applied
        ("m:f;dtype=str;max=3", "a text input .* takes none"),  # was shown, never applied
    ]:
        with pytest.raises(ConfigError, match=match):
            load_settings({"models": [bad]}, env={})


def test_the_server_gives_the_runner_only_the_fields_a_model_spec_declares() -> None:
    """What is left out comes from the model (see test_models): a whole declared spec dropped
    the graph's shape and dtype, and a text model's max_length (found in review)."""
    from infercache.config import model_input_fields

    assert model_input_fields("ids=emb.onnx;min=0;max=99") == {"min": 0.0, "max": 99.0}
    assert model_input_fields("net=/m/net.pt;shape=3x224x224;dtype=uint8") == {
        "shape": (3, 224, 224),
        "dtype": "uint8",
    }
    assert model_input_fields("m:f;shape=()") == {"shape": ()}
    assert model_input_fields("net=/m/net.pt") is None


def test_a_file_shared_with_other_tools(tmp_path: Path) -> None:
    # pyproject.toml: our table under [tool], the other tools' tables left alone
    pyproject = (
        '[project]\nname = "svc"\n[tool.ruff]\nline-length = 100\n'
        "[tool.infercache]\nport = 7003\nmax_batch_size = 16\n"
    )
    s = load_settings(env={}, config_file=_toml(tmp_path, pyproject))
    assert (s.port, s.max_batch_size) == (7003, 16)
    # another tool's array of tables ([[servers]]) is left alone as well
    servers = '[infercache]\nport = 7005\n[[servers]]\nname = "a"\n[[servers]]\nname = "b"\n'
    assert load_settings(env={}, config_file=_toml(tmp_path, servers)).port == 7005
    # the same with [infercache] beside another tool's table
    shared = '[infercache]\nport = 7004\n[other_tool]\nport = "not ours"\n'
    assert load_settings(env={}, config_file=_toml(tmp_path, shared)).port == 7004
    # a typo in our table is still named
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_settings(
            env={}, config_file=_toml(tmp_path, "[tool.ruff]\n[tool.infercache]\nprot = 1\n")
        )
    with pytest.raises(ConfigError, match=r"\[tool.infercache\] .* must be a table"):
        load_settings(env={}, config_file=_toml(tmp_path, "[tool]\ninfercache = 3\n"))
    # a pyproject.toml without our table: named as such, not a list of "unknown settings" only
    with pytest.raises(ConfigError, match=r"no \[infercache\] or \[tool.infercache\] table"):
        load_settings(env={}, config_file=_toml(tmp_path, '[project]\nname = "svc"\n'))


def test_unknown_infercache_variables_are_named_with_the_setting_they_resemble() -> None:
    """They are ignored (tools around the server share the prefix), so a typo went unnoticed
    where the same typo in a config file stops the start (found in review)."""
    from infercache.config import unknown_env

    env = {
        "INFERCACHE_MAX_BATCHSIZE": "64",
        "INFERCACHE_BOGUS": "1",
        "INFERCACHE_PORT": "8001",  # a setting
        "INFERCACHE_CONFIG": "x.toml",  # a tool's
        "INFERCACHE_TORCH_INDEX": "https://example.invalid",  # scripts/bootstrap's
        "OTHER_MAX_BATCHSIZE": "1",
    }
    assert unknown_env(env) == [
        "ignoring INFERCACHE_BOGUS: no such setting",
        "ignoring INFERCACHE_MAX_BATCHSIZE: no such setting; did you mean "
        "INFERCACHE_MAX_BATCH_SIZE?",
    ]
