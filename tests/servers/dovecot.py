"""A throwaway Dovecot IMAP server (plus LMTP and a SASL auth socket) for mailbox tests.

:class:`DovecotServer` runs ``dovecot -F -c DIR/dovecot.conf`` as a child process with its own
``base_dir``, ``state_dir``, ``instance_name`` and log under a temp dir. IMAP (and, with TLS,
IMAPS) listens on free loopback ports; users come from a passwd-file that tests edit with
:meth:`add_user` / :meth:`set_password`; every user gets a Maildir with the special-use folders
Sent, Drafts, Trash, Junk and Archive. :meth:`deliver` puts a message into a folder with
``doveadm save`` (which an IDLEing client sees at once). The auth service also listens on a unix
socket (:attr:`auth_socket`) that Postfix can use for SMTP AUTH (``smtpd_sasl_type = dovecot``).
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from tests.servers._process import (
    ServerFailed,
    make_temp_dir,
    read_text,
    register_cleanup,
    require_binary,
    stop_process,
    unregister_cleanup,
    wait_until,
)
from tests.servers.certs import CertFiles
from tests.servers.ports import free_port

SPECIAL_FOLDERS = {
    "Drafts": "\\Drafts",
    "Sent": "\\Sent",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}

_DH_FILE = Path("/usr/share/dovecot/dh.pem")


class DovecotServer:
    """A private Dovecot instance.

    With ``tls`` (certificate files), ``ssl = required``: the IMAP port offers STARTTLS and
    ``imaps_port`` speaks implicit TLS. Without it, plaintext IMAP with plaintext logins allowed
    (``imaps_port`` is None). Note that Dovecot counts a connection whose remote and local
    addresses are equal as secure, so over loopback it accepts LOGIN before STARTTLS even with
    ``ssl = required``: a test that needs "no credentials in clear" must check the client side.
    """

    def __init__(
        self,
        *,
        tls: CertFiles | None = None,
        directory: Path | None = None,
        idle_check_interval: int = 1,
        push_url: str | None = None,
        oauth_userinfo_url: str | None = None,
    ) -> None:
        self.dovecot = require_binary("/usr/sbin/dovecot", "dovecot-imapd")
        self.doveadm_bin = require_binary("/usr/bin/doveadm", "dovecot-imapd")
        self.tls = tls
        self.idle_check_interval = idle_check_interval
        self.push_url = push_url
        self.oauth_userinfo_url = oauth_userinfo_url
        self._own_dir = directory is None
        self.directory = directory if directory is not None else make_temp_dir("dovecot")
        self.config_file = self.directory / "dovecot.conf"
        self.users_dir = self.directory / "users"
        self.mail_dir = self.directory / "mail"
        self.log_file = self.directory / "dovecot.log"
        self.auth_socket = self.directory / "auth-client"
        self.host = "127.0.0.1"
        self.port = free_port()
        self.imaps_port: int | None = free_port() if tls is not None else None
        self.lmtp_port = free_port()
        self._users: dict[str, str] = {}
        self._users_lock = threading.Lock()
        self._users_mtime = 0.0
        self._counter = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- configuration --------------------------------------------------------------------------

    def _config(self) -> str:
        d = self.directory
        if self.tls is not None:
            dh = f"ssl_dh = <{_DH_FILE}\n" if _DH_FILE.exists() else ""
            ssl = (
                "ssl = required\n"
                f"ssl_cert = <{self.tls.cert}\n"
                f"ssl_key = <{self.tls.key}\n"
                f"{dh}"
                "disable_plaintext_auth = yes\n"
            )
            imaps = f"port = {self.imaps_port}"
        else:
            ssl = "ssl = no\ndisable_plaintext_auth = no\n"
            imaps = "port = 0"
        # Push (RFC 5423 events) to an HTTP endpoint on delivery, for the clients that register
        # by METADATA (RFC 5464), as Dovecot's push_notification "ox" driver works.
        push = (
            f"""mail_attribute_dict = file:%h/dovecot-attributes
