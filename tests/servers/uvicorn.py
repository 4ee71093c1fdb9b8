"""Run an ASGI app factory under a real uvicorn process, for HTTP end-to-end and crash tests.

:class:`UvicornServer` starts ``python -m uvicorn --factory module:func`` on 127.0.0.1 on a free
port as a child process with the given environment (added to this process's), waits by polling
until a health path answers 2xx, and stops it by its PID: :meth:`~UvicornServer.stop` sends
SIGTERM (graceful; SIGKILL after a deadline) and :meth:`~UvicornServer.kill` sends SIGKILL at
once, for tests of what survives a crash. It can be started again after either.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tests.servers._process import (
    ServerFailed,
    make_temp_dir,
    read_text,
    register_cleanup,
    stop_process,
    unregister_cleanup,
    wait_until,
)
from tests.servers.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


class UvicornServer:
    """``factory`` is ``"package.module:create_app"``; ``env`` overrides this process's env.

    The working directory is the repository root, so the factory module may live in ``tests``.
    """

    def __init__(
        self,
        factory: str,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        *,
        health_path: str = "/healthz",
        cwd: Path = REPO_ROOT,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.factory = factory
        self.env = dict(env or {})
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.health_path = health_path
        self.cwd = cwd
        self.extra_args = extra_args
        self.directory = make_temp_dir("uvicorn")
        self.log_file = self.directory / "uvicorn.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:40123``."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once it has stopped (negative: killed by that signal)."""
        return self._proc.returncode if self._proc is not None else None

    def start(self, timeout: float = 30.0) -> UvicornServer:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("already running")
        env = {**os.environ, **self.env}
        argv = [
            sys.executable, "-m", "uvicorn", "--factory", self.factory,
            "--host", self.host, "--port", str(self.port),
            "--no-access-log", "--timeout-graceful-shutdown", "5",
            *self.extra_args,
        ]  # fmt: skip
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        register_cleanup(self)
        try:
            wait_until(
                self._healthy,
                timeout=timeout,
                interval=0.05,
                what=f"uvicorn {self.factory} at {self.url}{self.health_path}",
                process=self._proc,
                log=self.log_text,
            )
        except ServerFailed:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}{self.health_path}", timeout=1) as reply:
                return 200 <= int(reply.status) < 300
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL after ``timeout``."""
        if self._proc is not None:
            stop_process(self._proc, timeout=timeout)
        unregister_cleanup(self)

    def kill(self) -> None:
        """SIGKILL the server at once, as a crash would."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
        unregister_cleanup(self)

    def cleanup(self) -> None:
        """Stop, then delete the log directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> UvicornServer:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def log_text(self) -> str:
        return read_text(self.log_file)
