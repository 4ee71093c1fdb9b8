"""Mail the CRM asks us to send, made into RFC 5322 bytes; no I/O here.

A :class:`Draft` is what a rep wrote in the CRM (who from, to whom, subject, text and HTML
bodies, attachments, the message it answers); :func:`compose` turns it into the bytes that go
into the queue like any submitted message, so signing, relaying and logging treat both alike.
The standard library's ``email`` package does the MIME work: it picks a transfer encoding that
keeps every line under SMTP's 998 octets, encodes non-ASCII names and subjects (RFC 2047) and
filenames (RFC 2231), and refuses header values that contain a line break, so a subject cannot
smuggle in headers. Blind copies never become a header; they are envelope recipients only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from gateway.message import domain_of

_SMTP = policy.SMTP.clone(max_line_length=78)


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str  # "type/subtype"
    data: bytes


@dataclass(frozen=True, slots=True)
class Draft:
    sender: str  # the address in From and in MAIL FROM
    sender_name: str
    to: Sequence[str]
    cc: Sequence[str]
    subject: str
    text: str | None
    html: str | None
    attachments: Sequence[Attachment] = ()
    in_reply_to: str | None = None  # a Message-ID, with or without its angle brackets
    references: Sequence[str] = ()
    reply_to: str | None = None


def new_message_id(sender: str) -> str:
    """``<unique@sender's domain>``: the domain a reader's client attributes the mail to."""
    return make_msgid(domain=domain_of(sender) or None)


def bracketed(message_id: str) -> str:
    message_id = message_id.strip()
    return message_id if message_id.startswith("<") else f"<{message_id}>"


def compose(draft: Draft, *, message_id: str, date: datetime) -> bytes:
    """The message as bytes with CRLF line ends, ready for the queue.

    Raises ``ValueError`` with a sentence for what the ``email`` package refuses (a line break
    in a header value, an address it cannot render).
    """
    message = EmailMessage(policy=_SMTP)
    message["From"] = _address(draft.sender_name, draft.sender)
    if draft.to:
        message["To"] = [_address("", a) for a in draft.to]
    if draft.cc:
        message["Cc"] = [_address("", a) for a in draft.cc]
    if draft.reply_to:
        message["Reply-To"] = _address("", draft.reply_to)
    message["Subject"] = draft.subject
    message["Date"] = format_datetime(date)
    message["Message-ID"] = bracketed(message_id)
    if draft.in_reply_to:
        parent = bracketed(draft.in_reply_to)
        message["In-Reply-To"] = parent
        # RFC 5322 §3.6.4: the parent's References followed by the parent's own id.
        chain = [bracketed(r) for r in draft.references if r.strip()]
        message["References"] = " ".join([*(r for r in chain if r != parent), parent])
    message["MIME-Version"] = "1.0"

    if draft.text is not None:
        message.set_content(draft.text)
        if draft.html is not None:
            message.add_alternative(draft.html, subtype="html")
    elif draft.html is not None:
        message.set_content(draft.html, subtype="html")
    else:
        message.set_content("")
    for attachment in draft.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        message.add_attachment(
            attachment.data,
            maintype=maintype,
            subtype=subtype,
            filename=attachment.filename,
        )
    return message.as_bytes(policy=_SMTP)


def _address(name: str, address: str) -> Address:
    local, _, domain = address.rpartition("@")
    try:
        return Address(display_name=name, username=local, domain=domain)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{address!r} cannot be written as an address: {exc}") from None
