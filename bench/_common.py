"""Shared plumbing for the SMTP benchmarks: the gateway, a private Postfix and smtp-sink.

Every server runs from its own temp dir on 127.0.0.1 and a free port, is stopped by its PID
(SIGTERM, then SIGKILL after a deadline) and leaves nothing behind. Nothing under /etc is touched
and Debian's own Postfix instance is never started. Every wait has a deadline.

- :class:`Sink`: ``smtp-sink -c``; :meth:`Sink.count` parses its running ``mesg=`` counter.
- :class:`GatewayServer`: ``python -m gateway serve`` with a config written for the benchmark
  (SQLite store, DKIM key for the sender's domain, trusted 127.0.0.1, relay to a sink);
  :meth:`GatewayServer.queued` reads its database read-only.
- :class:`PostfixServer`: a private Postfix relaying to a sink (``relayhost``), performance
  parameters left at Postfix's defaults.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SENDER = "bench@example.test"  # smtp-source writes "From: <SENDER>": DKIM signs for example.test
SENDER_DOMAIN = "example.test"
RECIPIENT = "rcpt@sink.test"


# -- small helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = HOST) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.02,
    proc: subprocess.Popen[Any] | None = None,
    log: Callable[[], str] | None = None,
) -> float:
    """Poll ``check`` until true; return the monotonic time it became true. Raise on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.monotonic()
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited ({proc.returncode}){_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f}s{_tail(log)}")
        time.sleep(interval)


