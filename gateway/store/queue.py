"""The durable queue: group-committed accepts, leased claims, and recorded outcomes.

Every write goes through one :class:`GroupCommitter`: callers hand it small functions that take a
connection, and it runs whatever has piled up while the previous transaction was committing in the
next single transaction. Under load that is one fsync for many SMTP sessions instead of one each;
when idle it adds no wait at all. A batch whose transaction fails is retried one function at a
time, so one bad row fails only its own caller. Claims are ``UPDATE … RETURNING`` with a lease
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so any number of processes can share a database and a
dead process's messages come back when its leases expire.

A process's worker takes the messages its own doors accept (:meth:`Store.hand_over_accepted`):
such a message is inserted already leased to this store, and :meth:`Store.claim` hands it out
from memory, so the fresh message costs no claim transaction and is not read back from disk. It is
on disk and leased like any claimed message, so a crash loses nothing: the lease expires and any
process claims it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message as EmailHeaders
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    Engine,
    Float,
    Integer,
    LargeBinary,
    String,
    bindparam,
    delete,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.exc import SQLAlchemyError

from gateway.errors import StoreError
from gateway.message import parse_headers
from gateway.store.db import is_postgres
from gateway.store.models import Delivery, DeliveryState, Message, MessageBody, MessageState
from gateway.store.owner import free_dead_leases, new_owner

log = logging.getLogger(__name__)

MESSAGE = Message.__table__  # type: ignore[attr-defined]
BODY = MessageBody.__table__  # type: ignore[attr-defined]
DELIVERY = Delivery.__table__  # type: ignore[attr-defined]

# Statements built once: building SQLAlchemy constructs per message costs more than SQLite's work.
_INSERT_MESSAGE = insert(MESSAGE)
_INSERT_BODY = insert(BODY)
_INSERT_DELIVERY = insert(DELIVERY)
_STREAMED_BODY = 1024 * 1024  # from this size on, SQLite gets the body in slices
_ZEROBLOB = text("INSERT INTO message_body (id, raw) VALUES (:id, zeroblob(:size)) RETURNING rowid")


def _sqlite_cursor(connection: Connection) -> sqlite3.Cursor | None:
    """The driver's cursor of a SQLite connection (in the same transaction); None otherwise."""
    if connection.dialect.name != "sqlite":
        return None
    dbapi = connection.connection.dbapi_connection
    return dbapi.cursor() if isinstance(dbapi, sqlite3.Connection) else None


def insert_body(connection: Connection, message_id: str, raw: bytes) -> None:
    """Store a body; big ones go to SQLite through its incremental blob API.

    Binding a 25 MB value makes SQLite copy it whole before writing; writing into a zeroblob a
    megabyte at a time keeps the extra memory at one slice (PostgreSQL has no such API, and
    copies).
    """
    if len(raw) < _STREAMED_BODY or connection.dialect.name != "sqlite":
        connection.execute(_INSERT_BODY, {"id": message_id, "raw": raw})
        return
    rowid = connection.execute(_ZEROBLOB, {"id": message_id, "size": len(raw)}).scalar_one()
    dbapi = connection.connection.dbapi_connection
    assert dbapi is not None
    view = memoryview(raw)
    with dbapi.blobopen("message_body", "raw", rowid) as blob:
        for start in range(0, len(raw), _STREAMED_BODY):
            blob.write(view[start : start + _STREAMED_BODY])


_RECORD_SQL = (
    "UPDATE message SET steps_done = :steps_done, prepend = :prepend, "
    "header_message_id = :header_message_id, meta = :meta, updated_at = :now, "
    "state = COALESCE(:state, state), "
    "lease_owner = CASE WHEN :release THEN NULL ELSE lease_owner END, "
    "lease_expires_at = CASE WHEN :release THEN NULL ELSE lease_expires_at END, "
    "next_attempt_at = COALESCE(:next_attempt_at, next_attempt_at), "
    "attempts = attempts + :retried, last_error = COALESCE(:error, last_error) "
    "WHERE id = :id AND lease_owner = :owner"
)
_RECORD = text(_RECORD_SQL).bindparams(
    bindparam("steps_done", type_=JSON),
    bindparam("meta", type_=JSON),
    bindparam("prepend", type_=LargeBinary),
    bindparam("state", type_=String),
    bindparam("release", type_=Boolean),
    bindparam("next_attempt_at", type_=Float),
    bindparam("retried", type_=Integer),
    bindparam("error", type_=String),
)
_RECORD_DELIVERY_SQL = (
    "UPDATE delivery SET state = :state, last_code = :code, last_reply = :reply, "
    "updated_at = :now, attempts = attempts + 1 WHERE message_id = :m AND recipient = :r"
)
_RECORD_DELIVERY = text(_RECORD_DELIVERY_SQL)

