"""DSNs (RFC 3464) parsed back with the email package, and one sent through the Relay to a sink."""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
from datetime import UTC, datetime, timedelta, timezone
from email.message import Message

import pytest

from gateway.dsn import build_dsn, should_bounce
from gateway.relay import RecipientResult, Relay
from gateway.settings import RelaySettings
from tests.servers.sink import MessageSink

ORIGINAL = (
    b"From: Rep <rep@corp.test>\r\n"
    b"To: buyer@client.test, gone@client.test\r\n"
    b"Subject: Our offer\r\n"
    b"Message-ID: <offer-1@corp.test>\r\n"
    b"\r\n"
    b"SECRET BODY that a bounce must not carry.\r\n"
)
ARRIVAL = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))
USER_UNKNOWN = RecipientResult(
    "gone@client.test", 550, "Mailbox unavailable", "5.1.1", "mx.client.test"
)
NO_CONNECTION = RecipientResult(
    "late@other.test", 0, "cannot connect to mx.other.test[192.0.2.1]:25: timed out", "4.4.1"
)
NULL_MX = RecipientResult("x@nomail.test", 556, "domain nomail.test accepts no mail", "5.1.10")


def parse(raw: bytes) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def dsn(*failures: RecipientResult, delayed: bool = False, **extra: str) -> bytes:
    return build_dsn(
        original=ORIGINAL,
        sender="rep@corp.test",
        failures=list(failures),
        reporting_mta="gw.mailgate.test",
        arrival_date=ARRIVAL,
        delayed=delayed,
        **extra,
    )


def report_parts(raw: bytes) -> tuple[email.message.EmailMessage, list[Message]]:
    message = parse(raw)
    parts = message.get_payload()
    assert isinstance(parts, list)
    return message, parts


def status_blocks(raw: bytes) -> list[Message]:
    _, parts = report_parts(raw)
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    return blocks


def test_structure_is_a_multipart_report_with_three_parts() -> None:
    message, parts = report_parts(dsn(USER_UNKNOWN))
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not message.defects
    assert all(not p.defects for p in parts)


def test_envelope_headers_mailer_daemon_auto_submitted_and_fresh_message_id() -> None:
    first, second = parse(dsn(USER_UNKNOWN)), parse(dsn(USER_UNKNOWN))
    assert first["From"].addresses[0].addr_spec == "MAILER-DAEMON@gw.mailgate.test"
    assert first["To"].addresses[0].addr_spec == "rep@corp.test"
    assert first["Auto-Submitted"] == "auto-replied"  # RFC 3834 §5
    assert first["Subject"] == "Undelivered Mail Returned to Sender"
    assert first["Message-ID"].endswith("@gw.mailgate.test>")
    assert first["Message-ID"] != second["Message-ID"]
    assert first["Date"].datetime.tzinfo is not None
    assert first["MIME-Version"] == "1.0"


def test_bounce_sender_can_be_configured() -> None:
    message = parse(dsn(USER_UNKNOWN, from_address="postmaster@corp.test"))
    assert message["From"].addresses[0].addr_spec == "postmaster@corp.test"


def test_human_part_names_the_host_and_each_recipient_with_the_reply() -> None:
    _, parts = report_parts(dsn(USER_UNKNOWN, NO_CONNECTION))
    text = parts[0].get_content()
    assert text.startswith("This is the mail system at host gw.mailgate.test.")
    assert "<gone@client.test>: host mx.client.test said: 550 5.1.1 Mailbox unavailable" in text
    assert "<late@other.test>: cannot connect to mx.other.test[192.0.2.1]:25: timed out" in text


def test_per_message_fields() -> None:
    per_message = status_blocks(dsn(USER_UNKNOWN))[0]
    assert per_message["Reporting-MTA"] == "dns; gw.mailgate.test"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL


def test_per_recipient_fields_for_remote_and_local_failures() -> None:
    blocks = status_blocks(dsn(USER_UNKNOWN, NO_CONNECTION, NULL_MX))
    assert len(blocks) == 4
    remote, expired, null_mx = blocks[1:]
    assert remote["Final-Recipient"] == "rfc822; gone@client.test"
    assert remote["Action"] == "failed"
    assert remote["Status"] == "5.1.1"
    assert remote["Remote-MTA"] == "dns; mx.client.test"
    assert remote["Diagnostic-Code"] == "smtp; 550 5.1.1 Mailbox unavailable"
    # Still temporary when the queue gave up: the lifetime ran out (RFC 3463 X.4.7).
    assert expired["Status"] == "5.4.7"
    assert expired["Remote-MTA"] is None
    assert expired["Diagnostic-Code"].startswith("X-Mailgate; cannot connect to mx.other.test")
    assert null_mx["Status"] == "5.1.10"
    assert null_mx["Diagnostic-Code"] == "X-Mailgate; 556 5.1.10 domain nomail.test accepts no mail"


def test_delay_warning_says_delayed_with_4xx_status() -> None:
    raw = dsn(NO_CONNECTION, delayed=True)
    message = parse(raw)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    block = status_blocks(raw)[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert "will keep trying" in report_parts(raw)[1][0].get_content()


def test_original_headers_are_included_but_not_the_body() -> None:
    raw = dsn(USER_UNKNOWN)
    _, parts = report_parts(raw)
    headers = parts[2].get_content()
    assert "Message-ID: <offer-1@corp.test>" in headers
    assert "Subject: Our offer" in headers
    assert b"SECRET BODY" not in raw


def test_eight_bit_original_headers_keep_the_dsn_seven_bit() -> None:
    original = "Subject: Grüße\nFrom: rep@corp.test\n\nbody\n".encode()
    raw = build_dsn(
        original=original,
        sender="rep@corp.test",
        failures=[USER_UNKNOWN],
        reporting_mta="gw.mailgate.test",
        arrival_date=ARRIVAL,
    )
    assert raw.isascii()
    headers_part = report_parts(raw)[1][2]
    assert "Subject: Grüße\r\n" in headers_part.get_payload(decode=True).decode()


def test_non_ascii_recipient_is_escaped_as_utf8_address_type() -> None:
    failure = RecipientResult("jörg@c.test", 553, "needs SMTPUTF8", "5.6.7", "mx.c.test")
    raw = dsn(failure)
    assert raw.isascii()
    assert status_blocks(raw)[1]["Final-Recipient"] == "utf-8; j\\x{F6}rg@c.test"  # RFC 6533 §3


def test_output_is_crlf_with_short_lines_even_for_hostile_replies() -> None:
    hostile = RecipientResult(
        "a@c.test", 550, "x" * 3000 + "\r\nInjected: header\r\n" + "word " * 400, "5.0.0", "mx"
    )
    raw = dsn(hostile)
    assert raw.count(b"\n") == raw.count(b"\r\n")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998  # RFC 5322 §2.1.1
    block = status_blocks(raw)[1]
    assert block["Injected"] is None  # the reply's CRLF did not start a new field
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.0.0 xxx")


def test_should_bounce_and_refusal_to_bounce_a_bounce() -> None:
    assert should_bounce("rep@corp.test")
    assert not should_bounce("")
    assert not should_bounce("<>")
    with pytest.raises(ValueError, match="null reverse path"):
        build_dsn(
            original=ORIGINAL,
            sender="",
            failures=[USER_UNKNOWN],
            reporting_mta="gw.mailgate.test",
            arrival_date=ARRIVAL,
        )


def test_dsn_goes_out_with_the_null_reverse_path_and_arrives_intact() -> None:
    raw = build_dsn(
        original=ORIGINAL,
        sender="rep@corp.test",
        failures=[USER_UNKNOWN],
        reporting_mta="gw.mailgate.test",
        arrival_date=datetime.now(UTC),
    )

    async def send(port: int) -> list[RecipientResult]:
        relay = Relay(RelaySettings(port=port, security="none"), hostname="gw.mailgate.test")
        try:
            return await relay.send("", ["rep@corp.test"], raw)
        finally:
            await relay.aclose()

    with MessageSink() as sink:
        results = asyncio.run(send(sink.port))
        (received,) = sink.wait_for(1, 10)
    assert results[0].delivered
    assert received.mail_from == "<>"
    assert received.data == raw
    assert received.message().get_content_type() == "multipart/report"