def _tail(log: Callable[[], str] | None) -> str:
    if log is None:
        return ""
    return "\n--- log tail ---\n" + "\n".join(log().splitlines()[-30:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


def stop_pid(
    pid: int,
    *,
    timeout: float = 10.0,
    group: bool = False,
    proc: subprocess.Popen[Any] | None = None,
) -> None:
    """SIGTERM ``pid`` (or its process group), then SIGKILL after ``timeout`` seconds."""
    kill = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError):
        kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        if proc is None and not pid_alive(pid):
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of one process, in KiB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def _pids_where(field: int, value: int) -> list[int]:
    """Live processes whose /proc stat ``field`` (counted after ")": state ppid pgrp session)
    equals ``value``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[field]) == value:
                pids.append(int(entry))
    return pids


def session_pids(session: int) -> list[int]:
    """All live processes in a session (Postfix's master is a session leader)."""
    return _pids_where(3, session)


def child_pids(parent: int) -> list[int]:
    """The live direct children of ``parent``."""
    return _pids_where(1, parent)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids``, plus that of their children they have reaped (so a
    Postfix master's figure includes the smtpd and cleanup processes that already exited)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / ticks


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def machine() -> dict[str, Any]:
    """What the numbers were measured on and against (the tree may have uncommitted changes)."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=False
        )
        return result.stdout.rstrip()

    return {
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg()[0],
        "python": sys.version.split()[0],
        "source": str(REPO),  # the gateway measured is this tree's (see GatewayServer._env)
        "commit": git("rev-parse", "--short", "HEAD").strip() or "unknown (not a git checkout)",
        # What differs from the commit: the numbers are for the tree as it was.
        "uncommitted": [line[3:] for line in git("status", "--porcelain").splitlines()],
    }


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"mailgate-bench-{prefix}-"))
    path.chmod(0o755)  # Postfix's daemons (user postfix) must reach their directories
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def require(binary: str) -> str:
    found = shutil.which(binary) or (binary if os.access(binary, os.X_OK) else None)
    if not found:
        sys.exit(f"{binary} not found: apt-get install -y --no-install-recommends postfix")
    return found


# -- smtp-sink ----------------------------------------------------------------------------------


class Sink:
    """``smtp-sink -c`` on a free port; counts the messages it took (its ``mesg=`` counter)."""

    def __init__(self, directory: Path) -> None:
        self.binary = require("/usr/sbin/smtp-sink")
        self.port = free_port()
        self.out = directory / f"sink-{self.port}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sink:
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-c", "-u", "nobody", f"{HOST}:{self.port}", "1024"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: port_open(self.port), timeout=10, what="smtp-sink", proc=self.proc)
        return self

    def count(self) -> int:
        """Messages received so far (smtp-sink rewrites its counter line on each ".")."""
        try:
            with self.out.open("rb") as f:
                f.seek(max(0, f.seek(0, 2) - 256))
                tail = f.read()
        except OSError:
            return 0
        found = re.findall(rb"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid, proc=self.proc, timeout=5)
            self.proc = None


# -- the gateway --------------------------------------------------------------------------------


class GatewayServer:
    """``python -m gateway --config FILE serve`` relaying to ``sink_port`` without TLS."""

    def __init__(
        self,
        directory: Path,
        sink_port: int,
        *,
        max_message_size: int | None = None,
        log_level: str = "warning",
        dkim: bool = True,
        processes: int = 1,
    ) -> None:
        self.dir = directory
        self.port = free_port()
        self.sink_port = sink_port
        self.db = directory / "mailgate.db"
        self.config = directory / "mailgate.toml"
        self.log = directory / "gateway.log"
        self.max_message_size = max_message_size
        self.log_level = log_level
        self.dkim = dkim
        self.processes = processes
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _write_config(self) -> None:
        from gateway.tls import write_self_signed  # this tree's gateway (run from its root)

        tls = self.dir / "tls"
        tls.mkdir(parents=True, exist_ok=True)
        write_self_signed(tls / "cert.pem", tls / "key.pem", hostname="gateway.bench.test")
        size = f"max_message_size = {self.max_message_size}\n" if self.max_message_size else ""
        cert, key, key_dir = tls / "cert.pem", tls / "key.pem", self.dir / "dkim"
        self.config.write_text(
            f"""[server]
hostname = "gateway.bench.test"
data_dir = "{self.dir}"
log_level = "{self.log_level}"
processes = {self.processes}

[database]
url = "sqlite:///{self.db}"

[submission]
listen = "{HOST}"
port = {self.port}
tls_port = 0
cert_file = "{cert}"
key_file = "{key}"
trusted_networks = ["127.0.0.1/32"]
{size}
[relay]
mode = "smarthost"
host = "{HOST}"
port = {self.sink_port}
security = "none"
require_tls = false

[dkim]
enabled = {"true" if self.dkim else "false"}
key_dir = "{key_dir}"

[api]
enabled = false

[crm]
embedded = false
"""
        )

    @staticmethod
    def _env() -> dict[str, str]:
        # Run the gateway of the tree this script is in (also from an exported copy of a commit),
        # whatever ``mailgate`` the venv has installed in editable mode.
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }

    def _cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.dir,
            env=self._env(),
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"mailgate {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def start(self) -> GatewayServer:
        self._write_config()
        if self.dkim:
            self._cli("dkim", "keygen", SENDER_DOMAIN)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--config", str(self.config), "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=self._env(),
            )
        wait_until(
            lambda: port_open(self.port),
            timeout=60,
            what="gateway SMTP port",
            proc=self.proc,
            log=self.log_text,
        )
        return self

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        connection = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return connection.execute(sql).fetchall()
        finally:
            connection.close()

    def queued(self) -> int:
        """Messages not yet through their pipeline (read-only look at the SQLite file)."""
        return int(self._query("SELECT COUNT(*) FROM message WHERE state='queued'")[0][0])

    def states(self) -> dict[str, int]:
        return dict(self._query("SELECT state, COUNT(*) FROM message GROUP BY state"))

    def dkim_signed(self) -> int:
        """Messages whose stored prepend starts with the DKIM-Signature we added."""
        return int(
            self._query(
                "SELECT COUNT(*) FROM message WHERE substr(prepend, 1, 15) = "
                "CAST('DKIM-Signature:' AS BLOB)"
            )[0][0]
        )

    def cpu_seconds(self) -> float:
        # With ``processes > 1`` the extra processes are live children: count them too.
        return cpu_seconds([self.pid, *child_pids(self.pid)])

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid, proc=self.proc, timeout=15)
            self.proc = None


# -- a private Postfix --------------------------------------------------------------------------

# Every service unchrooted (5th column "n"): the instance lives in a temp dir.
_MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
lmtp unix - - n - - lmtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


class PostfixServer:
    """A private Postfix on a free port relaying everything to ``[127.0.0.1]:sink_port``.

    Only what a private relay instance needs is set; throughput-relevant parameters (process
    limits, ``in_flow_delay``, connection caching, fsync of queue files) stay at their defaults.
    """

    def __init__(self, directory: Path, sink_port: int) -> None:
        self.postfix = require("/usr/sbin/postfix")
        self.dir = directory
        self.conf = directory / "conf"
        self.queue = directory / "queue"
        self.data = directory / "data"
        self.log = directory / "maillog"
        self.port = free_port()
        self.sink_port = sink_port
        self.pid: int | None = None

    def _main_cf(self) -> str:
        return (
            "\n".join(
                [
                    "compatibility_level = 3.6",
                    f"queue_directory = {self.queue}",
                    f"data_directory = {self.data}",
                    f"maillog_file = {self.log}",
                    f"maillog_file_prefixes = {self.dir}",
                    "syslog_name = postfix-mailgate-bench",
                    "mail_owner = postfix",
                    "setgid_group = postdrop",
                    "myhostname = postfix.bench.test",
                    "mydomain = bench.test",
                    "inet_interfaces = 127.0.0.1",
                    "inet_protocols = ipv4",
                    "mydestination =",
                    "local_recipient_maps =",
                    "alias_maps =",
                    "alias_database =",
                    f"relayhost = [{HOST}]:{self.sink_port}",
                    "mynetworks = 127.0.0.0/8",
                    "smtpd_relay_restrictions = permit_mynetworks, reject",
                    "smtpd_peername_lookup = no",  # the gateway does no reverse lookups either
                    "message_size_limit = 52428800",
                    "smtp_tls_security_level = none",  # like the gateway's relay.security = "none"
                    "biff = no",
                ]
            )
            + "\n"
        )

    def start(self) -> PostfixServer:
        self.conf.mkdir(parents=True, exist_ok=True)
        (self.conf / "main.cf").write_text(self._main_cf())
        (self.conf / "master.cf").write_text(_MASTER_CF.format(host=HOST, port=self.port))
        self.queue.mkdir(mode=0o755, exist_ok=True)
        self.data.mkdir(exist_ok=True)
        shutil.chown(self.data, "postfix", "postfix")
        self.data.chmod(0o700)
        result = subprocess.run(
            [self.postfix, "-c", str(self.conf), "start"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed: {result.stderr}\n{self.log_text()}")
        pid_file = self.queue / "pid" / "master.pid"
        wait_until(pid_file.exists, timeout=30, what="postfix master.pid", log=self.log_text)
        self.pid = int(pid_file.read_text().split()[0])
        wait_until(
            lambda: port_open(self.port), timeout=30, what="postfix smtpd", log=self.log_text
        )
        return self

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""

    def queue_empty(self) -> bool:
        result = subprocess.run(
            ["/usr/sbin/postqueue", "-c", str(self.conf), "-p"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return "Mail queue is empty" in result.stdout + result.stderr

    def pids(self) -> list[int]:
        return session_pids(self.pid) if self.pid else []

    def cpu_seconds(self) -> float:
        """CPU of every process of the instance, including exited ones the master reaped."""
        return cpu_seconds(self.pids())

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid, timeout=15, group=True)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)  # anything the master left behind
            self.pid = None


@contextlib.contextmanager
def running(*servers: Any) -> Iterator[None]:
    """Start servers in order; stop them in reverse, whatever happens."""
    started: list[Any] = []
    try:
        for server in servers:
            server.start()
            started.append(server)
        yield
    finally:
        for server in reversed(started):
            with contextlib.suppress(Exception):
                server.stop()


def message(size: int, *, sender: str = SENDER, to: str = RECIPIENT, tag: str = "") -> bytes:
    """A plain message of about ``size`` bytes of body, CRLF line ends, with a From header."""
    head = (
        f"From: Bench <{sender}>\r\nTo: <{to}>\r\nSubject: bench {tag}\r\n"
        f"Message-ID: <{tag or 'bench'}.{time.time_ns()}@{SENDER_DOMAIN}>\r\n"
        "Date: Mon, 03 Mar 2025 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.....\r\n"
    return head + line * max(1, size // len(line))
