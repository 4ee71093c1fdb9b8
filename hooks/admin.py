"""Queries and actions on webhooks for the admin API and the CLI: list, show, replay."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, func, select

from gateway.store.models import OutboxEvent, Subscriber, WebhookDelivery
from gateway.store.queue import GroupCommitter

OUTBOX = OutboxEvent.__table__  # type: ignore[attr-defined]
DELIVERY = WebhookDelivery.__table__  # type: ignore[attr-defined]
SUBSCRIBER = Subscriber.__table__  # type: ignore[attr-defined]
STATES = ("pending", "delivered", "dead")


async def list_events(
    committer: GroupCommitter, *, state: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Events newest first, each with its deliveries' states (``state`` filters on them)."""

    def read(connection: Connection) -> list[dict[str, Any]]:
        query = select(OUTBOX.c.id, OUTBOX.c.event_type, OUTBOX.c.created_at).order_by(
            OUTBOX.c.created_at.desc(), OUTBOX.c.id.desc()
        )
        if state:
            query = query.where(
                OUTBOX.c.id.in_(select(DELIVERY.c.event_id).where(DELIVERY.c.state == state))
            )
        events = [dict(row._mapping) for row in connection.execute(query.limit(limit))]
        if not events:
            return []
        states = connection.execute(
            select(DELIVERY.c.event_id, DELIVERY.c.state, func.count())
            .where(DELIVERY.c.event_id.in_([e["id"] for e in events]))
            .group_by(DELIVERY.c.event_id, DELIVERY.c.state)
        ).all()
        for event in events:
            event["deliveries"] = {s: n for e, s, n in states if e == event["id"]}
        return events

    result: list[dict[str, Any]] = await committer.read(read)
    return result


async def show_event(committer: GroupCommitter, event_id: str) -> dict[str, Any] | None:
    def read(connection: Connection) -> dict[str, Any] | None:
        row = connection.execute(select(OUTBOX).where(OUTBOX.c.id == event_id)).first()
        if row is None:
            return None
        event = dict(row._mapping)
        event["payload"] = json.loads(event["payload"])
        event["deliveries"] = [
            dict(d._mapping)
            for d in connection.execute(
                select(
                    DELIVERY.c.id,
                    SUBSCRIBER.c.name.label("subscriber"),
                    DELIVERY.c.state,
                    DELIVERY.c.attempts,
                    DELIVERY.c.next_attempt_at,
                    DELIVERY.c.last_status,
                    DELIVERY.c.last_error,
                    DELIVERY.c.delivered_at,
                )
                .join(SUBSCRIBER, SUBSCRIBER.c.id == DELIVERY.c.subscriber_id)
                .where(DELIVERY.c.event_id == event_id)
                .order_by(DELIVERY.c.id)
            )
        ]
        return event

    result: dict[str, Any] | None = await committer.read(read)
    return result
