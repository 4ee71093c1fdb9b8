"""The CRM's way of sending mail: who it is from, what it looks like, and into the queue.

``POST /api/v1/messages`` (see :mod:`gateway.api.send`) hands :meth:`Outgoing.send` a request
that names the mailbox to send from (a connected account) or the rep (their primary account, or
their own address when they have none). The sender is decided here, never taken from the request,
so the CRM cannot make the gateway write someone else's From. The draft becomes bytes in
:mod:`gateway.compose` and is accepted into the same queue as submitted mail with source ``api``:
the worker signs it, relays it, logs it back to the CRM and, when it came from an account, copies
it into that account's Sent folder (:class:`AppendSent`), in both sync modes since one-way
means "only mail sent from the CRM goes to the mailbox".

Mail from a mailbox that has an SMTP server (every provider preset; a custom set-up with
``smtp_host``) is submitted there, logged in as the mailbox (:class:`AccountRoutes`): a Gmail or
Microsoft 365 address must leave through its own provider to pass DMARC at the recipient. A
provider that files SMTP submissions in Sent by itself (``saves_sent`` in the presets) gets no
APPEND from us. Mail from a rep's own address, or a mailbox without SMTP, takes the gateway's
configured route like submitted mail. A Message-ID chosen by the CRM is recorded in the accept
transaction (``api_send``), so a request the CRM repeats after a timeout is never sent twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, select

from gateway.compose import Draft, bracketed, compose, new_message_id
from gateway.errors import Defer, Reject
from gateway.imap.accounts import AccountError, account_ref, find_account, own_addresses
from gateway.imap.errors import ImapError
from gateway.imap.models import MailAccount
from gateway.imap.service import ImapService
from gateway.imap.vault import SecretError
from gateway.message import normalise_address, outgoing
from gateway.relay import Advice, Relay
from gateway.settings import RelaySettings
from gateway.store.models import ApiSend, Source
from gateway.store.queue import NewMessage, QueuedMessage, Store
from gateway.users import UserError, get_user

log = logging.getLogger(__name__)
API_SEND = ApiSend.__table__  # type: ignore[attr-defined]


class SendError(ValueError):
    """A send the gateway refuses, with the sentence the CRM shows and an HTTP status."""

    def __init__(self, sentence: str, *, status: int = 400) -> None:
        super().__init__(sentence)
        self.status = status


@dataclass(frozen=True, slots=True)
class Sender:
    address: str
    owner: str  # the rep whose conversation this is
    account: dict[str, Any] | None  # AccountRef.as_meta() of the mailbox, when there is one
    # The mailbox's addresses (never contacts); a rep's own are looked up when the mail is
    # logged, as for submitted mail (IdentifySender).
    own_addresses: frozenset[str] = frozenset()
    via_account: bool = False  # submitted through the mailbox's own SMTP server
    provider: str = "custom"


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str  # the queue id
    message_id: str
    sender: str
    account_id: str | None
    recipients: int
    route: str  # "account" (the mailbox's SMTP server) or "gateway"
    repeated: bool = False  # the CRM sent this Message-ID before: the first one's answer


def resolve_sender(session: Session, *, account: str | None, user: str | None) -> Sender:
    """The From of a CRM send: the named account, or the rep's primary account or address."""
    if (account is None) == (user is None):
        raise SendError("name exactly one of `account` (a mailbox) or `user` (a rep)")
    if account is not None:
        try:
            return _from_account(find_account(session, account))
        except AccountError as exc:
            raise SendError(str(exc), status=exc.status) from None
    assert user is not None
    try:
        rep = get_user(session, user)
    except UserError as exc:
        raise SendError(str(exc), status=404) from None
    if rep.disabled:
        raise SendError(
            f"{rep.email} is disabled; enable them with `mailgate user enable`", status=409
        )
    primary = session.exec(
        select(MailAccount).where(MailAccount.owner == rep.email, MailAccount.is_primary)
    ).first()
    if primary is not None:
        return _from_account(primary)
    return Sender(address=rep.email, owner=rep.email, account=None)


