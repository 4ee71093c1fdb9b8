"""What a captured message means: a BCC, a forward to unwrap, or automatic mail to drop.

A message that names the capture address in To or Cc was written *to* the CRM: a forward, whose
original is found either as an attached ``message/rfc822`` or inline, in the forms Gmail
("---------- Forwarded message ---------"), Outlook ("-----Original Message-----", or a
"From: … Sent: … To: … Subject:" block under a rule), Apple Mail ("Begin forwarded message:")
and Thunderbird write. An inline original is rebuilt as an RFC 5322 message with its own From,
To, Cc, Date and Subject, and a Message-ID that is the original's when the client kept it (Apple
Mail does) or else derived from a hash of those fields, so that the same email forwarded twice
is the same email. A message that does not name the capture address is a BCC: the rep's own
outbound mail, kept as it is. Bounces (null sender, ``multipart/report``) and auto-replies
(RFC 3834 ``Auto-Submitted``, ``X-Autoreply``, ``Precedence: bulk``, vacation subjects) are
recognised so they are not logged as conversations. No I/O here.
"""

from __future__ import annotations

import email.policy
import hashlib
import html
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import format_datetime, formataddr, getaddresses, parsedate_to_datetime
from html.parser import HTMLParser
from io import BytesIO
from typing import Literal

from gateway.capture.policy import parse_capture_address
from gateway.message import normalise_address, parse_headers

Form = Literal["attached", "gmail", "outlook", "apple", "thunderbird"]

_SMTP = email.policy.SMTP
_RAW_POLICY = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)  # no refolding

# -- automatic mail ----------------------------------------------------------------------------

_VACATION = re.compile(
    r"^\s*(auto(matic)?[ -]?(reply|response|antwort)|out of (the )?office|abwesenheit|"
    r"automatische antwort|r[ée]ponse automatique|autosvar|respuesta autom[áa]tica|"
    r"risposta automatica|fuera de la oficina)\b"
    # "Vacation" and "Absence" alone are ordinary words: only as a whole subject or a prefix.
    r"|^\s*((on )?vacation|absence)( reply| response| notice)?\s*(:|$)",
    re.IGNORECASE,
)
_FORWARD_PREFIX = re.compile(r"^\s*(fwd?|fw|wg|tr|rv|enc|i)\s*:", re.IGNORECASE)


def automatic(raw: bytes, mail_from: str) -> str | None:
    """Why ``raw`` is automatic mail (a bounce or an auto-reply), or None for a person's mail."""
    if mail_from in ("", "<>"):
        return "a bounce or report: the envelope sender is null (RFC 5321 section 4.5.5)"
    headers = parse_headers(raw)
    content_type = str(headers.get("Content-Type", "")).split(";")[0].strip().lower()
    if content_type == "multipart/report":
        return "a delivery or read report (multipart/report, RFC 6522)"
    submitted = str(headers.get("Auto-Submitted", "")).split(";")[0].strip().lower()
    if submitted and submitted != "no":
        return f"an automatic message (Auto-Submitted: {submitted}, RFC 3834)"
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponse"):
        if headers.get(name) is not None:
            return f"an automatic reply ({name})"
    precedence = str(headers.get("Precedence", "")).strip().lower()
    if precedence in ("bulk", "junk", "auto_reply"):
        return f"bulk or automatic mail (Precedence: {precedence})"
    subject = str(headers.get("Subject", ""))
    if _VACATION.match(subject) and not _FORWARD_PREFIX.match(subject):
        return f"an automatic reply (subject {subject.strip()[:60]!r})"
    return None


def names_capture_address(raw: bytes, *, local_part: str, domain: str) -> bool:
    """True when To or Cc names a capture address: the message was written to the CRM."""
    headers = parse_headers(raw)
    values = [str(v) for name in ("To", "Cc") for v in headers.get_all(name, [])]
    return any(
        parse_capture_address(address, local_part=local_part, domain=domain) is not None
        for _, address in getaddresses(values)
    )


# -- forwards ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Original:
    """The message inside a forward."""

    raw: bytes
    sender: str  # its From address, normalised
    form: Form
    recipients: tuple[str, ...] = field(default=())


