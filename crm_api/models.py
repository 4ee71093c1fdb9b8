"""The CRM's tables and API schemas, in the FastAPI template's families (``ContactBase`` →
``ContactCreate`` / ``ContactUpdate`` / ``Contact(table=True)`` / ``ContactPublic``). Tables hold
strings where the API holds enums, so no database-specific enum types are created and the same
Alembic migration serves SQLite and PostgreSQL. Times are stored as naive UTC and read back as
aware UTC (:class:`UTCDateTime`) because SQLite keeps no time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from pydantic import ConfigDict
from sqlmodel import Field, SQLModel


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A DateTime stored as naive UTC and returned as aware UTC on every backend."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _created() -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class Role(StrEnum):
    admin = "admin"
    rep = "rep"


class ThreadOrder(StrEnum):
    """Where a thread's newest message is shown (each user chooses)."""

    newest_at_top = "newest_at_top"
    newest_at_bottom = "newest_at_bottom"


class AutoCreate(StrEnum):
    none = "none"
    sent = "sent"
    sent_and_received = "sent_and_received"


class ExcludedMail(StrEnum):
    """The admin's rule for mail whose outside parties are all at excluded domains."""

    owner_only = "owner_only"
    follow_sharing = "follow_sharing"


# --- users and tokens -------------------------------------------------------------------------


class UserBase(SQLModel):
    email: str = Field(max_length=320, unique=True, index=True)
    name: str = Field(default="", max_length=200)
    role: Role = Field(default=Role.rep, sa_type=sa.String(16))


class UserCreate(UserBase):
    pass


class User(UserBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    thread_order: ThreadOrder = Field(default=ThreadOrder.newest_at_bottom, sa_type=sa.String(24))
    created_at: datetime = _created()


class UserPublic(UserBase):
    id: int
    thread_order: ThreadOrder


class UsersPublic(SQLModel):
    data: list[UserPublic]
    count: int


class UserSettingsUpdate(SQLModel):
    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    thread_order: ThreadOrder


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True, ondelete="CASCADE")
    token_hash: str = Field(max_length=64, unique=True, index=True)
    created_at: datetime = _created()


# --- contacts -------------------------------------------------------------------------------


class ContactBase(SQLModel):
    name: str = Field(default="", max_length=200)
    company: str = Field(default="", max_length=200)


class ContactCreate(ContactBase):
    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    primary_address: str = Field(max_length=320)
    secondary_addresses: list[str] = Field(default_factory=list, max_length=100)
    owner: str | None = Field(default=None, description="email of the owning user")


class ContactUpdate(SQLModel):
    """Fields left out stay as they are; ``secondary_addresses`` replaces the whole list."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    name: str | None = Field(default=None, max_length=200)
    company: str | None = Field(default=None, max_length=200)
    owner: str | None = None
    primary_address: str | None = Field(default=None, max_length=320)
    secondary_addresses: list[str] | None = Field(default=None, max_length=100)


class AddressAdd(SQLModel):
    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    address: str = Field(max_length=320)
    primary: bool = False


class Contact(ContactBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    owner_id: int | None = Field(default=None, foreign_key="user.id", ondelete="SET NULL")
    auto_created: bool = False
    created_at: datetime = _created()
    updated_at: datetime = _created()


class ContactAddress(SQLModel, table=True):
    """One address of a contact; unique across all contacts, primary or not."""

    __tablename__ = "contact_address"

    id: int | None = Field(default=None, primary_key=True)
    contact_id: int = Field(foreign_key="contact.id", index=True, ondelete="CASCADE")
    address: str = Field(max_length=320, unique=True, index=True)
    is_primary: bool = False


class ContactPublic(ContactBase):
    id: int
    owner: str | None
    primary_address: str
    secondary_addresses: list[str]
    auto_created: bool
    created_at: datetime
    updated_at: datetime


class ContactsPublic(SQLModel):
    data: list[ContactPublic]
    count: int


# --- the contract: match ----------------------------------------------------------------------


class MatchRequest(SQLModel):
    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    addresses: list[str] = Field(max_length=1000)
    owner: str | None = Field(default=None, description="the rep whose mail is being matched")


class MatchResult(SQLModel):
    address: str = Field(description="as sent")
    normalized: str | None = Field(description="null when the address is not valid")
    contact_id: int | None
    match: str | None = Field(description="'primary', 'secondary' or null")
    owner: str | None = Field(description="email of the contact's owner")
    assigned_to_owner: bool = Field(description="the contact belongs to the request's owner")


class Policy(SQLModel):
    auto_create: AutoCreate
    excluded_domains: list[str]
    assigned_records_only: bool


class MatchResponse(SQLModel):
    results: list[MatchResult]
    policy: Policy


# --- settings ---------------------------------------------------------------------------------


class OrgSettings(SQLModel, table=True):
    """The organisation's policy: a single row (id 1), seeded from ``[policy]`` in crm.toml."""

    __tablename__ = "org_settings"

    id: int = Field(default=1, primary_key=True)
    auto_create: str = Field(default="sent", max_length=24)
    company_domains: str = Field(default="[]", sa_type=sa.Text)  # JSON list
    excluded_domains: str = Field(default="[]", sa_type=sa.Text)  # JSON list
    group_local_parts: str = Field(default="[]", sa_type=sa.Text)  # JSON list
    assigned_records_only: bool = False
    excluded_mail: str = Field(default="owner_only", max_length=24)