def _from_account(account: MailAccount) -> Sender:
    return Sender(
        address=account.email,
        owner=account.owner,
        account=account_ref(account).as_meta(),
        own_addresses=own_addresses(account),
        via_account=bool(account.smtp_host),
        provider=account.provider,
    )


def queue_meta(
    sender: Sender, *, bcc: Sequence[str], saves_sent: frozenset[str], requested_by: str
) -> dict[str, Any]:
    """What the worker's steps need to know of a CRM send: its account, route and Sent copy."""
    meta: dict[str, Any] = {"requested_by": requested_by}
    if sender.account is None:
        return meta
    meta["account"] = sender.account
    meta["own_addresses"] = sorted(sender.own_addresses)
    if sender.via_account:
        meta["via_account"] = sender.account["id"]
    if not (sender.via_account and sender.provider in saves_sent):
        # The copy for the Sent folder names the blind copies, as a mail client's does.
        meta["sent_copy"] = {"account_id": sender.account["id"], "bcc": list(bcc)}
    return meta


class Outgoing:
    """Accepts the CRM's drafts into the queue; the admin API's send route calls it."""

    def __init__(
        self,
        *,
        store: Store,
        engine: Engine,
        max_message_size: int,
        max_recipients: int,
        wake: Callable[[str], None],
        saves_sent: frozenset[str] = frozenset(),
    ) -> None:
        self.saves_sent = saves_sent  # provider presets that file SMTP submissions in Sent
        self.store = store
        self.engine = engine
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.wake = wake

    async def _accept_once(self, message: NewMessage, fingerprint: str) -> tuple[str, bool]:
        """Queue ``message`` unless the CRM already sent one with its Message-ID (the same
        transaction records it); ``(queue id, whether this was the first time)``. The same
        Message-ID with another ``fingerprint`` (a different request) raises a 409
        :class:`SendError`: answering it as a repeat would drop that message unsent."""
        key = str(message.header_message_id)
        store = self.store.inserting(message)

        def write(connection: Connection) -> tuple[str, bool | None]:
            # ON CONFLICT DO NOTHING: two processes taking the same request at once both end
            # here, and the one that did not insert reads the other's row.
            claimed = connection.execute(
                _insert_api_send(connection)
                .values(
                    message_id=key,
                    queue_id=message.id,
                    created_at=time.time(),
                    fingerprint=fingerprint,
                )
                .on_conflict_do_nothing(index_elements=["message_id"])
            ).rowcount
            if claimed:
                return store(connection), True
            earlier = connection.execute(
                select(API_SEND.c.queue_id, API_SEND.c.fingerprint).where(
                    API_SEND.c.message_id == key
                )
            ).one()
            same = earlier.fingerprint in (None, fingerprint)
            return str(earlier.queue_id), (False if same else None)

        stored, first = await self.store.committer.write(write)
        if first is None:
            raise SendError(
                f"message_id <{key}> was already used for a different message (another sender, "
                "recipients or content); give this message a Message-ID of its own",
                status=409,
            )
        return stored, first

    async def send(
        self,
        draft: Draft,
        *,
        account: str | None,
        user: str | None,
        bcc: Sequence[str],
        message_id: str | None,
        requested_by: str,
    ) -> Accepted:
        def resolve() -> Sender:
            with Session(self.engine) as session:
                return resolve_sender(session, account=account, user=user)

        sender = await asyncio.to_thread(resolve)
        recipients = list(dict.fromkeys(normalise_address(a) for a in [*draft.to, *draft.cc, *bcc]))
        if not recipients:
            raise SendError("no recipients: give at least one address in to, cc or bcc")
        if len(recipients) > self.max_recipients:
            raise SendError(
                f"{len(recipients)} recipients; at most {self.max_recipients} per message "
                "(submission.max_recipients)",
                status=413,
            )
        mid = bracketed(message_id) if message_id else new_message_id(sender.address)
        draft = dataclasses.replace(draft, sender=sender.address)
        try:
            # Off the event loop: MIME-encoding a large attachment takes a while (~0.27 s for
            # 10 MB measured), and the loop also serves the SMTP doors and the dispatcher.
            raw = await asyncio.to_thread(compose, draft, message_id=mid, date=datetime.now(UTC))
        except ValueError as exc:
            raise SendError(f"the message cannot be written: {exc}", status=422) from None
        if len(raw) > self.max_message_size:
            raise SendError(
                f"the message is {len(raw):,} bytes encoded; the limit is "
                f"{self.max_message_size:,} (submission.max_message_size)",
                status=413,
            )
        meta = queue_meta(sender, bcc=bcc, saves_sent=self.saves_sent, requested_by=requested_by)
        new = NewMessage(
            source=Source.API.value,
            mail_from=sender.address,
            rcpt_tos=recipients,
            raw=raw,
            username=sender.owner,
            client_address=None,
            header_message_id=mid.strip("<>"),
            meta=meta,
        )
        if message_id:
            stored, first = await self._accept_once(new, request_fingerprint(draft, bcc))
        else:
            stored, first = await self.store.accept(new), True
        if first:
            self.wake(stored)
            log.info("accepted %s from the API (%s for %s)", stored, sender.address, requested_by)
        else:
            log.info("the API sent %s again: answered with %s, not sent twice", mid, stored)
        return Accepted(
            id=stored,
            message_id=mid,
            sender=sender.address,
            account_id=sender.account["id"] if sender.account else None,
            recipients=len(recipients),
            route="account" if sender.via_account else "gateway",
            repeated=not first,
        )


