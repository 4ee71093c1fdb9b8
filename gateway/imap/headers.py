"""The cheap path through a header scan: FETCH replies and header blocks parsed without imapclient.

Measured on Dovecot with 20,000 messages, imapclient spends about 2.8 s turning an ENVELOPE scan
into Python objects while the server needs 0.2 s: its generic response parser is ~95 % of the
time. A scan only needs a few headers, so we ask for ``BODY.PEEK[HEADER.FIELDS (…)]`` (RFC 3501
§6.4.5; PEEK so no ``\\Seen`` flag is set), take imaplib's raw reply (the literal arrives as one
``bytes`` object), and parse the handful of header lines ourselves: the same scan costs about
0.25 s of reading plus 0.2 s here. Replies are matched by the UID inside them, never by position,
so unsolicited FETCH responses (flag changes of other messages, RFC 3501 §7.4.2) and messages
expunged between SEARCH and FETCH simply do not produce a record.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from functools import lru_cache

from gateway.message import normalise_address

# The headers a scan fetches: enough to decide who is on an email and what it is.
SCAN_FIELDS = ("FROM", "SENDER", "REPLY-TO", "TO", "CC", "BCC", "MESSAGE-ID")
SCAN_ITEM = f"BODY.PEEK[HEADER.FIELDS ({' '.join(SCAN_FIELDS)})]"
_SCAN_REPLY = b"BODY[HEADER.FIELDS"
_BODY_REPLY = b"BODY[]"

_UID = re.compile(rb"[( ]UID (\d+)")
_SIZE = re.compile(rb"[( ]RFC822\.SIZE (\d+)")
_QUOTED_OR_NIL = re.compile(rb'BODY\[[^\]]*\] (?:"((?:[^"\\]|\\.)*)"|NIL)')
_LOGICAL_LINE = re.compile(r"\r?\n(?![ \t])")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_MSGID = re.compile(r"<([^<>\s@]+@[^<>\s@]+)>")
# Without comments, groups or escapes (RFC 5322 §3.2.2, §3.4), a value whose quoted display
# names are blanked out can be split on commas safely.
_HARD_ADDRESSES = re.compile(r"[\\():;]")
_QUOTED = re.compile(r'"[^"]*"')


@dataclass(slots=True)
class HeaderRecord:
    """The participants and identity of one message, from its header scan."""

    uid: int
    from_: list[str] = field(default_factory=list)
    sender: list[str] = field(default_factory=list)
    reply_to: list[str] = field(default_factory=list)
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    message_id: str | None = None  # without angle brackets
    size: int = 0  # RFC822.SIZE, for sizing body fetches

    @property
    def key(self) -> str | None:
        """The dedupe key :func:`gateway.message.dedupe_key` gives the same message, if known."""
        if self.message_id is None:
            return None
        local, _, domain = self.message_id.partition("@")
        return f"mid:{local}@{domain.lower()}"

    def addresses(self) -> list[str]:
        return [*self.from_, *self.sender, *self.reply_to, *self.to, *self.cc, *self.bcc]


def replies(data: Sequence[object], reply: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """``(uid, content, items)`` for each FETCH reply in imaplib's raw ``data`` carrying ``reply``.

    imaplib gives a reply with a literal as ``(b'7 (UID 42 BODY[…] {123}', literal)`` followed by
    the line after the literal (``b')'``, or ``b' UID 42)'`` when the server puts UID last);
    ``items`` is that text around the literal (UID, RFC822.SIZE…). A short value may come as a
    quoted string or NIL instead of a literal (RFC 3501 §4.3).
    """
    pending: tuple[bytes, bytes] | None = None  # (text so far, literal)

    def finished(text: bytes, content: bytes) -> tuple[int, bytes, bytes] | None:
        found = _UID.search(text)
        return (int(found.group(1)), content, text) if found else None

    for item in data:
        if isinstance(item, tuple):
            if pending is not None and (done := finished(*pending)):
                yield done
            prefix, content = item[0], item[1]
            pending = (prefix, content) if reply in prefix else None
            continue
        if not isinstance(item, bytes):
            continue
        if pending is not None:
            text, content = pending
            pending = None
            if not item[:1].isdigit():  # the rest of the same reply, after its literal
                if done := finished(text + item, content):
                    yield done
                continue
            if done := finished(text, content):  # no trailer line before the next reply
                yield done
        if reply in item:  # no literal: a quoted string or NIL
            value = _QUOTED_OR_NIL.search(item)
            text = re.sub(rb"\\(.)", rb"\1", value.group(1) or b"") if value else b""
            if value and (done := finished(item, text)):
                yield done
    if pending is not None and (done := finished(*pending)):
        yield done


def literals(data: Sequence[object], reply: bytes) -> Iterator[tuple[int, bytes]]:
    """``(uid, content)`` pairs of :func:`replies`."""
    for uid, content, _items in replies(data, reply):
        yield uid, content


@lru_cache(maxsize=65536)
def _normalised(address: str) -> str:
    return normalise_address(address)


def parse_addresses(value: str) -> list[str]:
    """Normalised addr-specs in an address header value (display names dropped)."""
    if not _HARD_ADDRESSES.search(value) and value.count('"') % 2 == 0:
        if '"' in value:
            value = _QUOTED.sub(" ", value)  # "Doe, Jane" <jane@x> -> <jane@x>
        out = []
        for part in value.split(","):
            start = part.rfind("<")
            if start >= 0:
                end = part.find(">", start)
                part = part[start + 1 : end if end >= 0 else None]
            part = part.strip()
            if "@" in part and " " not in part:
                out.append(_normalised(part))
        return out
    # Comments, groups, escapes: the email package's (slower, complete) parser.
    return [_normalised(a) for _, a in getaddresses([value]) if "@" in a]


_TARGETS = {
    "from": "from_",
    "sender": "sender",
    "reply-to": "reply_to",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
}


def parse_header_block(uid: int, block: bytes) -> HeaderRecord:
    """A :class:`HeaderRecord` from the header lines a scan returned for one message."""
    record = HeaderRecord(uid=uid)
    # RFC 6532 allows UTF-8 in headers; anything else undecodable only affects display names.
    text = block.decode("utf-8", "replace")
    for line in _LOGICAL_LINE.split(text):
        name, colon, value = line.partition(":")
        if not colon:
            continue
        name = name.strip().lower()
        if "\n" in value:
            value = _FOLD.sub("", value)  # RFC 5322 §2.2.3 unfolding
        if name == "message-id":
            if record.message_id is None:
                found = _MSGID.search(value)
                record.message_id = found.group(1) if found else None
            continue
        target = _TARGETS.get(name)
        if target is not None:
            getattr(record, target).extend(parse_addresses(value))
    return record


def parse_scan(data: Sequence[object]) -> list[HeaderRecord]:
    """Header records from a raw ``UID FETCH (UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (…)])``."""
    records = []
    for uid, block, items in replies(data, _SCAN_REPLY):
        record = parse_header_block(uid, block)
        size = _SIZE.search(items)
        record.size = int(size.group(1)) if size else 0
        records.append(record)
    return records


def parse_bodies(data: Sequence[object]) -> dict[int, bytes]:
    """Whole messages by UID from a raw ``UID FETCH (UID BODY.PEEK[])`` reply."""
    return dict(literals(data, _BODY_REPLY))
