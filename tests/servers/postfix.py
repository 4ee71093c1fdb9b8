"""A private Postfix instance that relays everything it accepts to a test SMTP sink.

:class:`PostfixRelay` writes its own ``main.cf``/``master.cf`` under a temp dir (queue, data and
log there too; every service unchrooted), starts it with ``postfix -c DIR/conf start`` and stops
the master by its PID. Its smtpd listens on 127.0.0.1 on a free port and relays to a
:class:`~tests.servers.sink.MessageSink` as ``relayhost``, with the queue tuned to retry within a
second or two. Optionally it offers STARTTLS (and implicit TLS on a second port) with a test
certificate, and optionally requires SMTP AUTH, checked by a Dovecot auth socket (SASL type
``dovecot``). Debian's own Postfix instance is never touched.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.servers._process import (
    ServerFailed,
    make_temp_dir,
    read_text,
    register_cleanup,
    require_binary,
    stop_pid,
    unregister_cleanup,
    wait_until,
)
from tests.servers.certs import CertFiles
from tests.servers.ports import free_port, port_open
from tests.servers.sink import MessageSink

# Every service unchrooted (5th column "n"): the instance lives in a temp dir, not a jail.
_MASTER_CF = """\
{listen} inet n - n - - smtpd
{wrapper}pickup unix n - n 60 1 pickup
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


# (name, group, mode) of each queue subdirectory, from Postfix's own postfix-files list.
_QUEUE_DIRS = [
    ("active", "postfix", 0o700),
    ("bounce", "postfix", 0o700),
    ("corrupt", "postfix", 0o700),
    ("defer", "postfix", 0o700),
    ("deferred", "postfix", 0o700),
    ("flush", "postfix", 0o700),
    ("hold", "postfix", 0o700),
    ("incoming", "postfix", 0o700),
    ("private", "postfix", 0o700),
    ("maildrop", "postdrop", 0o730),
    ("public", "postdrop", 0o710),
    ("pid", "root", 0o755),
    ("saved", "postfix", 0o700),
    ("trace", "postfix", 0o700),
]


