"""A sighting: one email as one account saw it, the common input of matching and logging.

Every door ends up here. The submission door sees outbound mail from the sending rep; the capture
door sees a BCC'd message (outbound) or the original inside a forward (inbound) for the rep it
proved; IMAP sync sees mail in a rep's or a shared mailbox. The steps before ``match-contacts``
turn a queued message into a :class:`Sighting`; ``match-contacts`` and ``emit`` work only on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Sharing = Literal["private", "custom", "public"]
Direction = Literal["inbound", "outbound"]


@dataclass(frozen=True, slots=True)
class AccountRef:
    """The mailbox (or door) an email was seen in, and who may see its mail in the CRM."""

    id: str
    owner: str  # the rep's email
    kind: Literal["personal", "shared"] = "personal"
    sharing: Sharing = "public"
    selected_contacts: tuple[str, ...] = ()

    def as_meta(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "kind": self.kind,
            "sharing": self.sharing,
            "selected_contacts": list(self.selected_contacts),
        }

    @classmethod
    def from_meta(cls, data: dict[str, Any]) -> AccountRef:
        return cls(
            id=str(data["id"]),
            owner=str(data["owner"]),
            kind=data.get("kind", "personal"),
            sharing=data.get("sharing", "public"),
            selected_contacts=tuple(data.get("selected_contacts", ())),
        )


@dataclass(slots=True)
class Sighting:
    raw: bytes  # the email to log (for a forward: the original, unwrapped)
    account: AccountRef
    direction: Direction
    source: Literal["submission", "capture", "imap", "api"]
    # SPF / DKIM / DMARC verdicts (RFC 8601 result words) where the door checked them.
    authentication: dict[str, str] = field(default_factory=dict)
    # The owner's own addresses: never contacts, whatever the CRM says.
    own_addresses: frozenset[str] = frozenset()
    # Envelope recipients not named in To/Cc (blind copies of submitted mail).
    bcc: list[str] = field(default_factory=list)
    # Filled by match-contacts: the addresses that are (or will become) contacts.
    matched: list[str] = field(default_factory=list)
