"""Run a server in a subprocess on a free loopback port and wait until it is ready.

Used by the server benchmark (each contender in its own process, so none shares an event loop or
a GIL with the load generator) and by the tests (the real ``infercache serve``, no in-process
shortcuts). The process's output goes to a log file that :meth:`ServerProcess.log` returns, so
that a server that fails to start says why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (small race until the server binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerStartError(RuntimeError):
    """The server did not become ready; the message carries the end of its log."""


class ServerProcess:
    """A server subprocess on ``127.0.0.1:<port>``.

    Args:
        argv: the command, with ``{port}`` replaced by the chosen port.
        ready_path: polled until it answers 200 (``/readyz`` for infercache).
        cwd / env: working directory (default: a fresh temp dir) and extra environment.
        timeout: seconds to wait for readiness.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready_path: str = "/readyz",
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 90.0,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.ready_path = ready_path
        # the log (and, without a cwd, the working directory) live in a temp dir of their own, so
        # that a server started from a checkout never leaves files in it
        self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
            prefix="infercache-server-"
        )
        self.cwd = Path(cwd) if cwd is not None else Path(self._tmp.name)
        self.env = {**os.environ, **(env or {})}
        if env and "PYTHONPATH" in env and os.environ.get("PYTHONPATH"):
            # extend, don't replace: the parent's path may be what makes infercache importable
            self.env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + os.environ["PYTHONPATH"]
        self.timeout = timeout
        self.log_path = Path(self._tmp.name) / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def infercache(cls, *args: str, **kwargs: object) -> ServerProcess:
        """``python -m infercache serve --port {port} *args``."""
        argv = [sys.executable, "-m", "infercache", "serve", "--port", "{port}", *args]
        return cls(argv, **kwargs)  # type: ignore[arg-type]

    def start(self) -> ServerProcess:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.argv} exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            if self._ready():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"{self.argv} not ready in {self.timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def pause(self) -> None:
        """SIGSTOP the server's process group: it takes no CPU until :meth:`resume`.

        A benchmark keeping several servers up on one core pauses those it is not measuring;
        some idle servers are not idle (LitServe's took ~20 % of a core doing nothing).
        """
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the server's process group (harmless if it was not paused)."""
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.resume()  # a paused server would not act on SIGTERM
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(5)
        code = self.proc.returncode
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