def unwrap(raw: bytes) -> Original | None:
    """The forwarded original inside ``raw``, or None when there is none."""
    message = BytesParser(policy=email.policy.default).parsebytes(raw)
    attached = _attached(raw)
    if attached is not None:
        return attached
    text = _text_of(message)
    if text is None:
        return None
    found = _inline(text)
    if found is None:
        return None
    form, fields, body = found
    people = {name: _people(fields.get(name, "")) for name in ("from", "to", "cc")}
    if not people["from"]:
        return None
    outer_date = _outer_date(message)
    when = _date(fields.get("date", ""), outer_date)
    subject = fields.get("subject", "").strip()
    mid = _MSGID.search(fields.get("message-id", ""))
    message_id = mid.group(0) if mid else _synthetic_id(people, when, subject)
    original = EmailMessage(policy=_SMTP)
    original["From"] = _format(people["from"][:1])
    if people["to"]:
        original["To"] = _format(people["to"])
    if people["cc"]:
        original["Cc"] = _format(people["cc"])
    if when is not None:
        original["Date"] = format_datetime(when)
    original["Subject"] = subject
    original["Message-ID"] = message_id
    original["X-Mailgate-Unwrapped"] = form  # rebuilt from an inline forward, not the bytes sent
    original.set_content(body.rstrip() + "\n")
    for part in _attachments(message):
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            original.add_attachment(
                payload,
                maintype=part.get_content_maintype(),
                subtype=part.get_content_subtype(),
                filename=part.get_filename() or "attachment",
            )
    sender = normalise_address(people["from"][0][1])
    recipients = tuple(normalise_address(a) for _, a in people["to"] + people["cc"])
    return Original(original.as_bytes(), sender, form, recipients)


def _attached(raw: bytes) -> Original | None:
    """The first attached message (``message/rfc822``, or an ``.eml`` file), bytes as sent."""
    message = BytesParser(policy=email.policy.compat32).parsebytes(raw)
    for part in message.walk():
        inner: Message | None = None
        if part.get_content_type() == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                inner = payload[0]
        elif (part.get_filename() or "").lower().endswith(".eml"):
            data = part.get_payload(decode=True)
            if isinstance(data, bytes) and data:
                inner = BytesParser(policy=email.policy.compat32).parsebytes(data)
        if inner is None:
            continue
        senders = [a for _, a in getaddresses([str(v) for v in inner.get_all("From", [])])]
        if not senders or "@" not in senders[0]:
            continue
        out = BytesIO()
        BytesGenerator(out, mangle_from_=False, policy=_RAW_POLICY).flatten(inner)
        recipients = getaddresses([str(v) for n in ("To", "Cc") for v in inner.get_all(n, [])])
        return Original(
            out.getvalue(),
            normalise_address(senders[0]),
            "attached",
            tuple(normalise_address(a) for _, a in recipients if "@" in a),
        )
    return None


def _text_of(message: EmailMessage) -> str | None:
    """The forward's text: its text/plain body, else its HTML body as text."""
    for preference in (("plain",), ("html",)):
        body = message.get_body(preferencelist=preference)
        if body is None:
            continue
        try:
            content = body.get_content()
        except (LookupError, ValueError):
            continue
        if isinstance(content, str):
            return content if preference == ("plain",) else _html_to_text(content)
    return None


def _attachments(message: EmailMessage) -> Iterable[EmailMessage]:
    for part in message.iter_attachments():
        if part.get_content_type() != "message/rfc822" and part.get_filename():
            yield part