class PostfixRelay:
    """A throwaway Postfix relaying to ``sink``.

    - ``tls``: certificate files to offer STARTTLS on ``port`` and implicit TLS on ``tls_port``.
    - ``require_auth``: relay only for SMTP-AUTH'd clients (not for 127.0.0.0/8), checking
      credentials over the Dovecot auth socket ``sasl_socket`` (required then); with ``tls`` set,
      AUTH is offered only after STARTTLS.
    """

    def __init__(
        self,
        sink: MessageSink,
        *,
        tls: CertFiles | None = None,
        require_auth: bool = False,
        sasl_socket: Path | None = None,
        directory: Path | None = None,
        hostname: str = "relay.mailgate.test",
    ) -> None:
        if require_auth and sasl_socket is None:
            raise ValueError("require_auth needs sasl_socket (a Dovecot auth unix_listener)")
        self.postfix = require_binary("/usr/sbin/postfix", "postfix")
        self.sink = sink
        self.tls = tls
        self.require_auth = require_auth
        self.sasl_socket = sasl_socket
        self.hostname = hostname
        self._own_dir = directory is None
        self.directory = directory if directory is not None else make_temp_dir("postfix")
        self.conf_dir = self.directory / "conf"
        self.queue_dir = self.directory / "queue"
        self.data_dir = self.directory / "data"
        self.log_file = self.directory / "maillog"
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tls_port: int | None = free_port() if tls is not None else None
        self.pid: int | None = None

    # -- configuration --------------------------------------------------------------------------

    def _main_cf(self) -> str:
        lines = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue_dir}",
            f"data_directory = {self.data_dir}",
            f"maillog_file = {self.log_file}",
            f"maillog_file_prefixes = {self.directory}",
            "syslog_name = postfix-mailgate-test",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            f"myhostname = {self.hostname}",
            "mydomain = mailgate.test",
            "myorigin = $myhostname",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            # A pure relay: nothing is local, everything goes to the sink.
            "mydestination =",
            "local_recipient_maps =",
            "alias_maps =",
            "alias_database =",
            "local_transport = error:5.1.1 no local delivery on the test relay",
            f"relayhost = [127.0.0.1]:{self.sink.port}",
            "mynetworks = 127.0.0.0/8",
            "smtpd_peername_lookup = no",
            "biff = no",
            "message_size_limit = 52428800",
            # Retry within a second or two so that tests see delivery (and redelivery) quickly.
            "queue_run_delay = 1s",
            "minimal_backoff_time = 1s",
            "maximal_backoff_time = 2s",
            "in_flow_delay = 0",
            "delay_warning_time = 0",
            "smtp_connect_timeout = 5s",
            "smtpd_error_sleep_time = 0",
            "smtpd_soft_error_limit = 100",
            "smtpd_hard_error_limit = 1000",
            "smtp_tls_security_level = may",
        ]
        if self.require_auth:
            assert self.sasl_socket is not None
            lines += [
                "smtpd_relay_restrictions = permit_sasl_authenticated, reject",
                "smtpd_sasl_auth_enable = yes",
                "smtpd_sasl_type = dovecot",
                f"smtpd_sasl_path = {self.sasl_socket}",
                "smtpd_sasl_authenticated_header = yes",
                f"smtpd_tls_auth_only = {'yes' if self.tls is not None else 'no'}",
            ]
        else:
            lines.append(
                "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject"
            )
        if self.tls is not None:
            lines += [
                "smtpd_tls_security_level = may",
                f"smtpd_tls_cert_file = {self.tls.cert}",
                f"smtpd_tls_key_file = {self.tls.key}",
                "smtpd_tls_received_header = yes",
            ]
        return "\n".join(lines) + "\n"

    def _master_cf(self) -> str:
        wrapper = ""
        if self.tls_port is not None:
            wrapper = (
                f"127.0.0.1:{self.tls_port} inet n - n - - smtpd\n"
                "  -o smtpd_tls_wrappermode=yes\n"
                "  -o smtpd_tls_security_level=encrypt\n"
            )
        return _MASTER_CF.format(listen=f"127.0.0.1:{self.port}", wrapper=wrapper)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> PostfixRelay:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        past = time.time() - 60
        for name, text in (("main.cf", self._main_cf()), ("master.cf", self._master_cf())):
            path = self.conf_dir / name
            path.write_text(text)
            # Postfix waits (in 300 ms steps) until a just-written main.cf is a few seconds old,
            # in case an editor is still writing it; backdate the files to skip that wait.
            os.utime(path, (past, past))
        self._create_directories()
        status, output = _run_with_tty_stderr(
            [self.postfix, "-c", str(self.conf_dir), "start"], timeout=timeout
        )
        if status != 0:
            raise ServerFailed(f"postfix start failed ({status}): {output}\n{self.log_text()}")
        pid_file = self.queue_dir / "pid" / "master.pid"
        wait_until(pid_file.exists, timeout=timeout, what="postfix master.pid", log=self.log_text)
        self.pid = int(pid_file.read_text().split()[0])
        register_cleanup(self)
        ports = [self.port] + ([self.tls_port] if self.tls_port is not None else [])
        wait_until(
            lambda: all(port_open(self.host, p) for p in ports),
            timeout=timeout,
            what=f"postfix smtpd on {self.host}:{self.port}",
            log=self.log_text,
        )
        return self

    def _create_directories(self) -> None:
        """Make the queue and data directories as ``post-install create-missing`` would.

        Doing it here, and leaving a ``quick-start`` file, lets ``postfix start`` skip its
        integrity-check shell scripts, which take about two seconds of ``postconf`` calls.
        """
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        self.queue_dir.chmod(0o755)
        for name, group, mode in _QUEUE_DIRS:
            path = self.queue_dir / name
            path.mkdir(exist_ok=True)
            shutil.chown(path, "root" if name == "pid" else "postfix", group)
            path.chmod(mode)
        self.data_dir.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        self.data_dir.chmod(0o700)
        (self.queue_dir / "quick-start").touch()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the master by its PID (it takes its children along); SIGKILL the group if stuck."""
        if self.pid is not None:
            # On SIGTERM the master terminates its children itself.
            stop_pid(self.pid, timeout=timeout, sig=signal.SIGTERM, group=True)
            self.pid = None
        unregister_cleanup(self)

    def cleanup(self) -> None:
        """Stop, then delete the instance's directory (if this object made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostfixRelay:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- operating it ---------------------------------------------------------------------------

    def log_text(self) -> str:
        """Postfix's own log (``maillog_file``), for debugging a test."""
        return read_text(self.log_file)

    def queue_text(self) -> str:
        """``postqueue -p`` output: what is still queued (deferred or active)."""
        return self._postqueue("-p")

    def flush(self) -> None:
        """Ask Postfix to retry every deferred message now."""
        self._postqueue("-f")

    def wait_queue_empty(self, timeout: float = 10.0) -> None:
        """Wait until nothing is left in the queue (delivered or bounced)."""
        wait_until(
            lambda: "Mail queue is empty" in self.queue_text(),
            timeout=timeout,
            interval=0.1,
            what="postfix queue to drain",
            log=self.queue_text,
        )

    def _postqueue(self, flag: str) -> str:
        result = subprocess.run(
            ["/usr/sbin/postqueue", "-c", str(self.conf_dir), flag],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")

    def wait_logged(self, needle: str, timeout: float = 10.0) -> str:
        """Wait until ``needle`` appears in the maillog; return the log text."""
        wait_until(
            lambda: needle in self.log_text(),
            timeout=timeout,
            interval=0.05,
            what=f"postfix log line containing {needle!r}",
            log=self.log_text,
        )
        return self.log_text()


def _run_with_tty_stderr(argv: list[str], *, timeout: float) -> tuple[int, str]:
    """Run a Postfix command; return its status and what it printed.

    Postfix commands print their fatal errors to stderr only when it is a terminal (otherwise
    only to syslog, which a test box may not have), so give them a pseudo-terminal.
    """
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, close_fds=True
        )
    finally:
        os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                proc.kill()
                raise ServerFailed(f"{argv} did not finish in {timeout}s")
            ready, _, _ = select.select([leader], [], [], min(remaining, 0.1))
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: every writer closed the terminal
                    chunk = b""
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:
                break
        status = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        os.close(leader)
    return status, b"".join(chunks).decode(errors="replace").strip()
