"""Storing the gateway's webhook events: each ``webhook-id`` once, each normalised Message-ID once
(a second sighting adds an account link), emails threaded by References / In-Reply-To (in both
directions, since a reply can arrive before its parent) with a subject-and-participants fallback,
contacts linked and auto-created per the organisation's policy. One call is one transaction;
on PostgreSQL a race with a concurrent request (a unique key hit) is retried from the start."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from crm_api.addresses import (
    in_domains,
    is_group_address,
    normalise_message_id,
    subject_key,
    try_normalise,
)
from crm_api.crud import get_org
from crm_api.errors import BadRequest, describe_validation
from crm_api.events import (
    AccountStatusChanged,
    EmailLogged,
    EmailStatus,
    SyncCompleted,
)
from crm_api.models import (
    AccountSelection,
    Attachment,
    Contact,
    ContactAddress,
    Email,
    EmailAccount,
    EmailParticipant,
    EmailReference,
    MailAccount,
    OrgSettings,
    Thread,
    User,
    WebhookEvent,
    utcnow,
)

log = logging.getLogger("crm_api.ingest")

Outcome = Literal["stored", "duplicate"]
_ROLES = ("from", "to", "cc", "bcc")
_MAX_REFS = 100  # the newest References are the ones that find a thread
_ATTEMPTS = 3


@dataclass
class ParsedEvent:
    type: str
    data: dict[str, Any]
    email: EmailLogged | None = None
    status: EmailStatus | None = None
    account_status: AccountStatusChanged | None = None


def parse(body: bytes) -> ParsedEvent:
    """Validate a webhook body (already authenticated) or raise :class:`BadRequest`."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("webhook body is not JSON") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise BadRequest("webhook body must be an object with a string 'type'")
    data = raw.get("data")
    if not isinstance(data, dict):
        raise BadRequest("webhook body must carry an object 'data'")
    kind = raw["type"]
    event = ParsedEvent(type=kind[:64], data=data)
    try:
        if kind == "email.logged":
            event.email = EmailLogged.model_validate(data)
        elif kind in ("email.deleted", "email.archived"):
            event.status = EmailStatus.model_validate(data)
        elif kind == "account.status_changed":
            event.account_status = AccountStatusChanged.model_validate(data)
        elif kind == "sync.completed":
            SyncCompleted.model_validate(data)
    except ValidationError as exc:
        errors = [dict(e) for e in exc.errors()]
        raise BadRequest(f"invalid {kind} payload: {describe_validation(errors)}") from None
    return event


def store(*, engine: sa.Engine, webhook_id: str, timestamp: int, event: ParsedEvent) -> Outcome:
    """Store one verified event in its own transaction; a replayed ``webhook-id`` is a no-op."""
    for attempt in range(1, _ATTEMPTS + 1):
        with Session(engine, expire_on_commit=False) as session:
            try:
                outcome = _store(
                    session=session, webhook_id=webhook_id, timestamp=timestamp, event=event
                )
                session.commit()
                return outcome
            except IntegrityError:
                # A concurrent request stored the same event, email, account or contact first;
                # the next attempt sees its row and takes the "already there" path.
                session.rollback()
                if attempt == _ATTEMPTS:
                    raise
                log.info("webhook %s raced a concurrent request; retrying", webhook_id)
    raise AssertionError("unreachable")


def _store(*, session: Session, webhook_id: str, timestamp: int, event: ParsedEvent) -> Outcome:
    seen = session.execute(
        sa.select(col(WebhookEvent.id)).where(col(WebhookEvent.webhook_id) == webhook_id)
    ).first()
    if seen is not None:
        return "duplicate"
    email_id: int | None = None
    data: str | None = json.dumps(event.data)
    if event.email is not None:
        email_id = EmailWriter(session, get_org(session=session), event.email).store()
        data = None  # the email itself is the record; don't keep the body twice
    elif event.status is not None:
        email_id = _mark_link(session=session, event=event.status, status=event.type.split(".")[1])
    elif event.account_status is not None:
        session.execute(
            sa.update(MailAccount)
            .where(col(MailAccount.id) == event.account_status.account_id)
            .values(status=event.account_status.status, updated_at=utcnow())
        )
    session.execute(
        sa.insert(WebhookEvent).values(
            webhook_id=webhook_id,
            type=event.type,
            sent_at=datetime.fromtimestamp(timestamp, UTC),
            received_at=utcnow(),
            email_id=email_id,
            data=data,
        )
    )
    return "stored"


def _mark_link(*, session: Session, event: EmailStatus, status: str) -> int | None:
    email_id = session.execute(
        sa.select(col(Email.id)).where(
            col(Email.message_id) == normalise_message_id(event.message_id)
        )
    ).scalar()
    if email_id is not None:
        session.execute(
            sa.update(EmailAccount)
            .where(
                col(EmailAccount.email_id) == email_id,
                col(EmailAccount.account_id) == event.account_id,
            )
            .values(status=status)
        )
    return email_id


