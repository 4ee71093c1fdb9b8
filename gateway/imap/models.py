"""IMAP sync's tables: connected mailboxes, each synced folder's cursor, and where logged mail sits.

``mail_account`` holds what a user chose (provider, folders, window, sharing, switches) and what
they should see (status, progress, last error in words); its password is only ever stored
encrypted (:mod:`gateway.imap.vault`). ``mail_folder`` is the per-folder cursor of RFC 3501 and
RFC 7162: UIDVALIDITY, the last UID done and HIGHESTMODSEQ. ``mail_link`` remembers, per account,
each logged email (by its dedupe key, the normalised Message-ID) and the folder/UID where it
sits, which is what lets a UIDVALIDITY change re-link instead of logging twice, and an expunge or
move be reported as ``email.deleted`` / ``email.archived``. UIDs, UIDVALIDITY and mod-sequences
are unsigned 32-bit and 63-bit numbers, hence BIGINT columns.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, Index, LargeBinary, UniqueConstraint
from sqlmodel import Field

from gateway.store.models import GatewayTable


class AccountStatus:
    CONNECTING = "connecting"
    INITIAL_SYNC = "initial_sync"
    LIVE = "live"
    PAUSED = "paused"
    AUTH_FAILED = "auth_failed"
    ERROR = "error"


class MailAccount(GatewayTable, table=True):
    """A connected mailbox, personal (a rep's) or shared (``sales@``): choices and state."""

    __tablename__ = "mail_account"

    id: str = Field(primary_key=True, max_length=40)
    email: str = Field(index=True, max_length=320)
    owner: str = Field(index=True, max_length=320)  # the rep; a shared box's responsible person
    kind: str = Field(default="personal", max_length=16)  # personal | shared
    sharing: str = Field(default="public", max_length=16)  # private | custom | public
    selected_contacts: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    is_primary: bool = False
    provider: str = Field(default="custom", max_length=32)
    imap_host: str = Field(max_length=255)
    imap_port: int
    imap_security: str = Field(max_length=16)  # ssl | starttls | none
    username: str = Field(max_length=320)
    smtp_host: str = Field(default="", max_length=255)
    smtp_port: int = 0
    smtp_security: str = Field(default="starttls", max_length=16)
    allow_unverified_certificate: bool = False
    auth_method: str = Field(default="password", max_length=16)
    secret: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # Fernet token
    max_connections: int = 2
    sync_mode: str = Field(default="two_way", max_length=16)  # two_way | one_way
    start_from: str = Field(default="now", max_length=32)  # now | 1m | 3m | 6m | YYYY-MM-DD
    start_at: float
    folders: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    aliases: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    emit_deleted: bool = True
    emit_archived: bool = True
    allow_mailbox_changes: bool = False  # CRM -> mailbox: delete/archive in the mailbox
    enabled: bool = True
    status: str = Field(default=AccountStatus.CONNECTING, max_length=16)
    reported_status: str | None = Field(default=None, max_length=16)
    progress: float | None = None
    last_sync_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    auth_failures: int = 0
    # Which gateway process syncs this account (several may share a database), and until when.
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_expires_at: float | None = None
    created_at: float
    updated_at: float


class MailFolder(GatewayTable, table=True):
    """One synced folder of an account: its RFC 3501 / RFC 7162 cursor and first-sync progress."""

    __tablename__ = "mail_folder"
    __table_args__ = (UniqueConstraint("account_id", "name", name="uq_mail_folder_account_name"),)

    id: int | None = Field(default=None, primary_key=True)
    account_id: str = Field(
        foreign_key="mail_account.id", ondelete="CASCADE", index=True, max_length=40
    )
    name: str = Field(max_length=1000)
    special_use: str | None = Field(default=None, max_length=32)
    uidvalidity: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    last_uid: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    highest_modseq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    uidnext: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    messages: int | None = None
    initial_done: bool = False
    initial_total: int = 0
    initial_processed: int = 0
    fetched: int = 0
    logged: int = 0
    sync_started_at: float | None = None
    updated_at: float


class MailLink(GatewayTable, table=True):
    """A logged email in one account: its dedupe key and the folder/UID where it now sits."""

    __tablename__ = "mail_link"
    __table_args__ = (Index("ix_mail_link_place", "account_id", "folder", "uid"),)

    account_id: str = Field(
        primary_key=True, foreign_key="mail_account.id", ondelete="CASCADE", max_length=40
    )
    key: str = Field(primary_key=True, max_length=1000)
    folder: str = Field(max_length=1000)
    uidvalidity: int = Field(sa_column=Column(BigInteger, nullable=False))
    uid: int = Field(sa_column=Column(BigInteger, nullable=False))
    message_id: str = Field(max_length=32)  # the store's id of the accepted message
    created_at: float
