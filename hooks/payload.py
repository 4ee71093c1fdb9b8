"""Build an ``email.logged`` payload from a sighting: mail text made safe for JSON.

Mail is whatever senders wrote: invalid UTF-8, unknown charsets, lone surrogates, NULs, headers
of any length. Everything that goes into the payload passes through :func:`clean`, bodies above
the configured size are cut with ``body_truncated`` set, list lengths are capped, and attachments
travel as metadata with signed, expiring links to the bytes on the gateway.
"""

from __future__ import annotations

import email
import re
from datetime import UTC, datetime
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

from gateway.links import signed_url
from gateway.message import decoded, dedupe_key, is_attachment, normalise_address
from gateway.sighting import Sighting

_MSGID = re.compile(r"<([^<>\s]+)>")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_PARTIES = 500
MAX_REFERENCES = 200
MAX_HEADER = 998


def clean(text: str, limit: int | None = None) -> str:
    """Valid Unicode without NULs or control characters (tabs and newlines stay)."""
    text = text.encode("utf-8", "replace").decode("utf-8", "replace")
    text = _CONTROL.sub("", text)
    return text[:limit] if limit is not None else text


def _truncate(text: str, max_bytes: int) -> tuple[str, bool]:
    """At most ``max_bytes`` of UTF-8, never cutting a character in half."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text, False
    return encoded[:max_bytes].decode("utf-8", "ignore"), True


def _header(message: Message, name: str) -> str:
    value = message.get(name)
    return "" if value is None else decoded(value)


def _parties(message: Message, name: str) -> list[dict[str, str]]:
    values = [str(v) for v in message.get_all(name, [])]
    parties = []
    for display, address in getaddresses(values):
        if "@" not in address:
            continue
        parties.append(
            {"name": clean(decoded(display), 320), "address": normalise_address(address)[:320]}
        )
    return parties[:MAX_PARTIES]


def _date(message: Message, fallback: float) -> datetime:
    try:
        parsed = parsedate_to_datetime(_header(message, "Date"))
    except (TypeError, ValueError, IndexError):
        return datetime.fromtimestamp(fallback, UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset()
    return payload.decode(charset if charset and _known(charset) else "utf-8", "replace")


def _known(charset: str) -> bool:
    try:
        "".encode(charset)
    except LookupError:
        return False
    return True


def build_email_logged(
    sighting: Sighting,
    *,
    message_row_id: str,
    arrived: float,
    max_body: int,
    public_url: str,
    link_secret: str,
    link_lifetime: int,
    key: str | None = None,
) -> dict[str, Any]:
    """``key``: the email's dedupe key when the caller has it already (see ``dedupe_key``)."""
    raw = sighting.raw
    # compat32 parsing: the default policy's structured headers cost ~1 ms per message, and we
    # decode only the few headers we send, ourselves.
    message = email.message_from_bytes(raw)
    key = key or dedupe_key(raw)
    message_id = key.removeprefix("mid:")
    text_body = html_body = ""
    attachments: list[dict[str, Any]] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        if is_attachment(part):
            filename = part.get_filename()
            data = part.get_payload(decode=True)
            index = len(attachments)
            name = decoded(filename) if filename else f"attachment-{index}"
            path = f"/api/v1/messages/{message_row_id}/attachments/{index}"
            attachments.append(
                {
                    "filename": clean(name, 500),
                    "content_type": part.get_content_type()[:200],
                    "size": len(data) if isinstance(data, bytes) else 0,
                    "url": signed_url(public_url, path, secret=link_secret, lifetime=link_lifetime),
                }
            )
        elif part.get_content_type() == "text/plain" and not text_body:
            text_body = _text(part)
        elif part.get_content_type() == "text/html" and not html_body:
            html_body = _text(part)
    text_body, cut_text = _truncate(clean(text_body), max_body)
    html_body, cut_html = _truncate(clean(html_body), max_body)
    truncated = cut_text or cut_html
    references = _MSGID.findall(_header(message, "References"))[-MAX_REFERENCES:]
    in_reply_to = _MSGID.findall(_header(message, "In-Reply-To"))
    senders = _parties(message, "From") or [{"name": "", "address": "unknown@invalid"}]
    bcc = _parties(message, "Bcc") + [
        {"name": "", "address": normalise_address(a)} for a in sighting.bcc
    ]
    return {
        "message_id": clean(message_id, MAX_HEADER),
        "in_reply_to": clean(in_reply_to[0], MAX_HEADER) if in_reply_to else None,
        "references": [clean(r, MAX_HEADER) for r in references],
        "direction": sighting.direction,
        "source": sighting.source,
        "account": {
            "id": sighting.account.id,
            "owner": sighting.account.owner,
            "kind": sighting.account.kind,
            "sharing": sighting.account.sharing,
            "selected_contacts": list(sighting.account.selected_contacts),
        },
        "from": senders[:50],
        "to": _parties(message, "To"),
        "cc": _parties(message, "Cc"),
        "bcc": list({p["address"]: p for p in bcc}.values())[:MAX_PARTIES],
        "subject": clean(_header(message, "Subject"), 10_000),
        "date": _date(message, arrived).isoformat(),
        "text_body": text_body,
        "html_body": html_body,
        "body_truncated": truncated,
        "attachments": attachments,
        "authentication": {
            k: v for k, v in sighting.authentication.items() if k in ("spf", "dkim", "dmarc")
        },
        "matched_contacts": sighting.matched,
        "raw_url": signed_url(
            public_url,
            f"/api/v1/messages/{message_row_id}/raw",
            secret=link_secret,
            lifetime=link_lifetime,
        ),
    }
