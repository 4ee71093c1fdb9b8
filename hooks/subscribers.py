"""Webhook subscribers: the bundled CRM by default, and any the admin adds.

A URL is checked when it is saved (resolved, every address must be public unless the admin allows
private targets for that subscriber) and again by the dispatcher at each connection, because DNS
answers change. The CRM named in ``[crm] url`` is kept as the subscriber ``crm`` with the
configured secrets; it is the admin's own configuration, so its (often loopback) address is
allowed.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from gateway.settings import Settings
from gateway.store.models import Subscriber, WebhookDelivery
from gateway.store.queue import GroupCommitter
from hooks.events import EVENT_TYPES
from hooks.webhooks import HostResolver, UnsafeTarget, resolve_target, system_resolver

SUBSCRIBER = Subscriber.__table__  # type: ignore[attr-defined]
DELIVERY = WebhookDelivery.__table__  # type: ignore[attr-defined]
CRM = "crm"


class SubscriberError(ValueError):
    """A refused subscriber change, with the reason."""


async def ensure_crm_subscriber(committer: GroupCommitter, settings: Settings) -> None:
    """Create or refresh the ``crm`` subscriber from the config (URL and secrets)."""
    secrets = list(settings.hooks.webhook_secrets)
    url = settings.crm.url.rstrip("/") + "/api/v1/webhooks/gateway"

    def write(connection: Connection) -> None:
        row = connection.execute(select(SUBSCRIBER.c.id).where(SUBSCRIBER.c.name == CRM)).first()
        values = {
            "url": url,
            "secrets": secrets,
            "allow_private": True,
            "enabled": bool(secrets),
            "disabled_reason": None if secrets else "no hooks.webhook_secrets configured",
        }
        if row is None:
            connection.execute(
                insert(SUBSCRIBER),
                {"name": CRM, "event_types": [], "created_at": time.time(), **values},
            )
        else:
            connection.execute(update(SUBSCRIBER).where(SUBSCRIBER.c.id == row[0]).values(**values))

    await committer.write(write)


async def add_subscriber(
    committer: GroupCommitter,
    *,
    name: str,
    url: str,
    secret: str,
    event_types: list[str],
    allow_private: bool = False,
    resolver: HostResolver = system_resolver,
) -> int:
    unknown = [t for t in event_types if t not in EVENT_TYPES]
    if unknown:
        raise SubscriberError(
            f"unknown event type(s) {', '.join(unknown)}; choose from {', '.join(EVENT_TYPES)}"
        )
    if not secret.startswith("whsec_"):
        raise SubscriberError("the secret must be a Standard Webhooks secret (whsec_…)")
    try:
        await resolve_target(url, allow_private=allow_private, resolver=resolver)
    except UnsafeTarget as exc:
        raise SubscriberError(f"refused {url}: {exc}") from None

    def write(connection: Connection) -> int:
        if connection.execute(select(SUBSCRIBER.c.id).where(SUBSCRIBER.c.name == name)).first():
            raise SubscriberError(f"a subscriber named {name!r} exists already")
        return int(
            connection.execute(
                insert(SUBSCRIBER).returning(SUBSCRIBER.c.id),
                {
                    "name": name,
                    "url": url,
                    "secrets": [secret],
                    "event_types": event_types,
                    "allow_private": allow_private,
                    "enabled": True,
                    "created_at": time.time(),
                },
            ).scalar_one()
        )

    result: int = await committer.write(write)
    return result


async def list_subscribers(committer: GroupCommitter) -> list[dict[str, Any]]:
    def read(connection: Connection) -> list[dict[str, Any]]:
        rows = connection.execute(select(SUBSCRIBER).order_by(SUBSCRIBER.c.id)).all()
        # Secrets are never shown again: only how many there are.
        return [
            {
                **{k: v for k, v in row._mapping.items() if k != "secrets"},
                "secrets": len(row.secrets),
            }
            for row in rows
        ]

    result: list[dict[str, Any]] = await committer.read(read)
    return result


async def remove_subscriber(committer: GroupCommitter, name: str) -> bool:
    def write(connection: Connection) -> bool:
        table = DELIVERY
        row = connection.execute(select(SUBSCRIBER.c.id).where(SUBSCRIBER.c.name == name)).first()
        if row is None:
            return False
        connection.execute(delete(table).where(table.c.subscriber_id == row[0]))
        connection.execute(delete(SUBSCRIBER).where(SUBSCRIBER.c.id == row[0]))
        return True

    result: bool = await committer.write(write)
    return result
