"""Connect and test against the real Dovecot: every failure a user can meet, in words."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from gateway.imap.connection import ConnectionFactory, Endpoint
from gateway.imap.errors import AuthFailed, ConnectFailed, ImapDisabled, TlsFailed
from gateway.imap.presets import load_providers
from gateway.imap.service import probe
from gateway.imap.settings import ImapSettings
from gateway.imap.sync import Engine
from tests.imap.conftest import Mailbox
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


def test_protocol_pitfalls_uid_star_expunged_between_search_and_fetch_and_unsolicited_replies(
    factory: ConnectionFactory, dovecot: DovecotServer, ca: TestCA
) -> None:
    user, password = dovecot.new_user("pitfall")
    for i in range(6):
        dovecot.deliver(user, "INBOX", message("a@b.test", user, f"{i}.{user}"))
    assert dovecot.imaps_port is not None
    conn = factory.open(Endpoint("localhost", dovecot.imaps_port, "ssl", user), password)
    other = Mailbox(dovecot, ca, user, password).client()
    try:
        selected = conn.examine("INBOX")
        assert selected.exists == 6 and selected.uidnext == 7
        # RFC 3501 section 6.4.8: "UID 7:*" matches the highest UID (6) though it is below 7.
        assert conn.search("UID 7:*").max == 6
        assert not conn.new_uids(6)
        assert list(conn.new_uids(4)) == [5, 6]

        # Found by SEARCH, then expunged by another client before our FETCH; meanwhile the
        # other client also changes flags, which the server reports to us unasked.
        found = conn.new_uids(0)
        other.select_folder("INBOX")
        other.add_flags([1], [b"\\Flagged"])
        other.delete_messages([2, 3])
        other.expunge()
        records = conn.fetch_headers(found)
        # Until our session is told (RFC 3501 section 7.4.1 forbids EXPUNGE during FETCH), the
        # server may still answer for the removed messages, or not: either way nothing fails.
        assert {1, 4, 5, 6} <= {r.uid for r in records} <= set(found)
        bodies = conn.fetch_bodies(found)
        assert {1, 4, 5, 6} <= set(bodies) <= set(found)
        assert bodies[6].startswith(b"From: a@b.test")
        conn.search("UID 1:*")  # the next command that may carry the news
        # The removals were noted from the session's own unsolicited responses.
        reused = conn.reuse_selection("INBOX")
        assert reused is not None and reused.exists == 4
        assert set(reused.vanished) == {2, 3}  # QRESYNC: VANISHED, not sequence numbers

        # Without UIDNEXT (some servers leave it out) the highest UID comes from "UID *".
        async def io(fn: Any, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        engine = Engine(
            store=None,  # type: ignore[arg-type]
            crm=None,  # type: ignore[arg-type]
            outbox=None,
            settings=ImapSettings(),
            io=io,
            metrics=None,  # type: ignore[arg-type]
            on_accepted=lambda _id: None,
        )
        selected.uidnext = None
        assert asyncio.run(engine._highest_uid(conn, selected)) == 6
    finally:
        other.logout()
        conn.logout()
