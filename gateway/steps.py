"""The steps of the submission pipeline: normalise, DKIM-sign, relay.

Each step works on a :class:`QueuedMessage` and keeps its results on the item (``prepend`` for
header lines we add, ``outcomes`` for per-recipient delivery results), which the worker writes back
in the same transaction as the message's new state. Steps import the vocabulary (errors, message,
store types), never protocol code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from gateway.dkim import UnsignableMessage
from gateway.errors import Defer
from gateway.message import (
    addresses,
    domain_of,
    header_block,
    missing_header_lines,
    normalise_address,
    outgoing,
)
from gateway.relay import Relay
from gateway.sighting import AccountRef, Sharing, Sighting
from gateway.store.models import DeliveryState
from gateway.store.queue import DeliveryOutcome, QueuedMessage

log = logging.getLogger(__name__)

LARGE_MESSAGE = 256 * 1024  # sign bigger messages in a thread so the event loop stays responsive


class Signer(Protocol):
    def has_key(self, domain: str) -> bool: ...

    def sign(self, message: bytes, *, domain: str) -> bytes: ...


class Normalise:
    """Add the Message-ID and Date a client left out (RFC 6409 §8); Bcc is dropped on output."""

    name = "normalise"
    durable = False

    def __init__(self, *, hostname: str) -> None:
        self.hostname = hostname

    async def __call__(self, item: QueuedMessage) -> None:
        if item.prepend:
            return  # added on an earlier attempt; the same lines must go out every time
        headers = item.headers()
        item.prepend = missing_header_lines(
            headers, local_id=item.id, hostname=self.hostname, now=item.created_at
        )
        if item.header_message_id is None and item.prepend.startswith(b"Message-ID:"):
            item.header_message_id = f"{item.id}@{self.hostname}"


class DkimSign:
    """Sign what will go out with the key of the From domain (or its nearest parent)."""

    name = "dkim-sign"
    durable = False

    def __init__(self, signer: Signer | None) -> None:
        self.signer = signer

    async def __call__(self, item: QueuedMessage) -> None:
        if self.signer is None or b"DKIM-Signature:" in header_block(item.prepend or b"x"):
            return
        senders = addresses(item.headers(), "From")
        domain = domain_of(senders[0]) if senders else domain_of(item.mail_from)
        if not domain or not self.signer.has_key(domain):
            return
        message = outgoing(item.raw, item.prepend)
        try:
            if len(message) > LARGE_MESSAGE:
                signature = await asyncio.to_thread(self.signer.sign, message, domain=domain)
            else:
                signature = self.signer.sign(message, domain=domain)
        except UnsignableMessage as exc:
            # A header section dkimpy cannot parse: the recipient's verifier could not either,
            # so an unsigned message loses nothing, while a bounce would lose the mail.
            log.warning("message %s relayed unsigned: %s", item.id, exc.reply)
            return
        item.prepend = signature + item.prepend


class RelayUpstream:
    """Hand the message to the upstream route; one outcome per recipient still pending."""

    name = "relay"
    durable = True

    def __init__(
        self,
        relay: Relay,
        *,
        route: Callable[[QueuedMessage], Awaitable[Relay | None]] | None = None,
    ) -> None:
        self.relay = relay
        self.route = route  # a message's own route (a mailbox's SMTP server), if it has one

    async def __call__(self, item: QueuedMessage) -> None:
        if not item.pending_recipients:
            return
        relay = (await self.route(item) if self.route else None) or self.relay
        results = await relay.send(
            item.mail_from, item.pending_recipients, outgoing(item.raw, item.prepend)
        )
        temporary = []
        for result in results:
            if result.delivered:
                state = DeliveryState.DELIVERED
            elif result.permanent:
                state = DeliveryState.FAILED
                item.failures.append(result)
            else:
                state = DeliveryState.PENDING
                temporary.append(result)
            item.outcomes.append(
                DeliveryOutcome(result.recipient, state, code=result.code, reply=result.text)
            )
        item.pending_recipients = [r.recipient for r in temporary]
        if temporary:
            first = temporary[0]
            raise Defer(f"{first.code} {first.text}".strip(), code=first.code)


class IdentifySender:
    """Submitted mail is outbound mail of the rep who sent it (or of its sender address).

    It is logged under the rep's primary mailbox when they have one (its sharing level, and one
    account link when the sync later finds the same mail in that mailbox's Sent folder);
    otherwise under ``user:<rep>`` with ``hooks.submission_sharing``.
    """

    name = "identify-sender"
    durable = False

    def __init__(
        self,
        *,
        sharing: Sharing,
        identity_of: Callable[[str], Awaitable[tuple[frozenset[str], AccountRef | None]]],
    ) -> None:
        self.sharing = sharing
        self.identity_of = identity_of  # a rep's own addresses and primary mailbox

    async def __call__(self, item: QueuedMessage) -> None:
        owner = item.username or normalise_address(item.mail_from)
        if not owner:
            return  # a bounce or other null-sender mail: nobody's conversation
        raw = outgoing(item.raw, item.prepend)
        headers = item.headers()
        named = set(addresses(headers, "To") + addresses(headers, "Cc"))
        own, primary = await self.identity_of(owner)
        if "account" in item.meta:  # sent by the CRM from a connected mailbox: its account
            account = AccountRef.from_meta(item.meta["account"])
            own |= frozenset(item.meta.get("own_addresses", ()))
        elif primary is not None:
            account = primary
        else:
            account = AccountRef(id=f"user:{owner}", owner=owner, sharing=self.sharing)
        item.sighting = Sighting(
            raw=raw,
            account=account,
            direction="outbound",
            source="api" if item.source == "api" else "submission",
            own_addresses=own,
            bcc=[r for r in map(normalise_address, item.rcpt_tos) if r not in named],
        )


class IdentifyAccount:
    """Mail found by IMAP sync belongs to the account the sync engine recorded in its meta."""

    name = "identify-account"
    durable = False

    async def __call__(self, item: QueuedMessage) -> None:
        account = AccountRef.from_meta(item.meta["account"])
        item.sighting = Sighting(
            raw=item.raw,
            account=account,
            direction="outbound" if item.meta.get("direction") == "outbound" else "inbound",
            source="imap",
            own_addresses=frozenset(item.meta.get("own_addresses", [account.owner])),
        )
