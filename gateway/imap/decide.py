"""Which scanned emails are worth a body fetch: pure policy, no I/O, mirroring ``match-contacts``.

The sync engine scans headers, asks the CRM about every address it saw, and calls
:func:`worth_logging` per message. The rules are the ones the pipeline's ``match-contacts`` step
applies later to the full message (``hooks/match.py``), so what we fetch is exactly what will be
logged: the account's own addresses never count; excluded domains never count; a contact counts
(only the owner's own contacts under assigned-records-only); and under auto-create a non-contact
counts too — recipients of mail the owner sent ("sent"), or anyone on any mail
("sent_and_received") — unless it is a group address (noreply@, info@, …) or an RFC 5322 group.
Direction is outbound when the From is one of the account's addresses or the folder is the Sent
folder (RFC 6154 ``\\Sent``).
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.imap.headers import HeaderRecord
from gateway.sighting import Direction
from hooks.crm_client import MatchAnswer
from hooks.match import kept


def direction(record: HeaderRecord, own: frozenset[str], *, sent_folder: bool) -> Direction:
    if sent_folder or any(a in own for a in record.from_):
        return "outbound"
    return "inbound"


def candidates(record: HeaderRecord, own: frozenset[str], way: Direction) -> list[str]:
    """Who on this email could be a contact: recipients of sent mail, everyone else on received."""
    recipients = [*record.to, *record.cc, *record.bcc]
    people = recipients if way == "outbound" else [*record.from_, *record.reply_to, *recipients]
    return [a for a in dict.fromkeys(people) if a not in own]


def scan_addresses(records: Iterable[HeaderRecord], own: frozenset[str]) -> list[str]:
    """Every address worth asking the CRM about, once."""
    seen: dict[str, None] = {}
    for record in records:
        for address in record.addresses():
            if address not in own:
                seen[address] = None
    return list(seen)


def worth_logging(people: list[str], answer: MatchAnswer, way: Direction) -> bool:
    """True if ``match-contacts`` would keep at least one of ``people`` for this email."""
    return bool(kept(people, answer, way))
