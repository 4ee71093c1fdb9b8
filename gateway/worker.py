"""The worker: claims due messages, runs their pipeline, and records how each one ended.

Accepting doors wake the worker with the new message's id, so a message starts its way within
milliseconds; a slow poll picks up retries that came due and messages whose lease expired in a
process that died. Outcomes map to states here and only here: success → ``done``; ``Defer`` →
back in the queue after the retry schedule's next delay (or bounced once the queue lifetime is
over); ``Reject`` → ``bounced`` with a DSN to the sender; ``Discard`` → ``discarded``; anything
else → ``shunted`` with the traceback kept for a human (Mailman's shunt queue: an unexpected error
must never lose a message). A DSN is enqueued in the same transaction as the state it explains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection

from gateway.dsn import build_dsn, should_bounce
from gateway.errors import Defer, Discard, Reject, StoreError
from gateway.metrics import Metrics
from gateway.pipeline import Pipelines
from gateway.relay import RecipientResult
from gateway.settings import RelaySettings, WorkerSettings
from gateway.store.models import DeliveryState, MessageState, Source
from gateway.store.queue import DeliveryOutcome, NewMessage, QueuedMessage, Store, Write

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        *,
        store: Store,
        pipelines: Pipelines,
        settings: WorkerSettings,
        relay_settings: RelaySettings,
        hostname: str,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.pipelines = pipelines
        self.settings = settings
        self.schedule = relay_settings.retry_schedule_seconds
        self.lifetime = relay_settings.queue_lifetime_seconds
        self.bounce_sender = relay_settings.bounce_sender or f"MAILER-DAEMON@{hostname}"
        self.hostname = hostname
        self.metrics = metrics
        self.clock = clock
        self._woken: asyncio.Queue[str] = asyncio.Queue()
        self._tick = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        # When to look at the disk rather than only at what the doors handed over: at start and
        # when asked (wake() without an id), every poll interval (retries that came due, leases
        # of dead processes), and again at once while the last look filled every free slot.
        self._look = True
        self._looked_at = 0.0

    def wake(self, message_id: str = "") -> None:
        """A door stored a message (or an admin asked for a retry): look now, not at the poll."""
        if message_id:
            self._woken.put_nowait(message_id)
        else:
            self._look = True
        self._tick.set()

    async def start(self) -> None:
        # This process's doors wake us with what they accept: it may stay in memory for us.
        self.store.hand_over_accepted(True)
        self._runner = asyncio.create_task(self._run(), name="worker")

    async def stop(self) -> None:
        if self._runner:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        # Let the messages in flight finish their step; a relay is bounded by its timeouts.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        for task in self._tasks:
            task.cancel()
        try:
            await self.store.release_fresh()
        except StoreError as exc:  # their leases expire instead
            log.error("could not release unclaimed messages: %s", exc)

    async def _run(self) -> None:
        while True:
            try:
                await self._claim_and_start()
            except StoreError as exc:
                log.error("cannot claim work: %s", exc)
            except Exception:
                # The runner must outlive any bug: log it and try again at the next tick.
                log.exception("worker loop failed; retrying")
            # asyncio.timeout, not wait_for: this runs about twice per message under load, and
            # wait_for (Python 3.11) wraps the wait in a task of its own each time.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval_seconds):
                    await self._tick.wait()
            self._tick.clear()

    async def _claim_and_start(self) -> None:
        while True:
            free = self.settings.concurrency - len(self._tasks)
            if free <= 0:
                return
            ids: list[str] = []
            while not self._woken.empty() and len(ids) < free:
                ids.append(self._woken.get_nowait())
            if ids:
                items = await self.store.claim(free, ids)
            elif (
                self._look
                or time.monotonic() - self._looked_at >= self.settings.poll_interval_seconds
            ):
                # Not after every finished message: under load that was a claim transaction
                # per message that found nothing.
                self._look = False
                self._looked_at = time.monotonic()
                items = await self.store.claim(free)
                self._look = len(items) == free
            else:
                return
            for item in items:
                task = asyncio.create_task(self.process(item), name=f"message-{item.id}")
                self._tasks.add(task)
                task.add_done_callback(self._finished)
            if not ids and len(items) < free:
                return

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._tick.set()  # a slot is free: there may be more due work

    async def process(self, item: QueuedMessage) -> None:
        """Run the item's pipeline from where it stopped and record how it ended."""
        steps = self.pipelines.get(item.source)
        try:
            if steps is None:
                raise LookupError(f"no pipeline for source {item.source!r}")
            unrecorded = False
            for step in steps:
                if step.name in item.steps_done:
                    continue
                if step.durable and unrecorded:
                    await self._record(item)
                    unrecorded = False
                await step(item)
                if step.durable:
                    item.steps_done.append(step.name)
                    unrecorded = True
            await self._finish(item)
        except Defer as outcome:
            await self._defer(item, outcome)
        except Reject as outcome:
            await self._reject(item, outcome.reply)
        except Discard as outcome:
            log.info("message %s discarded: %s", item.id, outcome.reply)
            await self._record(item, state=MessageState.DISCARDED, error=outcome.reply)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("message %s shunted", item.id)
            self.metrics.shunted.inc()
            await self._record(item, state=MessageState.SHUNTED, error=traceback.format_exc())

    async def _record(
        self,
        item: QueuedMessage,
        *,
        state: MessageState | None = None,
        next_attempt_at: float | None = None,
        error: str | None = None,
        extra: Write | None = None,
    ) -> None:
        try:
            ok = await self.store.record(
                item,
                outcomes=item.outcomes,
                state=state,
                next_attempt_at=next_attempt_at,
                error=error,
                extra=extra,
            )
        except StoreError as exc:
            # The lease will expire and the message will be worked on again: at worst a
            # duplicate delivery, never a lost message.
            log.error("could not record message %s: %s", item.id, exc)
            return
        item.outcomes = []
        if not ok:
            log.warning("lease on %s was lost; another worker owns it now", item.id)

    async def _finish(self, item: QueuedMessage) -> None:
        self.metrics.relayed.inc(_delivered(item))
        extra = self._bounce(item, item.failures) if item.failures else None
        await self._record(item, state=MessageState.DONE, extra=extra)

    async def _defer(self, item: QueuedMessage, outcome: Defer) -> None:
        now = self.clock()
        self.metrics.relayed.inc(
            sum(1 for o in item.outcomes if o.state is DeliveryState.DELIVERED)
        )
        if now - item.created_at >= self.lifetime:
            expired = [
                RecipientResult(
                    r,
                    0,
                    f"message expired after {self.lifetime / 3600:.0f} hours "
                    f"in the queue; last reply: {outcome.reply}",
                    "4.4.7",
                )
                for r in item.pending_recipients
            ]
            item.outcomes += [
                DeliveryOutcome(r.recipient, DeliveryState.FAILED, code=None, reply=r.text)
                for r in expired
            ]
            extra = self._bounce(item, [*item.failures, *expired])
            await self._record(item, state=MessageState.BOUNCED, error=outcome.reply, extra=extra)
            return
        self.metrics.deferred.inc(max(1, len(item.pending_recipients)))
        delay = outcome.retry_after or self.schedule[min(item.attempts, len(self.schedule) - 1)]
        extra = self._bounce(item, item.failures) if item.failures else None
        item.failures = []
        await self._record(
            item,
            state=MessageState.QUEUED,
            next_attempt_at=now + delay,
            error=outcome.reply,
            extra=extra,
        )

    async def _reject(self, item: QueuedMessage, reply: str) -> None:
        code = int(reply[:3]) if reply[:3].isdigit() else 550
        failures = item.failures + [
            RecipientResult(r, code, reply) for r in item.pending_recipients
        ]
        item.outcomes += [
            DeliveryOutcome(r, DeliveryState.FAILED, code=code, reply=reply)
            for r in item.pending_recipients
        ]
        await self._record(
            item, state=MessageState.BOUNCED, error=reply, extra=self._bounce(item, failures)
        )

    def _bounce(self, item: QueuedMessage, failures: Sequence[RecipientResult]) -> Write | None:
        """The write that enqueues a DSN for ``failures``, or None when no DSN is due."""
        self.metrics.bounced.inc(len(failures))
        if not failures or item.source == Source.BOUNCE or not should_bounce(item.mail_from):
            return None  # never bounce a bounce (RFC 3464 §2; mail loops)
        dsn = build_dsn(
            original=item.raw,
            sender=item.mail_from,
            failures=failures,
            reporting_mta=self.hostname,
            arrival_date=datetime.fromtimestamp(item.created_at, UTC),
            from_address=self.bounce_sender,
        )
        insert = self.store.inserting(
            NewMessage(source=Source.BOUNCE.value, mail_from="", rcpt_tos=[item.mail_from], raw=dsn)
        )

        def write(connection: Connection) -> None:
            insert(connection)

        return write


def _delivered(item: QueuedMessage) -> int:
    return sum(1 for outcome in item.outcomes if outcome.state is DeliveryState.DELIVERED)