# The markers above a forwarded header block, by client.
_MARKERS: list[tuple[Form, re.Pattern[str]]] = [
    ("gmail", re.compile(r"^[> ]*-{5,} ?Forwarded message ?-{5,}[ \t]*$", re.I | re.M)),
    ("thunderbird", re.compile(r"^[> ]*-{5,} ?Forwarded Message ?-{5,}[ \t]*$", re.I | re.M)),
    ("outlook", re.compile(r"^[> ]*-{3,} ?Original Message ?-{3,}[ \t]*$", re.I | re.M)),
    ("apple", re.compile(r"^[> ]*Begin forwarded message:[ \t]*$", re.I | re.M)),
    # Newer Outlook: a rule of underscores, then From:/Sent:; or the block with no rule at all.
    ("outlook", re.compile(r"^[> ]*_{10,}[ \t]*\n(?=[> ]*\*?From:)", re.I | re.M)),
    ("outlook", re.compile(r"^(?=[> ]*\*?From:[^\n]*\n(?:[^\n]+\n)?[> ]*\*?Sent:)", re.I | re.M)),
]
# Field names as the clients write them, in the languages they are most often set to.
_FIELDS = {
    "from": "from",
    "von": "from",
    "de": "from",
    "da": "from",
    "van": "from",
    "to": "to",
    "an": "to",
    "à": "to",
    "a": "to",
    "para": "to",
    "aan": "to",
    "cc": "cc",
    "subject": "subject",
    "betreff": "subject",
    "objet": "subject",
    "asunto": "subject",
    "oggetto": "subject",
    "onderwerp": "subject",
    "date": "date",
    "sent": "date",
    "datum": "date",
    "gesendet": "date",
    "envoyé": "date",
    "enviado": "date",
    "data": "date",
    "inviato": "date",
    "verzonden": "date",
    "message-id": "message-id",
    "reply-to": "reply-to",
}
_FIELD_LINE = re.compile(r"^\*?([A-Za-zÀ-ÿ-]+):\*?[ \t]*(.*)$")


def _inline(text: str) -> tuple[Form, dict[str, str], str] | None:
    """The earliest forwarded header block in ``text``: its form, fields and the body after it."""
    text = text.replace("\r\n", "\n").replace("\u202f", " ").replace("\xa0", " ")
    best: tuple[int, Form, int] | None = None
    for form, pattern in _MARKERS:
        match = pattern.search(text)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), form, match.end())
    if best is None:
        return None
    _, form, end = best
    lines = text[end:].split("\n")
    fields: dict[str, str] = {}
    last = ""
    start = 0
    while start < len(lines) and not lines[start].strip(" >"):
        start += 1  # blank lines between the marker and the fields
    stop = start
    while stop < len(lines):
        line = re.sub(r"^(> ?)+", "", lines[stop]).rstrip()
        if not line.strip():
            break
        match = _FIELD_LINE.match(line.strip())
        name = _FIELDS.get(match.group(1).lower()) if match else None
        if match and name:
            fields.setdefault(name, match.group(2).strip())
            last = name
        elif last:
            fields[last] += " " + line.strip()  # a long To: list wrapped onto the next line
        else:
            return None
        stop += 1
    if "from" not in fields:
        return None
    body = "\n".join(re.sub(r"^> ?", "", line) for line in lines[stop + 1 :]).strip("\n")
    return form, fields, body


_ADDR = r"[^\s<>\[\]()\"',;:]+@[^\s<>\[\]()\"',;:]+\.[^\s<>\[\]()\"',;:]+"
_BRACKETED = re.compile(rf"(?P<name>[^<>\[\];]*?)\s*(?:<|\[mailto:)(?P<addr>{_ADDR})(?:>|\])")
_BARE = re.compile(_ADDR)
_MSGID = re.compile(r"<[^<>\s@]+@[^<>\s@]+>")


def _people(value: str) -> list[tuple[str, str]]:
    """``Name <a@b>``, ``Name [mailto:a@b]`` (Outlook), ``a@b``; separated by ``,`` or ``;``."""
    value = value.replace("*", " ")
    found: list[tuple[int, str, str]] = []
    rest = value
    for match in _BRACKETED.finditer(value):
        name = match.group("name").strip(" ,;\"'")
        found.append((match.start(), name, match.group("addr")))
        rest = rest.replace(match.group(0), " " * len(match.group(0)), 1)
    for match in _BARE.finditer(rest):
        found.append((match.start(), "", match.group(0)))
    return [(name, addr) for _, name, addr in sorted(found)]


def _format(people: list[tuple[str, str]]) -> str:
    return ", ".join(formataddr((name, addr)) for name, addr in people)