protocol imap {{
  imap_metadata = yes
}}
protocol lmtp {{
  mail_plugins = $mail_plugins notify push_notification
}}
plugin {{
  push_notification_driver = ox:url={self.push_url} user_from_metadata
}}
"""
            if self.push_url
            else ""
        )
        # OAuth bearer tokens (SASL XOAUTH2 / OAUTHBEARER) checked at the identity provider's
        # userinfo endpoint; passwords stay with the passwd-file.
        mechanisms = "plain login"
        oauth = ""
        if self.oauth_userinfo_url:
            mechanisms = "plain login xoauth2 oauthbearer"
            (d / "oauth2.conf.ext").write_text(
                "introspection_mode = auth\n"
                f"introspection_url = {self.oauth_userinfo_url}\n"
                "username_attribute = email\n"
            )
            oauth = f"""passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {d}/oauth2.conf.ext
}}
"""
        mailboxes = "".join(
            f"  mailbox {name} {{\n    auto = subscribe\n    special_use = {flag}\n  }}\n"
            for name, flag in SPECIAL_FOLDERS.items()
        )
        return f"""\
# Written by tests/servers/dovecot.py for one test session; nothing here is read from /etc.
base_dir = {d}/run
state_dir = {d}/state
instance_name = mailgate-test-{self.port}
log_path = {self.log_file}
info_log_path = {self.log_file}
protocols = imap lmtp
# No stats process: a child waiting for its handshake stalls shutdown by seconds.
stats_writer_socket_path =
listen = 127.0.0.1
{ssl}
auth_mechanisms = {mechanisms}
# Tests of wrong passwords should not wait out Dovecot's default 2 s penalty.
auth_failure_delay = 0
first_valid_uid = 8
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:{self.mail_dir}/%u/Maildir
mailbox_idle_check_interval = {self.idle_check_interval} secs
# Tests create many sessions from one address.
mail_max_userip_connections = 1000
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_dir}/%u
}}
{oauth}userdb {{
  driver = static
  args = uid=mail gid=mail home={self.mail_dir}/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
{mailboxes}}}
service imap-login {{
  inet_listener imap {{
    port = {self.port}
  }}
  inet_listener imaps {{
    {imaps}
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
# No auth penalty (an extra delay of up to 15 s per earlier failed login from the same IP), so
# that a test of a wrong password does not slow down every later login: the auth process
# disables it when it cannot connect to this socket (Dovecot's documented switch).
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  unix_listener {self.auth_socket} {{
    mode = 0666
  }}
}}
{push}"""

    def _user_file(self, name: str) -> Path:
        return self.users_dir / name

    def _write_user(self, name: str, password: str | None) -> None:
        """Write (or, for None, delete) one user's passwd-file, atomically.

        One file per user (the passdb path is ``users/%u``) means a new user is seen at once:
        Dovecot re-checks a passwd-file it already knows at most once a second.
        """
        path = self._user_file(name)
        if password is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(f"{name}:{{PLAIN}}{password}::::::\n")
        tmp.chmod(0o644)
        # Dovecot reloads a known file when its mtime (whole seconds) or size changes: make
        # each rewrite's mtime strictly later than the last.
        mtime = max(float(int(time.time())), self._users_mtime + 1.0)
        os.utime(tmp, (mtime, mtime))
        self._users_mtime = mtime
        tmp.replace(path)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> DovecotServer:
        for sub in ("run", "state"):
            (self.directory / sub).mkdir(exist_ok=True)
        self.mail_dir.mkdir(exist_ok=True)
        shutil.chown(self.mail_dir, "mail", "mail")
        self.users_dir.mkdir(exist_ok=True)
        self.config_file.write_text(self._config())
        with self._users_lock:
            for name, password in self._users.items():
                self._write_user(name, password)
        self._proc = subprocess.Popen(
            [self.dovecot, "-F", "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.directory / "stderr.log").open("wb"),
            start_new_session=True,
        )
        register_cleanup(self)
        try:
            wait_until(
                self._ready,
                timeout=timeout,
                what=f"dovecot on {self.host}:{self.port}",
                process=self._proc,
                log=self.log_text,
            )
        except ServerFailed:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        # A greeting (not just an open port) means the login process has its auth connection;
        # a Dovecot stopped before that point takes seconds to shut down. The master binds every
        # listener (imaps too) before it starts any process, so the imaps port is not probed:
        # a connection dropped before its TLS handshake also slows the shutdown down.
        return (
            _greets(self.host, self.port, b"* OK")
            and _greets(self.host, self.lmtp_port, b"220 ")
            and self.auth_socket.exists()
        )

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM the master by its PID (it stops its children); SIGKILL its group if stuck.

        A clean Dovecot shutdown takes about a second; one caught mid-start can take longer,
        hence the short deadline before SIGKILL (all its state is throwaway).
        """
        if self._proc is not None:
            stop_process(self._proc, timeout=timeout)
            self._proc = None
        unregister_cleanup(self)

    def cleanup(self) -> None:
        """Stop, then delete the instance's directory (if this object made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> DovecotServer:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- users and mail -------------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add a user (names are lower-cased, as Dovecot does); it can log in at once."""
        name = name.lower()
        if any(c in name + password for c in ":\n/") or name.startswith("."):
            raise ValueError("user names and passwords cannot contain ':', '/' or newlines")
        with self._users_lock:
            known = name in self._users
            self._users[name] = password
            self._write_user(name, password)
        if known and self._proc is not None:
            self._wait_auth(name, password, ok=True)

    def set_password(self, name: str, password: str) -> None:
        """Change a user's password; returns once Dovecot accepts the new one."""
        if name.lower() not in self._users:
            raise KeyError(name)
        self.add_user(name, password)

    def remove_user(self, name: str) -> None:
        """Delete a user; returns once Dovecot refuses their password."""
        name = name.lower()
        with self._users_lock:
            password = self._users.pop(name)
            self._write_user(name, None)
        if self._proc is not None:
            self._wait_auth(name, password, ok=False)

    def _wait_auth(self, name: str, password: str, *, ok: bool) -> None:
        # Dovecot re-reads a changed passwd-file within a second; poll until it has.
        def settled() -> bool:
            result = subprocess.run(
                [self.doveadm_bin, "-c", str(self.config_file), "auth", "test", name, password],
                capture_output=True,
                timeout=10,
                check=False,
            )
            return (result.returncode == 0) is ok

        wait_until(settled, timeout=5.0, interval=0.1, what=f"dovecot auth sees {name}")

    def new_user(self, prefix: str = "user", domain: str = "example.test") -> tuple[str, str]:
        """Create a user with a name unique in this server; return (name, password)."""
        n = next(self._counter)
        name = f"{prefix}{n}@{domain}"
        password = f"pw-{n}-{os.urandom(4).hex()}"
        self.add_user(name, password)
        return name, password

    def doveadm(self, *args: str, input: bytes | None = None, timeout: float = 30.0) -> str:
        """Run ``doveadm -c CONF ARGS...``; return its stdout; raise on a non-zero status."""
        result = subprocess.run(
            [self.doveadm_bin, "-c", str(self.config_file), *args],
            input=input,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise ServerFailed(
                f"doveadm {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace')}"
            )
        return result.stdout.decode(errors="replace")

    def deliver(self, user: str, folder: str, raw: bytes) -> None:
        """Save a message into ``folder`` of ``user`` (``doveadm save``), as new mail."""
        self.doveadm("save", "-u", user, "-m", folder, input=raw)

    def create_folder(self, user: str, folder: str) -> None:
        self.doveadm("mailbox", "create", "-u", user, folder)

    def delete_folder(self, user: str, folder: str) -> None:
        """Delete a folder (with its mail): recreating it gives it a new UIDVALIDITY."""
        self.doveadm("mailbox", "delete", "-u", user, "-r", "-Z", folder)

    def log_text(self) -> str:
        return read_text(self.log_file) + read_text(self.directory / "stderr.log")


def _greets(host: str, port: int, greeting: bytes) -> bool:
    """True if a server on host:port answers a new connection with ``greeting``."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as conn:
            return conn.recv(len(greeting)) == greeting
    except OSError:
        return False
