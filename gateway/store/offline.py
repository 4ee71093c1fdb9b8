"""The store for one-shot commands (the CLIs): open, migrate, do one thing, commit, close.

A long-running gateway builds its engine and committer once in ``gateway.app``; a command such as
``mailgate queue retry`` needs the same objects for a moment. These two helpers are that moment,
written once for every package's commands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlmodel import Session

from gateway.settings import Settings
from gateway.store.db import make_engine, migrate
from gateway.store.queue import GroupCommitter, Store

T = TypeVar("T")


def with_session(settings: Settings, fn: Callable[[Session], T]) -> T:
    """Run ``fn`` in one committed ORM session (rows stay readable after the commit)."""
    engine = make_engine(settings.database.url)
    try:
        migrate(engine)
        with Session(engine, expire_on_commit=False) as session:
            result = fn(session)
            session.commit()
            return result
    finally:
        engine.dispose()


def with_store(settings: Settings, fn: Callable[[Store], Awaitable[T]]) -> T:
    """Run the coroutine ``fn(store)`` against a short-lived queue store."""

    async def run() -> T:
        engine = make_engine(settings.database.url)
        migrate(engine)
        committer = GroupCommitter(engine)
        await committer.start()
        try:
            return await fn(Store(engine, committer, lease_seconds=settings.database.lease_seconds))
        finally:
            await committer.stop()
            engine.dispose()

    return asyncio.run(run())
