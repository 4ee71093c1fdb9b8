"""Forwards unwrap to their originals; automatic mail is recognised (no I/O)."""

from __future__ import annotations

from email import message_from_bytes, policy
from pathlib import Path

import pytest

from gateway.capture.meaning import automatic, names_capture_address, unwrap

FORWARDS = Path(__file__).parent / "data" / "forwards"


@pytest.mark.parametrize(
    ("fixture", "form", "sender", "recipients", "date", "message_id"),
    [
        (
            "gmail.eml",
            "gmail",
            "carla@customer.test",
            ("rep@company.test", "bob@customer.test", "dana@customer.test"),
            "Mon, 08 Jan 2024 16:15:00 +0100",
            None,
        ),
        (
            "outlook.eml",
            "outlook",
            "oscar@partner.test",
            ("rep@company.test", "sales@company.test", "legal@partner.test"),
            "Tue, 09 Jan 2024 11:05:00 +0000",
            None,
        ),
        (
            "outlook_new.eml",
            "outlook",
            "pia@prospect.test",
            ("rep@company.test",),
            "Wed, 10 Jan 2024 17:45:00 +0100",
            None,
        ),
        (
            "apple.eml",
            "apple",
            "quentin@customer.test",
            ("rep@company.test",),
            "Thu, 11 Jan 2024 18:20:05 +0100",
            "<order-4711@customer.test>",
        ),
        (
            "attached.eml",
            "attached",
            "ines@customer.test",
            ("rep@company.test",),
            "Fri, 12 Jan 2024 15:59:58 +0100",
            "<invoice-question@customer.test>",
        ),
    ],
)
def test_each_clients_forward_unwraps_to_the_original(
    fixture: str,
    form: str,
    sender: str,
    recipients: tuple[str, ...],
    date: str,
    message_id: str | None,
) -> None:
    raw = (FORWARDS / fixture).read_bytes()
    assert names_capture_address(raw, local_part="log", domain="crm.test")
    original = unwrap(raw)
    assert original is not None
    assert (original.form, original.sender, original.recipients) == (form, sender, recipients)
    parsed = message_from_bytes(original.raw, policy=policy.default)
    assert parsed["Date"] == date  # the original's date, in its own zone or the forward's
    if message_id is not None:
        assert parsed["Message-ID"] == message_id  # the original's own, when the client kept it
    else:
        assert parsed["Message-ID"].endswith(".forwarded@mailgate.invalid>")
        assert unwrap(raw).raw == original.raw  # derived from the fields: the same every time
    body = parsed.get_body(preferencelist=("plain",)).get_content()
    assert "Forwarded" not in body and "Original Message" not in body
    assert b"\r\n" in original.raw and b"\n" not in original.raw.replace(b"\r\n", b"")


def test_the_same_email_forwarded_twice_gets_one_message_id() -> None:
    gmail = (FORWARDS / "gmail.eml").read_bytes()
    again = gmail.replace(b"FYI, see below.", b"Another note on top.").replace(
        b"CAFwd123", b"CAFwd456"
    )
    first, second = unwrap(gmail), unwrap(again)
    assert first is not None and second is not None
    get = lambda raw: message_from_bytes(raw, policy=policy.default)["Message-ID"]  # noqa: E731
    assert get(first.raw) == get(second.raw)


def test_plain_mail_is_no_forward() -> None:
    raw = b"From: rep@company.test\r\nTo: carla@customer.test\r\nSubject: Hi\r\n\r\nHello.\r\n"
    assert unwrap(raw) is None
    assert not names_capture_address(raw, local_part="log", domain="crm.test")


@pytest.mark.parametrize(
    ("headers", "mail_from", "why"),
    [
        (b"Subject: Offer\r\n", "", "null"),
        (
            b"Subject: x\r\nContent-Type: multipart/report; report-type=delivery-status\r\n",
            "a@b.test",
            "multipart/report",
        ),
        (b"Subject: x\r\nAuto-Submitted: auto-replied\r\n", "a@b.test", "Auto-Submitted"),
        (b"Subject: x\r\nX-Autoreply: yes\r\n", "a@b.test", "X-Autoreply"),
        (b"Subject: x\r\nPrecedence: bulk\r\n", "a@b.test", "Precedence"),
        (b"Subject: Out of Office: back Monday\r\n", "a@b.test", "automatic reply"),
        (b"Subject: Automatic reply: Offer\r\n", "a@b.test", "automatic reply"),
        (b"Subject: Vacation reply: Offer\r\n", "a@b.test", "automatic reply"),
    ],
)
def test_automatic_mail_is_recognised(headers: bytes, mail_from: str, why: str) -> None:
    reason = automatic(b"From: a@b.test\r\n" + headers + b"\r\nbody\r\n", mail_from)
    assert reason is not None and why in reason


@pytest.mark.parametrize(
    "headers",
    [
        b"Subject: Fwd: Out of office\r\n",
        b"Subject: Offer\r\nAuto-Submitted: no\r\n",
        b"Subject: Vacation plans for the team\r\nPrecedence: normal\r\n",
    ],
)
def test_people_are_not_mistaken_for_machines(headers: bytes) -> None:
    raw = b"From: a@b.test\r\n" + headers + b"\r\nbody\r\n"
    assert automatic(raw, "a@b.test") is None
