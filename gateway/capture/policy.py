"""What the capture door takes, and as whom it may log it: pure decisions, no protocol, no I/O.

The door's handler and the ``identify-owner`` step ask the same questions here, so the rule is
written once: a message is logged as rep R only if its one From address is R's and an SPF or
DKIM pass aligns with the From domain (DMARC's test, RFC 7489 §3.1), or if it came to R's secret
``log+TOKEN@`` address. Every refusal maps to one reply in :data:`REPLIES`, with an RFC 3463
enhanced code and a sentence that says what to do. Nothing here imports aiosmtpd.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from enum import Enum

from gateway.smtp import policy as smtp_policy


class Verdict(Enum):
    ACCEPT = "accept"
    BAD_ADDRESS = "bad-address"
    SOURCE_ROUTE = "source-route"
    NOT_CAPTURE_ADDRESS = "not-capture-address"
    TOO_MANY_RECIPIENTS = "too-many-recipients"
    BARE_LINE_ENDING = "bare-line-ending"
    NUL_CHARACTER = "nul-character"
    FROM_MISSING = "from-missing"
    FROM_SEVERAL_HEADERS = "from-several-headers"
    FROM_SEVERAL_ADDRESSES = "from-several-addresses"
    FROM_INVALID = "from-invalid"
    SEVERAL_OWNERS = "several-owners"
    STRANGER = "stranger"
    UNPROVEN = "unproven"
    DNS_TEMPORARY = "dns-temporary"
    STORE_UNAVAILABLE = "store-unavailable"


# One place for every reply of the capture door.
REPLIES: dict[Verdict, str] = {
    Verdict.ACCEPT: "250 2.0.0 OK",
    Verdict.BAD_ADDRESS: smtp_policy.REPLIES[smtp_policy.Verdict.BAD_ADDRESS],
    Verdict.SOURCE_ROUTE: smtp_policy.REPLIES[smtp_policy.Verdict.SOURCE_ROUTE],
    Verdict.NOT_CAPTURE_ADDRESS: "550 5.1.1 No such recipient here: this server only takes mail "
    "for the CRM's capture addresses",
    Verdict.TOO_MANY_RECIPIENTS: "452 4.5.3 Too many capture addresses in one message",
    Verdict.BARE_LINE_ENDING: smtp_policy.REPLIES[smtp_policy.Verdict.BARE_LINE_ENDING],
    Verdict.NUL_CHARACTER: smtp_policy.REPLIES[smtp_policy.Verdict.NUL_CHARACTER],
    Verdict.FROM_MISSING: "550 5.7.1 Message refused: it has no From header, so nobody can be "
    "shown to have sent it",
    # RFC 7489 §6.6.1: several From fields or addresses make the author ambiguous.
    Verdict.FROM_SEVERAL_HEADERS: "550 5.7.1 Message refused: it has more than one From header, "
    "so its author is ambiguous (RFC 7489 section 6.6.1)",
    Verdict.FROM_SEVERAL_ADDRESSES: "550 5.7.1 Message refused: its From header names more than "
    "one address, so its author is ambiguous (RFC 7489 section 6.6.1)",
    Verdict.FROM_INVALID: "550 5.7.1 Message refused: its From header holds no valid address "
    "(user@domain)",
    Verdict.SEVERAL_OWNERS: "550 5.7.1 Message refused: it is addressed to the secret capture "
    "addresses of several users; send it to one",
    Verdict.STRANGER: "550 5.7.1 Message refused: the From address is not a user of this CRM; "
    "send from your own address, or to your secret capture address",
    Verdict.UNPROVEN: "550 5.7.1 Message refused: nothing proves it comes from the From "
    "address's domain (no SPF or DKIM pass aligned with it); send it from your mail account's "
    "own server, or to your secret capture address",
    Verdict.DNS_TEMPORARY: "451 4.4.3 DNS lookups for the SPF, DKIM and DMARC checks failed for "
    "now; please try again later",
    Verdict.STORE_UNAVAILABLE: smtp_policy.REPLIES[smtp_policy.Verdict.STORE_UNAVAILABLE],
}


@dataclass(frozen=True, slots=True)
class CaptureAddress:
    """A recipient the door takes: the shared ``log@`` (token None) or a user's ``log+TOKEN@``."""

    token: str | None


def parse_capture_address(address: str, *, local_part: str, domain: str) -> CaptureAddress | None:
    """``log@DOMAIN`` → shared; ``log+TOKEN@DOMAIN`` → that token; anything else → None.

    Local part and domain compare case-insensitively (mail systems rewrite case freely).
    """
    local, at, where = address.strip().strip("<>").rpartition("@")
    if not at or where.lower().rstrip(".") != domain.lower().rstrip("."):
        return None
    base, plus, token = local.lower().partition("+")
    if base != local_part.lower():
        return None
    if not plus:
        return CaptureAddress(None)
    return CaptureAddress(token) if re.fullmatch(r"[a-z0-9]{8,64}", token) else None


