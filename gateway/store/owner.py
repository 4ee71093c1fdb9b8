"""Who holds a lease: an id that names the machine, its boot and the process, so a restarted
gateway can take back at once what a dead predecessor held instead of waiting out the lease.

Leases (messages being worked on, mailboxes being synced) expire by themselves, which is what
makes several processes on one database safe; but a gateway killed and started again by its
supervisor would otherwise leave its mail untouched for ``database.lease_seconds``. An owner id
is ``host:boot:pid:random``. Another process's lease is known dead only when it is certain: the
same host, and either a different boot of it (the machine restarted) or a process id that no
longer runs (or is this very process, started again under the same id, as in a container).
Everything else — another host, an id in an older format, a live process — waits for expiry.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
from pathlib import Path

from sqlalchemy import Connection, Table, select, update

_HOST_CHARS = 20  # lease_owner columns hold 64 characters
# Owner ids made in this process: under our own pid, any other id is a previous life's.
_MINE: set[str] = set()


@functools.cache
def _host() -> str:
    return socket.gethostname().replace(":", "_")[:_HOST_CHARS]


@functools.cache
def _boot() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return "noboot"


def new_owner() -> str:
    """A fresh owner id for this process (random part: two stores in one process differ)."""
    owner = f"{_host()}:{_boot()}:{os.getpid()}:{secrets.token_hex(3)}"
    _MINE.add(owner)
    return owner


def is_dead(owner: str, *, me: str) -> bool:
    """True when the process that wrote ``owner`` is certainly gone (see the module text)."""
    parts = owner.split(":")
    if owner == me or len(parts) != 4 or parts[0] != _host() or not parts[2].isdigit():
        return False
    if parts[1] != _boot():
        return _boot() != "noboot"  # this machine has restarted since that lease was taken
    pid = int(parts[2])
    if pid == os.getpid():
        return owner not in _MINE  # our process id, but not ours: a previous life of it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, under another user
    return False


def free_dead_leases(connection: Connection, table: Table, *, me: str) -> int:
    """Clear the leases in ``table`` (messages, mailboxes: any table with ``lease_owner`` and
    ``lease_expires_at``) held by dead processes of this machine; how many rows were freed."""
    owners = select(table.c.lease_owner).where(table.c.lease_owner.is_not(None)).distinct()
    dead = [o for o in connection.execute(owners).scalars() if is_dead(o, me=me)]
    if not dead:
        return 0
    freed = connection.execute(
        update(table)
        .where(table.c.lease_owner.in_(dead))
        .values(lease_owner=None, lease_expires_at=None)
    )
    return int(freed.rowcount or 0)
