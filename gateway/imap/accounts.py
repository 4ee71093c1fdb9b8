"""Connected mailboxes as records: what a user may choose, validated once for the CLI and the API.

Models come in a family (``AccountCreate``, ``AccountUpdate``, ``AccountPublic``); functions take
keyword-only arguments and an explicit SQLModel session, and raise :class:`AccountError` with a
sentence that says what to do. Passwords arrive as ``SecretStr`` (so no repr or log shows them),
are encrypted by the :class:`~gateway.imap.vault.Vault` before they touch a row, and no public
model has a field that could carry them back out.
"""

from __future__ import annotations

import calendar
import re
import secrets
import time
from datetime import UTC, date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from sqlalchemy import delete
from sqlmodel import Session, col, select

from gateway.imap.connection import Endpoint
from gateway.imap.models import AccountStatus, MailAccount, MailFolder, MailLink
from gateway.imap.presets import Provider, Security
from gateway.imap.vault import Vault
from gateway.message import normalise_address
from gateway.sighting import AccountRef
from gateway.smtp.policy import is_mailbox
from gateway.store.models import UserAddress

Kind = Literal["personal", "shared"]
Sharing = Literal["private", "custom", "public"]
SyncMode = Literal["two_way", "one_way"]
_START = re.compile(r"^(now|1m|3m|6m|\d{4}-\d{2}-\d{2})$")
START_HINT = "use now, 1m, 3m, 6m or a date like 2024-01-31"


class AccountError(ValueError):
    """A refused account change, with a sentence that says what to do instead."""

    def __init__(self, sentence: str, *, status: int = 400) -> None:
        super().__init__(sentence)
        self.status = status


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountCreate(_Strict):
    """Connect a mailbox: a preset ``provider`` or a custom IMAP/SMTP set-up."""

    email: str = Field(max_length=320)
    password: SecretStr | None = Field(
        default=None, description="the mailbox password or an app-specific password"
    )
    auth: Literal["password", "oauth"] = Field(
        default="password",
        description="oauth: sign in at the provider instead (POST /api/v1/accounts/oauth)",
    )
    provider: str = Field(default="custom", description="a preset key, or 'custom'")
    username: str | None = Field(default=None, description="login name if not the address")
    imap_host: str | None = None
    imap_port: int | None = Field(default=None, ge=1, le=65535)
    imap_security: Security | None = None
    smtp_host: str | None = None
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_security: Security | None = None
    allow_unverified_certificate: bool = Field(
        default=False, description="WARNING: accepts any certificate (a man in the middle too)"
    )
    owner: str | None = Field(default=None, description="the rep (default: the address)")
    kind: Kind = "personal"
    sharing: Sharing = "public"
    selected_contacts: list[str] = Field(default_factory=list)
    primary: bool = False
    sync_mode: SyncMode = "two_way"
    start: str = Field(default="now", description=START_HINT)
    folders: list[str] = Field(default_factory=list, description="empty: Inbox and Sent")
    aliases: list[str] = Field(default_factory=list, description="other addresses of this box")
    emit_deleted: bool = True
    emit_archived: bool = True
    allow_mailbox_changes: bool = False


class AccountUpdate(_Strict):
    """Change an account's choices; a new ``password`` reconnects an account whose login failed."""

    enabled: bool | None = None
    password: SecretStr | None = None
    username: str | None = None
    allow_unverified_certificate: bool | None = None
    sharing: Sharing | None = None
    selected_contacts: list[str] | None = None
    primary: bool | None = None
    sync_mode: SyncMode | None = None
    folders: list[str] | None = None
    aliases: list[str] | None = None
    emit_deleted: bool | None = None
    emit_archived: bool | None = None
    allow_mailbox_changes: bool | None = None


class FolderPublic(BaseModel):
    name: str
    special_use: str | None
    uidvalidity: int | None
    last_uid: int
    highest_modseq: int | None
    initial_done: bool
    progress: float | None
    fetched: int
    logged: int


