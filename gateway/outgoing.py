"""The CRM's way of sending mail: who it is from, what it looks like, and into the queue.

``POST /api/v1/messages`` (see :mod:`gateway.api.send`) hands :meth:`Outgoing.send` a request
that names the mailbox to send from (a connected account) or the rep (their primary account, or
their own address when they have none). The sender is decided here, never taken from the request,
so the CRM cannot make the gateway write someone else's From. The draft becomes bytes in
:mod:`gateway.compose` and is accepted into the same queue as submitted mail with source ``api``:
the worker signs it, relays it, logs it back to the CRM and, when it came from an account, copies
it into that account's Sent folder (:class:`AppendSent`), in both sync modes since one-way
means "only mail sent from the CRM goes to the mailbox".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, select

from gateway.compose import Draft, bracketed, compose, new_message_id
from gateway.errors import Defer
from gateway.imap.accounts import AccountError, account_ref, find_account
from gateway.imap.errors import ImapError
from gateway.imap.models import MailAccount
from gateway.imap.vault import SecretError
from gateway.message import normalise_address, outgoing
from gateway.store.models import Source
from gateway.store.queue import NewMessage, QueuedMessage, Store
from gateway.users import UserError, get_user, identity_of

log = logging.getLogger(__name__)


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
    own_addresses: frozenset[str]


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str  # the queue id
    message_id: str
    sender: str
    account_id: str | None
    recipients: int


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
    identity = identity_of(session, rep)
    return Sender(
        address=rep.email, owner=rep.email, account=None, own_addresses=identity.addresses
    )


def _from_account(account: MailAccount) -> Sender:
    return Sender(
        address=account.email,
        owner=account.owner,
        account=account_ref(account).as_meta(),
        own_addresses=frozenset({account.email, account.owner}),
    )


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
    ) -> None:
        self.store = store
        self.engine = engine
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.wake = wake

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
        draft = Draft(
            sender=sender.address,
            sender_name=draft.sender_name,
            to=draft.to,
            cc=draft.cc,
            subject=draft.subject,
            text=draft.text,
            html=draft.html,
            attachments=draft.attachments,
            in_reply_to=draft.in_reply_to,
            references=draft.references,
            reply_to=draft.reply_to,
        )
        try:
            raw = compose(draft, message_id=mid, date=datetime.now(UTC))
        except ValueError as exc:
            raise SendError(f"the message cannot be written: {exc}", status=422) from None
        if len(raw) > self.max_message_size:
            raise SendError(
                f"the message is {len(raw):,} bytes encoded; the limit is "
                f"{self.max_message_size:,} (submission.max_message_size)",
                status=413,
            )
        meta: dict[str, Any] = {"requested_by": requested_by}
        if sender.account is not None:
            meta["account"] = sender.account
            meta["own_addresses"] = sorted(sender.own_addresses)
            # The copy for the Sent folder names the blind copies, as a mail client's does.
            meta["sent_copy"] = {"account_id": sender.account["id"], "bcc": list(bcc)}
        stored = await self.store.accept(
            NewMessage(
                source=Source.API.value,
                mail_from=sender.address,
                rcpt_tos=recipients,
                raw=raw,
                username=sender.owner,
                client_address=None,
                header_message_id=mid.strip("<>"),
                meta=meta,
            )
        )
        self.wake(stored)
        log.info("accepted %s from the API (%s for %s)", stored, sender.address, requested_by)
        return Accepted(
            id=stored,
            message_id=mid,
            sender=sender.address,
            account_id=sender.account["id"] if sender.account else None,
            recipients=len(recipients),
        )


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
