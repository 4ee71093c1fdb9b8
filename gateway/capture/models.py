"""The capture door's tables: each user's secret capture address, and the quarantine.

Both subclass :class:`GatewayTable` so they live on the gateway's own MetaData and are created by
migration ``0003``. A quarantined message stays in the ``message`` table (state ``discarded``)
with its exact bytes; the quarantine row says why it was held and, once an admin releases it, as
whom it may be logged. Deleting the message deletes the row (``ON DELETE CASCADE``), so
``mailgate queue delete`` never trips over it.
"""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, String
from sqlmodel import Field

from gateway.store.models import GatewayTable


class CaptureToken(GatewayTable, table=True):
    """A user's secret capture address ``log+TOKEN@DOMAIN``; one per user, rotatable."""

    __tablename__ = "capture_token"

    user_id: int = Field(foreign_key="user.id", primary_key=True)
    token: str = Field(unique=True, max_length=64)
    created_at: float


class QuarantinedMessage(GatewayTable, table=True):
    """A captured message held for an admin: the claimed owner, the reason, the release."""

    __tablename__ = "capture_quarantine"

    message_id: str = Field(
        sa_column=Column(String(32), ForeignKey("message.id", ondelete="CASCADE"), primary_key=True)
    )
    from_address: str = Field(default="", max_length=320)
    subject: str = Field(default="", max_length=998)
    claimed_owner: str | None = Field(default=None, max_length=320)
    reason: str
    created_at: float
    released_at: float | None = None
    released_by: str | None = Field(default=None, max_length=320)
    # Whom the released message is logged as (the claimed owner unless the admin chose another).
    release_owner: str | None = Field(default=None, max_length=320)