class OrgSettingsPublic(SQLModel):
    auto_create: AutoCreate
    company_domains: list[str]
    excluded_domains: list[str]
    group_local_parts: list[str]
    assigned_records_only: bool
    excluded_mail: ExcludedMail


class OrgSettingsUpdate(SQLModel):
    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    auto_create: AutoCreate | None = None
    company_domains: list[str] | None = None
    excluded_domains: list[str] | None = None
    group_local_parts: list[str] | None = None
    assigned_records_only: bool | None = None
    excluded_mail: ExcludedMail | None = None


class SettingsPublic(SQLModel):
    organisation: OrgSettingsPublic
    user: UserPublic


# --- mail accounts, threads, emails --------------------------------------------------------------


class MailAccount(SQLModel, table=True):
    """A gateway mailbox as last described by its events; its sharing level governs all of its
    mail, retroactively."""

    __tablename__ = "mail_account"

    id: str = Field(primary_key=True, max_length=200)
    owner: str = Field(max_length=320, index=True)
    kind: str = Field(max_length=16)
    sharing: str = Field(max_length=16)
    status: str = Field(default="active", max_length=64)
    updated_at: datetime = _created()


class AccountSelection(SQLModel, table=True):
    """Under ``custom`` sharing: the contact addresses whose mail others may see."""

    __tablename__ = "account_selection"

    account_id: str = Field(
        foreign_key="mail_account.id", primary_key=True, max_length=200, ondelete="CASCADE"
    )
    address: str = Field(primary_key=True, max_length=320)


