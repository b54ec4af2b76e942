"""bench.loadgen: the payloads the load generator sends, its HTTP client, ``infercache bench``."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infercache.bench.loadgen import MAX_KEYS, HTTPTarget, Inputs, make_inputs
from infercache.bench.process import ServerProcess, free_port
from infercache.cli import main


def test_distinct_vectors_stay_distinct_in_float32() -> None:
    inputs = Inputs("distinct", offset=(1 << 30) - 5)
    arrays = [np.asarray(inputs.input_list(inputs.next_index()), np.float32) for _ in range(10)]
    assert len({a.tobytes() for a in arrays}) == 10
    assert all(a.shape == (784,) for a in arrays)


def test_text_inputs_are_distinct_json_strings() -> None:
    inputs = Inputs("distinct", text=True)
    texts = [json.loads(inputs.input_json(inputs.next_index())) for _ in range(100)]
    assert all(isinstance(t, str) and 20 < len(t) < 200 for t in texts)
    assert len(set(texts)) == 100
    same = Inputs("same", text=True)
    assert same.input_json(same.next_index()) == same.input_json(same.next_index())


def test_zipf_draws_favour_low_ranks() -> None:
    inputs = Inputs("zipf", keys=1000, seed=3)
    draws = [inputs.next_index() for _ in range(5000)]
    assert all(0 <= d < 1000 for d in draws)
    assert sum(d < 10 for d in draws) > sum(d >= 990 for d in draws) * 5
    with pytest.raises(ValueError):
        Inputs("uniform")


def test_explicit_seed_and_offset_give_the_inputs_they_always_gave() -> None:
    """benchmarks/bench_server.py passes its own seed and offsets: its runs stay comparable."""
    distinct = Inputs("distinct", offset=10_000_000, seed=7)
    sent = b"".join(distinct.input_json(distinct.next_index()) for _ in range(3))
    digest = "3c5c2f3f3c43b37df1a85978e4af0b8f1b7960701d186181b9812c10c23f2e81"
    assert hashlib.sha256(sent).hexdigest() == digest
    zipf = Inputs("zipf", seed=7, keys=1000)
    assert [zipf.next_index() for _ in range(12)] == [510, 21, 121, 1, 15, 167, 39, 103, 0, 13,
                                                       536, 0]  # fmt: skip
    digest = "4e7ef348de82e1ec392ce2023c83e09366f69411eae3eac0ed54bd060f9ed55e"
    assert hashlib.sha256(zipf.input_json(5)).hexdigest() == digest


def test_bench_seeds_give_fresh_exact_distinct_ranges_and_one_zipf_key_space() -> None:
    firsts = []
    for seed in (0, 1, 2, 2**32 - 1, 2**63):
        inputs = make_inputs("distinct", seed)
        first = inputs.next_index()
        # above every zipf key, and room for 2**32 requests below 2**36 (exact in float32)
        assert first >= MAX_KEYS and first + 2**32 <= 2**36
        x = np.asarray(inputs.input_list(first + 2**32 - 1), np.float32)
        assert int(x[0]) * 4096 + int(x[1]) == first + 2**32 - 1
        firsts.append(inputs.input_json(first))
        again = make_inputs("distinct", seed)
        assert again.input_json(again.next_index()) == firsts[-1]  # the same seed: the same inputs
    assert len(set(firsts)) == len(firsts)
    one, two = make_inputs("zipf", 1, keys=1000), make_inputs("zipf", 2, keys=1000)
    assert all(one.input_json(k) == two.input_json(k) for k in (0, 1, 999))  # same keys
    draws = [one.next_index() for _ in range(50)]
    assert draws != [two.next_index() for _ in range(50)]  # drawn in another order
    repeat = make_inputs("zipf", 1, keys=1000)
    assert draws == [repeat.next_index() for _ in range(50)]  # the same seed: the same order


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``infercache serve`` with its SQLite L3, which kept the inputs of earlier bench runs."""
    workdir = tmp_path_factory.mktemp("bench")
    db = f"sqlite:///{workdir / 'l3.db'}"
    with ServerProcess.infercache("--sql-url", db, cwd=workdir) as proc:
        yield proc


