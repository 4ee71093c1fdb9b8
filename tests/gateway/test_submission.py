"""The submission door end to end: real clients in, a real upstream out, DKIM checked in DNS.

The gateway runs in-process (its own loop in a thread) with its SMTP ports on loopback; mail
goes out to a private Postfix (which relays into a recording sink) or, where the peer's own
behaviour does not matter but its replies must be chosen, straight to the sink.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import dkim
import httpx
import pytest

from gateway.dkim import generate_key
from tests.gateway.conftest import (
    REP,
    REP_PASSWORD,
    RunningGateway,
    add_users,
    gateway_settings,
)


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def dkim_key(tmp_path: Path, dns_server: Any) -> Any:
    key = generate_key(tmp_path / "dkim", "example.test", selector="s2026")
    name, _, value = key.txt_record().partition(" IN TXT ")
    dns_server.publish("example.test", [f"{name} 300 IN TXT {value}"])
    return key


@pytest.fixture
def via_postfix(tmp_path: Path, ca: Any, postfix: Any, dkim_key: Any) -> Iterator[RunningGateway]:
    """A gateway relaying through Postfix (STARTTLS, certificate verified) into its sink."""
    settings = gateway_settings(
        tmp_path,
        ca,
        relay={"host": "127.0.0.1", "port": postfix.port, "security": "starttls"},
    )
    token = add_users(settings.database.url)
    gateway = RunningGateway(settings).start()
    gateway.token = token  # type: ignore[attr-defined]
    postfix.sink.clear()
    yield gateway
    gateway.stop()


@pytest.fixture
def via_sink(tmp_path: Path, ca: Any, sink: Any) -> Iterator[RunningGateway]:
    """A gateway relaying straight to a sink whose replies the test chooses."""
    settings = gateway_settings(
        tmp_path,
        ca,
        relay={"host": "127.0.0.1", "port": sink.port, "security": "none", "require_tls": False},
        submission={
            "allow_plaintext_auth_on_loopback": True,
            "max_recipients": 3,
            "max_message_size": 20_000,
        },
    )
    token = add_users(settings.database.url)
    gateway = RunningGateway(settings).start()
    gateway.token = token  # type: ignore[attr-defined]
    yield gateway
    gateway.stop()


def client_context(ca: Any) -> ssl.SSLContext:
    return ca.client_context()


def dns_txt(resolver: Any) -> Any:
    def lookup(name: bytes, timeout: float = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(record.strings) for record in answer)

    return lookup


def submit(
    gateway: RunningGateway, ca: Any, message: bytes, *, to: list[str], sender: str = REP
) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.starttls(context=client_context(ca))
        client.login(REP, REP_PASSWORD)
        return client.sendmail(sender, to, message)


MESSAGE = (
    b"From: Rep <rep@example.test>\r\n"
    b"To: Customer <customer@client.test>\r\n"
    b"Bcc: boss@example.test\r\n"
    b"Subject: Our offer\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b".a line that starts with a dot\r\n"
    b"\r\n"
    b"Best, Rep\r\n"
)


def test_smtplib_starttls_auth_arrives_signed_through_postfix(
    via_postfix: RunningGateway, ca: Any, postfix: Any, dns_server: Any
) -> None:
    with smtplib.SMTP("127.0.0.1", via_postfix.port, timeout=10) as client:
        client.starttls(context=client_context(ca))
        client.login(REP, REP_PASSWORD)
        client.mail(REP)
        client.rcpt("customer@client.test")
        client.rcpt("boss@example.test")
        code, reply = client.data(MESSAGE)
    assert code == 250
    queued_id = reply.decode().rsplit(" ", 1)[-1]

    arrived = postfix.sink.wait_for_rcpt("customer@client.test", timeout=20)
    data = arrived.data
    # Signed by us, and the signature verifies against the record published in DNS.
    assert data.startswith(b"DKIM-Signature:") or b"\nDKIM-Signature:" in data
    assert dkim.verify(data, dnsfunc=dns_txt(dns_server.resolver()))
    headers = message_from_bytes(data)
    assert headers["Message-ID"] == f"<{queued_id}@gw.example.test>"
    assert headers["Date"]
    assert headers["Bcc"] is None
    assert b"\r\n.a line that starts with a dot\r\n" in data
    # The queue knows it went out.
    wait_until(lambda: _state(via_postfix, queued_id) == "done", what="message done")


def _state(gateway: RunningGateway, message_id: str) -> str | None:
    row = httpx.get(
        f"{gateway.api}/api/v1/queue/{message_id}",
        headers={"Authorization": f"Bearer {gateway.token}"},  # type: ignore[attr-defined]
    ).json()
    return row.get("state")


def test_swaks_over_implicit_tls(via_postfix: RunningGateway, postfix: Any) -> None:
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{via_postfix.tls_port}",
            "--tlsc",
            "--auth",
            "LOGIN",
            "--auth-user",
            REP,
            "--auth-password",
            REP_PASSWORD,
            "--from",
            REP,
            "--to",
            "customer@client.test",
            "--header",
            "From: rep@example.test",
            "--header",
            "Subject: swaks test",
            "--body",
            "sent by swaks",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 OK: queued as" in result.stdout
    arrived = postfix.sink.wait_for_rcpt("customer@client.test", timeout=20)
    assert b"sent by swaks" in arrived.data


def test_auth_is_not_offered_or_accepted_without_tls(via_postfix: RunningGateway) -> None:
    with smtplib.SMTP("127.0.0.1", via_postfix.port, timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        assert client.has_extn("starttls")
        blob = base64.b64encode(f"\0{REP}\0{REP_PASSWORD}".encode()).decode()
        code, reply = client.docmd("AUTH", f"PLAIN {blob}")
        assert code == 538
        assert b"5.7.11 Encryption required" in reply


def test_no_relay_without_auth(via_postfix: RunningGateway, postfix: Any) -> None:
    with smtplib.SMTP("127.0.0.1", via_postfix.port, timeout=10) as client:
        client.ehlo()
        code, reply = client.mail(REP)
        assert code == 530
        assert b"5.7.0 Authentication required" in reply
        code, _ = client.rcpt("victim@elsewhere.test")
        assert code >= 500
    assert postfix.sink.messages == []


@pytest.mark.parametrize(
    "trick",
    [
        "victim%elsewhere.test@example.test",
        "@gw.example.test:victim@elsewhere.test",
        "elsewhere.test!victim@example.test",
        '"victim@elsewhere.test"@example.test',
        "victim@[192.0.2.1]",
    ],
)
def test_open_relay_tricks_without_auth(via_sink: RunningGateway, sink: Any, trick: str) -> None:
    with socket.create_connection(("127.0.0.1", via_sink.port), timeout=10) as raw:
        transcript = _converse(
            raw,
            [
                b"EHLO attacker.test",
                b"MAIL FROM:<spammer@elsewhere.test>",
                f"RCPT TO:<{trick}>".encode(),
                b"DATA",
                b"QUIT",
            ],
        )
    assert b"530 5.7.0" in transcript
    assert b"\r\n354 " not in transcript and not transcript.startswith(b"354")
    assert not any(line.startswith(b"250 2.1.5") for line in transcript.split(b"\r\n"))
    assert sink.messages == []


def test_routing_tricks_refused_even_with_auth(via_sink: RunningGateway, ca: Any) -> None:
    with smtplib.SMTP("127.0.0.1", via_sink.port, timeout=10) as client:
        client.starttls(context=client_context(ca))
        client.login(REP, REP_PASSWORD)
        client.mail(REP)
        code, reply = client.rcpt("victim%elsewhere.test@example.test")
        assert code == 553
        assert b"5.1.3" in reply


def test_sending_as_someone_else_is_refused(via_sink: RunningGateway, ca: Any, sink: Any) -> None:
    with smtplib.SMTP("127.0.0.1", via_sink.port, timeout=10) as client:
        client.starttls(context=client_context(ca))
        client.login(REP, REP_PASSWORD)
        code, reply = client.mail("ceo@example.test")
        assert (code, reply[:5]) == (553, b"5.7.1")
        client.rset()
        client.mail(REP)
        client.rcpt("customer@client.test")
        code, reply = client.data(b"From: ceo@example.test\r\nSubject: wire money\r\n\r\nnow\r\n")
        assert (code, reply[:5]) == (550, b"5.7.1")
        client.rset()
        client.mail(REP)
        client.rcpt("customer@client.test")
        code, reply = client.data(
            b"From: rep@example.test\r\nFrom: ceo@example.test\r\nSubject: x\r\n\r\nx\r\n"
        )
        assert code == 550
        # An alias of the user is theirs to send as.
        client.rset()
        client.mail("rep.alias@example.test")
        client.rcpt("customer@client.test")
        code, _ = client.data(b"From: rep.alias@example.test\r\nSubject: ok\r\n\r\nok\r\n")
        assert code == 250
    received = sink.wait_for(1, timeout=10)
    assert len(received) == 1
    assert received[0].mail_from == "rep.alias@example.test"


def _converse(raw: socket.socket, commands: list[bytes], payload: bytes = b"") -> bytes:
    """Send commands one by one (payload after DATA's 354), returning everything read."""
    transcript = bytearray()
    raw.settimeout(10)

    def read_reply() -> bytes:
        chunk = bytearray()
        while True:
            data = raw.recv(65536)
            if not data:
                return bytes(chunk)
            chunk += data
            lines = bytes(chunk).split(b"\r\n")
            complete = [line for line in lines[:-1]]
            if complete and len(complete[-1]) >= 4 and complete[-1][3:4] == b" ":
                return bytes(chunk)

    transcript += read_reply()
    for command in commands:
        raw.sendall(command + b"\r\n")
        reply = read_reply()
        transcript += reply
        if command == b"DATA" and reply.startswith(b"354") and payload:
            raw.sendall(payload)
            transcript += read_reply()
    return bytes(transcript)


SMUGGLING_ENDINGS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\r",
]


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=lambda e: repr(e)[2:-1])
def test_smtp_smuggling_yields_at_most_one_message_and_a_refusal(
    via_sink: RunningGateway, sink: Any, ending: bytes
) -> None:
    auth = base64.b64encode(f"\0{REP}\0{REP_PASSWORD}".encode())
    smuggled = (
        b"From: rep@example.test\r\nSubject: first\r\n\r\nfirst body"
        + ending
        + b"MAIL FROM:<rep@example.test>\r\nRCPT TO:<smuggled@client.test>\r\nDATA\r\n"
        + b"From: rep@example.test\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
    )
    with socket.create_connection(("127.0.0.1", via_sink.port), timeout=10) as raw:
        transcript = _converse(
            raw,
            [
                b"EHLO client.test",
                b"AUTH PLAIN " + auth,
                b"MAIL FROM:<rep@example.test>",
                b"RCPT TO:<customer@client.test>",
                b"DATA",
            ],
            payload=smuggled,
        )
        raw.sendall(b"QUIT\r\n")
    assert b"235 " in transcript
    assert b"\r\n550 5.6.0" in transcript, transcript
    # Nothing was stored, so nothing can ever be relayed: the queue itself is the witness.
    queue = httpx.get(
        f"{via_sink.api}/api/v1/queue",
        headers={"Authorization": f"Bearer {via_sink.token}"},  # type: ignore[attr-defined]
    ).json()["messages"]
    assert len(queue) <= 1
    assert all("smuggled@client.test" not in m["rcpt_tos"] for m in queue)
    assert all("smuggled@client.test" not in m.rcpt_tos for m in sink.messages)


