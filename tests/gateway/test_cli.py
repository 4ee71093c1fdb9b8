"""The ``mailgate`` command as an admin uses it: real processes, output read like a person would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def mailgate(
    cwd: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where `mailgate init` has run, as after the README's first command."""
    cwd = tmp_path_factory.mktemp("site")
    result = mailgate(cwd, "init", "--hostname", "example.test")
    assert result.returncode == 0, result.stderr
    assert "admin user: admin@example.test  password: " in result.stdout
    assert "admin API token (shown once): mgt_" in result.stdout
    assert "mailgate serve" in result.stdout
    return cwd


def test_init_writes_a_working_config_database_and_certificate(site: Path) -> None:
    config = (site / "mailgate.toml").read_text()
    assert 'hostname = "example.test"' in config
    assert (site / "var" / "mailgate.db").exists()
    assert (site / "var" / "tls" / "cert.pem").exists()
    # The bundled CRM may send mail through this gateway, with a token of its own.
    crm = (site / "crm.toml").read_text()
    assert "[gateway]\n" in crm and 'url = "http://127.0.0.1:8026"' in crm
    assert 'token = "mgt_' in crm
    assert oct((site / "var" / "tls" / "key.pem").stat().st_mode & 0o777) == "0o600"
    assert mailgate(site, "config", "check").stdout.strip() == "mailgate.toml: OK"
    again = mailgate(site, "init")
    assert again.returncode == 0
    assert "kept the existing config" in again.stdout
    assert "admin exists already: admin@example.test" in again.stdout


def test_users(site: Path) -> None:
    added = mailgate(
        site,
        "user",
        "add",
        "Rep@Example.test",
        "--alias",
        "sales@example.test",
        "--password-stdin",
        stdin="a long enough password\n",
    )
    assert added.returncode == 0, added.stderr
    listing = mailgate(site, "user", "list").stdout
    assert "rep@example.test" in listing
    assert "sales@example.test" in listing
    short = mailgate(
        site, "user", "passwd", "rep@example.test", "--password-stdin", stdin="short\n"
    )
    assert short.returncode == 2
    assert short.stderr == "mailgate: the password is too short: use at least 10 characters\n"
    assert mailgate(site, "user", "disable", "rep@example.test").returncode == 0
    assert "disabled" in mailgate(site, "user", "list").stdout
    duplicate = mailgate(
        site,
        "user",
        "add",
        "rep@example.test",
        "--password-stdin",
        stdin="a long enough password\n",
    )
    assert duplicate.returncode == 2
    assert "exists already" in duplicate.stderr
    unknown = mailgate(site, "user", "disable", "nobody@example.test")
    assert unknown.stderr == (
        "mailgate: no user nobody@example.test; `mailgate user list` shows who exists\n"
    )


def test_dkim_keygen_prints_the_record_and_refuses_to_overwrite(site: Path) -> None:
    made = mailgate(site, "dkim", "keygen", "example.test", "--selector", "s1")
    assert made.returncode == 0, made.stderr
    assert 's1._domainkey.example.test. IN TXT "v=DKIM1; k=rsa; p=' in made.stdout
    again = mailgate(site, "dkim", "keygen", "example.test", "--selector", "s1")
    assert again.returncode == 2
    assert "--force" in again.stderr
    assert "Traceback" not in again.stderr
    ed = mailgate(site, "dkim", "keygen", "example.test", "--selector", "e1", "--ed25519")
    assert "k=ed25519" in ed.stdout
    assert len(mailgate(site, "dkim", "list").stdout.strip().splitlines()) == 2


def test_queue_commands(site: Path) -> None:
    assert mailgate(site, "queue", "list").stdout.strip() == "the queue is empty"
    assert json.loads(mailgate(site, "queue", "list", "--json").stdout) == []
    for command in ("show", "retry", "delete"):
        result = mailgate(site, "queue", command, "0123456789abcdef")
        assert result.returncode == 2
        assert result.stderr.startswith("mailgate: no message 0123456789abcdef")


def test_token_is_for_admins_only(site: Path) -> None:
    mailgate(
        site,
        "user",
        "add",
        "plain@example.test",
        "--password-stdin",
        stdin="a long enough password\n",
    )
    refused = mailgate(site, "token", "create", "plain@example.test")
    assert refused.returncode == 2
    assert "not an admin" in refused.stderr
    token = mailgate(site, "token", "create", "admin@example.test").stdout.strip()
    assert token.startswith("mgt_")


def test_bad_config_is_one_line_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "mailgate.toml").write_text("[relay]\nprot = 25\n")
    result = mailgate(tmp_path, "config", "check")
    assert result.returncode == 2
    assert result.stderr == (
        "mailgate: mailgate.toml: unknown option `relay.prot`; did you mean `relay.port`?\n"
    )
    env_bad = mailgate(tmp_path, "queue", "list", env={"MAILGATE_CONFIG": "missing.toml"})
    assert (
        env_bad.stderr == "mailgate: missing.toml: no such file; run `mailgate init` to write one\n"
    )


def test_serve_without_a_certificate_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "mailgate.toml").write_text(
        "[submission]\nport = 0\ntls_port = 0\n[api]\nenabled = false\n[crm]\nembedded = false\n"
    )
    result = mailgate(tmp_path, "serve")
    assert result.returncode == 2
    assert "cannot load the TLS certificate" in result.stderr
    assert "mailgate init" in result.stderr
    assert "Traceback" not in result.stderr