# SQLite gets the per-message writes (accept, record) on the driver's cursor: through
# SQLAlchemy's execution machinery the three inserts of an accept cost ~75 us of the writer
# thread's CPU (and GIL), on the cursor ~21 us. The statements are SQLAlchemy's own, compiled
# once for SQLite with named parameters; the JSON columns are serialised with json.dumps, as
# SQLAlchemy's JSON type does. PostgreSQL keeps SQLAlchemy.
_NAMED_SQLITE = sqlite_dialect(paramstyle="named")
# Every column an accept sets: all but last_error.
_MESSAGE_COLUMNS = [c.name for c in MESSAGE.columns if c.name != "last_error"]
_SQLITE_INSERT_MESSAGE = str(
    _INSERT_MESSAGE.compile(dialect=_NAMED_SQLITE, column_keys=_MESSAGE_COLUMNS)
)
_SQLITE_INSERT_BODY = str(_INSERT_BODY.compile(dialect=_NAMED_SQLITE, column_keys=["id", "raw"]))
_SQLITE_INSERT_DELIVERY = str(
    _INSERT_DELIVERY.compile(
        dialect=_NAMED_SQLITE,
        column_keys=["message_id", "recipient", "state", "attempts", "updated_at"],
    )
)

# Accepted messages waiting in memory for this process's worker hold at most this many bytes;
# beyond it, accepts are stored unleased and claimed from disk.
FRESH_BYTES = 32 * 1024 * 1024

Write = Callable[[Connection], Any]
_Pending = tuple[Write, "asyncio.Future[Any]"]  # a write and its caller's future


