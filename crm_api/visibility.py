"""Who may read which email, and every email read built on that rule, so no read path can forget
it. An email is visible to a user when one of the accounts it was logged from:

* belongs to the user (the owner always sees their own mail), or
* is ``public``, or
* is ``custom`` and the email involves a contact whose address the owner selected,

except that mail whose outside parties are all at excluded domains stays with its owners when the
admin's rule (``excluded_mail``) is ``owner_only``. Admins see all mail: they administer the CRM
and can read the database anyway, so hiding it from them would only pretend. Bcc recipients are
shown only to the mail's owners and admins. Sharing is read from the account's latest state, so a
change of sharing level applies to mail already logged. A hidden email answers 404, like a
missing one, so ids reveal nothing. Contacts themselves are shared records every user can read;
sharing governs the mail."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, func, or_, select

from crm_api.errors import NotFound
from crm_api.models import (
    AccountLinkPublic,
    AccountSelection,
    Attachment,
    AttachmentPublic,
    AuthenticationPublic,
    ContactAddress,
    Email,
    EmailAccount,
    EmailParticipant,
    EmailPublic,
    ExcludedMail,
    MailAccount,
    OrgSettings,
    PartyPublic,
    Role,
    Thread,
    ThreadOrder,
    ThreadPublic,
    TimelinePublic,
    User,
)


@dataclass(frozen=True)
class Viewer:
    """The reader: what the rule needs to know about the user and the organisation."""

    email: str
    admin: bool
    excluded_owner_only: bool
    order: ThreadOrder

    @classmethod
    def of(cls, user: User, org: OrgSettings) -> Viewer:
        return cls(
            email=user.email,
            admin=user.role == Role.admin,
            excluded_owner_only=org.excluded_mail == ExcludedMail.owner_only,
            order=ThreadOrder(user.thread_order),
        )


def visible(viewer: Viewer) -> ColumnElement[bool]:
    """A WHERE clause on ``email`` true for the emails ``viewer`` may read."""
    if viewer.admin:
        return sa.true()
    link = sa.alias(EmailAccount.__table__, "vis_link")  # type: ignore[attr-defined]
    account = sa.alias(MailAccount.__table__, "vis_account")  # type: ignore[attr-defined]
    part = sa.alias(EmailParticipant.__table__, "vis_part")  # type: ignore[attr-defined]
    sel = sa.alias(AccountSelection.__table__, "vis_sel")  # type: ignore[attr-defined]
    addr = sa.alias(ContactAddress.__table__, "vis_addr")  # type: ignore[attr-defined]
    email_id = col(Email.id)
    selected = (
        sa.select(sa.literal(1))
        .select_from(part.join(sel, sel.c.account_id == account.c.id))
        .outerjoin(addr, addr.c.contact_id == part.c.contact_id)
        .where(
            part.c.email_id == email_id,
            or_(sel.c.address == part.c.address, sel.c.address == addr.c.address),
        )
        # Correlate to the outer email and account, two levels up (auto-correlation only
        # reaches the immediately enclosing query).
        .correlate_except(part, sel, addr)
        .exists()
    )
    shared = or_(account.c.sharing == "public", sa.and_(account.c.sharing == "custom", selected))
    if viewer.excluded_owner_only:
        shared = sa.and_(sa.not_(col(Email.excluded_only)), shared)
    return (
        sa.select(sa.literal(1))
        .select_from(link.join(account, account.c.id == link.c.account_id))
        .where(link.c.email_id == email_id, or_(account.c.owner == viewer.email, shared))
        .exists()
    )


def owned(viewer: Viewer) -> ColumnElement[bool]:
    """Emails logged from the viewer's own accounts (the inbox)."""
    return col(Email.id).in_(
        select(EmailAccount.email_id)
        .join(MailAccount, col(MailAccount.id) == col(EmailAccount.account_id))
        .where(MailAccount.owner == viewer.email)
    )


def list_emails(
    *,
    session: Session,
    viewer: Viewer,
    q: str | None = None,
    contact_id: int | None = None,
    direction: str | None = None,
    inbox: bool = False,
    offset: int = 0,
    limit: int = 50,
) -> tuple[list[EmailPublic], int]:
    """Visible emails, newest first; ``q`` searches subject and text body."""
    stmt = select(Email).where(visible(viewer))
    if inbox:
        stmt = stmt.where(owned(viewer))
    if q:
        pattern = f"%{q.strip()}%"
        stmt = stmt.where(
            or_(col(Email.subject).ilike(pattern), col(Email.text_body).ilike(pattern))
        )
    if contact_id is not None:
        stmt = stmt.where(
            col(Email.id).in_(
                select(EmailParticipant.email_id).where(EmailParticipant.contact_id == contact_id)
            )
        )
    if direction:
        stmt = stmt.where(Email.direction == direction)
    count = session.exec(select(func.count()).select_from(stmt.subquery())).one()
    rows = session.exec(
        stmt.order_by(col(Email.date).desc(), col(Email.id).desc()).offset(offset).limit(limit)
    ).all()
    return hydrate(session=session, viewer=viewer, emails=rows), count


def get_email(*, session: Session, viewer: Viewer, email_id: int) -> EmailPublic:
    row = session.exec(select(Email).where(Email.id == email_id, visible(viewer))).first()
    if row is None:
        raise NotFound(f"email {email_id} not found")
    return hydrate(session=session, viewer=viewer, emails=[row])[0]