def request_fingerprint(draft: Draft, bcc: Sequence[str]) -> str:
    """SHA-256 over what a send request asks for (its sender and recipients, headers, text and
    attachments), each part length-prefixed so that no two requests share a byte stream."""
    digest = hashlib.sha256()

    def part(data: str | bytes) -> None:
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        digest.update(len(raw).to_bytes(8, "big"))
        digest.update(raw)

    for field in (draft.sender, draft.sender_name, draft.subject, draft.reply_to or ""):
        part(field)
    for addresses in (draft.to, draft.cc, bcc, draft.references):
        part(str(len(addresses)))
        for address in addresses:
            part(address)
    for body in (draft.text, draft.html, draft.in_reply_to):
        part("" if body is None else "\x00" + body)  # None and "" differ
    part(str(len(draft.attachments)))
    for attachment in draft.attachments:
        for piece in (attachment.filename, attachment.content_type, attachment.data):
            part(piece)
    return digest.hexdigest()


def _insert_api_send(connection: Connection) -> Any:
    """The dialect's INSERT for ``api_send`` (both SQLite and PostgreSQL offer ON CONFLICT)."""
    if connection.dialect.name == "postgresql":
        return postgresql_insert(API_SEND)
    return sqlite_insert(API_SEND)


Append = Callable[[str, bytes], Awaitable[bool]]


class AppendSent:
    """Mail the CRM sent from a mailbox is copied into that mailbox's Sent folder.

    It runs after relaying and logging, so a mailbox that is down delays only its own copy;
    a temporary IMAP failure defers the message (its relay and log are recorded and not redone),
    an account disconnected since is skipped.
    """

    name = "append-sent"
    durable = True

    def __init__(self, append: Callable[[], Append | None]) -> None:
        # A getter: the IMAP service starts after the pipelines are built, and may be off.
        self.append = append

    async def __call__(self, item: QueuedMessage) -> None:
        copy = item.meta.get("sent_copy")
        if not copy:
            return
        append = self.append()
        if append is None:
            log.warning("message %s: no Sent copy, IMAP sync is off in this gateway", item.id)
            return
        raw = outgoing(item.raw, item.prepend)
        if copy.get("bcc"):
            raw = b"Bcc: " + ", ".join(copy["bcc"]).encode() + b"\r\n" + raw
        try:
            appended = await append(str(copy["account_id"]), raw)
        except AccountError as exc:
            if exc.status == 404:  # disconnected since: there is no mailbox to copy into
                log.warning("message %s: no Sent copy: %s", item.id, exc)
                return
            raise Defer(f"451 4.4.0 sent; the copy to the Sent folder waits: {exc}") from None
        except (ImapError, SecretError) as exc:
            raise Defer(f"451 4.4.0 sent; the copy to the Sent folder failed: {exc}") from None
        if not appended:
            log.warning("message %s: account %s has no Sent folder", item.id, copy["account_id"])