class _Ids:
    """Message ids: 12 hex digits of milliseconds, so ``ORDER BY id`` is arrival order in
    listings (like UUIDv7), then 12 random hex digits drawn once per process and 8 of a counter.

    Unique without a random draw per message (``uuid4`` is an ``os.urandom`` system call: 2 µs
    alone, ~20 µs in a busy gateway process, where the event loop waits for the GIL after it):
    two processes differ in their 48 random bits, one process's ids in the counter, which
    wraps only after 4 billion. Nothing relies on ids being unguessable (every listing and link
    is behind a token or a signature).
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # a forked child must not repeat ours

    def reset(self) -> None:
        self.prefix = os.urandom(6).hex()
        self.counter = itertools.count(int.from_bytes(os.urandom(4)))

    def new(self) -> str:
        return (
            f"{time.time_ns() // 1_000_000:012x}{self.prefix}{next(self.counter) & 0xFFFFFFFF:08x}"
        )


new_message_id = _Ids().new


class GroupCommitter:
    """Runs write functions in shared transactions on one writer thread.

    One thread is enough: SQLite takes one writer at a time anyway, and on PostgreSQL the batch
    already amortises the commit. ``window`` optionally waits a little for more work when a batch
    is small; the default 0 relies on the natural batching while a commit is in flight.

    Several processes on one SQLite file (``server.processes``) take turns through a lock file
    beside the database: a writer that finds SQLite's lock taken would otherwise sleep in
    SQLite's busy handler (1, 2, 5, 10 … ms, however soon the lock is free again), while the
    kernel hands a ``flock`` over the moment it is released.
    """

    def __init__(self, engine: Engine, *, window: float = 0.0, max_batch: int = 128) -> None:
        self._engine = engine
        self._window = window
        self._max_batch = max_batch
        # The writer thread takes its batches from this queue itself, so the next transaction
        # starts the moment the last one committed, not when the busy event loop next gets
        # round to handing it over: one event-loop hop per write (the answer) instead of two.
        self._inbox: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turns = _writer_lock_path(engine)
        self._turns_fd: int | None = None

    @property
    def engine(self) -> Engine:
        return self._engine

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="mailgate-writer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._inbox.put(None)  # after the writes already queued: they still commit
            await asyncio.to_thread(thread.join)
        while True:  # writes queued after the stop: nobody will run them
            try:
                pending = self._inbox.get_nowait()
            except queue.Empty:
                break
            if pending is not None and not pending[1].done():
                pending[1].set_exception(StoreError("the store is stopping"))
        if self._turns_fd is not None:
            os.close(self._turns_fd)
            self._turns_fd = None

    async def write(self, fn: Write) -> Any:
        """Run ``fn(connection)`` in a transaction; returns its result once committed."""
        if self._thread is None or not self._thread.is_alive():
            raise StoreError("the store is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inbox.put((fn, future))
        return await future

    async def read(self, fn: Write) -> Any:
        """Run a read-only ``fn(connection)`` off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self._read, fn)

    def _read(self, fn: Write) -> Any:
        try:
            with self._engine.connect() as connection:
                return fn(connection)
        except SQLAlchemyError as exc:
            raise StoreError(f"database read failed: {_reason(exc)}") from exc

    def _run(self) -> None:
        """The writer thread: take what has piled up, commit it, hand the answers to the loop."""
        assert self._loop is not None
        stopping = False
        while not stopping:
            first = self._inbox.get()
            if first is None:
                return
            batch = [first]
            if self._window and self._inbox.empty():
                time.sleep(self._window)
            while len(batch) < self._max_batch:
                try:
                    pending = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if pending is None:
                    stopping = True
                    break
                batch.append(pending)
            try:
                results = self._commit(batch)
            except Exception as exc:  # the lock file or a bug: fail this batch, keep the thread
                log.exception("store writer failed")
                results = [(False, StoreError(f"database write failed: {exc}"))] * len(batch)
            try:
                self._loop.call_soon_threadsafe(_answer, batch, results)
            except RuntimeError:  # the loop is closed: the process is exiting without stop()
                return

    def _commit(self, batch: list[_Pending]) -> list[tuple[bool, Any]]:
        with self._turn():
            try:
                with self._engine.begin() as connection:
                    return [(True, fn(connection)) for fn, _ in batch]
            except Exception:  # one at a time, so that a bad write fails only its own caller
                return [self._commit_one(fn) for fn, _ in batch]

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """This process's turn to write (see the class docstring); a no-op off SQLite files."""
        if self._turns is None:
            yield
            return
        if self._turns_fd is None:
            try:
                self._turns_fd = os.open(self._turns, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                log.warning("no writer lock %s (%s): SQLite's locking only", self._turns, exc)
                self._turns = None
                yield
                return
        fcntl.flock(self._turns_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turns_fd, fcntl.LOCK_UN)

    def _commit_one(self, fn: Write) -> tuple[bool, Any]:
        try:
            with self._engine.begin() as connection:
                return (True, fn(connection))
        except (SQLAlchemyError, sqlite3.Error) as exc:  # the latter from the cursor fast path
            log.error("store write failed: %s", _reason(exc))
            return (False, StoreError(f"database write failed: {_reason(exc)}"))
        except Exception as exc:
            return (False, exc)


def _answer(batch: list[_Pending], results: list[tuple[bool, Any]]) -> None:
    """On the event loop: tell each caller how its write went."""
    for (_, future), (ok, value) in zip(batch, results, strict=True):
        if future.done():  # the caller gave up (client disconnected); nothing to tell
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _writer_lock_path(engine: Engine) -> str | None:
    """``<database>-writer.lock`` for a SQLite file; None for memory or another database."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None  # a URI filename (query options): not worth parsing for this
    return f"{database}-writer.lock"


def _reason(exc: SQLAlchemyError | sqlite3.Error) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig or exc).splitlines()[0]


@dataclass(slots=True)
class NewMessage:
    """What a door hands the store: the envelope and the exact bytes it accepted."""

    source: str
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    username: str | None = None
    client_address: str | None = None
    header_message_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_message_id)
    # The header section as the door parsed it (not stored): a message handed over in memory
    # (:meth:`Store.hand_over_accepted`) keeps it, so the worker's steps do not parse it again.
    headers: EmailHeaders | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """What happened to one recipient on one attempt."""

    recipient: str
    state: DeliveryState
    code: int | None = None
    reply: str | None = None


@dataclass(slots=True)
class QueuedMessage:
    """A claimed message, as the worker and its pipeline see it."""

    id: str
    source: str
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    prepend: bytes
    username: str | None
    header_message_id: str | None
    steps_done: list[str]
    attempts: int
    created_at: float
    client_address: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Filled by steps as they run; written back with the outcome.
    pending_recipients: list[str] = field(default_factory=list)
    outcomes: list[DeliveryOutcome] = field(default_factory=list)
    failures: list[Any] = field(default_factory=list)  # relay results that failed for good
    sighting: Any = None  # gateway.sighting.Sighting, set by the steps before match-contacts
    facts: dict[str, Any] = field(default_factory=dict)
    _headers: EmailHeaders | None = None

    def headers(self) -> EmailHeaders:
        """The client's header section, parsed once for all the steps that read it."""
        if self._headers is None:
            self._headers = parse_headers(self.raw)
        return self._headers


class Store:
    """The queue's operations, each one transaction, all through the group committer."""

    def __init__(
        self,
        engine: Engine,
        committer: GroupCommitter,
        *,
        lease_seconds: float,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.committer = committer
        self.lease_seconds = lease_seconds
        self.owner = owner or new_owner()
        self.clock = clock
        self._postgres = is_postgres(engine)
        self._hand_over = False
        # Accepted here, leased at insert, not claimed yet: id -> (message, lease expiry).
        self._fresh: dict[str, tuple[QueuedMessage, float]] = {}
        self._fresh_bytes = 0

    # -- accepting ---------------------------------------------------------------------------

    def hand_over_accepted(self, enabled: bool) -> None:
        """Lease what :meth:`accept` stores to this store, for :meth:`claim` to hand out from
        memory (see the module docstring). Only for a store whose process runs a worker that
        claims through it; :meth:`release_fresh` gives back what it did not take."""
        self._hand_over = enabled

    async def accept(self, message: NewMessage) -> str:
        """Store a message and its recipients; returns its id once it is durably committed."""
        now = self.clock()
        held = self._hand_over and self._fresh_bytes + len(message.raw) <= FRESH_BYTES
        expires = now + self.lease_seconds
        result: str = await self.committer.write(
            self.inserting(message, now=now, lease_until=expires if held else None)
        )
        if held:
            # (A caller cancelled mid-write may leave the row leased but not here: it is then
            # claimed when the lease expires, as after a crash.)
            self._fresh[message.id] = (self._queued(message, now), expires)
            self._fresh_bytes += len(message.raw)
        return result

    def _queued(self, message: NewMessage, now: float) -> QueuedMessage:
        """The message as :meth:`claim` would read it back from the row just inserted."""
        return QueuedMessage(
            id=message.id,
            source=message.source,
            mail_from=message.mail_from,
            rcpt_tos=list(message.rcpt_tos),
            raw=message.raw,
            prepend=b"",
            username=message.username,
            header_message_id=message.header_message_id,
            steps_done=[],
            attempts=0,
            created_at=now,
            client_address=message.client_address,
            # The JSON column's round trip (tuples come back as lists).
            meta=json.loads(json.dumps(message.meta)) if message.meta else {},
            pending_recipients=list(dict.fromkeys(message.rcpt_tos)),
            _headers=message.headers,
        )

    def inserting(
        self, message: NewMessage, *, now: float | None = None, lease_until: float | None = None
    ) -> Write:
        """The write that stores ``message``; also used inside other transactions (bounces).
        ``lease_until`` stores it leased to this store (see :meth:`hand_over_accepted`)."""
        now = self.clock() if now is None else now
        row = {
            "id": message.id,
            "source": message.source,
            "state": MessageState.QUEUED.value,
            "mail_from": message.mail_from,
            "rcpt_tos": message.rcpt_tos,
            "prepend": b"",
            "size": len(message.raw),
            "username": message.username,
            "client_address": message.client_address,
            "header_message_id": message.header_message_id,
            "meta": message.meta,
            "steps_done": [],
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
            "next_attempt_at": now,
        }
        if lease_until is not None:
            row["lease_owner"] = self.owner
            row["lease_expires_at"] = lease_until
        small = len(message.raw) < _STREAMED_BODY
        deliveries = [
            {
                "message_id": message.id,
                "recipient": rcpt,
                "state": DeliveryState.PENDING.value,
                "attempts": 0,
                "updated_at": now,
            }
            for rcpt in dict.fromkeys(message.rcpt_tos)
        ]

        def write(connection: Connection) -> str:
            cursor = _sqlite_cursor(connection) if small else None
            if cursor is None:
                connection.execute(_INSERT_MESSAGE, row)
                insert_body(connection, message.id, message.raw)
                if deliveries:
                    connection.execute(_INSERT_DELIVERY, deliveries)
                return message.id
            cursor.execute(
                _SQLITE_INSERT_MESSAGE,
                {
                    "lease_owner": None,
                    "lease_expires_at": None,
                    **row,
                    "rcpt_tos": json.dumps(row["rcpt_tos"]),
                    "meta": json.dumps(row["meta"]),
                    "steps_done": json.dumps(row["steps_done"]),
                },
            )
            cursor.execute(_SQLITE_INSERT_BODY, {"id": message.id, "raw": message.raw})
            if deliveries:
                cursor.executemany(_SQLITE_INSERT_DELIVERY, deliveries)
            return message.id

        return write

    # -- claiming ----------------------------------------------------------------------------

    async def claim(self, limit: int, ids: Sequence[str] = ()) -> list[QueuedMessage]:
        """Lease up to ``limit`` due messages (or exactly ``ids``, if they are still free)."""
        items = self._take_fresh(limit, ids)
        if items:
            taken = {item.id for item in items}
            wanted = [i for i in ids if i not in taken]
            limit -= len(items)
            if limit <= 0 or (ids and not wanted):
                return items
            ids = wanted
        return items + await self._claim(limit, ids)

    def _take_fresh(self, limit: int, ids: Sequence[str]) -> list[QueuedMessage]:
        """Accepted messages still leased to us since their insert: ``ids`` among them, or any.

        One whose lease is half over is forgotten instead (its row comes back to the queue
        when the lease expires), so a message handed out from here can never also have been
        claimed from disk since.
        """
        if not self._fresh:
            return []
        now = self.clock()
        for message_id, (item, expires) in list(self._fresh.items()):
            if expires - now < self.lease_seconds / 2:
                del self._fresh[message_id]
                self._fresh_bytes -= len(item.raw)
        wanted = [i for i in ids if i in self._fresh] if ids else list(self._fresh)
        items = []
        for message_id in wanted[: max(limit, 0)]:
            item, _expires = self._fresh.pop(message_id)
            self._fresh_bytes -= len(item.raw)
            items.append(item)
        return items

    async def reclaim(self) -> int:
        """Take back at once the leases of this machine's dead gateway processes (a crash and a
        restart, see :mod:`gateway.store.owner`) instead of waiting for them to expire; returns
        how many messages were freed."""

        def write(connection: Connection) -> int:
            return free_dead_leases(connection, MESSAGE, me=self.owner)

        freed: int = await self.committer.write(write)
        return freed

    async def release_fresh(self) -> None:
        """Give back the leases of accepted messages :meth:`claim` did not hand out (at
        shutdown), so that the next process to start takes them at once."""
        self._hand_over = False
        ids = list(self._fresh)
        self._fresh.clear()
        self._fresh_bytes = 0
        if not ids:
            return
        statement = (
            update(MESSAGE)
            .where(MESSAGE.c.id.in_(ids))
            .where(MESSAGE.c.lease_owner == self.owner)
            .values(lease_owner=None, lease_expires_at=None)
        )

        def write(connection: Connection) -> None:
            connection.execute(statement)

        await self.committer.write(write)

    async def _claim(self, limit: int, ids: Sequence[str]) -> list[QueuedMessage]:
        now = self.clock()
        params = {"now": now, "owner": self.owner, "expires": now + self.lease_seconds}
        free = "(lease_expires_at IS NULL OR lease_expires_at < :now)"
        if ids:
            where = f"id IN :ids AND state = 'queued' AND {free}"
            params["ids"] = list(ids)
        else:
            where = f"state = 'queued' AND next_attempt_at <= :now AND {free}"
        skip_locked = " FOR UPDATE SKIP LOCKED" if self._postgres else ""
        statement = text(
            f"UPDATE message SET lease_owner = :owner, lease_expires_at = :expires "
            f"WHERE id IN (SELECT id FROM message WHERE {where} "
            f"ORDER BY next_attempt_at LIMIT {int(limit)}{skip_locked}) AND {free} "
            "RETURNING id, source, mail_from, rcpt_tos, prepend, username, "
            "header_message_id, steps_done, attempts, created_at, client_address, meta"
        ).columns(rcpt_tos=JSON, steps_done=JSON, meta=JSON)
        if ids:
            statement = statement.bindparams(bindparam("ids", expanding=True))

        def write(connection: Connection) -> list[QueuedMessage]:
            rows = connection.execute(statement, params).all()
            if not rows:
                return []
            # The bytes come from their own table: reading them rewrites nothing.
            bodies: dict[str, bytes] = dict(
                connection.execute(
                    select(BODY.c.id, BODY.c.raw).where(BODY.c.id.in_([r.id for r in rows]))
                ).all()
            )
            pending = connection.execute(
                select(DELIVERY.c.message_id, DELIVERY.c.recipient)
                .where(DELIVERY.c.message_id.in_([r.id for r in rows]))
                .where(DELIVERY.c.state == DeliveryState.PENDING.value)
                .order_by(DELIVERY.c.id)
            ).all()
            by_message: dict[str, list[str]] = {}
            for message_id, recipient in pending:
                by_message.setdefault(message_id, []).append(recipient)
            return [
                QueuedMessage(
                    id=r.id,
                    source=r.source,
                    mail_from=r.mail_from,
                    rcpt_tos=list(r.rcpt_tos),
                    raw=bytes(bodies[r.id]),
                    prepend=bytes(r.prepend),
                    username=r.username,
                    header_message_id=r.header_message_id,
                    steps_done=list(r.steps_done),
                    attempts=r.attempts,
                    created_at=r.created_at,
                    client_address=r.client_address,
                    meta=dict(r.meta or {}),
                    pending_recipients=by_message.get(r.id, []),
                )
                for r in rows
            ]

        result: list[QueuedMessage] = await self.committer.write(write)
        return result

    # -- recording outcomes ------------------------------------------------------------------

    def _owned(self, message_id: str) -> Any:
        # Only the lease holder may write an outcome: if our lease expired and another process
        # took the message, our late result must not clobber theirs.
        return (MESSAGE.c.id == message_id) & (MESSAGE.c.lease_owner == self.owner)

    async def record(
        self,
        item: QueuedMessage,
        *,
        outcomes: Iterable[DeliveryOutcome] = (),
        state: MessageState | None = None,
        next_attempt_at: float | None = None,
        error: str | None = None,
        extra: Write | None = None,
    ) -> bool:
        """Write steps done, per-recipient outcomes and (optionally) the message's new state.

        ``state`` None keeps the lease (more steps follow); any other state releases it.
        ``extra`` runs in the same transaction (an outbox row, a bounce to enqueue).
        Returns False when the lease was lost and nothing was written.
        """
        now = self.clock()
        values = {
            "id": item.id,
            "owner": self.owner,
            "steps_done": item.steps_done,
            "prepend": item.prepend,
            "header_message_id": item.header_message_id,
            "meta": item.meta,
            "now": now,
            "state": state.value if state is not None else None,
            "release": state is not None,
            "next_attempt_at": next_attempt_at,
            "retried": 1 if next_attempt_at is not None else 0,
            "error": error,
        }
        outcome_rows = [
            {
                "m": item.id,
                "r": o.recipient,
                "state": o.state.value,
                "code": o.code,
                "reply": o.reply,
                "now": now,
            }
            for o in outcomes
        ]

        def write(connection: Connection) -> bool:
            cursor = _sqlite_cursor(connection)
            if cursor is None:
                if not connection.execute(_RECORD, values).rowcount:
                    return False
                if outcome_rows:
                    connection.execute(_RECORD_DELIVERY, outcome_rows)
            else:
                encoded = {
                    **values,
                    "steps_done": json.dumps(values["steps_done"]),
                    "meta": json.dumps(values["meta"]),
                }
                if not cursor.execute(_RECORD_SQL, encoded).rowcount:
                    return False
                if outcome_rows:
                    cursor.executemany(_RECORD_DELIVERY_SQL, outcome_rows)
            if extra is not None:
                extra(connection)
            return True

        result: bool = await self.committer.write(write)
        return result

    # -- admin operations --------------------------------------------------------------------

    async def retry_now(self, message_id: str) -> bool:
        """Make a deferred, bounced or shunted message due now; its failed recipients retry."""
        now = self.clock()

        def write(connection: Connection) -> bool:
            state = connection.execute(
                select(MESSAGE.c.state).where(MESSAGE.c.id == message_id)
            ).scalar_one_or_none()
            if state is None or state in (MessageState.DONE, MessageState.DELETED):
                return False
            connection.execute(
                update(DELIVERY)
                .where(DELIVERY.c.message_id == message_id)
                .where(DELIVERY.c.state == DeliveryState.FAILED.value)
                .values(state=DeliveryState.PENDING.value, updated_at=now)
            )
            connection.execute(
                update(MESSAGE)
                .where(MESSAGE.c.id == message_id)
                .values(
                    state=MessageState.QUEUED.value,
                    next_attempt_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                    created_at=now if state != MessageState.QUEUED else MESSAGE.c.created_at,
                    updated_at=now,
                )
            )
            return True

        result: bool = await self.committer.write(write)
        return result

    async def delete(self, message_id: str) -> bool:
        """Remove a message and its deliveries for good."""

        def write(connection: Connection) -> bool:
            connection.execute(delete(DELIVERY).where(DELIVERY.c.message_id == message_id))
            connection.execute(delete(BODY).where(BODY.c.id == message_id))
            return bool(
                connection.execute(delete(MESSAGE).where(MESSAGE.c.id == message_id)).rowcount
            )

        result: bool = await self.committer.write(write)
        return result

    async def list_messages(
        self, *, state: str | None = None, limit: int = 100, before: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first, without the raw bytes."""
        columns = [c for c in MESSAGE.c if c.name != "prepend"]
        query = select(*columns).order_by(MESSAGE.c.id.desc()).limit(limit)
        if state:
            query = query.where(MESSAGE.c.state == state)
        if before:
            query = query.where(MESSAGE.c.id < before)

        def read(connection: Connection) -> list[dict[str, Any]]:
            return [dict(row._mapping) for row in connection.execute(query)]

        result: list[dict[str, Any]] = await self.committer.read(read)
        return result

    async def get_message(
        self, message_id: str, *, with_raw: bool = False
    ) -> dict[str, Any] | None:
        """One message with its deliveries, or None."""
        columns = [c for c in MESSAGE.c if with_raw or c.name != "prepend"]

        def read(connection: Connection) -> dict[str, Any] | None:
            row = connection.execute(select(*columns).where(MESSAGE.c.id == message_id)).first()
            if row is None:
                return None
            result = dict(row._mapping)
            if with_raw:
                result["raw"] = connection.execute(
                    select(BODY.c.raw).where(BODY.c.id == message_id)
                ).scalar_one()
            result["deliveries"] = [
                dict(d._mapping)
                for d in connection.execute(
                    select(DELIVERY)
                    .where(DELIVERY.c.message_id == message_id)
                    .order_by(DELIVERY.c.id)
                )
            ]
            return result

        result: dict[str, Any] | None = await self.committer.read(read)
        return result

    async def counts(self) -> dict[str, int]:
        """Messages per state (for /metrics and the queue summary)."""

        def read(connection: Connection) -> dict[str, int]:
            rows = connection.execute(text("SELECT state, COUNT(*) FROM message GROUP BY state"))
            return {state: count for state, count in rows}

        result: dict[str, int] = await self.committer.read(read)
        return result
