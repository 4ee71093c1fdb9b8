"""Create/read/update/delete for users, tokens, contacts and the organisation's settings, plus the
contract's batch match. Every function takes keyword-only arguments and an explicit session and
never commits: the route (one request, one transaction) does, so nothing is half-stored. Email
reads live in ``visibility`` (what a user may see) and email writes in ``ingest``."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from sqlmodel import Session, col, func, or_, select

from crm_api.addresses import InvalidAddress, normalise_address, normalise_domain
from crm_api.errors import Conflict, NotFound, Unprocessable
from crm_api.models import (
    ApiToken,
    AutoCreate,
    Contact,
    ContactAddress,
    ContactCreate,
    ContactPublic,
    ContactUpdate,
    EmailParticipant,
    ExcludedMail,
    MatchRequest,
    MatchResponse,
    MatchResult,
    OrgSettings,
    OrgSettingsPublic,
    OrgSettingsUpdate,
    Policy,
    User,
    UserCreate,
    utcnow,
)
from crm_api.settings import PolicySettings

TOKEN_PREFIX = "mgc_"
_CHUNK = 500  # bound on IN-list sizes, well under SQLite's variable limit

# --- users and tokens -------------------------------------------------------------------------


def hash_token(token: str) -> str:
    # Tokens are 256 random bits, so a fast unsalted hash is enough (no dictionary to attack).
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(*, session: Session, user_in: UserCreate) -> User:
    try:
        email = normalise_address(user_in.email)
    except InvalidAddress as exc:
        raise Unprocessable(str(exc)) from None
    if get_user_by_email(session=session, email=email) is not None:
        raise Conflict(f"a user with email {email} already exists")
    user = User(email=email, name=user_in.name, role=user_in.role)
    session.add(user)
    session.flush()
    return user


def get_user_by_email(*, session: Session, email: str) -> User | None:
    try:
        email = normalise_address(email)
    except InvalidAddress:
        return None
    return session.exec(select(User).where(User.email == email)).first()


def list_users(*, session: Session, offset: int = 0, limit: int = 100) -> tuple[list[User], int]:
    count = session.exec(select(func.count()).select_from(User)).one()
    users = session.exec(select(User).order_by(col(User.id)).offset(offset).limit(limit)).all()
    return list(users), count


def create_token(*, session: Session, user: User) -> str:
    """A new API token for ``user``; the plaintext is returned once and only its hash stored."""
    assert user.id is not None
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, token_hash=hash_token(token)))
    session.flush()
    return token


def user_for_token(*, session: Session, token: str) -> User | None:
    stmt = (
        select(User)
        .join(ApiToken, col(ApiToken.user_id) == col(User.id))
        .where(ApiToken.token_hash == hash_token(token))
    )
    return session.exec(stmt).first()


# --- organisation settings --------------------------------------------------------------------


def get_org(*, session: Session) -> OrgSettings:
    org = session.get(OrgSettings, 1)
    if org is None:  # seeded at startup; this only guards a database created by hand
        org = OrgSettings(id=1)
    return org


def _domains(values: Iterable[str], what: str) -> list[str]:
    out: set[str] = set()
    for value in values:
        try:
            out.add(normalise_domain(value.strip().lstrip("@")))
        except InvalidAddress as exc:
            raise Unprocessable(f"{what}: {exc}") from None
    return sorted(out)


def seed_org(*, session: Session, policy: PolicySettings) -> None:
    """Store ``[policy]`` from crm.toml as the organisation's settings, unless already stored."""
    if session.get(OrgSettings, 1) is not None:
        return
    session.add(
        OrgSettings(
            id=1,
            auto_create=policy.auto_create,
            company_domains=json.dumps(_domains(policy.company_domains, "company_domains")),
            excluded_domains=json.dumps(_domains(policy.excluded_domains, "excluded_domains")),
            group_local_parts=json.dumps(sorted({p.lower() for p in policy.group_local_parts})),
            assigned_records_only=policy.assigned_records_only,
            excluded_mail=policy.excluded_mail,
        )
    )


