"""The ``emit`` step: turn a matched sighting into an ``email.logged`` event, exactly once.

The ``seen`` table remembers every (email, account) pair that was logged. In one transaction the
step checks it, records the pair, and writes the event to the outbox, so a crash and a resume, a
re-synced mailbox or a second door for the same account never log the same email twice for the
same account; the same email from another account is logged again on purpose, and the CRM turns it
into a second account link on one email. Mail that matched no contact emits nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, text

from gateway.message import dedupe_key
from gateway.settings import HooksSettings
from gateway.store.queue import GroupCommitter, QueuedMessage
from hooks.payload import build_email_logged
from hooks.webhooks import Outbox

_REMEMBER = text(
    "INSERT INTO seen (key, account_id, message_id, created_at) "
    "VALUES (:key, :account_id, :message_id, :created_at) ON CONFLICT DO NOTHING"
)


class EmitLogged:
    name = "emit"
    durable = True

    def __init__(
        self,
        *,
        committer: GroupCommitter,
        outbox: Outbox,
        settings: HooksSettings,
        on_emitted: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.committer = committer
        self.outbox = outbox
        self.settings = settings
        self.on_emitted = on_emitted
        self.clock = clock

    async def __call__(self, item: QueuedMessage) -> None:
        sighting = item.sighting
        if sighting is None or not sighting.matched:
            return
        key = dedupe_key(sighting.raw)
        payload = build_email_logged(
            sighting,
            message_row_id=item.id,
            arrived=item.created_at,
            max_body=self.settings.max_body_bytes,
            public_url=self.settings.public_url,
            link_secret=self.settings.link_secret,
            link_lifetime=self.settings.link_lifetime_seconds,
            key=key,
        )
        account = sighting.account.id
        event = self.outbox.event("email.logged", payload)
        now = self.clock()

        def write(connection: Connection) -> bool:
            # ON CONFLICT DO NOTHING (SQLite and PostgreSQL alike): two doors logging the same
            # email for the same account at the same moment must not fail either transaction.
            inserted = connection.execute(
                _REMEMBER,
                {"key": key, "account_id": account, "message_id": item.id, "created_at": now},
            ).rowcount
            if not inserted:
                return False
            event(connection)
            return True

        if await self.committer.write(write):
            self.on_emitted()
