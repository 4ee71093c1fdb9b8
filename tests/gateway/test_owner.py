"""Lease owner ids: a restarted gateway recognises its dead predecessor's leases, and only those."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from gateway.store.db import make_engine, migrate
from gateway.store.owner import is_dead, new_owner
from gateway.store.queue import GroupCommitter, Store
from tests.gateway.test_store import message


def finished_owner() -> str:
    """The owner id of a gateway process that has since ended."""
    child = subprocess.run(
        [sys.executable, "-c", "from gateway.store.owner import new_owner; print(new_owner())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return child.stdout.strip()


def test_owner_ids_name_this_process_and_differ() -> None:
    first, second = new_owner(), new_owner()
    assert first != second and len(first) <= 64
    assert first.split(":")[2] == str(os.getpid())
    assert not is_dead(first, me=first)
    assert not is_dead(second, me=first)  # another store of this live process


def test_a_finished_process_is_dead_a_live_one_is_not() -> None:
    gone = finished_owner()
    me = new_owner()
    assert is_dead(gone, me=me)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as alive:
        try:
            host, boot, _pid, rand = me.split(":")
            assert not is_dead(f"{host}:{boot}:{alive.pid}:{rand}", me=me)
        finally:
            alive.kill()


def test_only_certain_deaths_count() -> None:
    me = new_owner()
    host, boot, pid, rand = me.split(":")
    assert is_dead(f"{host}:{'0' * 8}:{pid}:{rand}", me=me)  # an earlier boot of this machine
    assert is_dead(f"{host}:{boot}:{pid}:ffffff", me=me)  # this pid in an earlier life
    assert not is_dead(f"elsewhere:{boot}:999999:{rand}", me=me)  # another host: wait
    assert not is_dead("3f2a9c0d1e2b4a5c", me=me)  # an id from before this format: wait
    assert not is_dead(f"{host}:{boot}:1:{rand}", me=me)  # init is alive


def test_a_restarted_gateway_takes_back_its_dead_predecessors_leases(db_url: str) -> None:
    gone = finished_owner()

    async def main() -> None:
        engine = make_engine(db_url)
        migrate(engine)
        committer = GroupCommitter(engine)
        await committer.start()
        try:
            dead = Store(engine, committer, lease_seconds=300, owner=gone)
            remote = Store(engine, committer, lease_seconds=300, owner="other-host:ab:1:cd")
            lost = await dead.accept(message(1))
            assert [m.id for m in await dead.claim(1, [lost])] == [lost]
            busy = await remote.accept(message(2))
            assert [m.id for m in await remote.claim(1, [busy])] == [busy]
            restarted = Store(engine, committer, lease_seconds=300)
            assert await restarted.claim(10) == []  # both leased, for 300 s
            assert await restarted.reclaim() == 1  # only the dead local process's
            assert [m.id for m in await restarted.claim(10)] == [lost]
        finally:
            await committer.stop()
            engine.dispose()

    asyncio.run(main())