_ZONES = {
    "UTC": 0,
    "GMT": 0,
    "UT": 0,
    "Z": 0,
    "EST": -5,
    "EDT": -4,
    "CST": -6,
    "CDT": -5,
    "MST": -7,
    "MDT": -6,
    "PST": -8,
    "PDT": -7,
    "CET": 1,
    "CEST": 2,
    "BST": 1,
    "EET": 2,
    "EEST": 3,
    "IST": 5.5,
    "JST": 9,
}
_FORMATS = (
    "%b %d, %Y %I:%M %p",
    "%B %d, %Y %I:%M %p",
    "%B %d, %Y %I:%M:%S %p",
    "%b %d, %Y %I:%M:%S %p",
    "%d %B %Y %H:%M:%S",
    "%d %B %Y %H:%M",
    "%d %b %Y %H:%M:%S",
    "%d %b %Y %H:%M",
    "%m/%d/%Y %I:%M %p",
    "%m/%d/%Y %I:%M:%S %p",
    "%d/%m/%Y %H:%M",
    "%d.%m.%Y %H:%M",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
)
_WEEKDAY = re.compile(r"^[A-Za-z]+\.?,\s*")
_ZONE = re.compile(
    r"\s*(?:(?P<name>[A-Z]{1,4})?(?P<offset>[+-]\d{1,2}(?::?\d{2})?)?)\s*$",
)


def _date(value: str, outer: datetime | None) -> datetime | None:
    """A forwarded Date/Sent line as a datetime; its zone, else the forward's own zone."""
    value = value.strip()
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        parsed = None
    if parsed is not None and parsed.tzinfo is not None:
        return parsed
    text = _WEEKDAY.sub("", value).replace(" at ", " ").replace(",,", ",")
    text = re.sub(r"\s+", " ", text).strip()
    zone: timezone | None = None
    match = _ZONE.search(text)
    if match and (match.group("name") in _ZONES or match.group("offset")):
        hours = float(_ZONES.get(match.group("name") or "", 0))
        if match.group("offset"):
            sign = -1 if match.group("offset")[0] == "-" else 1
            digits = match.group("offset")[1:].replace(":", "")
            hh, mm = (digits[:-2], digits[-2:]) if len(digits) > 2 else (digits, "0")
            hours += sign * (int(hh) + int(mm) / 60)
        if match.group("name") in _ZONES or match.group("offset"):
            zone = timezone(timedelta(hours=hours))
            text = text[: match.start()].strip()
    for pattern in _FORMATS:
        try:
            naive = datetime.strptime(text, pattern)  # the zone is applied below
        except ValueError:
            continue
        if zone is None:
            zone = outer.tzinfo if outer is not None and outer.tzinfo else UTC  # type: ignore[assignment]
        return naive.replace(tzinfo=zone)
    return None


def _outer_date(message: EmailMessage) -> datetime | None:
    try:
        return parsedate_to_datetime(str(message.get("Date", "")))
    except (TypeError, ValueError):
        return None


def _synthetic_id(
    people: dict[str, list[tuple[str, str]]], when: datetime | None, subject: str
) -> str:
    """A Message-ID from the original's fields, the same whichever client forwarded it."""
    minute = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M") if when else ""
    recipients = sorted(normalise_address(a) for _, a in people["to"] + people["cc"])
    key = "\n".join(
        [
            normalise_address(people["from"][0][1]),
            ",".join(recipients),
            minute,
            re.sub(r"\s+", " ", subject).strip().lower(),
        ]
    )
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}.forwarded@mailgate.invalid>"


class _Text(HTMLParser):
    _BREAKS = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "blockquote", "hr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script", "head"):
            self._skip += 1
        elif tag in self._BREAKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "head"):
            self._skip = max(0, self._skip - 1)
        elif tag in ("p", "div", "tr", "h1", "h2", "h3"):
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(re.sub(r"[ \t\r\n]+", " ", data))


def _html_to_text(markup: str) -> str:
    parser = _Text()
    parser.feed(markup)
    parser.close()
    lines = [line.strip() for line in html.unescape("".join(parser.parts)).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