def test_size_and_recipient_limits(via_sink: RunningGateway, ca: Any) -> None:
    with smtplib.SMTP("127.0.0.1", via_sink.port, timeout=10) as client:
        client.starttls(context=client_context(ca))
        client.login(REP, REP_PASSWORD)
        assert client.has_extn("size")
        assert int(client.esmtp_features["size"]) == 20_000
        code, reply = client.mail(REP, ["SIZE=50000"])
        assert code == 552
        assert reply.startswith(b"5.3.4 ")
        client.rset()
        client.mail(REP)
        for n in range(3):
            assert client.rcpt(f"r{n}@client.test")[0] == 250
        code, reply = client.rcpt("r4@client.test")
        assert (code, reply[:5]) == (452, b"4.5.3")
        # Without a SIZE parameter the limit is enforced on the data itself (RFC 1870 §6.3).
        code, reply = client.data(b"From: rep@example.test\r\n\r\n" + (b"y" * 98 + b"\r\n") * 300)
        assert (code, reply) == (552, b"5.3.4 Message too big for this server")


def test_permanent_failure_bounces_to_the_sender(
    via_sink: RunningGateway, ca: Any, sink: Any
) -> None:
    result = submit(via_sink, ca, MESSAGE, to=["customer@client.test", "reject@client.test"])
    assert result == {}
    sink.wait_for_rcpt("customer@client.test", timeout=10)
    dsn = sink.wait_for_rcpt(REP, timeout=10)
    assert dsn.mail_from in ("", "<>")  # the null reverse path, as aiosmtpd records it
    report = dsn.message()
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    assert status
    text = dsn.data.decode("utf-8", "replace")
    assert "reject@client.test" in text
    assert "5.1.1" in text
    assert (
        "customer@client.test"
        not in text.split("text/rfc822-headers")[0].split("message/delivery-status")[1]
    )