@dataclass
class EmailWriter:
    """Files one ``email.logged`` payload: account, email, thread, parties, contacts."""

    session: Session
    org: OrgSettings
    event: EmailLogged
    parties: list[tuple[str, str, str]] = field(default_factory=list)  # role, name, address

    def store(self) -> int:
        ev = self.event
        self._upsert_account()
        message_id = normalise_message_id(ev.message_id)
        existing = self.session.execute(
            sa.select(col(Email.id)).where(col(Email.message_id) == message_id)
        ).scalar()
        if existing is not None:
            self._link_account(existing)
            return int(existing)

        for role in _ROLES:
            for party in getattr(ev, "from_" if role == "from" else role):
                address = try_normalise(party.address)
                if address is None:
                    log.info("skipping unparseable %s address %r", role, party.address)
                    continue
                self.parties.append((role, party.name[:320], address))
        addresses = sorted({a for _, _, a in self.parties})
        company_domains = set(json.loads(self.org.company_domains))
        excluded_domains = set(json.loads(self.org.excluded_domains)) | company_domains
        insiders = self._company_people(addresses) | {try_normalise(ev.account.owner) or ""}
        outsiders = [
            a for a in addresses if a not in insiders and not in_domains(a, company_domains)
        ]
        contacts = self._contacts(addresses)
        contacts.update(self._auto_create(contacts, insiders, excluded_domains))

        thread_id = self._thread(
            message_id, outsiders or [a for a in addresses if a not in insiders]
        )
        refs = [normalise_message_id(r) for r in ev.references][-_MAX_REFS:]
        if ev.in_reply_to:
            refs.append(normalise_message_id(ev.in_reply_to))
        refs = list(dict.fromkeys(r for r in refs if r and r != message_id))
        email_id = int(
            self.session.execute(
                sa.insert(Email)
                .values(
                    message_id=message_id,
                    thread_id=thread_id,
                    direction=ev.direction,
                    source=ev.source,
                    subject=ev.subject,
                    date=ev.date,
                    text_body=ev.text_body,
                    html_body=ev.html_body,
                    body_truncated=ev.body_truncated,
                    in_reply_to=normalise_message_id(ev.in_reply_to) if ev.in_reply_to else None,
                    thread_refs=" ".join(normalise_message_id(r) for r in ev.references),
                    spf=ev.authentication.spf,
                    dkim=ev.authentication.dkim,
                    dmarc=ev.authentication.dmarc,
                    excluded_only=bool(outsiders)
                    and all(in_domains(a, excluded_domains) for a in outsiders),
                    created_at=utcnow(),
                )
                .returning(col(Email.id))
            ).scalar_one()
        )
        if refs:
            self.session.execute(
                sa.insert(EmailReference),
                [{"email_id": email_id, "ref_message_id": r[:998]} for r in refs],
            )
        if self.parties:
            self.session.execute(
                sa.insert(EmailParticipant),
                [
                    {
                        "email_id": email_id,
                        "role": role,
                        "name": name,
                        "address": address,
                        "contact_id": contacts.get(address),
                    }
                    for role, name, address in self.parties
                ],
            )
        if ev.attachments:
            self.session.execute(
                sa.insert(Attachment),
                [
                    {
                        "email_id": email_id,
                        "filename": a.filename,
                        "content_type": a.content_type,
                        "size": a.size,
                        "url": a.url,
                    }
                    for a in ev.attachments
                ],
            )
        self._link_account(email_id)
        return email_id

    # -- account ---------------------------------------------------------------------------

    def _upsert_account(self) -> None:
        acc = self.event.account
        owner = try_normalise(acc.owner) or acc.owner.strip().lower()
        row = self.session.get(MailAccount, acc.id)
        if row is None:
            self.session.add(
                MailAccount(id=acc.id, owner=owner, kind=acc.kind, sharing=acc.sharing)
            )
        elif (row.owner, row.kind, row.sharing) != (owner, acc.kind, acc.sharing):
            row.owner, row.kind, row.sharing, row.updated_at = (
                owner,
                acc.kind,
                acc.sharing,
                utcnow(),
            )
            self.session.add(row)
        self.session.flush()
        wanted = {a for a in (try_normalise(s) for s in acc.selected_contacts) if a}
        current = set(
            self.session.execute(
                sa.select(col(AccountSelection.address)).where(
                    col(AccountSelection.account_id) == acc.id
                )
            ).scalars()
        )
        if wanted != current:
            self.session.execute(
                sa.delete(AccountSelection).where(col(AccountSelection.account_id) == acc.id)
            )
            if wanted:
                self.session.execute(
                    sa.insert(AccountSelection),
                    [{"account_id": acc.id, "address": a} for a in sorted(wanted)],
                )

    def _link_account(self, email_id: int) -> None:
        linked = self.session.execute(
            sa.select(col(EmailAccount.email_id)).where(
                col(EmailAccount.email_id) == email_id,
                col(EmailAccount.account_id) == self.event.account.id,
            )
        ).first()
        if linked is None:
            self.session.execute(
                sa.insert(EmailAccount).values(
                    email_id=email_id,
                    account_id=self.event.account.id,
                    status="active",
                    logged_at=utcnow(),
                )
            )

    # -- contacts --------------------------------------------------------------------------

    def _contacts(self, addresses: list[str]) -> dict[str, int]:
        if not addresses:
            return {}
        rows = self.session.execute(
            sa.select(col(ContactAddress.address), col(ContactAddress.contact_id)).where(
                col(ContactAddress.address).in_(addresses)
            )
        ).all()
        return {address: contact_id for address, contact_id in rows}

    def _company_people(self, addresses: list[str]) -> set[str]:
        """Addresses of CRM users and of gateway account owners: the company's own people."""
        if not addresses:
            return set()
        users = self.session.execute(
            sa.select(col(User.email)).where(col(User.email).in_(addresses))
        ).scalars()
        owners = self.session.execute(
            sa.select(col(MailAccount.owner)).where(col(MailAccount.owner).in_(addresses))
        ).scalars()
        return set(users) | set(owners)

    def _auto_create(
        self, known: dict[str, int], insiders: set[str], excluded: set[str]
    ) -> dict[str, int]:
        policy = self.org.auto_create
        if policy == "none":
            return {}
        if self.event.direction == "outbound":
            roles = {"to", "cc", "bcc"}
        elif policy == "sent_and_received":
            roles = {"from"}
        else:
            return {}
        groups = set(json.loads(self.org.group_local_parts))
        owner_id = self.session.execute(
            sa.select(col(User.id)).where(
                col(User.email) == (try_normalise(self.event.account.owner) or "")
            )
        ).scalar()
        created: dict[str, int] = {}
        for role, name, address in self.parties:
            if role not in roles or address in known or address in created:
                continue
            if address in insiders or in_domains(address, excluded):
                continue
            if is_group_address(address, groups):
                continue
            now = utcnow()
            contact_id = int(
                self.session.execute(
                    sa.insert(Contact)
                    .values(
                        name=name[:200],
                        company="",
                        owner_id=owner_id,
                        auto_created=True,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(col(Contact.id))
                ).scalar_one()
            )
            self.session.execute(
                sa.insert(ContactAddress).values(
                    contact_id=contact_id, address=address, is_primary=True
                )
            )
            created[address] = contact_id
        return created

    # -- threads ---------------------------------------------------------------------------

    def _thread(self, message_id: str, match_addresses: list[str]) -> int:
        ev = self.event
        keys = [normalise_message_id(r) for r in ev.references][-_MAX_REFS:]
        if ev.in_reply_to:
            keys.append(normalise_message_id(ev.in_reply_to))
        keys = [k for k in dict.fromkeys(keys) if k and k != message_id]
        parents: list[int] = []
        if keys:
            parents = list(
                self.session.execute(
                    sa.select(col(Email.thread_id))
                    .where(col(Email.message_id).in_(keys))
                    .order_by(col(Email.date).desc())
                ).scalars()
            )
        # Replies logged before this message name it in their references.
        children = list(
            self.session.execute(
                sa.select(col(Email.thread_id))
                .join(EmailReference, col(EmailReference.email_id) == col(Email.id))
                .where(col(EmailReference.ref_message_id) == message_id)
            ).scalars()
        )
        candidates = list(dict.fromkeys([*parents, *children]))
        key = subject_key(ev.subject)
        if not candidates and key and match_addresses:
            # Fallback for clients that drop References: same subject, a shared participant.
            fallback = self.session.execute(
                sa.select(col(Thread.id))
                .join(Email, col(Email.thread_id) == col(Thread.id))
                .join(EmailParticipant, col(EmailParticipant.email_id) == col(Email.id))
                .where(
                    col(Thread.subject_key) == key,
                    col(EmailParticipant.address).in_(match_addresses[:200]),
                )
                .order_by(col(Thread.last_date).desc())
                .limit(1)
            ).scalar()
            if fallback is not None:
                candidates = [fallback]
        if not candidates:
            return int(
                self.session.execute(
                    sa.insert(Thread)
                    .values(
                        subject=ev.subject,
                        subject_key=key,
                        last_date=ev.date,
                        created_at=utcnow(),
                    )
                    .returning(col(Thread.id))
                ).scalar_one()
            )
        thread_id = int(candidates[0])
        merged = [t for t in candidates[1:] if t != thread_id]
        if merged:
            # This message joins threads that were split while it was missing.
            self.session.execute(
                sa.update(Email).where(col(Email.thread_id).in_(merged)).values(thread_id=thread_id)
            )
            newest = self.session.execute(
                sa.select(sa.func.max(col(Thread.last_date))).where(col(Thread.id).in_(merged))
            ).scalar()
            self.session.execute(sa.delete(Thread).where(col(Thread.id).in_(merged)))
            if newest is not None:
                self._touch(thread_id, newest)
        self._touch(thread_id, ev.date)
        return thread_id

    def _touch(self, thread_id: int, date: datetime) -> None:
        self.session.execute(
            sa.update(Thread)
            .where(col(Thread.id) == thread_id, col(Thread.last_date) < date)
            .values(last_date=date)
        )
