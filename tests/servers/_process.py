"""Shared plumbing for the throwaway servers: polling with a deadline, stopping by PID, cleanup.

Every server helper in this package waits for readiness with :func:`wait_until` (never a fixed
sleep), stops its process with :func:`stop_pid` (SIGTERM, then SIGKILL after a deadline), and
registers itself with :func:`register_cleanup` so that an interrupted test session still stops
what it started. :class:`ServerUnavailable` says a server binary is missing and names the script
that installs it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

INSTALL_HINT = "run tests/run.sh (it installs the Debian packages the test servers need)"


class ServerUnavailable(RuntimeError):
    """A server's binary is not installed on this machine."""


class ServerFailed(RuntimeError):
    """A server did not start, or stopped answering, within its deadline."""


def require_binary(path_or_name: str, package: str) -> str:
    """Return the absolute path of an executable, or raise ServerUnavailable naming the package."""
    found = shutil.which(path_or_name)
    if found is None:
        raise ServerUnavailable(
            f"{path_or_name} not found (Debian package {package}): {INSTALL_HINT}"
        )
    return found


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.02,
    process: subprocess.Popen[bytes] | None = None,
    log: Callable[[], str] | None = None,
) -> None:
    """Poll ``check`` until it returns True; raise ServerFailed after ``timeout`` seconds.

    If ``process`` exits while we wait, fail at once instead of waiting out the deadline. ``log``
    supplies the server's log text for the error message.
    """
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if process is not None and process.poll() is not None:
            raise ServerFailed(
                f"{what}: process exited with status {process.returncode}{_tail(log)}"
            )
        if time.monotonic() >= deadline:
            raise ServerFailed(f"{what}: not done after {timeout:.1f}s{_tail(log)}")
        time.sleep(interval)


def _tail(log: Callable[[], str] | None, lines: int = 40) -> str:
    if log is None:
        return ""
    try:
        text = log()
    except OSError as exc:
        return f"\n(log unreadable: {exc})"
    return "\n--- log tail ---\n" + "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    """True if a process with this PID exists (and is not a zombie we already reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Field 3 (after the parenthesised command name) is the state letter.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_pid(
    pid: int,
    *,
    timeout: float = 10.0,
    sig: signal.Signals = signal.SIGTERM,
    group: bool = False,
) -> None:
    """Send ``sig`` to ``pid`` and wait for it to go; SIGKILL it (or its group) after a deadline."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    """Stop a child started with ``start_new_session=True``: SIGTERM it, then SIGKILL its group.

    The group is killed only while the leader is still unreaped, so its id cannot have been
    reused by an unrelated process.
    """
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5.0)


def make_temp_dir(prefix: str, *, mode: int = 0o755) -> Path:
    """A fresh directory under the system temp dir, traversable by the servers' own users."""
    path = Path(tempfile.mkdtemp(prefix=f"mailgate-{prefix}-"))
    path.chmod(mode)
    return path


def read_text(path: Path) -> str:
    """A log file's text, or "" if it does not exist yet."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_running: list[_Stoppable] = []
_running_lock = threading.Lock()


def register_cleanup(server: _Stoppable) -> None:
    """Remember a started server so that interpreter exit stops it if no fixture did."""
    with _running_lock:
        _running.append(server)


def unregister_cleanup(server: _Stoppable) -> None:
    with _running_lock, contextlib.suppress(ValueError):
        _running.remove(server)


@atexit.register
def _stop_all() -> None:
    with _running_lock:
        servers = list(reversed(_running))
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()