def test_temporary_failure_is_retried_and_queue_api(
    via_sink: RunningGateway, ca: Any, sink: Any
) -> None:
    api = httpx.Client(base_url=via_sink.api, headers={"Authorization": f"Bearer {via_sink.token}"})  # type: ignore[attr-defined]
    assert httpx.get(f"{via_sink.api}/api/v1/queue").status_code == 401
    bad = httpx.get(f"{via_sink.api}/api/v1/queue", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    assert "detail" in bad.json()

    sink.set_rcpt_reply("later@client.test", "451 4.3.0 not now")
    submit(via_sink, ca, MESSAGE, to=["later@client.test"])
    queued = wait_until(
        lambda: [m for m in api.get("/api/v1/queue").json()["messages"] if m["attempts"] >= 1],
        what="a deferred attempt",
    )[0]
    shown = api.get(f"/api/v1/queue/{queued['id']}").json()
    assert shown["state"] == "queued"
    assert shown["deliveries"][0]["last_code"] == 451
    assert shown["last_error"].startswith("451")

    sink.set_rcpt_reply("later@client.test", None)
    assert api.post(f"/api/v1/queue/{queued['id']}/retry").status_code == 200
    sink.wait_for_rcpt("later@client.test", timeout=10)
    wait_until(
        lambda: api.get(f"/api/v1/queue/{queued['id']}").json()["state"] == "done",
        what="done after retry",
    )

    metrics = httpx.get(f"{via_sink.api}/metrics").text
    assert 'mailgate_messages_accepted_total{source="submission"} 1.0' in metrics
    assert "mailgate_recipients_deferred_total" in metrics
    assert "mailgate_recipients_relayed_total 1.0" in metrics
    assert 'mailgate_queue_depth{state="done"} 1.0' in metrics
    assert "mailgate_accept_latency_seconds_count 1.0" in metrics
    assert httpx.get(f"{via_sink.api}/healthz").json()["status"] == "ok"

    assert api.delete(f"/api/v1/queue/{queued['id']}").status_code == 200
    missing = api.get(f"/api/v1/queue/{queued['id']}")
    assert missing.status_code == 404
    assert queued["id"] in missing.json()["detail"]
    assert api.get("/api/v1/queue?limit=0").status_code == 422


def test_wrong_password_then_disconnect(via_sink: RunningGateway, ca: Any) -> None:
    with smtplib.SMTP("127.0.0.1", via_sink.port, timeout=10) as client:
        client.starttls(context=client_context(ca))
        client.ehlo()
        blob = base64.b64encode(f"\0{REP}\0wrong".encode()).decode()
        assert client.docmd("AUTH", f"PLAIN {blob}")[0] == 535
        assert client.docmd("AUTH", f"PLAIN {blob}")[0] == 535
        code, _ = client.docmd("AUTH", f"PLAIN {blob}")
        assert code == 421


def test_a_large_message_goes_through_unchanged(tmp_path: Path, ca: Any, sink: Any) -> None:
    settings = gateway_settings(
        tmp_path,
        ca,
        relay={"host": "127.0.0.1", "port": sink.port, "security": "none", "require_tls": False},
    )
    add_users(settings.database.url)
    gateway = RunningGateway(settings).start()
    try:
        body = b"".join(b"%07d " % n + b"x" * 70 + b"\r\n" for n in range(40_000))  # ~3 MB
        message = b"From: rep@example.test\r\nTo: big@client.test\r\nSubject: big\r\n\r\n" + body
        submit(gateway, ca, message, to=["big@client.test"])
        arrived = sink.wait_for_rcpt("big@client.test", timeout=30)
        assert arrived.data.endswith(body)
    finally:
        gateway.stop()
