"""Connect and test against the real Dovecot: every failure a user can meet, in words."""

from __future__ import annotations

import os
import time

import pytest

from gateway.imap.connection import ConnectionFactory, Endpoint
from gateway.imap.errors import AuthFailed, ConnectFailed, ImapDisabled, TlsFailed
from gateway.imap.presets import load_providers
from gateway.imap.service import probe
from tests.imap.test_sync import message
from tests.servers.certs import TestCA
from tests.servers.dovecot import DovecotServer
from tests.servers.ports import free_port


@pytest.fixture
def factory(ca: TestCA) -> ConnectionFactory:
    return ConnectionFactory(ca_file=ca.ca_file, connect_timeout=5, command_timeout=10)


def test_a_good_login_lists_folders_with_special_use_and_counts(
    factory: ConnectionFactory, dovecot: DovecotServer
) -> None:
    user, password = dovecot.new_user("probe")
    for i in range(3):
        dovecot.deliver(user, "INBOX", message("a@b.test", user, f"{i}.{user}"))
    dovecot.deliver(user, "Sent", message(user, "a@b.test", f"s.{user}"))
    # STARTTLS on the plain port (RFC 3501 section 6.2.1), then LOGIN.
    report = probe(factory, Endpoint("localhost", dovecot.port, "starttls", user), password)
    assert report.ok, report.error
    folders = {f.name: (f.special_use, f.messages) for f in report.folders}
    assert folders["INBOX"] == (None, 3)
    assert folders["Sent"] == ("\\Sent", 1)
    assert folders["Trash"] == ("\\Trash", 0)
    assert folders["Junk"][0] == "\\Junk" and folders["Archive"][0] == "\\Archive"
    assert report.capabilities == {"idle": True, "condstore": True, "qresync": True, "move": True}


def test_a_wrong_password_says_so_with_the_providers_app_password_hint(
    factory: ConnectionFactory, dovecot: DovecotServer
) -> None:
    user, _ = dovecot.new_user("wrong")
    gmail = load_providers()["gmail"]
    assert dovecot.imaps_port is not None
    endpoint = Endpoint(
        "localhost",
        dovecot.imaps_port,
        "ssl",
        user,
        app_password_hint=gmail.app_password_hint,
        imap_disabled_hint=gmail.imap_disabled_hint,
    )
    with pytest.raises(AuthFailed) as failure:
        factory.open(endpoint, "not the password")
    assert "refused the username or password" in failure.value.sentence
    assert "myaccount.google.com/apppasswords" in failure.value.sentence
    assert "not the password" not in failure.value.sentence


def test_imap_switched_off_for_the_mailbox_is_not_called_a_wrong_password(
    factory: ConnectionFactory, dovecot: DovecotServer
) -> None:
    user, password = dovecot.new_user("nologin")
    # Dovecot's passdb can refuse a user with a reason, as a provider with IMAP off does.
    path = dovecot.users_dir / user
    path.write_text(f"{user}:{{PLAIN}}{password}::::::nologin=y reason=IMAP-is-off\n")
    later = time.time() + 5  # Dovecot re-reads a passwd-file whose mtime changed
    os.utime(path, (later, later))
    assert dovecot.imaps_port is not None
    endpoint = Endpoint("localhost", dovecot.imaps_port, "ssl", user)
    deadline = time.monotonic() + 10
    refusal: ImapDisabled | None = None
    while refusal is None:
        try:
            factory.open(endpoint, password).logout()
        except ImapDisabled as exc:
            refusal = exc
        assert time.monotonic() < deadline, "Dovecot never refused the login"
        time.sleep(0.05)
    assert "IMAP access switched off" in refusal.sentence


def test_tls_failures_say_what_to_check(dovecot: DovecotServer) -> None:
    user, password = dovecot.new_user("tls")
    assert dovecot.imaps_port is not None
    # The system's CAs do not know the test CA: an unverifiable certificate.
    stranger = ConnectionFactory(connect_timeout=5)
    with pytest.raises(TlsFailed) as failure:
        stranger.open(Endpoint("localhost", dovecot.imaps_port, "ssl", user), password)
    assert "could not be verified" in failure.value.sentence
    assert "allow an unverified certificate" in failure.value.sentence
    # ...which the explicit switch accepts (and the account then carries a warning).
    unverified = Endpoint(
        "localhost", dovecot.imaps_port, "ssl", user, allow_unverified_certificate=True
    )
    stranger.open(unverified, password).logout()
    # Implicit TLS against the plain port: the handshake fails, and the hint names the fix.
    with pytest.raises(TlsFailed) as failure:
        stranger.open(Endpoint("localhost", dovecot.port, "ssl", user), password)
    assert "check the encryption setting" in failure.value.sentence


def test_unreachable_servers_say_why(factory: ConnectionFactory) -> None:
    with pytest.raises(ConnectFailed) as failure:
        factory.open(Endpoint("no-such-host.invalid", 993, "ssl", "u"), "p")
    assert "no-such-host.invalid was not found" in failure.value.sentence
    port = free_port()
    with pytest.raises(ConnectFailed) as failure:
        factory.open(Endpoint("127.0.0.1", port, "ssl", "u"), "p")
    assert f"refused the connection on port {port}" in failure.value.sentence
