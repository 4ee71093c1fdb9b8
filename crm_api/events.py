"""The webhook payloads the CRM accepts from the gateway: the published half of the CRM contract.

Every request body is a Standard Webhooks envelope ``{"type", "timestamp", "data"}`` signed with
the ``webhook-id`` / ``webhook-timestamp`` / ``webhook-signature`` headers (see
``crm_api.signatures``). ``type`` selects the ``data`` model:

==========================  ==========================================================
``email.logged``            :class:`EmailLogged`: one email, as the account saw it
``email.deleted``           :class:`EmailStatus`: removed from that account's mailbox
``email.archived``          :class:`EmailStatus`: archived in that account's mailbox
``account.status_changed``  :class:`AccountStatusChanged`
``sync.completed``          :class:`SyncCompleted`
==========================  ==========================================================

The gateway's ``hooks/events.py`` builds these same shapes; keep the two in step. Unknown
fields are ignored (a newer gateway may send more), unknown event types are stored and
acknowledged. A payload never carries more than the account's sharing level allows: the gateway
leaves out mail of private accounts' contacts it does not log, and the CRM enforces sharing on
every read from ``account.sharing`` (latest value wins, retroactively).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

Verdict = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"]
EVENT_TYPES = (
    "email.logged",
    "email.deleted",
    "email.archived",
    "account.status_changed",
    "sync.completed",
)

_Text = Annotated[str, Field(max_length=998)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, serialize_by_alias=True)


class Party(_Model):
    """One mailbox from an address header: display name (may be empty) and address."""

    name: str = Field(default="", max_length=320)
    address: str = Field(max_length=320)


class Account(_Model):
    """The gateway mailbox the email was seen in."""

    id: str = Field(min_length=1, max_length=200)
    owner: str = Field(max_length=320, description="email of the rep who owns the account")
    kind: Literal["personal", "shared"]
    sharing: Literal["private", "custom", "public"]
    selected_contacts: list[str] = Field(
        default_factory=list,
        max_length=10_000,
        description="under 'custom': contact addresses whose mail others may see",
    )


class AttachmentMeta(_Model):
    """Attachment metadata; the bytes stay on the gateway behind ``url``."""

    filename: str = Field(default="", max_length=500)
    content_type: str = Field(default="application/octet-stream", max_length=200)
    size: int = Field(ge=0)
    url: str = Field(max_length=4000)


class Authentication(_Model):
    """The gateway's SPF / DKIM / DMARC verdicts (RFC 8601 result words)."""

    spf: Verdict = "none"
    dkim: Verdict = "none"
    dmarc: Verdict = "none"


class EmailLogged(_Model):
    """``email.logged``: one email to file in the CRM.

    ``message_id`` is the Message-ID without angle brackets (the gateway synthesises one from a
    content hash when the header is missing); the CRM keeps one email per normalised id, so the
    same mail seen by two accounts adds an account link, not a second email. ``in_reply_to`` and
    ``references`` are the thread keys; ``matched_contacts`` are the addresses the gateway found to
    be contacts through ``/contacts/match`` (the CRM re-checks against its own records).
    """

    message_id: _Text = Field(min_length=1)
    in_reply_to: _Text | None = None
    references: list[_Text] = Field(default_factory=list, max_length=500)
    direction: Literal["inbound", "outbound"]
    source: Literal["submission", "capture", "imap", "api"]
    account: Account
    from_: list[Party] = Field(alias="from", default_factory=list, max_length=50)
    to: list[Party] = Field(default_factory=list, max_length=1000)
    cc: list[Party] = Field(default_factory=list, max_length=1000)
    bcc: list[Party] = Field(default_factory=list, max_length=1000)
    subject: str = Field(default="", max_length=10_000)
    date: AwareDatetime
    text_body: str = ""
    html_body: str = ""
    body_truncated: bool = False
    attachments: list[AttachmentMeta] = Field(default_factory=list, max_length=500)
    authentication: Authentication = Field(default_factory=Authentication)
    matched_contacts: list[str] = Field(default_factory=list, max_length=5000)
    raw_url: str = Field(
        default="", max_length=4000, description="signed link to the raw MIME on the gateway"
    )


class EmailStatus(_Model):
    """``email.deleted`` / ``email.archived``: the email left that account's mailbox (the CRM
    keeps the email and marks the account link)."""

    message_id: _Text = Field(min_length=1)
    account_id: str = Field(min_length=1, max_length=200)


class AccountStatusChanged(_Model):
    """``account.status_changed``: e.g. ``active`` → ``auth_failed``."""

    account_id: str = Field(min_length=1, max_length=200)
    status: str = Field(min_length=1, max_length=64)
    detail: str | None = Field(default=None, max_length=2000)


class SyncCompleted(_Model):
    """``sync.completed``: one IMAP sync pass of an account finished."""

    account_id: str = Field(min_length=1, max_length=200)
    folder: str | None = Field(default=None, max_length=1000)
    fetched: int = Field(default=0, ge=0)
    logged: int = Field(default=0, ge=0)
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None


class Envelope(_Model):
    """The Standard Webhooks body: ``type``, the time the event happened, and ``data``."""

    type: str = Field(min_length=1, max_length=64)
    timestamp: datetime
    data: dict[str, object]


class EmailLoggedEnvelope(_Model):
    """Parsed in one step on the hot path (``email.logged`` is most of the traffic)."""

    type: Literal["email.logged"]
    timestamp: datetime
    data: EmailLogged