class Thread(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    subject: str = Field(default="", sa_type=sa.Text)
    subject_key: str = Field(default="", max_length=200, index=True)
    last_date: datetime = Field(sa_type=UTCDateTime, nullable=False)
    created_at: datetime = _created()


class Email(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(max_length=998, unique=True, index=True)  # RFC 5322 line limit
    thread_id: int = Field(foreign_key="thread.id", index=True)
    direction: str = Field(max_length=16)
    source: str = Field(max_length=16)
    subject: str = Field(default="", sa_type=sa.Text)
    date: datetime = Field(sa_type=UTCDateTime, nullable=False, index=True)
    text_body: str = Field(default="", sa_type=sa.Text)
    html_body: str = Field(default="", sa_type=sa.Text)
    body_truncated: bool = False
    in_reply_to: str | None = Field(default=None, max_length=998)
    thread_refs: str = Field(default="", sa_type=sa.Text)  # References, space-separated
    spf: str = Field(default="none", max_length=16)
    dkim: str = Field(default="none", max_length=16)
    dmarc: str = Field(default="none", max_length=16)
    excluded_only: bool = False  # every outside party is at an excluded domain
    raw_url: str = Field(default="", sa_type=sa.Text, sa_column_kwargs={"server_default": ""})
    created_at: datetime = _created()


class EmailReference(SQLModel, table=True):
    """A Message-ID that an email names in In-Reply-To / References, for threading in both
    directions (a reply can be logged before its parent)."""

    __tablename__ = "email_reference"

    email_id: int = Field(foreign_key="email.id", primary_key=True, ondelete="CASCADE")
    ref_message_id: str = Field(primary_key=True, max_length=998, index=True)


class EmailParticipant(SQLModel, table=True):
    __tablename__ = "email_participant"

    id: int | None = Field(default=None, primary_key=True)
    email_id: int = Field(foreign_key="email.id", index=True, ondelete="CASCADE")
    role: str = Field(max_length=8)  # from / to / cc / bcc
    name: str = Field(default="", max_length=320)
    address: str = Field(max_length=320, index=True)
    contact_id: int | None = Field(
        default=None, foreign_key="contact.id", index=True, ondelete="SET NULL"
    )


class EmailAccount(SQLModel, table=True):
    """Which account(s) an email was logged from: one email, several sightings."""

    __tablename__ = "email_account"

    email_id: int = Field(foreign_key="email.id", primary_key=True, ondelete="CASCADE")
    account_id: str = Field(
        foreign_key="mail_account.id", primary_key=True, index=True, max_length=200
    )
    status: str = Field(default="active", max_length=16)  # active / deleted / archived
    logged_at: datetime = _created()


class Attachment(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    email_id: int = Field(foreign_key="email.id", index=True, ondelete="CASCADE")
    filename: str = Field(default="", max_length=500)
    content_type: str = Field(default="application/octet-stream", max_length=200)
    size: int = 0
    url: str = Field(default="", sa_type=sa.Text)


class WebhookEvent(SQLModel, table=True):
    """Each webhook the gateway delivered, once (unique ``webhook-id``)."""

    __tablename__ = "webhook_event"

    id: int | None = Field(default=None, primary_key=True)
    webhook_id: str = Field(max_length=200, unique=True, index=True)
    type: str = Field(max_length=64)
    sent_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    received_at: datetime = _created()
    email_id: int | None = Field(default=None, foreign_key="email.id", ondelete="SET NULL")
    data: str | None = Field(default=None, sa_type=sa.Text)  # JSON, except for email.logged


# --- email API schemas ------------------------------------------------------------------------


class PartyPublic(SQLModel):
    name: str
    address: str
    contact_id: int | None


class AccountLinkPublic(SQLModel):
    account_id: str
    owner: str
    kind: str
    sharing: str
    status: str


class AttachmentPublic(SQLModel):
    id: int
    email_id: int
    filename: str
    content_type: str
    size: int
    url: str


class AuthenticationPublic(SQLModel):
    spf: str
    dkim: str
    dmarc: str


class EmailPublic(SQLModel):
    id: int
    message_id: str
    thread_id: int
    direction: str
    source: str
    subject: str
    date: datetime
    from_: list[PartyPublic] = Field(alias="from")
    to: list[PartyPublic]
    cc: list[PartyPublic]
    bcc: list[PartyPublic] = Field(description="shown only to the mail's owners and admins")
    text_body: str
    html_body: str
    body_truncated: bool
    in_reply_to: str | None
    references: list[str]
    authentication: AuthenticationPublic
    attachments: list[AttachmentPublic]
    raw_url: str = Field(description="the raw MIME on the gateway (signed link; may expire)")
    accounts: list[AccountLinkPublic]
    contact_ids: list[int]

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)  # type: ignore[assignment]


class EmailsPublic(SQLModel):
    data: list[EmailPublic]
    count: int


class ThreadPublic(SQLModel):
    id: int
    subject: str
    last_date: datetime
    order: ThreadOrder
    emails: list[EmailPublic]


class TimelinePublic(SQLModel):
    """A contact's threads, newest thread first."""

    data: list[ThreadPublic]
    count: int


class Message(SQLModel):
    detail: str