def org_public(org: OrgSettings) -> OrgSettingsPublic:
    return OrgSettingsPublic(
        auto_create=AutoCreate(org.auto_create),
        company_domains=json.loads(org.company_domains),
        excluded_domains=json.loads(org.excluded_domains),
        group_local_parts=json.loads(org.group_local_parts),
        assigned_records_only=org.assigned_records_only,
        excluded_mail=ExcludedMail(org.excluded_mail),
    )


def update_org(*, session: Session, org: OrgSettings, update: OrgSettingsUpdate) -> OrgSettings:
    if update.auto_create is not None:
        org.auto_create = update.auto_create.value
    if update.company_domains is not None:
        org.company_domains = json.dumps(_domains(update.company_domains, "company_domains"))
    if update.excluded_domains is not None:
        org.excluded_domains = json.dumps(_domains(update.excluded_domains, "excluded_domains"))
    if update.group_local_parts is not None:
        org.group_local_parts = json.dumps(sorted({p.lower() for p in update.group_local_parts}))
    if update.assigned_records_only is not None:
        org.assigned_records_only = update.assigned_records_only
    if update.excluded_mail is not None:
        org.excluded_mail = update.excluded_mail.value
    session.add(org)
    session.flush()
    return org


def policy(org: OrgSettings) -> Policy:
    """The policy half of a match answer: excluded domains include the company's own."""
    excluded = set(json.loads(org.company_domains)) | set(json.loads(org.excluded_domains))
    return Policy(
        auto_create=AutoCreate(org.auto_create),
        excluded_domains=sorted(excluded),
        assigned_records_only=org.assigned_records_only,
    )


# --- contacts ---------------------------------------------------------------------------------