def _bench(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    """``infercache bench --json *argv``: exit code, result, stderr."""
    code = main(["bench", "--json", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else {}, err


def _predictions_served(server: ServerProcess) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(r'infercache_http_requests_total\{route="/v1/models/\{name\}/predict",'
                      r'status="200"\} (\S+)', text)  # fmt: skip
    return float(found.group(1)) if found else 0.0


def test_bench_runs_send_new_distinct_inputs_unless_given_the_same_seed(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second ``--inputs distinct`` run measured cache hits: every run sent the same inputs."""
    argv = ("--url", server.url, "--rate", "400", "--duration", "1", "--warmup", "0",
            "--max-requests", "40")  # fmt: skip
    seeds = set()
    for _ in range(2):
        code, result, _ = _bench(capsys, *argv)
        assert code == 0 and result["ok"] == 40 and result["cached"] == 0, result
        seeds.add(result.get("seed"))
    assert len(seeds) == 2
    code, first, _ = _bench(capsys, *argv, "--seed", "7")
    assert code == 0 and first["seed"] == 7 and first["cached"] == 0
    code, again, _ = _bench(capsys, *argv, "--seed", "7")
    assert code == 0 and again["ok"] == again["cached"] == 40  # reproduced: all hits


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_bench_max_requests_counts_the_recorded_requests(
    server: ServerProcess, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """``--max-requests 10`` was spent in warm-up: nothing recorded, exit 1."""
    before = _predictions_served(server)
    started = time.monotonic()
    code, result, err = _bench(capsys, "--url", server.url, "--mode", mode, "--rate", "100",
                               "--concurrency", "4", "--warmup", "0.5", "--duration", "20",
                               "--max-requests", "10")  # fmt: skip
    assert code == 0, err
    assert result["sent"] == result["ok"] == 10 and not result["errors"]
    assert time.monotonic() - started < 10  # the budget ended the run, not --duration
    # warm-up (50 arrivals in open mode, hundreds in closed) is bounded by a budget as large
    assert _predictions_served(server) - before == 20


def test_bench_says_in_one_line_why_a_run_recorded_nothing(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (("--url", server.url, "--rate", "1", "--duration", "0.05", "--warmup", "0"),
         "no request was recorded: --rate 1/s over --duration 0.05 s expects 0.05 arrivals"),
        (("--url", server.url, "--model", "nope", "--duration", "0.2", "--rate", "50"),
         "no request succeeded: http_404 x"),
        # inputs the model refuses: it said only "http_422 x105" (found in review)
        (("--url", server.url, "--dim", "10", "--duration", "0.2", "--rate", "50"),
         "the server refused the 10-number inputs: does --dim match model 'mlp'"),
        (("--url", f"http://127.0.0.1:{free_port()}", "--duration", "0.2", "--rate", "50"),
         "(is an infercache server listening at"),
        (("--url", f"http://127.0.0.1:{free_port()}", "--transport", "ws", "--duration", "0.2"),
         "cannot connect to http://127.0.0.1:"),
    ]  # fmt: skip
    for argv, says in cases:
        code, result, err = _bench(capsys, *argv)
        assert code == 1 and err.startswith("infercache bench: ") and says in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err
        assert result.get("ok", 0) == 0


async def test_http_target_does_not_reuse_a_connection_the_server_closed() -> None:
    """A keep-alive connection the server dropped while idle (uvicorn: after 5 s) is replaced,
    not used: benchmark runs reported a few IncompleteReadErrors per 10k requests from it."""
    served = 0

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # then close, as an idle timeout would

    server = await asyncio.start_server(answer_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    target = HTTPTarget(f"http://127.0.0.1:{port}/p", Inputs("distinct", dim=4))
    try:
        for i in range(3):
            assert await target.send(target.request_bytes(i)) == (200, b"ok")
            await asyncio.sleep(0.05)  # idle: the close reaches the client
        assert served == 3 and target._open == 1
    finally:
        await target.close()
        server.close()
        await server.wait_closed()


async def test_http_target_resends_once_when_a_reused_connection_is_closed_under_it() -> None:
    """The server closes a keep-alive connection just as the next request arrives (the race an
    idle timeout has with a client): that request goes once more on a new connection. A new
    connection that fails is the server failing: no second try."""
    answered = 0
    answer_first_only = True

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        n = 0
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            n += 1
            if n > 1 or not answer_first_only:
                break  # close unanswered
            answered += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    target = HTTPTarget(f"http://127.0.0.1:{port}/p", Inputs("distinct", dim=4))
    try:
        assert await target.send(target.request_bytes(0)) == (200, b"ok")
        assert await target.send(target.request_bytes(1)) == (200, b"ok")  # resent
        assert answered == 2
        answer_first_only = False
        await target.close()
        with pytest.raises(asyncio.IncompleteReadError):
            await target.send(target.request_bytes(2))
        assert answered == 2
    finally:
        await target.close()
        server.close()
        await server.wait_closed()


def _point(server: str, rate: float, p99: float, served: float, **errors: int) -> dict[str, object]:
    return {
        "server": server,
        "label": f"slo {rate:.0f}/s distinct",
        "transport": "http",
        "offered_rate": rate,
        "throughput": served,
        "p50_ms": p99 / 4,
        "p99_ms": p99,
        "errors": errors,
    }


def _benchmark(name: str) -> Any:
    """A script from benchmarks/ loaded as a module (they are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_server_reports_the_highest_rate_within_the_p99_objective() -> None:
    bench = _benchmark("bench_server")
    results = [
        _point("seed-orjson", 600, 4.0, 600),
        _point("seed-orjson", 900, 9.0, 899),
        _point("seed-orjson", 1200, 40.0, 1190),  # over the objective
        _point("infercache", 600, 3.0, 600),
        _point("infercache", 900, 14.9, 900),
        _point("infercache", 1200, 12.0, 1100),  # p99 fine, but the rate was not served
        _point("infercache", 1500, 11.0, 1500, ServerDisconnected=1),  # an error fails it
    ]
    lines = bench._ratios(results, {}, {})
    assert (
        "highest Poisson rate with p99 <= 15 ms (infercache): 900/s vs seed-orjson 900/s "
        "(1.00x)" in lines
    )
    assert not any("infercache-l1" in line for line in lines)  # not measured, not reported


def test_bench_server_reports_the_median_p99_at_70_percent_over_rounds() -> None:
    """One 3 s point of a tail percentile is noise on a shared machine: the figure is the median
    of the rounds, with every round shown (nothing picked)."""
    bench = _benchmark("bench_server")
    results = []
    for p99, rate, busy in ((5.4, 1900, 0.81), (225.0, 1750, 0.99), (22.5, 1900, 0.9)):
        point = _point("infercache", rate, p99, rate)  # each round's own capacity
        point["label"] = f"open {rate}/s (70%) distinct"
        point["server_core_busy"] = busy
        results.append(point)
    ws = {**results[0], "transport": "ws", "p99_ms": 1.0}  # other transports are not counted
    lines = bench._ratios([*results, ws], {}, {})
    assert (
        "p99 at 70 % of capacity (infercache, 1900, 1750, 1900 req/s): 22.50 ms (per round 5.4, "
        "225.0, 22.5; server core 81%, 99%, 90% busy)" in lines
    )
    del results[1]["server_core_busy"]  # not measured (no /proc): not reported
    assert any(
        line.endswith("(per round 5.4, 225.0, 22.5)") for line in bench._ratios(results, {}, {})
    )
    table = bench.markdown([{**r, "p999_ms": None, "cached": 0, "ok": 1} for r in results])
    assert table.splitlines()[2].endswith("| 81% |") and table.splitlines()[3].endswith("| - |")


def test_bench_accept_times_a_burst_against_two_workers() -> None:
    """benchmarks/bench_accept.py's measurement, small: every connection answered, both
    workers (their own SO_REUSEPORT sockets) took part, the times are sorted."""
    pytest.importorskip("uvloop")
    bench = _benchmark("bench_accept")
    if not bench.REUSEPORT_BALANCES:
        pytest.skip("SO_REUSEPORT balances on Linux only")
    times, split = bench.measure("greedy x2", 20)
    assert len(times) == 20 and times == sorted(times) and times[0] > 0
    assert sum(split.values()) == 20 and len(split) == 2, split


def test_server_process_pause_resume_and_stop_while_paused(tmp_path: Path) -> None:
    # bench_server keeps every contender up and pauses all but the one under load
    argv = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
    proc = ServerProcess(argv, cwd=tmp_path, ready_path="/").start()
    try:
        proc.pause()
        with pytest.raises(OSError):  # the kernel accepts; the stopped server never answers
            urllib.request.urlopen(proc.url + "/", timeout=0.5)
        proc.resume()
        with urllib.request.urlopen(proc.url + "/", timeout=5) as resp:
            assert resp.status == 200
        proc.pause()
    finally:
        started = time.monotonic()
        code = proc.stop(timeout=5)
    assert code is not None and time.monotonic() - started < 5  # SIGTERM acted on, no SIGKILL


def test_ab_server_reads_contenders_like_a_shell_line() -> None:
    ab = _benchmark("ab_server")
    assert ab.parse_contender("seed-orjson") == ("seed-orjson", None, [])
    assert ab.parse_contender("default=") == ("default", {}, [])
    assert ab.parse_contender("l1=--sql-url none") == ("l1", {}, ["--sql-url", "none"])
    assert ab.parse_contender("x=EXP=1 OPTS=a=b --no-onnx lower=1") == (
        "x",
        {"EXP": "1", "OPTS": "a=b"},
        ["--no-onnx", "lower=1"],  # only leading upper-case words are variables
    )