def get_attachment(*, session: Session, viewer: Viewer, attachment_id: int) -> AttachmentPublic:
    row = session.exec(
        select(Attachment)
        .join(Email, col(Email.id) == col(Attachment.email_id))
        .where(Attachment.id == attachment_id, visible(viewer))
    ).first()
    if row is None:
        raise NotFound(f"attachment {attachment_id} not found")
    return AttachmentPublic.model_validate(row, from_attributes=True)


def get_thread(*, session: Session, viewer: Viewer, thread_id: int) -> ThreadPublic:
    threads = _threads(session=session, viewer=viewer, thread_ids=[thread_id])
    if not threads:
        raise NotFound(f"thread {thread_id} not found")
    return threads[0]


def timeline(
    *, session: Session, viewer: Viewer, contact_id: int, offset: int = 0, limit: int = 20
) -> TimelinePublic:
    """The contact's threads (those with a visible email involving the contact), newest thread
    first, each with all of its visible emails in the viewer's chosen order."""
    involved = (
        select(Email.thread_id, func.max(Email.date).label("newest"))
        .where(
            visible(viewer),
            col(Email.id).in_(
                select(EmailParticipant.email_id).where(EmailParticipant.contact_id == contact_id)
            ),
        )
        .group_by(col(Email.thread_id))
    )
    count = session.exec(select(func.count()).select_from(involved.subquery())).one()
    sub = involved.subquery()
    page = session.exec(
        select(sub.c.thread_id)
        .order_by(sub.c.newest.desc(), sub.c.thread_id.desc())
        .offset(offset)
        .limit(limit)
    ).all()
    return TimelinePublic(
        data=_threads(session=session, viewer=viewer, thread_ids=list(page)), count=count
    )


def _threads(*, session: Session, viewer: Viewer, thread_ids: list[int]) -> list[ThreadPublic]:
    if not thread_ids:
        return []
    emails = session.exec(
        select(Email)
        .where(col(Email.thread_id).in_(thread_ids), visible(viewer))
        .order_by(col(Email.date), col(Email.id))
    ).all()
    by_thread: dict[int, list[EmailPublic]] = defaultdict(list)
    for public in hydrate(session=session, viewer=viewer, emails=emails):
        by_thread[public.thread_id].append(public)
    rows = {t.id: t for t in session.exec(select(Thread).where(col(Thread.id).in_(thread_ids)))}
    out = []
    for thread_id in thread_ids:  # keep the caller's order (newest thread first)
        items = by_thread.get(thread_id)
        thread = rows.get(thread_id)
        if not items or thread is None:
            continue
        if viewer.order == ThreadOrder.newest_at_top:
            items.reverse()
        out.append(
            ThreadPublic(
                id=thread_id,
                subject=thread.subject,
                last_date=max(e.date for e in items),
                order=viewer.order,
                emails=items,
            )
        )
    return out


def hydrate(*, session: Session, viewer: Viewer, emails: Sequence[Email]) -> list[EmailPublic]:
    """Build the API view of already-visible emails in three more queries, whatever their number."""
    ids = [e.id for e in emails if e.id is not None]
    if not ids:
        return []
    parts: dict[int, list[EmailParticipant]] = defaultdict(list)
    for p in session.exec(
        select(EmailParticipant)
        .where(col(EmailParticipant.email_id).in_(ids))
        .order_by(col(EmailParticipant.id))
    ):
        parts[p.email_id].append(p)
    files: dict[int, list[AttachmentPublic]] = defaultdict(list)
    for a in session.exec(
        select(Attachment).where(col(Attachment.email_id).in_(ids)).order_by(col(Attachment.id))
    ):
        files[a.email_id].append(AttachmentPublic.model_validate(a, from_attributes=True))
    links: dict[int, list[AccountLinkPublic]] = defaultdict(list)
    for link, account in session.exec(
        select(EmailAccount, MailAccount)
        .join(MailAccount, col(MailAccount.id) == col(EmailAccount.account_id))
        .where(col(EmailAccount.email_id).in_(ids))
        .order_by(col(EmailAccount.logged_at))
    ):
        links[link.email_id].append(
            AccountLinkPublic(
                account_id=account.id,
                owner=account.owner,
                kind=account.kind,
                sharing=account.sharing,
                status=link.status,
            )
        )
    out = []
    for e in emails:
        assert e.id is not None
        owner = viewer.admin or any(link.owner == viewer.email for link in links[e.id])
        by_role: dict[str, list[PartyPublic]] = defaultdict(list)
        for p in parts[e.id]:
            by_role[p.role].append(
                PartyPublic(name=p.name, address=p.address, contact_id=p.contact_id)
            )
        contact_ids = sorted(
            {
                p.contact_id
                for p in parts[e.id]
                if p.contact_id is not None and (owner or p.role != "bcc")
            }
        )
        out.append(
            EmailPublic(
                id=e.id,
                message_id=e.message_id,
                thread_id=e.thread_id,
                direction=e.direction,
                source=e.source,
                subject=e.subject,
                date=e.date,
                **{"from": by_role["from"]},
                to=by_role["to"],
                cc=by_role["cc"],
                bcc=by_role["bcc"] if owner else [],
                text_body=e.text_body,
                html_body=e.html_body,
                body_truncated=e.body_truncated,
                in_reply_to=e.in_reply_to,
                references=e.thread_refs.split() if e.thread_refs else [],
                authentication=AuthenticationPublic(spf=e.spf, dkim=e.dkim, dmarc=e.dmarc),
                attachments=files[e.id],
                raw_url=e.raw_url,
                accounts=links[e.id],
                contact_ids=contact_ids,
            )
        )
    return out
