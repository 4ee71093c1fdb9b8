"""The quarantine: captured messages from a user's address that nothing proved, held for an admin.

With ``capture.on_unverified = "quarantine"`` the door accepts such a message, and the
``identify-owner`` step holds it: a :class:`QuarantinedMessage` row says why, and the message
itself ends ``discarded`` (so nothing else works on it) with its exact bytes kept. An admin
lists, releases or deletes it, from the CLI or the admin API, through these functions. A
release records who released it and as whom it is logged, then puts the message back in the
queue: ``identify-owner`` finds the release and treats it as proven. Nothing here ever logs a
held message in anyone's name by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, insert, select, update

from gateway.capture.directory import load_directory
from gateway.capture.models import QuarantinedMessage
from gateway.errors import GatewayError
from gateway.message import normalise_address
from gateway.store.models import Message
from gateway.store.queue import Store

QUARANTINE = QuarantinedMessage.__table__  # type: ignore[attr-defined]
MESSAGE = Message.__table__  # type: ignore[attr-defined]


class QuarantineError(GatewayError):
    """An admin's quarantine request that cannot be done; the sentence says what to do."""


def holding(
    message_id: str, *, from_address: str, subject: str, claimed_owner: str | None, reason: str
) -> Callable[[Connection], None]:
    """The write that holds ``message_id`` (again: a retried step changes nothing)."""

    def write(connection: Connection) -> None:
        exists = connection.execute(
            select(QUARANTINE.c.message_id).where(QUARANTINE.c.message_id == message_id)
        ).first()
        if exists is None:
            connection.execute(
                insert(QUARANTINE),
                {
                    "message_id": message_id,
                    "from_address": from_address[:320],
                    "subject": subject[:998],
                    "claimed_owner": claimed_owner,
                    "reason": reason,
                    "created_at": time.time(),
                },
            )

    return write


def released_owner(connection: Connection, message_id: str) -> str | None:
    """Whom an admin released ``message_id`` to be logged as, or None if not released."""
    row = connection.execute(
        select(QUARANTINE.c.release_owner)
        .where(QUARANTINE.c.message_id == message_id)
        .where(QUARANTINE.c.released_at.is_not(None))
    ).first()
    return None if row is None else row.release_owner


async def held(store: Store, *, limit: int = 100) -> list[dict[str, Any]]:
    """Messages waiting for an admin, oldest first."""

    def read(connection: Connection) -> list[dict[str, Any]]:
        rows = connection.execute(
            select(
                QUARANTINE.c.message_id.label("id"),
                QUARANTINE.c.from_address,
                QUARANTINE.c.subject,
                QUARANTINE.c.claimed_owner,
                QUARANTINE.c.reason,
                QUARANTINE.c.created_at,
                MESSAGE.c.mail_from,
                MESSAGE.c.client_address,
                MESSAGE.c.size,
            )
            .join(MESSAGE, MESSAGE.c.id == QUARANTINE.c.message_id)
            .where(QUARANTINE.c.released_at.is_(None))
            .order_by(QUARANTINE.c.created_at)
            .limit(limit)
        )
        return [dict(row._mapping) for row in rows]

    result: list[dict[str, Any]] = await store.committer.read(read)
    return result


async def release(
    store: Store,
    message_id: str,
    *,
    admin: str,
    owner: str | None = None,
    wake: Callable[[str], None] = lambda _id: None,
) -> str:
    """Log a held message after all, as ``owner`` (default: the user whose From it is).

    Returns the owner. Raises :class:`QuarantineError` when the id is not held or nobody
    can own it.
    """
    now = time.time()

    def write(connection: Connection) -> str:
        from sqlmodel import Session

        row = connection.execute(
            select(QUARANTINE).where(QUARANTINE.c.message_id == message_id)
        ).first()
        if row is None:
            raise QuarantineError(
                f"no quarantined message {message_id}; `mailgate capture quarantine list` "
                "shows the ids"
            )
        chosen = normalise_address(owner) if owner else row.claimed_owner
        if not chosen:
            raise QuarantineError(
                f"{message_id} is from {row.from_address}, who is no user: release it with "
                "--as EMAIL (the user to log it as), or delete it"
            )
        directory = load_directory(Session(bind=connection))
        if chosen not in directory.own:
            raise QuarantineError(
                f"{chosen} is not an enabled user; `mailgate user list` shows who is"
            )
        connection.execute(
            update(QUARANTINE)
            .where(QUARANTINE.c.message_id == message_id)
            .values(released_at=now, released_by=admin, release_owner=chosen)
        )
        return str(chosen)

    chosen: str = await store.committer.write(write)
    if not await store.retry_now(message_id):
        raise QuarantineError(f"{message_id} is no longer in the queue; nothing to release")
    wake(message_id)
    return chosen


async def delete(store: Store, message_id: str) -> None:
    """Delete a held message for good (its quarantine row goes with it)."""

    def read(connection: Connection) -> bool:
        found = connection.execute(
            select(QUARANTINE.c.message_id)
            .where(QUARANTINE.c.message_id == message_id)
            .where(QUARANTINE.c.released_at.is_(None))
        ).first()
        return found is not None

    if not await store.committer.read(read):
        raise QuarantineError(
            f"no quarantined message {message_id}; `mailgate capture quarantine list` shows the ids"
        )
    await store.delete(message_id)
