"""The durable queue on SQLite and PostgreSQL: group commit, leases, outcomes."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import event, text

from gateway.message import parse_headers
from gateway.store.db import make_engine, migrate
from gateway.store.models import DeliveryState, MessageState
from gateway.store.queue import (
    DeliveryOutcome,
    GroupCommitter,
    NewMessage,
    Store,
    _writer_lock_path,
    new_message_id,
)

T = TypeVar("T")


def run_with_store(
    url: str, body: Callable[[Store, Store], Awaitable[T]], *, lease: float = 300
) -> T:
    """Two Stores (as two gateway processes would have) on one database."""

    async def main() -> T:
        engine = make_engine(url)
        migrate(engine)
        first, second = GroupCommitter(engine), GroupCommitter(engine)
        await first.start()
        await second.start()
        clock = Clock()
        try:
            return await body(
                Store(engine, first, lease_seconds=lease, owner="one", clock=clock),
                Store(engine, second, lease_seconds=lease, owner="two", clock=clock),
            )
        finally:
            await first.stop()
            await second.stop()
            engine.dispose()

    return asyncio.run(main())


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def message(n: int) -> NewMessage:
    return NewMessage(
        source="submission",
        mail_from="rep@example.com",
        rcpt_tos=[f"a{n}@x.test", f"b{n}@x.test"],
        raw=b"Subject: %d\r\n\r\nbody\r\n" % n,
    )


def test_accepted_message_is_committed_and_claimed_once(db_url: str) -> None:
    async def body(one: Store, two: Store) -> None:
        stored = await one.accept(message(1))
        first = await one.claim(10)
        assert [m.id for m in first] == [stored]
        assert first[0].pending_recipients == ["a1@x.test", "b1@x.test"]
        assert first[0].raw == b"Subject: 1\r\n\r\nbody\r\n"
        # The other process sees nothing while the lease holds.
        assert await two.claim(10) == []

    run_with_store(db_url, body)


def test_a_dead_workers_lease_expires(db_url: str) -> None:
    async def body(one: Store, two: Store) -> None:
        stored = await one.accept(message(1))
        [item] = await one.claim(1)
        one.clock.now += 301  # type: ignore[attr-defined]
        [again] = await two.claim(1)
        assert again.id == stored
        # The first owner's late outcome must not overwrite the new owner's work.
        assert await one.record(item, state=MessageState.DONE) is False
        assert await two.record(again, state=MessageState.DONE) is True
        row = await two.get_message(stored)
        assert row is not None and row["state"] == "done"

    run_with_store(db_url, body)


def test_a_message_accepted_for_our_worker_is_handed_out_as_a_disk_claim_would_be(
    db_url: str,
) -> None:
    def with_meta() -> NewMessage:
        return dataclasses.replace(message(1), meta={"account": ("a", 1)}, id=new_message_id())

    async def body(one: Store, two: Store) -> None:
        on_disk = await one.accept(with_meta())
        [from_disk] = await one.claim(1, [on_disk])
        one.hand_over_accepted(True)
        parsed = parse_headers(message(1).raw)
        fresh = await one.accept(dataclasses.replace(with_meta(), headers=parsed))
        # Leased to us at insert: the other process cannot take it, nor a poll of ours.
        assert await two.claim(10) == []
        [from_memory] = await one.claim(10, [fresh])
        assert from_memory.id == fresh
        for name in ("source", "mail_from", "rcpt_tos", "raw", "prepend", "username", "meta"):
            assert getattr(from_memory, name) == getattr(from_disk, name), name
        assert from_memory.pending_recipients == from_disk.pending_recipients
        assert from_memory.headers() is parsed  # the door's parse, not a second one
        assert (from_memory.steps_done, from_memory.attempts) == ([], 0)
        assert await one.claim(10, [fresh]) == []  # handed out once
        assert await one.record(from_memory, state=MessageState.DONE) is True

    run_with_store(db_url, body)


def test_an_unclaimed_accepted_message_comes_back_to_the_queue(db_url: str) -> None:
    async def body(one: Store, two: Store) -> None:
        one.hand_over_accepted(True)
        released = await one.accept(message(1))
        await one.release_fresh()  # shutdown: its lease is given back at once
        [item] = await two.claim(10)
        assert item.id == released
        await two.record(item, state=MessageState.DONE)
        one.hand_over_accepted(True)
        stale = await one.accept(message(2))
        one.clock.now += 151  # type: ignore[attr-defined]
        # Half the lease is gone: forgotten here, so it can only come back from disk.
        assert await one.claim(10, [stale]) == []
        one.clock.now += 150  # type: ignore[attr-defined]
        assert [m.id for m in await two.claim(10)] == [stale]

    run_with_store(db_url, body)


def test_concurrent_claims_never_hand_out_the_same_message(db_url: str) -> None:
    async def body(one: Store, two: Store) -> None:
        ids = {await one.accept(message(n)) for n in range(40)}
        batches = await asyncio.gather(*(s.claim(7) for s in (one, two) for _ in range(4)))
        claimed = [m.id for batch in batches for m in batch]
        assert len(claimed) == len(set(claimed))
        assert set(claimed) <= ids

    run_with_store(db_url, body)


def test_group_commit_shares_transactions_between_sessions(db_url: str) -> None:
    commits = 0
    lock = threading.Lock()

    async def body(one: Store, _two: Store) -> int:
        nonlocal commits

        def count(_connection: object) -> None:
            nonlocal commits
            with lock:
                commits += 1

        event.listen(one.engine, "commit", count)
        ids = await asyncio.gather(*(one.accept(message(n)) for n in range(200)))
        event.remove(one.engine, "commit", count)
        assert len(set(ids)) == 200
        stored = await one.committer.read(
            lambda c: c.execute(text("SELECT COUNT(*) FROM message")).scalar_one()
        )
        assert stored == 200
        return commits

    used = run_with_store(db_url, body)
    assert used < 50, f"{used} commits for 200 concurrent accepts: group commit is not working"


def test_outcomes_and_retry(db_url: str) -> None:
    async def body(one: Store, _two: Store) -> None:
        stored = await one.accept(message(1))
        [item] = await one.claim(1)
        outcomes = [
            DeliveryOutcome("a1@x.test", DeliveryState.DELIVERED, code=250, reply="ok"),
            DeliveryOutcome("b1@x.test", DeliveryState.FAILED, code=550, reply="no such user"),
        ]
        assert await one.record(item, outcomes=outcomes, state=MessageState.BOUNCED)
        row = await one.get_message(stored)
        assert row is not None
        assert [(d["recipient"], d["state"], d["last_code"]) for d in row["deliveries"]] == [
            ("a1@x.test", "delivered", 250),
            ("b1@x.test", "failed", 550),
        ]
        # An admin retry re-queues only the failed recipient.
        assert await one.retry_now(stored)
        [again] = await one.claim(1)
        assert again.pending_recipients == ["b1@x.test"]
        assert await one.delete(stored)
        assert await one.get_message(stored) is None
        assert not await one.retry_now(stored)

    run_with_store(db_url, body)


def test_deferred_message_waits_for_its_time(db_url: str) -> None:
    async def body(one: Store, _two: Store) -> None:
        await one.accept(message(1))
        [item] = await one.claim(1)
        now = one.clock()
        await one.record(item, state=MessageState.QUEUED, next_attempt_at=now + 60, error="451")
        assert await one.claim(1) == []
        one.clock.now += 61  # type: ignore[attr-defined]
        [again] = await one.claim(1)
        assert again.attempts == 1

    run_with_store(db_url, body)


def test_sqlite_writers_take_turns_through_a_lock_file(db_url: str) -> None:
    """Two committers (as two processes would) never hold the writer lock file at once."""
    engine = make_engine(db_url)
    lock = _writer_lock_path(engine)
    if engine.dialect.name != "sqlite":
        assert lock is None
        return
    assert lock == f"{engine.url.database}-writer.lock"
    inside: list[int] = []
    overlaps: list[int] = []

    def write(connection: object) -> None:
        inside.append(1)
        if len(inside) > 1:
            overlaps.append(len(inside))
        threading.Event().wait(0.002)
        inside.pop()

    async def body(one: Store, two: Store) -> None:
        await asyncio.gather(*(s.committer.write(write) for s in (one, two) for _ in range(20)))

    run_with_store(db_url, body)
    assert overlaps == []
    assert Path(lock).exists()
