"""The gateway's tables, as SQLModel classes; Alembic migrations are written against these.

Times are UNIX seconds (floats) rather than SQL timestamps: the queue compares them on every claim,
and a number compares the same way on SQLite and PostgreSQL with no time-zone surprises. Raw
messages are kept as the exact bytes the client sent; anything the gateway adds (Message-ID, Date,
the DKIM signature) is stored separately in ``prepend`` so the original stays provable.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Index, LargeBinary, MetaData
from sqlmodel import Field, SQLModel


class GatewayTable(SQLModel):
    """Base of the gateway's tables: their own MetaData, so the bundled CRM's tables (which may
    share table names such as ``user``) can be imported in the same process."""

    metadata = MetaData()


class Source(StrEnum):
    SUBMISSION = "submission"
    CAPTURE = "capture"
    IMAP = "imap"
    API = "api"
    BOUNCE = "bounce"


class MessageState(StrEnum):
    QUEUED = "queued"  # waiting for (or in) its pipeline
    DONE = "done"  # every step ran
    BOUNCED = "bounced"  # rejected permanently; the sender got a DSN
    DISCARDED = "discarded"  # dropped on purpose
    SHUNTED = "shunted"  # an unexpected error; kept for a human, see last_error
    DELETED = "deleted"  # removed by an admin


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Message(GatewayTable, table=True):
    __tablename__ = "message"
    __table_args__ = (Index("ix_message_due", "state", "next_attempt_at"),)

    id: str = Field(primary_key=True, max_length=32)
    source: str = Field(max_length=16)
    state: str = Field(default=MessageState.QUEUED, max_length=16)
    mail_from: str = Field(max_length=512)
    rcpt_tos: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    prepend: bytes = Field(default=b"", sa_column=Column(LargeBinary, nullable=False))
    size: int = 0
    username: str | None = Field(default=None, max_length=320)
    client_address: str | None = Field(default=None, max_length=64)
    header_message_id: str | None = Field(default=None, max_length=998)
    steps_done: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    attempts: int = 0
    created_at: float
    updated_at: float
    next_attempt_at: float
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_expires_at: float | None = None
    last_error: str | None = None
    # What the door knew that the pipeline needs: IMAP account/folder/UID, capture verdicts...
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class MessageBody(GatewayTable, table=True):
    """The exact bytes a door accepted, written once and never updated.

    Kept apart from ``message`` because leasing and recording update that row many times: in
    SQLite an update rewrites the whole row, so a 25 MB body there would be copied at every
    claim and outcome.
    """

    __tablename__ = "message_body"

    id: str = Field(foreign_key="message.id", primary_key=True, max_length=32)
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class ApiSend(GatewayTable, table=True):
    """A message the CRM sent with its own Message-ID: a retry of the same request (after a
    timeout, say) finds it here and is answered with the first one, never sent twice."""

    __tablename__ = "api_send"

    message_id: str = Field(primary_key=True, max_length=998)  # the Message-ID, no brackets
    # No foreign key: an admin may delete the message from the queue; a retry still finds it.
    queue_id: str = Field(max_length=32)
    created_at: float
    # SHA-256 of what the request asked for (sender, recipients, content): the same Message-ID
    # with a different request is refused instead of answered as a repeat and never sent.
    fingerprint: str | None = Field(default=None, max_length=64)


class Delivery(GatewayTable, table=True):
    """One recipient of one message: what the upstream last said, and whether we are done."""

    __tablename__ = "delivery"

    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(foreign_key="message.id", index=True, max_length=32)
    recipient: str = Field(max_length=512)
    state: str = Field(default=DeliveryState.PENDING, max_length=16)
    attempts: int = 0
    last_code: int | None = None
    last_reply: str | None = None
    updated_at: float


class User(GatewayTable, table=True):
    """Someone who may submit mail; ``password_hash`` is Argon2id (salted, deliberately slow)."""

    __tablename__ = "user"

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(unique=True, max_length=320)
    password_hash: str = Field(max_length=256)
    is_admin: bool = False
    disabled: bool = False
    created_at: float


class UserAddress(GatewayTable, table=True):
    """An address a user may send as: their login address and any aliases (``@domain`` for all)."""

    __tablename__ = "user_address"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    address: str = Field(unique=True, max_length=320)


class ApiToken(GatewayTable, table=True):
    """A bearer token for the admin API; only its SHA-256 is kept (tokens are random, 256 bits)."""

    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    token_sha256: str = Field(unique=True, max_length=64)
    label: str = Field(default="", max_length=200)
    created_at: float


class Seen(GatewayTable, table=True):
    """One row per email and account it was logged for: promise 4's memory.

    ``key`` is the normalised Message-ID (or a content hash); a second sighting for the same
    account is not sent again, one for another account becomes an account link in the CRM.
    """

    __tablename__ = "seen"

    key: str = Field(primary_key=True, max_length=1000)
    account_id: str = Field(primary_key=True, max_length=200)
    message_id: str = Field(max_length=32)
    created_at: float


class Subscriber(GatewayTable, table=True):
    """A webhook receiver: URL, its secrets, and which events it wants."""

    __tablename__ = "subscriber"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=200)
    url: str = Field(max_length=2000)
    secrets: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    event_types: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # Loopback/private targets are refused unless the admin allows them for this subscriber.
    allow_private: bool = False
    enabled: bool = True
    disabled_reason: str | None = None
    created_at: float


class OutboxEvent(GatewayTable, table=True):
    """An event, written in the same transaction as the step that produced it."""

    __tablename__ = "outbox"

    id: str = Field(primary_key=True, max_length=64)  # the webhook-id, stable across retries
    event_type: str = Field(max_length=64, index=True)
    payload: str  # the JSON body, exactly as it is signed and sent
    created_at: float


class WebhookDelivery(GatewayTable, table=True):
    """One event to one subscriber: attempts, the next try, and the last answer."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (Index("ix_webhook_due", "state", "next_attempt_at"),)

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(foreign_key="outbox.id", index=True, max_length=64)
    subscriber_id: int = Field(foreign_key="subscriber.id", index=True)
    state: str = Field(default="pending", max_length=16)  # pending | delivered | dead
    attempts: int = 0
    next_attempt_at: float
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_expires_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None
    created_at: float
