"""Sending mail from the CRM: ``POST /api/v1/emails/send`` hands the rep's message to the Mailgate
gateway (``[gateway]`` in crm.toml), which signs, relays, copies it to the rep's Sent folder and
logs it back here by webhook like any other mail, so the CRM stores nothing at this point.

The sender is the signed-in user: a rep sends as themselves (the gateway picks their primary
mailbox, or their own address); only an admin may name another mailbox. A reply names the email
it answers, which must be visible to the user, and gets its Message-ID and References.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from crm_api import visibility
from crm_api.deps import CurrentUser, SessionDep, SettingsDep, ViewerDep
from crm_api.models import Role

router = APIRouter(tags=["emails"])


class AttachmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: str = Field(min_length=1, max_length=255)
    content_type: str = Field(default="application/octet-stream", max_length=255)
    content_base64: str


class SendEmail(BaseModel):
    """A message written in the CRM."""

    model_config = ConfigDict(extra="forbid")

    to: list[str] = Field(default_factory=list, max_length=1000)
    cc: list[str] = Field(default_factory=list, max_length=1000)
    bcc: list[str] = Field(default_factory=list, max_length=1000)
    subject: str = Field(default="", max_length=998)
    text: str | None = None
    html: str | None = None
    attachments: list[AttachmentIn] = Field(default_factory=list, max_length=100)
    reply_to_email_id: int | None = Field(default=None, description="the email this answers")
    account: str | None = Field(
        default=None, description="admins only: the gateway mailbox (id or address) to send from"
    )


@router.post("/emails/send", status_code=202)
def send_email(
    session: SessionDep,
    user: CurrentUser,
    viewer: ViewerDep,
    settings: SettingsDep,
    data: SendEmail,
) -> dict[str, Any]:
    """Send through the gateway; 202 once it has queued the message (it is logged back here)."""
    gateway = settings.gateway
    if not gateway.token:
        raise HTTPException(
            503, "sending is not set up: set [gateway] url and token in the CRM's config"
        )
    if data.account is not None and user.role != Role.admin:
        raise HTTPException(403, "only an admin may send from another mailbox; leave out account")
    body: dict[str, Any] = data.model_dump(exclude={"reply_to_email_id", "account"})
    body["account" if data.account else "user"] = data.account or user.email
    if data.reply_to_email_id is not None:
        # 404 unless the user may read it: a reply cannot reveal a thread they cannot see.
        parent = visibility.get_email(
            session=session, viewer=viewer, email_id=data.reply_to_email_id
        )
        body["in_reply_to"] = f"<{parent.message_id.strip('<>')}>"
        body["references"] = [f"<{r.strip('<>')}>" for r in parent.references if r.strip("<>")]
    # Nothing more is read here: end the read transaction and give the connection back to the
    # pool rather than hold them while the gateway answers (up to timeout_seconds).
    session.close()
    try:
        reply = httpx.post(
            f"{gateway.url.rstrip('/')}/api/v1/messages",
            json=body,
            headers={"Authorization": f"Bearer {gateway.token}"},
            timeout=gateway.timeout_seconds,
            trust_env=False,
        )
    except httpx.HTTPError as exc:
        raise HTTPException(
            502, f"the gateway at {gateway.url} did not answer ({type(exc).__name__})"
        ) from None
    try:
        answer = reply.json()
    except ValueError:
        answer = {}
    if reply.status_code == 202 and isinstance(answer, dict):
        return answer
    detail = answer.get("detail") if isinstance(answer, dict) else None
    if reply.status_code in (401, 403):
        raise HTTPException(502, "the gateway refused the CRM's token; set [gateway] token anew")
    status = reply.status_code if 400 <= reply.status_code < 500 else 502
    raise HTTPException(status, f"the gateway refused the message: {detail or reply.status_code}")
