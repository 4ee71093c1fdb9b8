"""Delivery status notifications (RFC 3464): the bounce, or delay warning, sent back to a sender.

:func:`build_dsn` turns the failed :class:`~gateway.relay.RecipientResult` of one message into a
``multipart/report; report-type=delivery-status`` message (RFC 6522): a sentence per recipient for
people, a ``message/delivery-status`` part for programs, and the original's header block (not its
body, to keep bounces small). The worker sends it with the null reverse path (``MAIL FROM:<>``,
RFC 5321 §4.5.5) so that it can never bounce in turn, and :func:`should_bounce` says when a
message may get one at all. The bytes are built by hand rather than through :mod:`email`'s
generator, which would re-fold the original's headers; the tests parse the result with
:mod:`email` to prove the structure.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

from gateway.relay import RecipientResult

CRLF = "\r\n"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_MAX_HEADERS = 64 * 1024
# RFC 6533 §3: in a utf-8 address type these are written as \x{HEX}.
_XTEXT_ESCAPE = re.compile(r"[^\x21-\x7e]|[\\+=]")


def should_bounce(sender: str) -> bool:
    """False for the null reverse path: never answer a bounce with a bounce (RFC 5321 §4.5.5)."""
    return sender.strip() not in ("", "<>")


def build_dsn(
    *,
    original: bytes,
    sender: str,
    failures: Sequence[RecipientResult],
    reporting_mta: str,
    arrival_date: datetime,
    delayed: bool = False,
    from_address: str = "",
) -> bytes:
    """The DSN for ``original`` (from ``sender``) about ``failures``, as CRLF bytes.

    ``delayed`` makes it a warning (``Action: delayed``) instead of a bounce. ``from_address``
    defaults to ``MAILER-DAEMON@reporting_mta`` (``relay.bounce_sender`` overrides it).
    """
    if not should_bounce(sender):
        raise ValueError("no DSN for a message with the null reverse path (RFC 5321 §4.5.5)")
    if not failures:
        raise ValueError("a DSN needs at least one recipient to report on")
    mailer_daemon = from_address or f"MAILER-DAEMON@{reporting_mta}"
    boundary = f"{uuid.uuid4().hex}/{reporting_mta}"
    subject = (
        "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    )
    headers = [
        f"From: Mail Delivery System <{mailer_daemon}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {format_datetime(datetime.now(UTC))}",
        f"Message-ID: <{uuid.uuid4().hex}@{reporting_mta}>",
        # RFC 3834 §5: generated automatically, so auto-responders must not answer it.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;{CRLF} boundary="{boundary}"',
        "Content-Transfer-Encoding: 7bit",
    ]
    parts = [
        _human_part(failures, reporting_mta, delayed=delayed),
        _status_part(failures, reporting_mta, arrival_date, delayed=delayed),
        _headers_part(original),
    ]
    body = "".join(f"--{boundary}{CRLF}{part}{CRLF}" for part in parts) + f"--{boundary}--{CRLF}"
    preamble = f"This is a MIME-encapsulated message.{CRLF}{CRLF}"
    return (CRLF.join(headers) + CRLF + CRLF + preamble + body).encode("utf-8")


def _human_part(failures: Sequence[RecipientResult], reporting_mta: str, *, delayed: bool) -> str:
    if delayed:
        opening = (
            "Your message could not be delivered yet to the recipients below. The mail system "
            "will keep trying; you do not need to send it again."
        )
    else:
        opening = (
            "I'm sorry to have to inform you that your message could not be delivered to one "
            "or more recipients. The reason is given below for each of them."
        )
    lines = [f"This is the mail system at host {reporting_mta}.", "", *_wrap(opening), ""]
    for failure in failures:
        lines += _wrap(f"<{failure.recipient}>: {_sentence(failure)}", indent="    ")
    text = CRLF.join(lines) + CRLF
    return _text_part("text/plain", text.encode("utf-8"))


def _sentence(failure: RecipientResult) -> str:
    reply = _reply_text(failure)
    if failure.remote_mta:
        return f"host {failure.remote_mta} said: {reply}"
    return reply


def _status_part(
    failures: Sequence[RecipientResult],
    reporting_mta: str,
    arrival_date: datetime,
    *,
    delayed: bool,
) -> str:
    # RFC 3464 §2.2: per-message fields, then one block per recipient, blank-line separated.
    blocks = [
        [
            f"Reporting-MTA: dns; {reporting_mta}",
            f"Arrival-Date: {format_datetime(arrival_date)}",
        ]
    ]
    for failure in failures:
        block = [
            f"Final-Recipient: {_address_field(failure.recipient)}",
            f"Action: {'delayed' if delayed else 'failed'}",
            f"Status: {_status(failure, delayed=delayed)}",
        ]
        if failure.remote_mta:
            block.append(f"Remote-MTA: dns; {_ascii(failure.remote_mta)}")
            block.append(_fold(f"Diagnostic-Code: smtp; {_ascii(_reply_text(failure))}"))
        else:  # decided here (DNS, no connection): not a reply any server gave
            block.append(_fold(f"Diagnostic-Code: X-Mailgate; {_ascii(_reply_text(failure))}"))
        blocks.append(block)
    content = CRLF.join(CRLF.join(block) + CRLF for block in blocks)
    return f"Content-Type: message/delivery-status{CRLF}{CRLF}{content}"


def _headers_part(original: bytes) -> str:
    """The original's header block as text/rfc822-headers (RFC 6522 §4), CRLF, 7-bit safe."""
    match = _HEADER_END.search(original)
    block = original[: match.start()] if match else original
    if len(block) > _MAX_HEADERS:  # no blank line in sight: a bounce stays small all the same
        block = block[: block.rfind(b"\n", 0, _MAX_HEADERS) + 1]
    block = _LINE_BREAK.sub(b"\r\n", block).rstrip(b"\r\n") + b"\r\n"
    return _text_part("text/rfc822-headers", block)