class AccountPublic(BaseModel):
    """An account as the API and CLI show it: everything but the secret."""

    id: str
    email: str
    owner: str
    kind: str
    sharing: str
    selected_contacts: list[str]
    primary: bool
    provider: str
    imap_host: str
    imap_port: int
    imap_security: str
    username: str
    auth: str  # password | oauth
    smtp_host: str
    smtp_port: int
    smtp_security: str
    allow_unverified_certificate: bool
    warning: str | None
    sync_mode: str
    start: str
    start_at: datetime
    folders: list[str]
    aliases: list[str]
    emit_deleted: bool
    emit_archived: bool
    allow_mailbox_changes: bool
    enabled: bool
    status: str
    progress: float | None
    last_sync_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    created_at: datetime
    folder_states: list[FolderPublic] = Field(default_factory=list)


UNVERIFIED_WARNING = (
    "the server's TLS certificate is not verified for this account: anyone on the network "
    "path could read the password and mail; use it only for a server you control"
)


def _when(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None


def public(account: MailAccount, folders: list[MailFolder] | None = None) -> AccountPublic:
    return AccountPublic(
        id=account.id,
        email=account.email,
        owner=account.owner,
        kind=account.kind,
        sharing=account.sharing,
        selected_contacts=list(account.selected_contacts),
        primary=account.is_primary,
        provider=account.provider,
        imap_host=account.imap_host,
        imap_port=account.imap_port,
        imap_security=account.imap_security,
        username=account.username,
        auth=account.auth_method,
        smtp_host=account.smtp_host,
        smtp_port=account.smtp_port,
        smtp_security=account.smtp_security,
        allow_unverified_certificate=account.allow_unverified_certificate,
        warning=UNVERIFIED_WARNING if account.allow_unverified_certificate else None,
        sync_mode=account.sync_mode,
        start=account.start_from,
        start_at=datetime.fromtimestamp(account.start_at, UTC),
        folders=list(account.folders),
        aliases=list(account.aliases),
        emit_deleted=account.emit_deleted,
        emit_archived=account.emit_archived,
        allow_mailbox_changes=account.allow_mailbox_changes,
        enabled=account.enabled,
        status=account.status,
        progress=account.progress,
        last_sync_at=_when(account.last_sync_at),
        last_error=account.last_error,
        last_error_at=_when(account.last_error_at),
        created_at=datetime.fromtimestamp(account.created_at, UTC),
        folder_states=[
            FolderPublic(
                name=f.name,
                special_use=f.special_use,
                uidvalidity=f.uidvalidity,
                last_uid=f.last_uid,
                highest_modseq=f.highest_modseq,
                initial_done=f.initial_done,
                progress=(
                    None
                    if f.initial_done or not f.initial_total
                    else round(100.0 * f.initial_processed / f.initial_total, 1)
                ),
                fetched=f.fetched,
                logged=f.logged,
            )
            for f in folders or []
        ],
    )


# -- rules ------------------------------------------------------------------------------------


def start_at(start: str, *, now: float) -> float:
    """The UNIX time a window choice means: now, 1/3/6 calendar months back, or a date (UTC)."""
    if not _START.match(start):
        raise AccountError(f"start {start!r} is not understood; {START_HINT}")
    if start == "now":
        return now
    if start.endswith("m"):
        today = datetime.fromtimestamp(now, UTC)
        months = int(start[:-1])
        year, month = today.year, today.month - months
        while month < 1:
            month, year = month + 12, year - 1
        day = min(today.day, calendar.monthrange(year, month)[1])
        return today.replace(year=year, month=month, day=day).timestamp()
    try:
        return datetime.combine(date.fromisoformat(start), datetime.min.time(), UTC).timestamp()
    except ValueError:
        raise AccountError(f"start {start!r} is not a real date; {START_HINT}") from None


def _address(value: str, what: str) -> str:
    address = normalise_address(value)
    if not is_mailbox(address):
        raise AccountError(f"{what} {value!r} is not an email address (user@domain)")
    return address


def _check_sharing(sharing: str, selected: list[str]) -> list[str]:
    if selected and sharing != "custom":
        raise AccountError("selected_contacts only apply with sharing 'custom'; set sharing too")
    return [_address(a, "selected contact") for a in selected]


def _check_owner(session: Session, owner: str, kind: str) -> None:
    """A personal account belongs to a user of the gateway (login or alias address)."""
    if kind != "personal":
        return
    if session.exec(select(UserAddress).where(UserAddress.address == owner)).first() is None:
        raise AccountError(
            f"no user {owner}: personal accounts belong to a user; add them first with "
            f"`mailgate user add {owner}`, or make this a shared account"
        )


def _make_primary(session: Session, account: MailAccount) -> None:
    """One primary account per user: the new one takes over."""
    for other in session.exec(
        select(MailAccount).where(MailAccount.owner == account.owner, MailAccount.id != account.id)
    ):
        if other.is_primary:
            other.is_primary = False
            session.add(other)
    account.is_primary = True


def _endpoint_fields(
    data: AccountCreate, providers: dict[str, Provider]
) -> tuple[str, str, int, Security, str, int, Security, int]:
    if data.provider != "custom":
        preset = providers.get(data.provider)
        if preset is None:
            known = ", ".join(sorted(providers))
            raise AccountError(f"unknown provider {data.provider!r}; use one of {known} or custom")
        return (
            preset.key,
            data.imap_host or preset.imap_host,
            data.imap_port or preset.imap_port,
            data.imap_security or preset.imap_security,
            data.smtp_host or preset.smtp_host,
            data.smtp_port or preset.smtp_port,
            data.smtp_security or preset.smtp_security,
            preset.max_connections,
        )
    if not data.imap_host:
        raise AccountError("a custom set-up needs imap_host (or pick a provider preset)")
    security: Security = data.imap_security or "ssl"
    port = data.imap_port or (993 if security == "ssl" else 143)
    smtp_security: Security = data.smtp_security or "starttls"
    smtp_port = data.smtp_port or (465 if smtp_security == "ssl" else 587)
    return (
        "custom",
        data.imap_host,
        port,
        security,
        data.smtp_host or "",
        smtp_port,
        smtp_security,
        2,
    )


def new_account(
    session: Session,
    *,
    data: AccountCreate,
    vault: Vault,
    providers: dict[str, Provider],
    now: float | None = None,
) -> MailAccount:
    """Validate ``data`` and add the account (not committed); the caller tests it first."""
    now = time.time() if now is None else now
    email = _address(data.email, "the address")
    owner = _address(data.owner or email, "the owner")
    _check_owner(session, owner, data.kind)
    selected = _check_sharing(data.sharing, data.selected_contacts)
    if session.exec(select(MailAccount).where(MailAccount.email == email)).first():
        raise AccountError(
            f"{email} is connected already; change it with PATCH (or `mailgate account`), "
            "or disconnect it first",
            status=409,
        )
    provider, host, port, security, smtp_host, smtp_port, smtp_security, limit = _endpoint_fields(
        data, providers
    )
    # For OAuth the secret is the provider's tokens (JSON), set once the user has signed in.
    password = data.password.get_secret_value() if data.password is not None else ""
    if not password and data.auth == "password":
        raise AccountError("the password is empty")
    account = MailAccount(
        id=f"acct_{secrets.token_hex(8)}",
        email=email,
        owner=owner,
        kind=data.kind,
        sharing=data.sharing,
        selected_contacts=selected,
        provider=provider,
        imap_host=host,
        imap_port=port,
        imap_security=security,
        username=data.username or email,
        smtp_host=smtp_host,
        smtp_port=smtp_port,
        smtp_security=smtp_security,
        allow_unverified_certificate=data.allow_unverified_certificate,
        auth_method=data.auth,
        secret=vault.encrypt(password),
        max_connections=limit,
        sync_mode=data.sync_mode,
        start_from=data.start,
        start_at=start_at(data.start, now=now),
        folders=list(dict.fromkeys(data.folders)),
        aliases=[_address(a, "alias") for a in data.aliases],
        emit_deleted=data.emit_deleted,
        emit_archived=data.emit_archived,
        allow_mailbox_changes=data.allow_mailbox_changes,
        status=AccountStatus.CONNECTING,
        created_at=now,
        updated_at=now,
    )
    if data.primary:
        _make_primary(session, account)
    session.add(account)
    return account


def replace_secret(account: MailAccount, secret: bytes, *, auth_method: str) -> None:
    """A new password or new OAuth tokens: the failure count starts again, so it reconnects."""
    account.secret = secret
    account.auth_method = auth_method
    account.auth_failures = 0
    if account.status == AccountStatus.AUTH_FAILED:
        account.status = AccountStatus.CONNECTING


def update_account(
    session: Session, *, account: MailAccount, patch: AccountUpdate, vault: Vault | None
) -> MailAccount:
    """Apply ``patch``; a new password clears the failure count so the account reconnects."""
    changes = patch.model_dump(exclude_unset=True)
    if "password" in changes:
        if patch.password is None or not patch.password.get_secret_value():
            raise AccountError("the password is empty")
        if vault is None:
            raise AccountError("cannot store a password without imap.secret_key")
        replace_secret(
            account, vault.encrypt(patch.password.get_secret_value()), auth_method="password"
        )
    sharing = patch.sharing if patch.sharing is not None else account.sharing
    selected = (
        patch.selected_contacts
        if patch.selected_contacts is not None
        else ([] if sharing != "custom" else list(account.selected_contacts))
    )
    account.selected_contacts = _check_sharing(sharing, selected)
    account.sharing = sharing
    for name in (
        "enabled",
        "username",
        "allow_unverified_certificate",
        "sync_mode",
        "emit_deleted",
        "emit_archived",
        "allow_mailbox_changes",
    ):
        value = changes.get(name)
        if value is not None:
            setattr(account, name, value)
    if patch.folders is not None:
        account.folders = list(dict.fromkeys(patch.folders))
    if patch.aliases is not None:
        account.aliases = [_address(a, "alias") for a in patch.aliases]
    if patch.primary is True:
        _make_primary(session, account)
    elif patch.primary is False:
        account.is_primary = False
    if patch.enabled is False:
        account.status = AccountStatus.PAUSED
    elif patch.enabled is True and account.status == AccountStatus.PAUSED:
        account.status = AccountStatus.CONNECTING
    account.updated_at = time.time()
    session.add(account)
    return account


def get_account(session: Session, account_id: str) -> MailAccount:
    account = session.get(MailAccount, account_id)
    if account is None:
        raise AccountError(
            f"no account {account_id}; `mailgate account list` or GET /api/v1/accounts shows them",
            status=404,
        )
    return account


def find_account(session: Session, id_or_email: str) -> MailAccount:
    """By id, or by its address (what an admin types in the CLI)."""
    account = session.get(MailAccount, id_or_email)
    if account is None:
        account = session.exec(
            select(MailAccount).where(MailAccount.email == normalise_address(id_or_email))
        ).first()
    if account is None:
        raise AccountError(
            f"no account {id_or_email}; `mailgate account list` shows them", status=404
        )
    return account


def list_accounts(session: Session, *, owner: str | None = None) -> list[MailAccount]:
    query = select(MailAccount).order_by(col(MailAccount.created_at))
    if owner:
        query = query.where(MailAccount.owner == normalise_address(owner))
    return list(session.exec(query))


def folders_of(session: Session, account_id: str) -> list[MailFolder]:
    return list(
        session.exec(
            select(MailFolder)
            .where(MailFolder.account_id == account_id)
            .order_by(col(MailFolder.id))
        )
    )


def delete_account(session: Session, account: MailAccount) -> None:
    """Disconnect: the account, its cursors and links go; mail already logged stays logged."""
    session.exec(delete(MailLink).where(col(MailLink.account_id) == account.id))
    session.exec(delete(MailFolder).where(col(MailFolder.account_id) == account.id))
    session.delete(account)


def endpoint_of(account: MailAccount, providers: dict[str, Provider]) -> Endpoint:
    preset = providers.get(account.provider)
    kwargs = {}
    if preset is not None:
        kwargs = {
            "app_password_hint": preset.app_password_hint,
            "imap_disabled_hint": preset.imap_disabled_hint,
        }
    security: Security = "ssl"
    if account.imap_security in ("starttls", "none"):
        security = "starttls" if account.imap_security == "starttls" else "none"
    return Endpoint(
        host=account.imap_host,
        port=account.imap_port,
        security=security,
        username=account.username,
        allow_unverified_certificate=account.allow_unverified_certificate,
        oauth=account.auth_method == "oauth",
        **kwargs,
    )


def account_ref(account: MailAccount) -> AccountRef:
    return AccountRef(
        id=account.id,
        owner=account.owner,
        kind="shared" if account.kind == "shared" else "personal",
        sharing=(
            "private"
            if account.sharing == "private"
            else "custom"
            if account.sharing == "custom"
            else "public"
        ),
        selected_contacts=tuple(account.selected_contacts),
    )


def own_addresses(account: MailAccount) -> frozenset[str]:
    """The addresses that are this mailbox (or its owner): never contacts, and mark outbound."""
    found = {account.email, account.owner, *account.aliases}
    if "@" in account.username:
        found.add(normalise_address(account.username))
    return frozenset(normalise_address(a) for a in found)
