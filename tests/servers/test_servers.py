"""Smoke tests of the throwaway servers: each one really starts, answers and stops.

They use the session fixtures from ``tests/conftest.py`` exactly as other tests do, with real
clients (smtplib, dnspython, imapclient, psycopg, httpx), so a broken fixture fails here first.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import uuid
from email.message import EmailMessage

import dns.resolver
import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from tests.servers._process import pid_alive
from tests.servers.certs import TestCA
from tests.servers.dns import AuthoritativeDns, split_long_txt, split_txt_string, txt_record
from tests.servers.dovecot import DovecotServer
from tests.servers.ports import free_port, port_open
from tests.servers.postfix import PostfixRelay
from tests.servers.postgres import PostgresCluster
from tests.servers.sink import MessageSink
from tests.servers.uvicorn import UvicornServer


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_message(sender: str, recipient: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject
    msg.set_content(f"Body of {subject}.\n")
    return msg


# -- SMTP sink ------------------------------------------------------------------------------------


def test_sink_records_exact_bytes_and_refuses_chosen_recipients(sink: MessageSink) -> None:
    raw = b"From: a@x.test\r\nSubject: exact\r\n\r\n.leading dot\r\nline two\r\n"
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        refused = client.sendmail(
            "a@x.test", ["ok@y.test", "reject@y.test"], raw, mail_options=["SMTPUTF8"]
        )
        assert refused == {"reject@y.test": (550, b"5.1.1 Mailbox unavailable (test sink: reject)")}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as excinfo:
            client.sendmail("a@x.test", ["tempfail@y.test"], raw)
        assert excinfo.value.recipients["tempfail@y.test"][0] == 451

    (got,) = sink.wait_for(1, timeout=5)
    assert got.mail_from == "a@x.test"
    assert got.rcpt_tos == ("ok@y.test",)
    assert got.data == raw  # dot-unstuffed, otherwise byte for byte
    assert got.tls is False
    assert got.message()["Subject"] == "exact"


def test_sink_reply_can_change_while_running(sink: MessageSink) -> None:
    sink.set_rcpt_reply("later@y.test", "452 4.2.2 Mailbox full")
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@x.test", ["later@y.test"], b"Subject: 1\r\n\r\n1\r\n")
        sink.set_rcpt_reply("later@y.test", None)
        client.sendmail("a@x.test", ["later@y.test"], b"Subject: 2\r\n\r\n2\r\n")
    assert sink.wait_for_rcpt("later@y.test").message()["Subject"] == "2"
    with pytest.raises(TimeoutError, match="1 of 2"):
        sink.wait_for(2, timeout=0.2)


def test_sink_offers_starttls(ca: TestCA) -> None:
    with MessageSink(tls_context=ca.server_context(), require_tls=True) as tls_sink:
        with smtplib.SMTP(tls_sink.host, tls_sink.port, timeout=10) as client:
            client.starttls(context=ca.client_context())
            client.sendmail("a@x.test", ["b@y.test"], b"Subject: tls\r\n\r\nx\r\n")
        assert tls_sink.wait_for(1)[0].tls is True


# -- Postfix --------------------------------------------------------------------------------------


def test_postfix_relays_over_starttls_to_its_sink(postfix: PostfixRelay, ca: TestCA) -> None:
    recipient = f"{unique('relayed')}@remote.test"
    with smtplib.SMTP(postfix.host, postfix.port, timeout=10) as client:
        client.starttls(context=ca.client_context())
        client.send_message(make_message("sender@client.test", recipient, "via postfix"))

    got = postfix.sink.wait_for_rcpt(recipient, timeout=10)
    assert got.mail_from == "sender@client.test"
    parsed = got.message()
    assert parsed["Subject"] == "via postfix"
    assert "by relay.mailgate.test (Postfix) with ESMTPS" in str(parsed["Received"])
    assert got.tls is True  # Postfix took up the sink's STARTTLS offer


def test_postfix_bounces_a_5xx_and_retries_a_4xx_quickly(postfix: PostfixRelay) -> None:
    sender = f"{unique('sender')}@client.test"
    rejected = f"{unique('rejected')}@remote.test"
    deferred = f"{unique('deferred')}@remote.test"
    postfix.sink.set_rcpt_reply(rejected, "550 5.1.1 No such user here")
    postfix.sink.set_rcpt_reply(deferred, "451 4.3.0 Not now")
    try:
        with smtplib.SMTP(postfix.host, postfix.port, timeout=10) as client:
            client.sendmail(sender, [rejected], b"Subject: bounce me\r\n\r\nx\r\n")
            client.sendmail(sender, [deferred], b"Subject: defer me\r\n\r\nx\r\n")

        bounce = postfix.sink.wait_for_rcpt(sender, timeout=10)
        assert bounce.mail_from == "<>"
        assert rejected in bounce.data.decode()
        postfix.wait_logged(f"to=<{deferred}>")
        assert "status=deferred" in postfix.log_text()
    finally:
        postfix.sink.set_rcpt_reply(deferred, None)
        postfix.sink.set_rcpt_reply(rejected, None)
    # queue_run_delay and the backoff times are 1-2 s: the retry comes quickly.
    retried = postfix.sink.wait_for_rcpt(deferred, timeout=10)
    assert retried.message()["Subject"] == "defer me"


def test_postfix_auth_relays_only_for_dovecot_users(
    postfix_auth: PostfixRelay, dovecot: DovecotServer, ca: TestCA
) -> None:
    user, password = dovecot.new_user("smtp")
    recipient = f"{unique('authed')}@remote.test"
    with smtplib.SMTP(postfix_auth.host, postfix_auth.port, timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("auth")  # AUTH only after STARTTLS
        client.starttls(context=ca.client_context())
        client.ehlo()
        with pytest.raises(smtplib.SMTPRecipientsRefused) as excinfo:
            client.sendmail(user, [recipient], b"Subject: no auth\r\n\r\nx\r\n")
        assert excinfo.value.recipients[recipient][0] == 554
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(user, "wrong password")
        client.login(user, password)
        client.sendmail(user, [recipient], b"Subject: with auth\r\n\r\nx\r\n")
    got = postfix_auth.sink.wait_for_rcpt(recipient)
    assert got.message()["Subject"] == "with auth"

    assert postfix_auth.tls_port is not None
    with smtplib.SMTP_SSL(
        "localhost", postfix_auth.tls_port, context=ca.client_context(), timeout=10
    ) as client:
        client.login(user, password)
        client.sendmail(user, [recipient], b"Subject: implicit tls\r\n\r\nx\r\n")
    postfix_auth.sink.wait_for(2, where=lambda m: recipient in m.rcpt_tos)


# -- NSD ------------------------------------------------------------------------------------------


def dkim_public_key_b64() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def test_nsd_serves_mx_txt_and_a_dkim_sized_txt(dns_server: AuthoritativeDns) -> None:
    zone = f"{unique('zone')}.test"
    p = dkim_public_key_b64()
    dkim = f"v=DKIM1; k=rsa; p={p}"
    assert len(dkim) > 255
    serial = dns_server.publish(
        zone,
        [
            "@ IN MX 10 mx1",
            "@ IN MX 20 mx2.backup.test.",
            "mx1 IN A 127.0.0.1",
            txt_record("@", "v=spf1 ip4:127.0.0.1 -all"),
            txt_record("sel2048._domainkey", dkim),
        ],
    )
    resolver = dns_server.resolver()

    mx = sorted((r.preference, r.exchange.to_text()) for r in resolver.resolve(zone, "MX"))
    assert mx == [(10, f"mx1.{zone}."), (20, "mx2.backup.test.")]
    spf = [b"".join(r.strings) for r in resolver.resolve(zone, "TXT")]
    assert spf == [b"v=spf1 ip4:127.0.0.1 -all"]
    (key,) = resolver.resolve(f"sel2048._domainkey.{zone}", "TXT")
    assert len(key.strings) == 2 and all(len(s) <= 255 for s in key.strings)
    assert b"".join(key.strings).decode() == dkim
    # Over TCP as well (a big answer a resolver would retry there).
    assert b"".join(resolver.resolve(f"sel2048._domainkey.{zone}", "TXT", tcp=True)[0].strings)
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve(f"missing.{zone}", "A")

    # Publishing again replaces the zone and bumps the serial.
    assert dns_server.publish(zone, ["@ IN MX 5 only"]) == serial + 1
    assert [r.preference for r in resolver.resolve(zone, "MX")] == [5]


def test_nsd_rejects_a_broken_zone(dns_server: AuthoritativeDns) -> None:
    with pytest.raises(ValueError, match="does not load"):
        dns_server.publish(f"{unique('broken')}.test", ["@ IN MX not-a-number mx"])


def test_txt_splitting_counts_escapes_as_one_octet() -> None:
    text = 'a\\"' * 200  # 400 octets on the wire
    pieces = split_txt_string(text)
    assert [len(p.replace('\\"', '"')) for p in pieces] == [255, 145]
    assert "".join(pieces) == text
    assert split_long_txt('@ IN MX 10 "x"') == '@ IN MX 10 "x"'
    assert split_long_txt(f'k IN TXT "{"b" * 300}"') == f'k IN TXT "{"b" * 255}" "{"b" * 45}"'


# -- Dovecot --------------------------------------------------------------------------------------


def test_dovecot_idle_sees_a_delivered_message(dovecot: DovecotServer, ca: TestCA) -> None:
    user, password = dovecot.new_user("imap")
    raw = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: idle\r\n\r\nHello IDLE.\r\n"
    assert dovecot.imaps_port is not None
    with IMAPClient(
        dovecot.host, dovecot.imaps_port, ssl=True, ssl_context=ca.client_context(), timeout=10
    ) as client:
        client.login(user, password)
        special = {name: flags for flags, _, name in client.list_folders() if name != "INBOX"}
        assert special["Sent"] == (b"\\HasNoChildren", b"\\Sent")
        assert set(special) == {"Sent", "Drafts", "Trash", "Junk", "Archive"}
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
        assert b"IDLE" in client.capabilities()
        client.idle()
        dovecot.deliver(user, "INBOX", raw)
        responses = client.idle_check(timeout=10)
        client.idle_done()
        assert (1, b"EXISTS") in responses
        fetched = client.fetch([1], ["BODY.PEEK[]"])
        assert next(iter(fetched.values()))[b"BODY[]"] == raw


def test_dovecot_offers_starttls_and_follows_password_changes(
    dovecot: DovecotServer, ca: TestCA
) -> None:
    user, password = dovecot.new_user("pw")
    dovecot.set_password(user, "new secret")
    with IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=10) as client:
        assert b"STARTTLS" in client.capabilities()
        client.starttls(ca.client_context())
        with pytest.raises(LoginError):
            client.login(user, password)
        client.login(user, "new secret")
    dovecot.remove_user(user)
    with IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=10) as client:
        client.starttls(ca.client_context())
        with pytest.raises(LoginError):
            client.login(user, "new secret")


def test_dovecot_recreated_folder_gets_a_new_uidvalidity(
    dovecot: DovecotServer, ca: TestCA
) -> None:
    user, password = dovecot.new_user("uidv")
    dovecot.create_folder(user, "Projects")
    dovecot.deliver(user, "Projects", b"Subject: one\r\n\r\nx\r\n")
    assert dovecot.imaps_port is not None
    with IMAPClient(
        dovecot.host, dovecot.imaps_port, ssl=True, ssl_context=ca.client_context(), timeout=10
    ) as client:
        client.login(user, password)
        before = client.select_folder("Projects")
        assert before[b"EXISTS"] == 1
        client.close_folder()
        dovecot.delete_folder(user, "Projects")
        dovecot.create_folder(user, "Projects")
        after = client.select_folder("Projects")
    assert after[b"EXISTS"] == 0
    assert after[b"UIDVALIDITY"] != before[b"UIDVALIDITY"]


def test_plaintext_dovecot_starts_and_stops_by_pid() -> None:
    with DovecotServer() as server:
        server.add_user("plain@example.test", "secret")
        with IMAPClient(server.host, server.port, ssl=False, timeout=10) as client:
            client.login("plain@example.test", "secret")
            assert client.select_folder("Trash")[b"EXISTS"] == 0
        pid = server.pid
        assert pid is not None
    assert not pid_alive(pid)
    assert not port_open(server.host, server.port)


# -- PostgreSQL -----------------------------------------------------------------------------------


def test_postgres_gives_each_test_an_empty_database(pg_url: str, postgres: PostgresCluster) -> None:
    assert pg_url.startswith(f"postgresql+psycopg://postgres@127.0.0.1:{postgres.port}/test_")
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE message (id serial PRIMARY KEY, raw bytea NOT NULL)")
        conn.execute("INSERT INTO message (raw) VALUES (%s)", (b"\x00mail",))
        assert conn.execute("SELECT raw FROM message").fetchall() == [(b"\x00mail",)]
    other = postgres.new_database()
    assert other != pg_url
    postgres.drop_database(other)


# -- uvicorn --------------------------------------------------------------------------------------


def test_uvicorn_runs_a_factory_with_env_and_can_be_killed() -> None:
    server = UvicornServer("tests.servers._demo_app:create_app", {"MAILGATE_PROBE": "42"})
    with server:
        reply = httpx.get(f"{server.url}/env/MAILGATE_PROBE", timeout=5)
        assert reply.json() == {"value": "42", "pid": server.pid}
        server.kill()
        assert server.returncode == -9
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/healthz", timeout=5)
        server.start()  # the same port again, as after a crash
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


# -- ports ----------------------------------------------------------------------------------------


def test_free_port_is_free_for_tcp_and_udp() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", port))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", port))
