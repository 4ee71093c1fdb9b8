"""The ``match-contacts`` step: which people in a sighting are (or will become) CRM contacts.

For mail a rep sent, the candidates are its recipients; for mail a rep received, everyone on it
but the rep. The rep's own addresses never count. The CRM answers which candidates are contacts
and with what policy; this step then applies that policy: excluded domains never count, group
addresses (noreply@, info@, …) are never auto-created, assigned-records-only keeps only the
owner's contacts, and auto-create ("sent", or "sent and received") lets a non-contact count so
the CRM can create it. An empty result means the mail is not logged.
"""

from __future__ import annotations

from collections.abc import Iterable
from email.utils import getaddresses

from gateway.message import domain_of, normalise_address, parse_headers
from gateway.sighting import Direction
from gateway.store.queue import QueuedMessage
from hooks.crm_client import CrmClient, MatchAnswer

# Role accounts: a person never reads these as themselves (RFC 2142 names and their cousins).
GROUP_LOCAL_PARTS = frozenset(
    {
        "noreply",
        "no-reply",
        "donotreply",
        "do-not-reply",
        "info",
        "support",
        "sales",
        "admin",
        "administrator",
        "postmaster",
        "mailer-daemon",
        "hostmaster",
        "webmaster",
        "abuse",
        "hello",
        "contact",
        "help",
        "billing",
        "notifications",
        "newsletter",
        "news",
        "marketing",
        "team",
        "office",
        "jobs",
        "careers",
        "bounce",
        "bounces",
        "root",
    }
)


def is_group_address(address: str) -> bool:
    local = address.partition("@")[0].lower().split("+")[0]
    return local in GROUP_LOCAL_PARTS


class MatchContacts:
    name = "match-contacts"
    durable = False

    def __init__(self, crm: CrmClient) -> None:
        self.crm = crm

    async def __call__(self, item: QueuedMessage) -> None:
        sighting = item.sighting
        if sighting is None:
            raise LookupError("match-contacts needs a sighting from an earlier step")
        headers = parse_headers(sighting.raw)

        def field(name: str) -> list[str]:
            values = [str(v) for v in headers.get_all(name, [])]
            return [normalise_address(a) for _, a in getaddresses(values) if "@" in a]

        own = {normalise_address(a) for a in sighting.own_addresses} | {
            normalise_address(sighting.account.owner)
        }
        recipients = field("To") + field("Cc") + [normalise_address(a) for a in sighting.bcc]
        if sighting.direction == "outbound":
            candidates = recipients
        else:
            candidates = field("From") + field("Reply-To") + recipients
        candidates = [a for a in dict.fromkeys(candidates) if a not in own]
        if not candidates:
            sighting.matched = []
            return
        answer = await self.crm.match(candidates, owner=sighting.account.owner)
        sighting.matched = kept(candidates, answer, sighting.direction)


def kept(candidates: Iterable[str], answer: MatchAnswer, direction: Direction) -> list[str]:
    """The candidates the CRM's policy keeps: contacts (the owner's, under assigned-records-only)
    and, where auto-creation allows, people who will become contacts; never excluded domains,
    never a group address as a new contact. IMAP sync asks the same question before fetching."""
    policy = answer.policy
    matched = []
    for address in candidates:
        if domain_of(address) in policy.excluded_domains:
            continue
        contact = answer.contacts.get(address)
        if contact is not None:
            if policy.assigned_records_only and not contact.assigned_to_owner:
                continue
            matched.append(address)
        elif not is_group_address(address) and (
            policy.auto_create == "sent_and_received"
            or (policy.auto_create == "sent" and direction == "outbound")
        ):
            matched.append(address)  # the CRM creates the contact from this mail
    return matched