def _normalise(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        try:
            address = normalise_address(value)
        except InvalidAddress as exc:
            raise Unprocessable(str(exc)) from None
        if address in out:
            raise Unprocessable(f"address {address} is listed twice")
        out.append(address)
    return out


def _owner_id(*, session: Session, owner: str | None) -> int | None:
    if owner is None or owner == "":
        return None
    user = get_user_by_email(session=session, email=owner)
    if user is None:
        raise Unprocessable(f"owner {owner!r} is not a CRM user; add them with `crm user add`")
    return user.id


def _set_addresses(
    *, session: Session, contact_id: int, primary: str, secondaries: Sequence[str]
) -> None:
    """Make the contact's addresses exactly ``primary`` + ``secondaries`` (normalised), refusing
    addresses another contact holds, and relink logged mail to match."""
    wanted = _normalise([primary, *secondaries])
    taken = session.exec(
        select(ContactAddress).where(
            col(ContactAddress.address).in_(wanted), ContactAddress.contact_id != contact_id
        )
    ).all()
    if taken:
        raise Conflict(
            f"address {taken[0].address} already belongs to contact {taken[0].contact_id}"
        )
    current = {
        row.address: row
        for row in session.exec(
            select(ContactAddress).where(ContactAddress.contact_id == contact_id)
        ).all()
    }
    removed = [a for a in current if a not in wanted]
    for address in removed:
        session.delete(current.pop(address))
    session.flush()
    added: list[str] = []
    for address in wanted:
        is_primary = address == wanted[0]
        row = current.get(address)
        if row is None:
            session.add(
                ContactAddress(contact_id=contact_id, address=address, is_primary=is_primary)
            )
            added.append(address)
        elif row.is_primary != is_primary:
            row.is_primary = is_primary
            session.add(row)
    session.flush()
    link_addresses(session=session, contact_id=contact_id, added=added, removed=removed)


def link_addresses(
    *, session: Session, contact_id: int, added: Sequence[str], removed: Sequence[str] = ()
) -> None:
    """Mail already logged with a newly gained address now belongs to the contact (and mail
    with a dropped address no longer does)."""
    if removed:
        session.execute(
            sa.update(EmailParticipant)
            .where(
                col(EmailParticipant.address).in_(removed),
                col(EmailParticipant.contact_id) == contact_id,
            )
            .values(contact_id=None)
        )
    if added:
        session.execute(
            sa.update(EmailParticipant)
            .where(col(EmailParticipant.address).in_(added))
            .values(contact_id=contact_id)
        )


def create_contact(*, session: Session, contact_in: ContactCreate, auto: bool = False) -> Contact:
    contact = Contact(
        name=contact_in.name,
        company=contact_in.company,
        owner_id=_owner_id(session=session, owner=contact_in.owner),
        auto_created=auto,
    )
    session.add(contact)
    session.flush()
    assert contact.id is not None
    _set_addresses(
        session=session,
        contact_id=contact.id,
        primary=contact_in.primary_address,
        secondaries=contact_in.secondary_addresses,
    )
    return contact


def get_contact(*, session: Session, contact_id: int) -> Contact:
    contact = session.get(Contact, contact_id)
    if contact is None:
        raise NotFound(f"contact {contact_id} not found")
    return contact


def update_contact(*, session: Session, contact: Contact, update: ContactUpdate) -> Contact:
    assert contact.id is not None
    if update.name is not None:
        contact.name = update.name
    if update.company is not None:
        contact.company = update.company
    if "owner" in update.model_fields_set:
        contact.owner_id = _owner_id(session=session, owner=update.owner)
    if update.primary_address is not None or update.secondary_addresses is not None:
        primary, secondaries = addresses_of(session=session, contact_id=contact.id)
        _set_addresses(
            session=session,
            contact_id=contact.id,
            primary=update.primary_address or primary,
            secondaries=(
                update.secondary_addresses
                if update.secondary_addresses is not None
                else [a for a in secondaries if a != update.primary_address]
            ),
        )
    contact.updated_at = utcnow()
    session.add(contact)
    session.flush()
    return contact


def add_address(*, session: Session, contact: Contact, address: str, primary: bool) -> Contact:
    assert contact.id is not None
    current_primary, secondaries = addresses_of(session=session, contact_id=contact.id)
    new = _normalise([address])[0]
    everything = [current_primary, *secondaries]
    if new in everything:
        raise Conflict(f"address {new} is already on contact {contact.id}")
    if primary:
        _set_addresses(session=session, contact_id=contact.id, primary=new, secondaries=everything)
    else:
        _set_addresses(
            session=session,
            contact_id=contact.id,
            primary=current_primary,
            secondaries=[*secondaries, new],
        )
    contact.updated_at = utcnow()
    session.add(contact)
    return contact


def remove_address(*, session: Session, contact: Contact, address: str) -> Contact:
    assert contact.id is not None
    primary, secondaries = addresses_of(session=session, contact_id=contact.id)
    target = _normalise([address])[0]
    if target == primary:
        raise Unprocessable(f"{target} is the primary address; make another address primary first")
    if target not in secondaries:
        raise NotFound(f"address {target} is not on contact {contact.id}")
    _set_addresses(
        session=session,
        contact_id=contact.id,
        primary=primary,
        secondaries=[a for a in secondaries if a != target],
    )
    contact.updated_at = utcnow()
    session.add(contact)
    return contact


def delete_contact(*, session: Session, contact: Contact) -> None:
    assert contact.id is not None
    session.execute(
        sa.update(EmailParticipant)
        .where(col(EmailParticipant.contact_id) == contact.id)
        .values(contact_id=None)
    )
    session.execute(sa.delete(ContactAddress).where(col(ContactAddress.contact_id) == contact.id))
    session.delete(contact)
    session.flush()


def addresses_of(*, session: Session, contact_id: int) -> tuple[str, list[str]]:
    rows = session.exec(
        select(ContactAddress)
        .where(ContactAddress.contact_id == contact_id)
        .order_by(col(ContactAddress.id))
    ).all()
    primary = next((r.address for r in rows if r.is_primary), "")
    return primary, [r.address for r in rows if not r.is_primary]


def contacts_public(*, session: Session, contacts: Sequence[Contact]) -> list[ContactPublic]:
    """Hydrate contacts with their addresses and owners in two queries, not 2·N."""
    ids = [c.id for c in contacts if c.id is not None]
    addresses: dict[int, list[ContactAddress]] = {i: [] for i in ids}
    if ids:
        for row in session.exec(
            select(ContactAddress)
            .where(col(ContactAddress.contact_id).in_(ids))
            .order_by(col(ContactAddress.id))
        ).all():
            addresses[row.contact_id].append(row)
    owner_ids = {c.owner_id for c in contacts if c.owner_id is not None}
    owners = (
        {u.id: u.email for u in session.exec(select(User).where(col(User.id).in_(owner_ids)))}
        if owner_ids
        else {}
    )
    out = []
    for c in contacts:
        assert c.id is not None
        rows = addresses[c.id]
        out.append(
            ContactPublic(
                id=c.id,
                name=c.name,
                company=c.company,
                owner=owners.get(c.owner_id) if c.owner_id is not None else None,
                primary_address=next((r.address for r in rows if r.is_primary), ""),
                secondary_addresses=[r.address for r in rows if not r.is_primary],
                auto_created=c.auto_created,
                created_at=c.created_at,
                updated_at=c.updated_at,
            )
        )
    return out


def list_contacts(
    *,
    session: Session,
    q: str | None = None,
    owner: str | None = None,
    offset: int = 0,
    limit: int = 50,
) -> tuple[list[Contact], int]:
    stmt = select(Contact)
    if q:
        pattern = f"%{q.strip()}%"
        by_address = select(ContactAddress.contact_id).where(
            col(ContactAddress.address).ilike(pattern)
        )
        stmt = stmt.where(
            or_(
                col(Contact.name).ilike(pattern),
                col(Contact.company).ilike(pattern),
                col(Contact.id).in_(by_address),
            )
        )
    if owner:
        user = get_user_by_email(session=session, email=owner)
        stmt = stmt.where(Contact.owner_id == (user.id if user else -1))
    count = session.exec(select(func.count()).select_from(stmt.subquery())).one()
    rows = session.exec(stmt.order_by(col(Contact.id)).offset(offset).limit(limit)).all()
    return list(rows), count


# --- the contract: match ----------------------------------------------------------------------


def match(*, session: Session, request: MatchRequest, org: OrgSettings) -> MatchResponse:
    """Which of up to 1,000 addresses are contacts, in the order asked. Addresses are unique
    across contacts, so an address is the primary of one contact or a secondary of one, never
    both; invalid addresses answer ``normalized: null`` rather than failing the batch."""
    normalised = {a: _try(a) for a in request.addresses}
    valid = sorted({n for n in normalised.values() if n})
    found: dict[str, tuple[int, bool, str | None]] = {}
    for start in range(0, len(valid), _CHUNK):
        chunk = valid[start : start + _CHUNK]
        stmt = (
            select(
                ContactAddress.address,
                ContactAddress.contact_id,
                ContactAddress.is_primary,
                User.email,
            )
            .join(Contact, col(Contact.id) == col(ContactAddress.contact_id))
            .outerjoin(User, col(User.id) == col(Contact.owner_id))
            .where(col(ContactAddress.address).in_(chunk))
        )
        for address, contact_id, is_primary, owner_email in session.exec(stmt).all():
            found[address] = (contact_id, is_primary, owner_email)
    requester = _try(request.owner) if request.owner else None
    results = []
    for raw in request.addresses:
        norm = normalised[raw]
        hit = found.get(norm) if norm else None
        results.append(
            MatchResult(
                address=raw,
                normalized=norm,
                contact_id=hit[0] if hit else None,
                match=("primary" if hit[1] else "secondary") if hit else None,
                owner=hit[2] if hit else None,
                assigned_to_owner=bool(hit and requester and hit[2] == requester),
            )
        )
    return MatchResponse(results=results, policy=policy(org))


def _try(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return normalise_address(text)
    except InvalidAddress:
        return None
