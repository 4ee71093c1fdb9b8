"""``POST /api/v1/messages``: the CRM sends mail through the gateway.

The request names the mailbox (``account``: an account id or address) or the rep (``user``: their
primary account, or their own address) and carries the draft as JSON: recipients, subject, text
and/or HTML body, attachments in base64, and the Message-ID it answers. The answer is ``202``
with the queue id and the new Message-ID once the message is durably queued; from there it is
signed, relayed, logged back to the CRM and copied to the account's Sent folder like any other
mail (see :mod:`gateway.outgoing`). Refusals are 4xx with a ``detail`` sentence: 404 for an
unknown account or rep, 413 over the size or recipient limit, 422 for a malformed field.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from gateway.api.deps import Admin, ApiContext, Context, service
from gateway.compose import Attachment, Draft
from gateway.outgoing import Outgoing, SendError
from gateway.smtp.policy import is_mailbox

# One header line's worth, without line breaks: names, subjects and ids become header values.
HeaderText = Annotated[str, StringConstraints(max_length=998, pattern=r"^[^\r\n]*$")]
MessageIdText = Annotated[
    str, StringConstraints(max_length=998, pattern=r"^<?[^<>\s]+@[^<>\s]+>?$")
]


def _mailbox(value: str) -> str:
    value = value.strip()
    if not is_mailbox(value):
        raise ValueError(f"{value!r} is not an e-mail address (local@domain)")
    return value


class AttachmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: Annotated[
        str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\r\n/\\]+$")
    ]
    content_type: Annotated[str, StringConstraints(pattern=r"^[\w.+-]+/[\w.+-]+$")] = (
        "application/octet-stream"
    )
    content_base64: str = Field(description="the file's bytes, base64")

    def decoded(self) -> Attachment:
        try:
            data = base64.b64decode(self.content_base64, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(
                422, f"attachments: {self.filename!r} has content_base64 that is not base64"
            ) from None
        return Attachment(self.filename, self.content_type.lower(), data)


class MessageIn(BaseModel):
    """A draft from the CRM."""

    model_config = ConfigDict(extra="forbid")

    account: str | None = Field(None, max_length=320, description="mailbox id or address")
    user: str | None = Field(None, max_length=320, description="a rep: their primary mailbox")
    from_name: HeaderText = ""
    to: list[str] = Field(default_factory=list, max_length=1000)
    cc: list[str] = Field(default_factory=list, max_length=1000)
    bcc: list[str] = Field(default_factory=list, max_length=1000)
    reply_to: str | None = None
    subject: HeaderText = ""
    text: str | None = None
    html: str | None = None
    attachments: list[AttachmentIn] = Field(default_factory=list, max_length=100)
    in_reply_to: MessageIdText | None = None
    references: list[MessageIdText] = Field(default_factory=list, max_length=100)
    message_id: MessageIdText | None = Field(
        None,
        description="the Message-ID to use (default: a new one on the sender's domain); a "
        "request repeated with the same one is answered 200 with the first, never sent twice; "
        "a different request with it is refused with 409",
    )

    @field_validator("to", "cc", "bcc")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        return [_mailbox(v) for v in values]

    @field_validator("reply_to")
    @classmethod
    def _reply_to(cls, value: str | None) -> str | None:
        return None if value is None else _mailbox(value)


def _outgoing(context: ApiContext) -> Outgoing:
    return service(
        context, "outgoing", Outgoing, "sending from the API is not set up in this gateway"
    )


def router() -> APIRouter:
    routes = APIRouter(prefix="/api/v1/messages", tags=["messages"])

    @routes.post("", status_code=202)
    async def send(
        context: Context, admin: Admin, data: MessageIn, response: Response
    ) -> dict[str, Any]:
        """Queue a message from the CRM; 202 once it is stored durably."""
        draft = Draft(
            sender="",  # decided by the gateway from `account` / `user`
            sender_name=data.from_name,
            to=data.to,
            cc=data.cc,
            subject=data.subject,
            text=data.text,
            html=data.html,
            attachments=[a.decoded() for a in data.attachments],
            in_reply_to=data.in_reply_to,
            references=data.references,
            reply_to=data.reply_to,
        )
        try:
            accepted = await _outgoing(context).send(
                draft,
                account=data.account,
                user=data.user,
                bcc=data.bcc,
                message_id=data.message_id,
                requested_by=admin,
            )
        except SendError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        if accepted.repeated:
            response.status_code = 200  # sent before with this message_id: not sent again
        return {
            "repeated": accepted.repeated,
            "id": accepted.id,
            "message_id": accepted.message_id,
            "from": accepted.sender,
            "account_id": accepted.account_id,
            "recipients": accepted.recipients,
            "route": accepted.route,
            "state": "queued",
        }

    return routes
