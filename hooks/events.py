"""The webhook payloads the gateway sends: the published half of the CRM contract.

Every POST body is a Standard Webhooks envelope ``{"type", "timestamp", "data"}``; ``type``
selects the ``data`` model below. ``mailgate webhooks schema`` prints the JSON Schema generated
from these models, and the README shows an example of each. The bundled CRM (``crm_api.events``)
accepts exactly these shapes; the two are kept in step by a test that validates every payload
built here with the CRM's models.

==========================  ================================================================
``email.logged``            :class:`EmailLogged`: one email, as one account saw it
``email.deleted``           :class:`EmailStatus`: removed from that account's mailbox
``email.archived``          :class:`EmailStatus`: archived in that account's mailbox
``account.status_changed``  :class:`AccountStatusChanged`
``sync.completed``          :class:`SyncCompleted`
==========================  ================================================================
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

Verdict = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"]
EVENT_TYPES = (
    "email.logged",
    "email.deleted",
    "email.archived",
    "account.status_changed",
    "sync.completed",
)


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True, extra="forbid")


class Party(_Model):
    """One mailbox from an address header."""

    name: str = ""
    address: str


class Account(_Model):
    """The mailbox (or door) the email was seen in, and who may see its mail."""

    id: str
    owner: str = Field(description="email of the rep who owns the account")
    kind: Literal["personal", "shared"]
    sharing: Literal["private", "custom", "public"]
    selected_contacts: list[str] = Field(
        default_factory=list, description="under 'custom': contacts whose mail others may see"
    )


class AttachmentMeta(_Model):
    """An attachment's metadata; the bytes stay on the gateway behind a signed, expiring URL."""

    filename: str = ""
    content_type: str = "application/octet-stream"
    size: int = Field(ge=0)
    url: str


class Authentication(_Model):
    """SPF / DKIM / DMARC verdicts (RFC 8601 result words), where the gateway checked them."""

    spf: Verdict = "none"
    dkim: Verdict = "none"
    dmarc: Verdict = "none"


class EmailLogged(_Model):
    """``email.logged``: one email to file in the CRM, once per account that saw it."""

    message_id: str = Field(description="Message-ID without <>, or 'sha256:…' when missing")
    in_reply_to: str | None = None
    references: list[str] = Field(default_factory=list)
    direction: Literal["inbound", "outbound"]
    source: Literal["submission", "capture", "imap", "api"]
    account: Account
    from_: list[Party] = Field(alias="from")
    to: list[Party] = Field(default_factory=list)
    cc: list[Party] = Field(default_factory=list)
    bcc: list[Party] = Field(default_factory=list)
    subject: str = ""
    date: AwareDatetime
    text_body: str = ""
    html_body: str = ""
    body_truncated: bool = False
    attachments: list[AttachmentMeta] = Field(default_factory=list)
    authentication: Authentication = Field(default_factory=Authentication)
    matched_contacts: list[str] = Field(default_factory=list)
    raw_url: str = Field(default="", description="signed link to the raw MIME on the gateway")


class EmailStatus(_Model):
    """``email.deleted`` / ``email.archived``."""

    message_id: str
    account_id: str


class AccountStatusChanged(_Model):
    """``account.status_changed``: e.g. ``live`` → ``auth_failed``, with the reason in words."""

    account_id: str
    status: str
    detail: str | None = None


class SyncCompleted(_Model):
    """``sync.completed``: a sync pass of an account's folder finished."""

    account_id: str
    folder: str | None = None
    fetched: int = Field(default=0, ge=0)
    logged: int = Field(default=0, ge=0)
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None


MODELS: dict[str, type[_Model]] = {
    "email.logged": EmailLogged,
    "email.deleted": EmailStatus,
    "email.archived": EmailStatus,
    "account.status_changed": AccountStatusChanged,
    "sync.completed": SyncCompleted,
}


def envelope(event_type: str, data: _Model | dict[str, Any], *, at: datetime) -> str:
    """The JSON body for one event, validated against its model; what is signed and sent."""
    model = MODELS[event_type]
    payload = data if isinstance(data, model) else model.model_validate(data)
    body = {
        "type": event_type,
        "timestamp": at.isoformat(),
        "data": payload.model_dump(mode="json", by_alias=True),
    }
    # ensure_ascii keeps the body 7-bit: lone surrogates or odd code points cannot break it.
    return json.dumps(body, ensure_ascii=True, separators=(",", ":"))


def json_schema() -> dict[str, Any]:
    """One JSON Schema document describing every event type's ``data``."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Mailgate webhook events",
        "oneOf": [
            {
                "type": "object",
                "properties": {
                    "type": {"const": name},
                    "timestamp": {"type": "string", "format": "date-time"},
                    "data": model.model_json_schema(by_alias=True),
                },
                "required": ["type", "timestamp", "data"],
            }
            for name, model in MODELS.items()
        ],
    }
