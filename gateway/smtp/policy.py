"""Who may send what through the gateway: pure decisions, no protocol and no I/O.

The SMTP handlers turn each client command into a question for this module and answer with the
reply that :data:`REPLIES` maps the verdict to, so every refusal has one enhanced status code and
one sentence, written once. Nothing here imports aiosmtpd: these rules are tested as plain
functions, and the same rules serve any door that needs them.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from gateway.message import domain_of, has_bare_line_ending, normalise_address


class Verdict(Enum):
    ACCEPT = "accept"
    AUTH_REQUIRED = "auth-required"
    SENDER_NOT_OWNED = "sender-not-owned"
    FROM_NOT_OWNED = "from-not-owned"
    FROM_MISSING = "from-missing"
    BAD_ADDRESS = "bad-address"
    SOURCE_ROUTE = "source-route"
    TOO_MANY_RECIPIENTS = "too-many-recipients"
    BARE_LINE_ENDING = "bare-line-ending"
    NUL_CHARACTER = "nul-character"
    MESSAGE_TOO_BIG = "message-too-big"
    STORE_UNAVAILABLE = "store-unavailable"


# One place for every reply: code, RFC 3463 enhanced status, and a sentence a person can act on.
REPLIES: dict[Verdict, str] = {
    Verdict.ACCEPT: "250 2.0.0 OK",
    Verdict.AUTH_REQUIRED: "530 5.7.0 Authentication required: log in (AUTH) before sending",
    Verdict.SENDER_NOT_OWNED: "553 5.7.1 Sender address rejected: not one of your addresses",
    Verdict.FROM_NOT_OWNED: "550 5.7.1 From header rejected: you may only send as your own "
    "addresses",
    Verdict.FROM_MISSING: "550 5.6.0 Message rejected: it needs exactly one From header",
    Verdict.BAD_ADDRESS: "553 5.1.3 Address rejected: not a valid mailbox (user@domain)",
    Verdict.SOURCE_ROUTE: "553 5.1.3 Address rejected: source routes, %-hacks and bang paths "
    "are not relayed",
    Verdict.TOO_MANY_RECIPIENTS: "452 4.5.3 Too many recipients: send the rest in another message",
    Verdict.BARE_LINE_ENDING: "550 5.6.0 Message rejected: bare CR or LF characters; lines "
    "must end with CRLF (RFC 5321 section 2.3.8)",
    Verdict.NUL_CHARACTER: "550 5.6.0 Message rejected: NUL characters are not allowed in mail",
    Verdict.MESSAGE_TOO_BIG: "552 5.3.4 Message too big for this server",
    Verdict.STORE_UNAVAILABLE: "451 4.3.0 Temporary local problem: the message was not stored; "
    "please try again later",
}

# RFC 5321 §4.1.2 Mailbox, simplified: dot-atom or quoted local part, a domain or an IP literal.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_LOCAL = rf'(?:{_ATOM}(?:\.{_ATOM})*|"(?:[^"\\\r\n]|\\.)*")'
_LETDIG = r"[A-Za-z0-9\u0080-\U0010ffff]"
_DOMAIN = rf"(?:{_LETDIG}(?:[\-A-Za-z0-9\u0080-\U0010ffff]*{_LETDIG})?\.?)+"
_MAILBOX = re.compile(rf"^{_LOCAL}@(?:{_DOMAIN}|\[[^\[\]\s]+\])$")


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated user and the addresses they may send as."""

    login: str
    addresses: frozenset[str]
    domains: frozenset[str] = frozenset()  # ``@example.com`` aliases: any address there

    def owns(self, address: str) -> bool:
        address = normalise_address(address)
        return address in self.addresses or domain_of(address) in self.domains


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What the policy needs to know about a client session, and nothing about SMTP."""

    identity: Identity | None = None
    peer: str = ""
    tls: bool = False
    trusted_networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(
        default_factory=tuple
    )

    @property
    def trusted(self) -> bool:
        """A client in a trusted network (like Postfix's mynetworks) may relay without AUTH."""
        return _in_networks(self.peer, tuple(self.trusted_networks))

    @property
    def may_relay(self) -> bool:
        return self.identity is not None or self.trusted


@functools.lru_cache(maxsize=4096)
def _in_networks(
    peer: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    # Cached: asked at MAIL and at RCPT of every message, mostly by the same few clients.
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def is_mailbox(address: str) -> bool:
    return bool(_MAILBOX.match(address)) and len(address) <= 254


def is_routing_trick(address: str) -> bool:
    """Addresses that ask a relay to forward elsewhere: never honoured (open-relay classics).

    ``@a,@b:user@c`` (source route, RFC 5321 Appendix C), ``user%c@b`` (percent hack) and
    ``c!user@b`` (UUCP bang path) in an unquoted local part.
    """
    if address.startswith("@"):
        return True
    local = address.rpartition("@")[0]
    if local.startswith('"'):
        return False  # a quoted local part is just a name; the domain decides the route
    return "%" in local or "!" in local


def sender(address: str, facts: SessionFacts) -> Verdict:
    """MAIL FROM: only an authenticated user (or a trusted network) may send, as themselves."""
    if not facts.may_relay:
        return Verdict.AUTH_REQUIRED
    if address == "":
        # The null reverse-path is for bounces; a person does not send those.
        return Verdict.ACCEPT if facts.identity is None else Verdict.SENDER_NOT_OWNED
    if is_routing_trick(address) or not is_mailbox(address):
        return Verdict.BAD_ADDRESS
    if facts.identity is not None and not facts.identity.owns(address):
        return Verdict.SENDER_NOT_OWNED
    return Verdict.ACCEPT


def recipient(address: str, facts: SessionFacts, *, accepted: int, limit: int) -> Verdict:
    """RCPT TO: relaying needs AUTH; routing tricks are refused; a cap per message."""
    if not facts.may_relay:
        return Verdict.AUTH_REQUIRED
    if is_routing_trick(address):
        return Verdict.SOURCE_ROUTE
    if not is_mailbox(address):
        return Verdict.BAD_ADDRESS
    if accepted >= limit:
        # RFC 5321 §4.5.3.1.10: 452 and the client sends the rest in another transaction.
        return Verdict.TOO_MANY_RECIPIENTS
    return Verdict.ACCEPT


def content(
    raw: bytes, from_addresses: Sequence[str], from_headers: int, facts: SessionFacts
) -> Verdict:
    """DATA: the bytes must be clean and the From header must be the user's own."""
    if b"\x00" in raw:
        return Verdict.NUL_CHARACTER
    if has_bare_line_ending(raw):
        return Verdict.BARE_LINE_ENDING
    if facts.identity is None:
        return Verdict.ACCEPT  # a trusted network: no identity to hold the From header to
    if from_headers != 1 or not from_addresses:
        return Verdict.FROM_MISSING
    if not all(facts.identity.owns(address) for address in from_addresses):
        return Verdict.FROM_NOT_OWNED
    return Verdict.ACCEPT