class AccountRoutes:
    """Relays that submit through a connected mailbox's own SMTP server, one per account.

    The worker's relay step asks :meth:`relay_for` first; ``None`` means the gateway's route.
    Each relay logs in as the mailbox (its username, its decrypted password) with the
    account's TLS choice, and is rebuilt when the account changes (a new password).
    """

    def __init__(
        self,
        *,
        service: Callable[[], ImapService | None],
        relay_settings: RelaySettings,
        hostname: str,
    ) -> None:
        self.service = service
        self.relay_settings = relay_settings
        self.hostname = hostname
        self._relays: dict[str, tuple[tuple[float, str], Relay]] = {}

    async def relay_for(self, item: QueuedMessage) -> Relay | None:
        account_id = item.meta.get("via_account")
        if not account_id:
            return None
        service = self.service()
        if service is None:
            raise Defer("451 4.3.0 IMAP accounts are off in this gateway; the mailbox's SMTP waits")
        account = await service.session(lambda s: s.get(MailAccount, account_id))
        if account is None:
            raise Reject(
                "550 5.7.0 the mailbox this was sent from was disconnected; send it again from "
                "the CRM"
            )
        try:
            secret = await service.credential(account)
        except SecretError as exc:
            raise Defer(f"451 4.3.0 the mailbox password cannot be read: {exc}") from None
        except ImapError as exc:  # an OAuth refresh refused or unreachable
            raise Defer(f"451 4.7.0 the mailbox cannot sign in: {exc.sentence}") from None
        # Rebuilt when the account changes or its OAuth access token is renewed.
        key = (account.updated_at, hashlib.sha256(secret.encode()).hexdigest())
        cached = self._relays.get(account_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        relay = Relay(
            self.relay_settings.model_copy(
                update={
                    "mode": "smarthost",
                    "host": account.smtp_host,
                    "port": account.smtp_port,
                    "security": _RELAY_SECURITY[account.smtp_security],
                    "require_tls": account.smtp_security != "none",
                    "verify_certificate": not account.allow_unverified_certificate,
                    "ca_file": service.settings.ca_file,
                    "username": account.username or account.email,
                    "password": secret,
                    # Providers cap connections per mailbox; a rep sends a few mails at a time.
                    "max_connections": 2,
                }
            ),
            hostname=self.hostname,
            bearer=account.auth_method == "oauth",
            advice=ACCOUNT_ADVICE,
        )
        if cached is not None:
            await cached[1].aclose()
        self._relays[account_id] = (key, relay)
        return relay

    async def aclose(self) -> None:
        for _updated, relay in self._relays.values():
            await relay.aclose()
        self._relays.clear()


# Failures of a mailbox's own submission server name the settings that fix them.
ACCOUNT_ADVICE = Advice(
    ca_file="set imap.ca_file to the CA that signed its certificate, or fix the certificate",
    starttls="the mailbox is set to STARTTLS; choose smtp_security ssl (usually port 465)",
    auth="a password login needs AUTH PLAIN or LOGIN there (or sign the mailbox in with OAuth)",
)

# The account's words for SMTP security, in the relay's.
_RELAY_SECURITY = {"ssl": "tls", "starttls": "starttls", "none": "none"}