def sender(address: str) -> Verdict:
    """MAIL FROM: the null sender is allowed (it is checked later); tricks are not."""
    if address == "":
        return Verdict.ACCEPT
    if smtp_policy.is_routing_trick(address):
        return Verdict.BAD_ADDRESS
    if not smtp_policy.is_mailbox(address):
        return Verdict.BAD_ADDRESS
    return Verdict.ACCEPT


def recipient(
    address: str,
    *,
    local_part: str,
    domain: str,
    token_known: Callable[[str], bool],
    accepted: int,
    limit: int,
) -> Verdict:
    """RCPT TO: only the capture addresses (an unknown token is no address at all)."""
    if smtp_policy.is_routing_trick(address):
        return Verdict.SOURCE_ROUTE
    found = parse_capture_address(address, local_part=local_part, domain=domain)
    if found is None or (found.token is not None and not token_known(found.token)):
        return Verdict.NOT_CAPTURE_ADDRESS
    if accepted >= limit:
        return Verdict.TOO_MANY_RECIPIENTS  # RFC 5321 §4.5.3.1.10: the client sends the rest later
    return Verdict.ACCEPT


def content(raw: bytes) -> Verdict:
    """DATA: the submission door's smuggling rules (bare CR or LF, NUL), unchanged."""
    verdict = smtp_policy.content(raw, [], 0, smtp_policy.SessionFacts())
    if verdict is smtp_policy.Verdict.NUL_CHARACTER:
        return Verdict.NUL_CHARACTER
    if verdict is smtp_policy.Verdict.BARE_LINE_ENDING:
        return Verdict.BARE_LINE_ENDING
    return Verdict.ACCEPT


def author(from_values: Sequence[str]) -> tuple[Verdict, str]:
    """The one From address, or why there is none (RFC 5322 §3.6.2, RFC 7489 §6.6.1).

    Display names never count: ``"rep@company.com" <attacker@evil.test>`` is attacker's mail.
    """
    if not from_values:
        return Verdict.FROM_MISSING, ""
    if len(from_values) > 1:
        return Verdict.FROM_SEVERAL_HEADERS, ""
    pairs = [pair for pair in getaddresses([from_values[0]]) if pair != ("", "")]
    if len(pairs) > 1:
        return Verdict.FROM_SEVERAL_ADDRESSES, ""
    address = pairs[0][1].strip() if pairs else ""
    if not address or not smtp_policy.is_mailbox(address):
        return Verdict.FROM_INVALID, ""
    return Verdict.ACCEPT, address.lower()


@dataclass(frozen=True, slots=True)
class Decision:
    """As whom a message may be logged, or why not."""

    verdict: Verdict
    owner: str | None = None  # the rep it is logged as (ACCEPT only)
    via: str | None = None  # "token", "spf", "dkim" or "release"
    claimed_owner: str | None = None  # whose address the From is, proven or not
    reason: str = ""

    @property
    def proven(self) -> bool:
        return self.verdict is Verdict.ACCEPT


def claimant(
    from_address: str, *, owner_of: Callable[[str], str | None], token_owners: Collection[str]
) -> Decision:
    """Before any DNS: a secret address decides; otherwise the From must be a user's.

    Returns ACCEPT (via token), SEVERAL_OWNERS, STRANGER, or UNPROVEN with the claimed owner,
    which :func:`proven` then settles with the verdicts.
    """
    owners = set(token_owners)
    if len(owners) > 1:
        return Decision(Verdict.SEVERAL_OWNERS, reason="several users' secret addresses")
    if owners:
        owner = owners.pop()
        return Decision(Verdict.ACCEPT, owner=owner, via="token", claimed_owner=owner)
    claimed = owner_of(from_address)
    if claimed is None:
        return Decision(
            Verdict.STRANGER, reason=f"{from_address or 'the From address'} is not a user's"
        )
    return Decision(Verdict.UNPROVEN, claimed_owner=claimed, reason="not checked yet")


def proven(
    claim: Decision,
    *,
    aligned: Sequence[str],
    temporary: bool,
    words: dict[str, str],
    from_domain: str,
) -> Decision:
    """Settle an UNPROVEN claim: an aligned SPF or DKIM pass proves it (RFC 7489 §4.2).

    A DNS failure matters only when nothing aligned passed: then a retry may still prove it.
    """
    if claim.verdict is not Verdict.UNPROVEN:
        return claim
    if aligned:
        return Decision(
            Verdict.ACCEPT,
            owner=claim.claimed_owner,
            via=aligned[0],
            claimed_owner=claim.claimed_owner,
        )
    if temporary:
        return Decision(
            Verdict.DNS_TEMPORARY, claimed_owner=claim.claimed_owner, reason="DNS failure"
        )
    summary = ", ".join(f"{k}={words.get(k, 'none')}" for k in ("spf", "dkim", "dmarc"))
    return Decision(
        Verdict.UNPROVEN,
        claimed_owner=claim.claimed_owner,
        reason=f"no SPF or DKIM pass aligned with {from_domain} ({summary})",
    )
