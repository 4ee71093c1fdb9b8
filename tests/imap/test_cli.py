"""``mailgate account`` as an admin uses it: real processes, real Dovecot, output read as text."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from tests.servers.certs import TestCA
from tests.servers.dovecot import DovecotServer


def mailgate(cwd: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(cwd / "mailgate.toml"), *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")},
    )


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def inproc(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> object:
    """``mailgate`` in this process (fast); the first commands run as real processes."""

    def run(cwd: Path, *args: str, stdin: str = "") -> Run:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = main(["--config", str(cwd / "mailgate.toml"), *args])
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run


def test_connect_list_test_change_and_remove_a_mailbox(
    tmp_path: Path, dovecot: DovecotServer, ca: TestCA, inproc: Any
) -> None:
    (tmp_path / "mailgate.toml").write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "gw.db"}"\n[imap]\nca_file = "{ca.ca_file}"\n'
    )
    user, password = dovecot.new_user("cli")
    assert dovecot.imaps_port is not None
    add = ["account", "add", user, "--host", "localhost", "--port", str(dovecot.imaps_port)]
    add += ["--shared", "--start", "3m", "--password-stdin"]

    # Without a key nothing can be stored: one line, naming the option and the fix.
    refused = mailgate(tmp_path, *add, stdin=password + "\n")
    assert refused.returncode == 2
    assert refused.stderr.startswith("mailgate: `imap.secret_key` is not set: run `mailgate ")
    assert refused.stderr.count("\n") == 1

    key = mailgate(tmp_path, "account", "keygen")
    assert key.returncode == 0 and key.stdout.startswith('secret_key = "')
    config = (tmp_path / "mailgate.toml").read_text() + key.stdout
    (tmp_path / "mailgate.toml").write_text(config)

    wrong = inproc(tmp_path, *add, stdin="not-it\n")
    assert wrong.returncode == 2
    assert "refused the username or password" in wrong.stderr
    assert wrong.stderr.rstrip().endswith("nothing was stored")

    added = inproc(tmp_path, *add, stdin=password + "\n")
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith(f"connected {user} as acct_")

    listed = inproc(tmp_path, "account", "list")
    assert user in listed.stdout and "connecting" in listed.stdout
    assert password not in listed.stdout + added.stdout

    tested = inproc(tmp_path, "account", "test", user)
    assert tested.returncode == 0, tested.stderr
    assert tested.stdout.startswith(f"logged in to localhost:{dovecot.imaps_port} as {user}")
    assert "Sent" in tested.stdout and "\\Sent" in tested.stdout

    assert "paused" in inproc(tmp_path, "account", "disable", user).stdout
    changed = mailgate(
        tmp_path, "account", "set", user, "--sharing", "custom", "--contact", "c@client.test"
    )
    assert changed.returncode == 0, changed.stderr
    shown = inproc(tmp_path, "account", "show", user).stdout
    assert "sharing          custom" in shown and "status           paused" in shown
    assert "folder 'INBOX'" in shown and password not in shown

    inproc(tmp_path, "account", "passwd", user, "--password-stdin", stdin="other-pw\n")
    failing = inproc(tmp_path, "account", "test", user)
    assert failing.returncode == 2 and "refused the username or password" in failing.stderr
    assert failing.stderr.startswith("mailgate: ") and failing.stderr.count("\n") == 1

    removed = inproc(tmp_path, "account", "remove", user)
    assert removed.returncode == 0 and "disconnected" in removed.stdout
    unknown = inproc(tmp_path, "account", "show", user)
    assert unknown.returncode == 2 and "`mailgate account list` shows them" in unknown.stderr