def _text_part(content_type: str, data: bytes) -> str:
    if data.isascii():
        head = (
            f"Content-Type: {content_type}; charset=us-ascii{CRLF}Content-Transfer-Encoding: 7bit"
        )
        return f"{head}{CRLF}{CRLF}{data.decode('ascii')}"
    # Keep the DSN itself 7-bit so that it can travel back without 8BITMIME/SMTPUTF8.
    try:
        data.decode("utf-8")
        charset = "utf-8"
    except UnicodeDecodeError:
        charset = "unknown-8bit"  # RFC 1428
    encoded = base64.encodebytes(data).decode("ascii").replace("\n", CRLF)
    head = f"Content-Type: {content_type}; charset={charset}{CRLF}Content-Transfer-Encoding: base64"
    return f"{head}{CRLF}{CRLF}{encoded}"


def _status(failure: RecipientResult, *, delayed: bool) -> str:
    """The RFC 3463 status: the server's own, else one derived from the reply code."""
    enhanced = failure.enhanced
    if delayed:
        return enhanced if enhanced.startswith("4.") else "4.0.0"
    if failure.permanent:
        return enhanced if enhanced.startswith("5.") else "5.0.0"
    # Failed after only temporary errors: the queue lifetime ran out (RFC 3463 X.4.7).
    return "5.4.7"


def _reply_text(failure: RecipientResult) -> str:
    if failure.code == 0:
        return failure.text
    return " ".join(part for part in (str(failure.code), failure.enhanced, failure.text) if part)


def _address_field(address: str) -> str:
    if address.isascii():
        return f"rfc822; {_ascii(address)}"
    _MAX_HEADERS = 64 * 1024
    # RFC 6533 §3: a non-ASCII address is typed utf-8 and escaped to stay 7-bit.
    escaped = _XTEXT_ESCAPE.sub(lambda m: f"\\x{{{ord(m.group()):X}}}", address)
    return f"utf-8; {escaped}"


def _ascii(text: str) -> str:
    """One header-safe line: control characters (CR, LF) go, non-ASCII becomes "?"."""
    return _CONTROL.sub(" ", text).encode("ascii", "replace").decode("ascii").strip()


def _fold(field: str, width: int = 78) -> str:
    """Fold a long field at spaces (RFC 5322 §2.2.3); cap it so no line nears 998 octets."""
    field = field[:2000]
    lines: list[str] = []
    current = ""
    for word in field.split(" "):
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = " " + word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return CRLF.join(line[:990] for line in lines)


def _wrap(text: str, *, indent: str = "", width: int = 76) -> list[str]:
    """Plain-text paragraph wrapping; continuation lines indented by ``indent``."""
    text = _CONTROL.sub(" ", text)[:2000]
    # A "word" longer than a line (a hostile reply) is cut into line-sized pieces.
    words = [w[i : i + width] for w in text.split() for i in range(0, len(w), width)]
    lines: list[str] = []
    current = ""
    for word in words:
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = indent + word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(current)
    return lines
