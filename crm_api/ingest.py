"""Storing the gateway's webhook events: each ``webhook-id`` once, each normalised Message-ID once
(a second sighting adds an account link), emails threaded by References / In-Reply-To (in both
directions, since a reply can be logged before its parent) with a subject-and-participants
fallback, contacts linked and auto-created per the organisation's policy.

Events are written in batches with **group commit** (:class:`GroupCommitter`): whatever requests
are waiting are stored in one transaction with a fixed number of statements per batch, and each
request is answered only after that commit. Should a batch fail (on PostgreSQL, a race with a
concurrent request on a unique key), every event in it is retried alone in its own transaction,
so an event is stored whole or not at all and never depends on its neighbours.

On SQLite the batch runs on the event loop thread, not in the thread pool: a writer thread that
gives up the GIL on every SQLite call must win it back from a busy event loop each time (Python's
5 ms switch interval), which made per-request threads ten times slower than the work itself.
On PostgreSQL, where a round trip would stall the loop, it runs on one writer thread that keeps
its connection, in psycopg's pipeline mode: one round trip for all of the batch's look-ups, one
for all of its writes and the COMMIT (plus one per new thread or auto-created contact). Keys and
rows travel as arrays (``= ANY(:keys)``, ``unnest``) in statements whose text never changes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlmodel import SQLModel

from crm_api import models  # noqa: F401  (registers the tables used below)
from crm_api.addresses import (
    in_domains,
    is_group_address,
    normalise_message_id,
    subject_key,
    try_normalise,
)
from crm_api.errors import BadRequest, describe_validation
from crm_api.events import (
    AccountStatusChanged,
    EmailLogged,
    EmailLoggedEnvelope,
    EmailStatus,
    SyncCompleted,
)
from crm_api.models import utcnow

log = logging.getLogger("crm_api.ingest")

Outcome = Literal["stored", "duplicate"]
_ROLES = ("from", "to", "cc", "bcc")
_MAX_REFS = 100  # the root and the newest References are the ones that find a thread
_MAX_BATCH = 64  # events per transaction
_ATTEMPTS = 3

_T = SQLModel.metadata.tables
EVENT, EMAIL, THREAD, REF = _T["webhook_event"], _T["email"], _T["thread"], _T["email_reference"]
PART, ATTACH, LINK = _T["email_participant"], _T["attachment"], _T["email_account"]
ACCOUNT, SELECTION, ADDRESS = _T["mail_account"], _T["account_selection"], _T["contact_address"]
CONTACT, USER, ORG = _T["contact"], _T["user"], _T["org_settings"]


@contextlib.contextmanager
def _pipelined(conn: sa.Connection) -> Iterator[Any]:
    """On PostgreSQL, run the block in psycopg 3's pipeline mode and yield the pipeline (None
    elsewhere): BEGIN and every write whose result is not read are queued and sent together
    with the next statement that is read (such a statement syncs at once, before SQLAlchemy
    looks at its rows) or with the COMMIT, instead of one round trip each. Errors still
    surface, at the latest on COMMIT, so a batch fails whole exactly as before."""
    if conn.dialect.name != "postgresql":
        yield None
        return
    raw: Any = conn.connection.dbapi_connection
    try:
        with raw.pipeline() as pipeline:

            def sync(*args: Any) -> None:
                context, executemany = args[-2], args[-1]
                # A write with nothing to read back (no RETURNING) stays queued.
                if executemany or (context.is_crud and not context.compiled.effective_returning):
                    return
                pipeline.sync()

            sa.event.listen(conn, "after_cursor_execute", sync)
            try:
                yield pipeline
            finally:
                sa.event.remove(conn, "after_cursor_execute", sync)
    except BaseException:
        # An error aborts the pipeline, and a rollback issued inside it may not take: end the
        # transaction here, or drop the connection rather than pool it in a failed state.
        with contextlib.suppress(Exception):
            raw.rollback()
        if raw.info.transaction_status != 0:  # not IDLE
            conn.invalidate()
        raise


class _Reads:
    """Independent SELECTs gathered and answered together. On PostgreSQL, inside the batch's
    pipeline, each is queued on a cursor of its own and one sync answers them all: one round
    trip instead of one per statement (on a loaded machine each round trip also waits for
    the writer thread to be scheduled and to win the GIL back). Elsewhere they run in turn.

    ``add`` returns a function giving the statement's rows as tuples once :meth:`run` ran."""

    def __init__(self, conn: sa.Connection, pipeline: Any) -> None:
        self.conn = conn
        self.pipeline = pipeline

    def add(
        self, stmt: sa.Select[Any], params: dict[str, Any] | None = None
    ) -> Callable[[], list[tuple[Any, ...]]]:
        if self.pipeline is None:
            rows = [tuple(row) for row in self.conn.execute(stmt, params or {})]
            return lambda: rows
        # Not prepared, so planned for these very keys each time (a few tens of µs): psycopg
        # prepares a statement run five times, and PostgreSQL then settles on a generic plan
        # made without the array's contents; made while the email table was small, it kept
        # scanning the whole table as it grew (measured: the batch twice as slow). Forcing
        # custom plans for the whole transaction instead also re-planned every foreign-key
        # check of the inserts (~75 µs per event).
        cursor = _send(self.conn, stmt, params or {}, prepare=False)

        def fetch() -> list[tuple[Any, ...]]:
            with cursor:
                return list(cursor.fetchall())

        return fetch

    def run(self) -> None:
        if self.pipeline is not None:
            self.pipeline.sync()


def _send(
    conn: sa.Connection, stmt: sa.ClauseElement, params: dict[str, Any], prepare: bool | None
) -> Any:
    """Execute ``stmt`` on a raw psycopg cursor of ``conn`` and return the cursor. Inside the
    batch's pipeline this only queues it: its result is there after the next sync, and an
    error surfaces then at the latest (as with the COMMIT). This skips SQLAlchemy's execution
    machinery (~0.1 ms a statement, a good part of a small batch's time), not its typing:
    the parameters go through their column types' bind processors as they would there."""
    sql, defaults, processors = _pg_compiled(stmt, conn.dialect)
    values = {**defaults, **params}
    for name, process in processors.items():
        if values.get(name) is not None:
            values[name] = [None if v is None else process(v) for v in values[name]]
    raw: Any = conn.connection.dbapi_connection
    cursor = raw.cursor()
    cursor.execute(sql, values, prepare=prepare)
    return cursor


_PG_COMPILED: dict[int, tuple[sa.ClauseElement, str, dict[str, Any], dict[str, Any]]] = {}


def _pg_compiled(
    stmt: sa.ClauseElement, dialect: sa.Dialect
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``stmt`` compiled for psycopg once, for :func:`_send`: its text (parameters named
    ``%(name)s``), the values of the parameters it carries itself, and the bind processor of
    each array parameter's elements that has one (UTCDateTime's, which stores naive UTC)."""
    cached = _PG_COMPILED.get(id(stmt))
    if cached is None or cached[0] is not stmt:
        compiled = stmt.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        processors = {}
        for name, bind in compiled.binds.items():
            if isinstance(bind.type, sa.ARRAY):
                process = bind.type.item_type.dialect_impl(dialect).bind_processor(dialect)
                if process is not None:
                    processors[name] = process
        cached = (stmt, str(compiled), dict(compiled.params), processors)
        _PG_COMPILED[id(stmt)] = cached
    return cached[1], cached[2], cached[3]


def _is_integrity_error(exc: BaseException, engine: sa.Engine) -> bool:
    """A unique-key race, as SQLAlchemy wraps it or (from a pipeline's sync) as the driver
    raises it."""
    driver = getattr(engine.dialect, "dbapi", None)
    raw_error = getattr(driver, "IntegrityError", None)
    return isinstance(exc, IntegrityError) or (
        isinstance(raw_error, type) and isinstance(exc, raw_error)
    )


def _unnest(**arrays: sa.types.TypeEngine[Any]) -> Any:
    """PostgreSQL's ``unnest(:a, :b, …) AS t(a, b, …)``: one array parameter per column, so
    a batch's rows travel as a handful of arrays in one statement whose text never changes
    (psycopg prepares it once per connection), instead of a statement per row or a VALUES
    list whose text, and plan, changes with every batch size."""
    params = [sa.bindparam(name, type_=postgresql.ARRAY(type_)) for name, type_ in arrays.items()]
    return sa.func.unnest(*params).table_valued(*arrays).render_derived()


def _unnest_insert(table: sa.Table, columns: Sequence[str]) -> sa.Insert:
    rows = _unnest(**{name: table.c[name].type for name in columns})
    return sa.insert(table).from_select(list(columns), sa.select(*rows.c))


class _Statements:
    """The batch's statements for one dialect, built once: SQLAlchemy then only looks their
    compiled form up in its cache. On PostgreSQL a set of keys is one array parameter
    (``= ANY(:keys)``) and many rows are a few arrays (:func:`_unnest`): each statement has
    one text whatever the batch size, so psycopg converts it once, and the writes are
    prepared once per connection (the look-ups are planned for their keys: see
    :class:`_Reads`). ``IN (…)`` lists and VALUES lists (SQLite's way) are a new text for each
    length: parsed by psycopg's regex every time (its cache stops at 50 parameters), parsed
    and planned by the server every time."""

    def __init__(self, postgres: bool) -> None:
        def member(column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[bool]:
            if postgres:
                return column == sa.any_(sa.bindparam(name, type_=postgresql.ARRAY(column.type)))
            return column.in_(sa.bindparam(name, expanding=True))

        self.postgres = postgres
        self.org = sa.select(
            ORG.c.auto_create,
            ORG.c.company_domains,
            ORG.c.excluded_domains,
            ORG.c.group_local_parts,
        ).where(ORG.c.id == 1)
        self.seen = sa.select(EVENT.c.webhook_id).where(member(EVENT.c.webhook_id, "ids"))
        # The thread's subject key and last date come along: the batch needs them to choose a
        # subject-and-participants fallback exactly as one event at a time would.
        self.emails = (
            sa.select(
                EMAIL.c.message_id,
                EMAIL.c.id,
                EMAIL.c.thread_id,
                THREAD.c.subject_key,
                THREAD.c.last_date,
            )
            .join(THREAD, THREAD.c.id == EMAIL.c.thread_id)
            .where(member(EMAIL.c.message_id, "mids"))
        )
        self.children = (
            sa.select(
                REF.c.ref_message_id, EMAIL.c.thread_id, THREAD.c.subject_key, THREAD.c.last_date
            )
            .join(EMAIL, EMAIL.c.id == REF.c.email_id)
            .join(THREAD, THREAD.c.id == EMAIL.c.thread_id)
            .where(member(REF.c.ref_message_id, "mids"))
        )
        self.contacts = sa.select(ADDRESS.c.address, ADDRESS.c.contact_id).where(
            member(ADDRESS.c.address, "addrs")
        )
        self.users = sa.select(USER.c.email, USER.c.id).where(member(USER.c.email, "addrs"))
        self.owners = sa.select(ACCOUNT.c.owner, ACCOUNT.c.id).where(
            member(ACCOUNT.c.owner, "addrs")
        )
        self.accounts = sa.select(
            ACCOUNT.c.id, ACCOUNT.c.owner, ACCOUNT.c.kind, ACCOUNT.c.sharing
        ).where(member(ACCOUNT.c.id, "ids"))
        self.selected = sa.select(SELECTION.c.account_id, SELECTION.c.address).where(
            member(SELECTION.c.account_id, "ids")
        )
        # By Message-ID rather than email id, so that it goes with the other look-ups.
        self.links = (
            sa.select(EMAIL.c.message_id, LINK.c.account_id)
            .join(EMAIL, EMAIL.c.id == LINK.c.email_id)
            .where(member(EMAIL.c.message_id, "mids"))
        )
        # Every (thread, participant address) pair for the batch's subject keys and
        # addresses, for all of its fallback lookups at once.
        self.fallback = (
            sa.select(THREAD.c.id, THREAD.c.subject_key, THREAD.c.last_date, PART.c.address)
            .distinct()
            .join(EMAIL, EMAIL.c.thread_id == THREAD.c.id)
            .join(PART, PART.c.email_id == EMAIL.c.id)
            .where(member(THREAD.c.subject_key, "keys"), member(PART.c.address, "addrs"))
        )
        self.insert_thread = sa.insert(THREAD).returning(THREAD.c.id)
        self.insert_contact = sa.insert(CONTACT).returning(CONTACT.c.id)
        self.touch_thread = (
            sa.update(THREAD)
            .where(THREAD.c.id == sa.bindparam("tid"), THREAD.c.last_date < sa.bindparam("newest"))
            .values(last_date=sa.bindparam("newest"))
        )
        # Many rows at once: executemany on SQLite (its C loop is the fast path), unnest on
        # PostgreSQL. On SQLite the new emails' ids come back by Message-ID (unique); on
        # PostgreSQL they are drawn from the email id sequence with the look-ups, so that the
        # inserts need no answer and go out with the COMMIT (one round trip fewer).
        self.insert_many: dict[str, sa.Insert] = {}
        self.email_columns = [c.name for c in EMAIL.c if c.name != "id"]
        self.insert_emails = sa.insert(EMAIL).returning(EMAIL.c.message_id, EMAIL.c.id)
        self.email_ids = sa.select(
            sa.func.nextval(sa.func.pg_get_serial_sequence("email", "id"))
        ).select_from(sa.func.generate_series(1, sa.bindparam("n", type_=sa.Integer)))
        if postgres:
            newer = _unnest(tid=THREAD.c.id.type, newest=THREAD.c.last_date.type)
            self.touch_threads = (
                sa.update(THREAD)
                .where(THREAD.c.id == newer.c.tid, THREAD.c.last_date < newer.c.newest)
                .values(last_date=newer.c.newest)
            )
        else:
            self.touch_threads = self.touch_thread

    def insert(self, table: sa.Table, columns: Sequence[str]) -> sa.Insert:
        """The many-rows INSERT of ``columns`` into ``table``."""
        key = f"{table.name}({','.join(columns)})"
        stmt = self.insert_many.get(key)
        if stmt is None:
            stmt = self.insert_many[key] = (
                _unnest_insert(table, columns) if self.postgres else sa.insert(table)
            )
        return stmt


STATEMENTS = {"postgresql": _Statements(postgres=True), "sqlite": _Statements(postgres=False)}


def _bulk_insert(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Insert many rows (dicts with the same keys): as columns of arrays on PostgreSQL, where
    inside the batch's pipeline the statement is queued (:func:`_send`) and goes out with the
    COMMIT; as an executemany on SQLite."""
    if not rows:
        return
    stmts = STATEMENTS[conn.dialect.name]
    columns = list(rows[0])
    if stmts.postgres:
        _send(conn, stmts.insert(table, columns), _columns(rows, columns), prepare=None)
    else:
        conn.execute(stmts.insert(table, columns), rows)


def _columns(rows: list[dict[str, Any]], columns: Sequence[str]) -> dict[str, list[Any]]:
    """Rows as one list per column (the arrays of :func:`_unnest`)."""
    return {name: [row[name] for row in rows] for name in columns}


# --- parsing --------------------------------------------------------------------------------


@dataclass
class ParsedEvent:
    type: str
    data: dict[str, Any]  # the payload, stored as is for events other than email.logged
    email: EmailLogged | None = None
    status: EmailStatus | None = None
    account_status: AccountStatusChanged | None = None


def parse(body: bytes) -> ParsedEvent:
    """Validate a webhook body (already authenticated) or raise :class:`BadRequest`."""
    # Most events are email.logged: pydantic-core parses and validates those in one step,
    # without building the Python dicts first (half the time). Whatever it refuses, another
    # event type or a mistake to report, takes the general path below.
    try:
        email = EmailLoggedEnvelope.model_validate_json(body).data
    except ValidationError:
        pass
    else:
        return ParsedEvent(type="email.logged", data={}, email=email)
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("webhook body is not JSON") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise BadRequest("webhook body must be an object with a string 'type'")
    data = raw.get("data")
    if not isinstance(data, dict):
        raise BadRequest("webhook body must carry an object 'data'")
    kind = raw["type"]
    event = ParsedEvent(type=kind[:64], data=data)
    try:
        if kind == "email.logged":
            event.email = EmailLogged.model_validate(data)
        elif kind in ("email.deleted", "email.archived"):
            event.status = EmailStatus.model_validate(data)
        elif kind == "account.status_changed":
            event.account_status = AccountStatusChanged.model_validate(data)
        elif kind == "sync.completed":
            SyncCompleted.model_validate(data)
    except ValidationError as exc:
        errors = [dict(e) for e in exc.errors()]
        raise BadRequest(f"invalid {kind} payload: {describe_validation(errors)}") from None
    return event


@dataclass
class Item:
    """One verified webhook waiting to be stored."""

    webhook_id: str
    timestamp: int
    event: ParsedEvent


# --- the batch writer -----------------------------------------------------------------------


class KeptConnection:
    """A connection kept from batch to batch by the group committer's writer thread: a batch
    then needs no pool checkout and no pre-ping (on PostgreSQL a round trip of its own). It is
    dropped after any error, so the next transaction (the retry of that batch's events among
    them) starts on a fresh connection, which the pool checks as usual."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.conn: sa.Connection | None = None

    @contextlib.contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        if self.conn is None or self.conn.closed or self.conn.invalidated:
            self.conn = self.engine.connect()
        try:
            yield self.conn
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def store(
    *, engine: sa.Engine, items: Sequence[Item], connection: KeptConnection | None = None
) -> list[Outcome | Exception]:
    """Store ``items`` in one transaction; on failure, each alone (retrying races). The
    transactions run on ``connection`` if given, else on one from the engine's pool."""
    connect = engine.connect if connection is None else connection.connect
    try:
        stored: list[Outcome | Exception] = list(_store_batch(connect, items))
        return stored
    except Exception:
        if len(items) == 1:
            return [_store_alone(connect, engine, items[0])]
        log.info("batch of %d failed; storing its events one by one", len(items), exc_info=True)
    return [_store_alone(connect, engine, item) for item in items]


_Connect = Callable[[], contextlib.AbstractContextManager[sa.Connection]]


def _store_alone(connect: _Connect, engine: sa.Engine, item: Item) -> Outcome | Exception:
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return _store_batch(connect, [item])[0]
        except Exception as exc:
            # A concurrent request stored the same event, email, account or contact first;
            # the next attempt sees its row and takes the "already there" path.
            if attempt == _ATTEMPTS or not _is_integrity_error(exc, engine):
                return exc
    raise AssertionError("unreachable")


def _store_batch(connect: _Connect, items: Sequence[Item]) -> list[Outcome]:
    """One transaction; the COMMIT is sent inside the pipeline, with the last writes."""
    with connect() as conn:
        conn.begin()  # (so that COMMIT also covers a batch that only read, on raw cursors)
        with _pipelined(conn) as pipeline:
            outcomes = _Batch(conn, pipeline).store(items)
            conn.commit()
        return outcomes


@dataclass
class _Pending:
    """A new email of this batch, inserted at the end of its run."""

    item: Item
    message_id: str
    thread_id: int
    values: dict[str, Any]
    parties: list[tuple[str, str, str, int | None]]  # role, name, address, contact id
    refs: list[str]
    accounts: list[str] = field(default_factory=list)
    email_id: int | None = None


@dataclass
class _Facts:
    """What the batch needs from one ``email.logged`` event, worked out once."""

    item: Item
    ev: EmailLogged
    mid: str  # the normalised Message-ID
    refs: list[str]  # its thread keys, In-Reply-To last
    parties: list[tuple[str, str, str]]  # role, name, normalised address
    owner: str  # the account's owner, normalised


class _Stored:
    """The stored side of a run of ``email.logged`` events, asked for in one :class:`_Reads`
    round trip: their accounts, the emails they are or refer to, the emails that refer to
    them, and who their addresses are."""

    def __init__(self, reads: _Reads, sql: _Statements, facts: Sequence[_Facts]) -> None:
        ids = sorted({f.ev.account.id for f in facts})
        mids = sorted({f.mid for f in facts})
        addresses = sorted({a for f in facts for _, _, a in f.parties} | {f.owner for f in facts})
        self.accounts = reads.add(sql.accounts, {"ids": ids})
        self.selected = reads.add(sql.selected, {"ids": ids})
        self.emails = reads.add(
            sql.emails, {"mids": sorted({*mids, *(r for f in facts for r in f.refs)})}
        )
        self.children = reads.add(sql.children, {"mids": mids})
        self.contacts = reads.add(sql.contacts, {"addrs": addresses})
        self.users = reads.add(sql.users, {"addrs": addresses})
        self.owners = reads.add(sql.owners, {"addrs": addresses})
        self.links = reads.add(sql.links, {"mids": mids})
        # Enough new email ids for every event to be a new email.
        self.email_ids = reads.add(sql.email_ids, {"n": len(facts)}) if sql.postgres else None


class _Batch:
    """Stores a sequence of events on one connection, in one transaction."""

    def __init__(self, conn: sa.Connection, pipeline: Any = None) -> None:
        self.conn = conn
        self.pipeline = pipeline
        self.sql = STATEMENTS[conn.dialect.name]
        self.auto_create = "none"
        self.company: set[str] = set()
        self.excluded: set[str] = set()
        self.groups: set[str] = set()
        # The threads this batch has seen: subject key and last date as stored before it.
        self.thread_keys: dict[int, str] = {}
        self.thread_dates: dict[int, datetime] = {}
        # Fallback candidates read ahead for the batch: (subject key, address) -> threads, for
        # the keys and addresses in ``fb_keys`` x ``fb_addrs``; None once a merge made it stale.
        self.fb: dict[tuple[str, str], set[int]] | None = None
        self.fb_keys: set[str] = set()
        self.fb_addrs: set[str] = set()

    def store(self, items: Sequence[Item]) -> list[Outcome]:
        reads = _Reads(self.conn, self.pipeline)
        org = reads.add(self.sql.org)
        seen_rows = reads.add(self.sql.seen, {"ids": [i.webhook_id for i in items]})
        # The usual batch is all email.logged, hence one run: its look-ups go in the same round
        # trip, made for every event (a replay among them only adds rows nobody asks for).
        facts = {id(i): self._facts(i) for i in items if i.event.email is not None}
        ahead = _Stored(reads, self.sql, list(facts.values())) if len(facts) == len(items) else None
        reads.run()
        self._policy(org())
        seen = {webhook_id for (webhook_id,) in seen_rows()}
        outcomes: list[Outcome] = []
        fresh: list[Item] = []
        for item in items:
            if item.webhook_id in seen:
                outcomes.append("duplicate")
            else:
                seen.add(item.webhook_id)
                outcomes.append("stored")
                fresh.append(item)
        # Runs of email.logged go together; any other event is applied between runs, in order.
        run: list[_Facts] = []
        for item in fresh:
            if item.event.email is not None:
                run.append(facts[id(item)])
                continue
            self._emails(run)
            run = []
            self._other(item)
        self._emails(run, ahead)
        return outcomes

    def _select(self, stmt: sa.Select[Any], params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """One look-up on its own (planned for its keys, as in :class:`_Reads`)."""
        reads = _Reads(self.conn, self.pipeline)
        rows = reads.add(stmt, params)
        reads.run()
        return rows()

    def _policy(self, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        auto_create, company, excluded, groups = rows[0]
        self.auto_create = auto_create
        self.company = set(json.loads(company))
        self.excluded = set(json.loads(excluded)) | self.company
        self.groups = set(json.loads(groups))

    def _facts(self, item: Item) -> _Facts:
        ev = item.event.email
        assert ev is not None
        mid = normalise_message_id(ev.message_id)
        return _Facts(item, ev, mid, self._refs(ev, mid), self._parties(ev), self._owner(ev))

    # -- events other than email.logged ----------------------------------------------------

    def _other(self, item: Item) -> None:
        event = item.event
        email_id = None
        if event.status is not None:
            email_id = self.conn.execute(
                sa.select(EMAIL.c.id).where(
                    EMAIL.c.message_id == normalise_message_id(event.status.message_id)
                )
            ).scalar()
            if email_id is not None:
                self.conn.execute(
                    sa.update(LINK)
                    .where(
                        LINK.c.email_id == email_id, LINK.c.account_id == event.status.account_id
                    )
                    .values(status=event.type.split(".", 1)[1])
                )
        elif event.account_status is not None:
            self.conn.execute(
                sa.update(ACCOUNT)
                .where(ACCOUNT.c.id == event.account_status.account_id)
                .values(status=event.account_status.status, updated_at=utcnow())
            )
        self.conn.execute(sa.insert(EVENT), [self._event_row(item, email_id, event.data)])

    @staticmethod
    def _event_row(item: Item, email_id: int | None, data: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "webhook_id": item.webhook_id,
            "type": item.event.type,
            "sent_at": datetime.fromtimestamp(item.timestamp, UTC),
            "received_at": utcnow(),
            "email_id": email_id,
            # email.logged's payload is the email itself; don't keep the body twice.
            "data": None if data is None else json.dumps(data),
        }

    # -- email.logged ------------------------------------------------------------------------

    def _emails(self, run: list[_Facts], stored: _Stored | None = None) -> None:
        """Store a run of email.logged events; ``stored``: its look-ups, if already made."""
        if not run:
            return
        if stored is None:
            reads = _Reads(self.conn, self.pipeline)
            stored = _Stored(reads, self.sql, run)
            reads.run()
        self._accounts(run, stored)
        known: dict[str, tuple[int, int]] = {}
        for mid, email_id, thread_id, key, last in stored.emails():
            known[mid] = (email_id, thread_id)
            self._saw_thread(thread_id, key, last)
        children: dict[str, set[int]] = defaultdict(set)
        for ref, thread_id, key, last in stored.children():
            children[ref].add(thread_id)
            self._saw_thread(thread_id, key, last)
        contacts: dict[str, int] = dict(stored.contacts())
        users: dict[str, int] = dict(stored.users())
        # Account owners are insiders. The owners were read before this run's accounts were
        # written, so its own accounts count as they are now.
        latest = {f.ev.account.id: f.owner for f in run}  # the last word wins, as in _accounts
        insiders = set(users) | {o for o, account in stored.owners() if account not in latest}
        insiders |= set(latest.values())
        self._read_fallbacks(run, known, children, insiders)

        pending: dict[str, _Pending] = {}
        links: list[tuple[int | _Pending, str]] = []
        event_rows: list[tuple[Item, int | _Pending]] = []
        newest: dict[int, datetime] = {}
        for f in run:
            ev, mid, ps = f.ev, f.mid, f.parties
            if mid in known:
                target: int | _Pending = known[mid][0]
            elif mid in pending:
                target = pending[mid]
            else:
                outsiders = self._outsiders(f, insiders)
                self._auto_create(ev, ps, contacts, insiders | {f.owner}, users.get(f.owner))
                thread_id = self._thread(f, known, pending, children, outsiders, newest)
                newest[thread_id] = max(newest.get(thread_id, ev.date), ev.date)
                target = pending[mid] = _Pending(
                    item=f.item,
                    message_id=mid,
                    thread_id=thread_id,
                    values=self._email_row(ev, mid, thread_id, outsiders),
                    parties=[(r, n, a, contacts.get(a)) for r, n, a in ps],
                    refs=self._kept_refs(f.refs),
                )
                for key in f.refs:
                    children[key].add(thread_id)  # for a parent later in this batch
            links.append((target, ev.account.id))
            event_rows.append((f.item, target))
        # Only emails stored before this batch can have links already.
        existing = {(known[m][0], a) for m, a in stored.links() if m in known}
        new_ids = None if stored.email_ids is None else [i for (i,) in stored.email_ids()]
        self._insert(list(pending.values()), links, existing, event_rows, newest, new_ids)

    def _insert(
        self,
        pending: list[_Pending],
        links: list[tuple[int | _Pending, str]],
        existing: set[tuple[int, str]],
        event_rows: list[tuple[Item, int | _Pending]],
        newest: dict[int, datetime],
        new_ids: list[int] | None,
    ) -> None:
        """Write the run; ``new_ids``: ids drawn for its new emails (else read back)."""
        conn, sql = self.conn, self.sql
        if pending:
            rows = [{**p.values, "thread_id": p.thread_id} for p in pending]
            if new_ids is None:
                ids: dict[str, int] = dict(conn.execute(sql.insert_emails, rows).all())
                for p in pending:
                    p.email_id = ids[p.message_id]
            else:
                for p, row, new_id in zip(pending, rows, new_ids[: len(pending)], strict=True):
                    p.email_id = row["id"] = new_id
                _bulk_insert(conn, EMAIL, rows)
            refs = [{"email_id": p.email_id, "ref_message_id": r} for p in pending for r in p.refs]
            _bulk_insert(conn, REF, refs)
            parts = [
                {"email_id": p.email_id, "role": r, "name": n, "address": a, "contact_id": c}
                for p in pending
                for r, n, a, c in p.parties
            ]
            _bulk_insert(conn, PART, parts)
            files = [
                {
                    "email_id": p.email_id,
                    "filename": a.filename,
                    "content_type": a.content_type,
                    "size": a.size,
                    "url": a.url,
                }
                for p in pending
                if p.item.event.email is not None
                for a in p.item.event.email.attachments
            ]
            _bulk_insert(conn, ATTACH, files)
        if newest:
            if sql.postgres:
                arrays = {"tid": list(newest), "newest": list(newest.values())}
                _send(conn, sql.touch_threads, arrays, prepare=None)
            else:
                conn.execute(
                    sql.touch_threads, [{"tid": t, "newest": d} for t, d in newest.items()]
                )

        def email_id(target: int | _Pending) -> int:
            value = target if isinstance(target, int) else target.email_id
            assert value is not None
            return value

        wanted = {(email_id(t), account) for t, account in links}
        now = utcnow()
        new_links = [
            {"email_id": e, "account_id": a, "status": "active", "logged_at": now}
            for e, a in sorted(wanted - existing)
        ]
        _bulk_insert(conn, LINK, new_links)
        _bulk_insert(
            conn, EVENT, [self._event_row(item, email_id(t), None) for item, t in event_rows]
        )

    def _saw_thread(self, thread_id: int, key: str, last: datetime) -> None:
        self.thread_keys[thread_id] = key
        self.thread_dates[thread_id] = last.replace(tzinfo=UTC) if last.tzinfo is None else last

    @staticmethod
    def _match(f: _Facts, outsiders: list[str]) -> list[str]:
        """The addresses a fallback lookup looks for: the outside parties, else all but the
        account's owner."""
        return (outsiders or [a for _, _, a in f.parties if a != f.owner])[:200]

    def _outsiders(self, f: _Facts, insiders: set[str]) -> list[str]:
        inside = insiders | {f.owner}
        return [a for _, _, a in f.parties if a not in inside and not in_domains(a, self.company)]

    def _read_fallbacks(
        self,
        run: list[_Facts],
        known: dict[str, tuple[int, int]],
        children: dict[str, set[int]],
        insiders: set[str],
    ) -> None:
        """One query for the stored side of every fallback lookup the batch may make: those of
        the new emails with no stored relative (a relative stored in this batch only makes the
        lookup unnecessary)."""
        keys: set[str] = set()
        addrs: set[str] = set()
        for f in run:
            if f.mid in known or f.mid in children or any(r in known for r in f.refs):
                continue
            subject = subject_key(f.ev.subject)
            match = self._match(f, self._outsiders(f, insiders))
            if subject and match:
                keys.add(subject)
                addrs.update(match)
        self.fb, self.fb_keys, self.fb_addrs = {}, keys, addrs
        if not keys:
            return
        rows = self._select(self.sql.fallback, {"keys": sorted(keys), "addrs": sorted(addrs)})
        for thread_id, key, last, address in rows:
            self.fb.setdefault((key, address), set()).add(thread_id)
            self._saw_thread(thread_id, key, last)

    def _fallback(
        self,
        key: str,
        match: list[str],
        pending: dict[str, _Pending],
        newest: dict[int, datetime],
    ) -> int | None:
        """The thread with subject key ``key`` and a participant in ``match`` that was active
        last (the stored emails and this batch's alike), as if each event had its own
        transaction; None when there is none."""
        found: set[int] = set()
        if self.fb is not None and key in self.fb_keys and self.fb_addrs.issuperset(match):
            for address in match:
                found |= self.fb.get((key, address), set())
        else:
            for thread_id, k, last, _ in self._select(
                self.sql.fallback, {"keys": [key], "addrs": match}
            ):
                found.add(thread_id)
                self._saw_thread(thread_id, k, last)
        wanted = set(match)
        for p in pending.values():
            if self.thread_keys.get(p.thread_id) == key and any(
                a in wanted for *_, a, _ in p.parties
            ):
                found.add(p.thread_id)
        if not found:
            return None

        def active(thread_id: int) -> tuple[datetime, int]:
            last = self.thread_dates[thread_id]
            return max(last, newest.get(thread_id, last)), thread_id

        return max(found, key=active)

    @staticmethod
    def _owner(ev: EmailLogged) -> str:
        return try_normalise(ev.account.owner) or ev.account.owner.strip().lower()

    @staticmethod
    def _kept_refs(keys: list[str]) -> list[str]:
        """The thread keys stored for finding this email's thread from a late ancestor: the
        root (References' first), the parent (In-Reply-To, last in ``keys``) and the newest
        Reference. References grow by one per reply (RFC 5322 §3.6.4), so every message of a
        chain names its parent and the root: when any ancestor arrives late, the message that
        replied to it names it, and the rest of the chain is already in that thread."""
        return list(dict.fromkeys([keys[0], keys[-1], *keys[-2:-1]])) if keys else []

    @staticmethod
    def _refs(ev: EmailLogged, mid: str) -> list[str]:
        keys = [normalise_message_id(r) for r in ev.references]
        if len(keys) > _MAX_REFS:  # keep the root and the newest
            keys = [keys[0], *keys[-(_MAX_REFS - 1) :]]
        if ev.in_reply_to:
            keys.append(normalise_message_id(ev.in_reply_to))
        return [k[:998] for k in dict.fromkeys(keys) if k and k != mid]

    @staticmethod
    def _parties(ev: EmailLogged) -> list[tuple[str, str, str]]:
        out = []
        for role, group in zip(_ROLES, (ev.from_, ev.to, ev.cc, ev.bcc), strict=True):
            for party in group:
                address = try_normalise(party.address)
                if address is None:
                    log.info("skipping unparseable %s address %r", role, party.address)
                    continue
                out.append((role, party.name[:320], address))
        return out

    def _email_row(
        self, ev: EmailLogged, mid: str, thread_id: int, outsiders: list[str]
    ) -> dict[str, Any]:
        return {
            "message_id": mid,
            "thread_id": thread_id,
            "direction": ev.direction,
            "source": ev.source,
            "subject": ev.subject,
            "date": ev.date,
            "text_body": ev.text_body,
            "html_body": ev.html_body,
            "body_truncated": ev.body_truncated,
            "in_reply_to": normalise_message_id(ev.in_reply_to)[:998] if ev.in_reply_to else None,
            "thread_refs": " ".join(normalise_message_id(r) for r in ev.references),
            "spf": ev.authentication.spf,
            "dkim": ev.authentication.dkim,
            "dmarc": ev.authentication.dmarc,
            # Mail whose every outside party is at an excluded domain (e.g. a personal address)
            # follows the admin's rule for such mail.
            "raw_url": ev.raw_url,
            "excluded_only": bool(outsiders)
            and all(in_domains(a, self.excluded) for a in outsiders),
            "created_at": utcnow(),
        }

    # -- accounts ------------------------------------------------------------------------------

    def _accounts(self, run: list[_Facts], stored: _Stored) -> None:
        latest = {f.ev.account.id: f.ev.account for f in run}  # the last word in the batch wins
        ids = sorted(latest)
        rows = {
            account_id: (owner, kind, sharing)
            for account_id, owner, kind, sharing in stored.accounts()
        }
        selected: dict[str, set[str]] = defaultdict(set)
        for account_id, address in stored.selected():
            selected[account_id].add(address)
        now = utcnow()
        for account_id in ids:
            acc = latest[account_id]
            owner = try_normalise(acc.owner) or acc.owner.strip().lower()
            row = rows.get(account_id)
            values = {"owner": owner, "kind": acc.kind, "sharing": acc.sharing}
            if row is None:
                self.conn.execute(
                    sa.insert(ACCOUNT).values(
                        id=account_id, status="active", updated_at=now, **values
                    )
                )
            elif row != (owner, acc.kind, acc.sharing):
                self.conn.execute(
                    sa.update(ACCOUNT)
                    .where(ACCOUNT.c.id == account_id)
                    .values(updated_at=now, **values)
                )
            wanted = {a for a in (try_normalise(s) for s in acc.selected_contacts) if a}
            if wanted != selected[account_id]:
                self.conn.execute(sa.delete(SELECTION).where(SELECTION.c.account_id == account_id))
                if wanted:
                    self.conn.execute(
                        sa.insert(SELECTION),
                        [{"account_id": account_id, "address": a} for a in sorted(wanted)],
                    )

    # -- contacts ------------------------------------------------------------------------------

    def _auto_create(
        self,
        ev: EmailLogged,
        parties: list[tuple[str, str, str]],
        contacts: dict[str, int],
        insiders: set[str],
        owner_id: int | None,
    ) -> None:
        if self.auto_create == "none":
            return
        if ev.direction == "outbound":
            roles = {"to", "cc", "bcc"}
        elif self.auto_create == "sent_and_received":
            roles = {"from"}
        else:
            return
        for role, name, address in parties:
            if role not in roles or address in contacts or address in insiders:
                continue
            if in_domains(address, self.excluded) or is_group_address(address, self.groups):
                continue
            now = utcnow()
            contact_id = self.conn.execute(
                self.sql.insert_contact,
                {
                    "name": name[:200],
                    "company": "",
                    "owner_id": owner_id,
                    "auto_created": True,
                    "created_at": now,
                    "updated_at": now,
                },
            ).scalar_one()
            self.conn.execute(
                sa.insert(ADDRESS).values(contact_id=contact_id, address=address, is_primary=True)
            )
            contacts[address] = contact_id

    # -- threads -------------------------------------------------------------------------------

    def _thread(
        self,
        f: _Facts,
        known: dict[str, tuple[int, int]],
        pending: dict[str, _Pending],
        children: dict[str, set[int]],
        outsiders: list[str],
        newest: dict[int, datetime],
    ) -> int:
        ev = f.ev
        parents: list[int] = []
        for key in reversed(f.refs):  # In-Reply-To first, then the newest References
            if key in pending:
                parents.append(pending[key].thread_id)
            elif key in known:
                parents.append(known[key][1])
        candidates = list(dict.fromkeys([*parents, *sorted(children.get(f.mid, ()))]))
        subject = subject_key(ev.subject)
        match = self._match(f, outsiders)
        if not candidates and subject and match:
            # Fallback for clients that drop References: same subject, a shared participant.
            found = self._fallback(subject, match, pending, newest)
            if found is not None:
                candidates = [found]
        if not candidates:
            thread_id: int = self.conn.execute(
                self.sql.insert_thread,
                {
                    "subject": ev.subject,
                    "subject_key": subject,
                    "last_date": ev.date,
                    "created_at": utcnow(),
                },
            ).scalar_one()
            self._saw_thread(thread_id, subject, ev.date)
            return thread_id
        target, merged = candidates[0], [t for t in candidates[1:] if t != candidates[0]]
        if merged:
            # This message joins threads that were split while it was missing.
            self.conn.execute(
                sa.update(EMAIL).where(EMAIL.c.thread_id.in_(merged)).values(thread_id=target)
            )
            last = self.conn.execute(
                sa.select(sa.func.max(THREAD.c.last_date)).where(THREAD.c.id.in_(merged))
            ).scalar()
            self.conn.execute(sa.delete(THREAD).where(THREAD.c.id.in_(merged)))
            if last is not None:
                self.conn.execute(self.sql.touch_thread, {"tid": target, "newest": last})
                self.thread_dates[target] = max(self.thread_dates.get(target, last), last)
            # The merged threads' emails of this batch now make the target's date.
            for m in merged:
                if m in newest:
                    moved = newest.pop(m)
                    newest[target] = max(newest.get(target, moved), moved)
            self.fb = None  # the stored side moved: look it up afresh from now on
            for p in pending.values():
                if p.thread_id in merged:
                    p.thread_id = target
            for message_id, (email_id, thread_id) in list(known.items()):
                if thread_id in merged:
                    known[message_id] = (email_id, target)
            for threads in children.values():
                if threads & set(merged):
                    threads.difference_update(merged)
                    threads.add(target)
        return target


# --- group commit -----------------------------------------------------------------------------


@dataclass
class _Waiting:
    item: Item
    future: asyncio.Future[Outcome]


class GroupCommitter:
    """Queues verified events and stores whatever has queued up in one transaction.

    Requests announce themselves (:meth:`arrival`) as soon as they start, so that after a
    commit the next batch waits, a few milliseconds at most, for the requests already being
    read and parsed instead of committing the first one alone: on PostgreSQL a commit costs a
    few milliseconds whatever its size. ``writer`` is the database's writer lock (SQLite has
    one writer); ``store_fn`` is :func:`store`, injectable for tests. With ``offload``
    (PostgreSQL) batches run on a thread of their own, on a connection it keeps."""

    def __init__(
        self,
        engine: sa.Engine,
        writer: Callable[[], contextlib.AbstractAsyncContextManager[None]],
        store_fn: Callable[..., list[Outcome | Exception]] = store,
        gather_seconds: float = 0.005,
        offload: bool = False,
    ) -> None:
        self.engine = engine
        self.offload = offload
        # One thread, so batches stay in order and PostgreSQL sees one writer connection.
        self.executor = ThreadPoolExecutor(1, "crm-ingest") if offload else None
        self.connection = KeptConnection(engine) if offload else None
        self.writer = writer
        self.store_fn = store_fn
        self.gather_seconds = gather_seconds
        self.queue: list[_Waiting] = []
        self.arriving = 0
        self.wakeup = asyncio.Event()
        self.progress = asyncio.Event()
        self.expected = 1.0  # recent batch size (moving average)
        self.task: asyncio.Task[None] | None = None
        self.batches = 0
        self.events = 0

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """Wrap a request from its start until it has submitted (or failed)."""
        self.arriving += 1
        self.progress.set()
        try:
            yield
        finally:
            self.arriving -= 1

    def submit(self, item: Item) -> asyncio.Future[Outcome]:
        """Queue ``item``; the future resolves once the transaction holding it commits."""
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name="crm-group-commit")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.queue.append(_Waiting(item, future))
        self.wakeup.set()
        self.progress.set()
        return future

    async def _gather(self) -> None:
        """Wait (bounded) for the batch to fill: while requests are being read and parsed,
        and, under steady load, until about as many as last time have queued, since their
        clients are sending them now. Alone, a request waits for nothing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gather_seconds
        await asyncio.sleep(0)
        target = min(_MAX_BATCH, round(self.expected))
        while len(self.queue) < _MAX_BATCH and (self.arriving or len(self.queue) < target):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            if self.arriving:
                await asyncio.sleep(0)  # one loop turn: the arriving requests move on
                continue
            self.progress.clear()
            try:
                await asyncio.wait_for(self.progress.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.queue:
                await self._gather()
                batch, self.queue = self.queue[:_MAX_BATCH], self.queue[_MAX_BATCH:]
                self.batches += 1
                self.events += len(batch)
                self.expected = 0.7 * self.expected + 0.3 * len(batch)
                items = [w.item for w in batch]
                async with self.writer():
                    try:
                        if self.executor is None:
                            results = self.store_fn(engine=self.engine, items=items)
                        else:
                            results = await asyncio.get_running_loop().run_in_executor(
                                self.executor,
                                partial(
                                    self.store_fn,
                                    engine=self.engine,
                                    items=items,
                                    connection=self.connection,
                                ),
                            )
                    except Exception as exc:  # never leave a request hanging
                        results = [exc] * len(batch)
                if len(results) != len(batch):
                    results = [RuntimeError("the store answered a different count")] * len(batch)
                for waiting, result in zip(batch, results, strict=True):
                    if waiting.future.done():
                        continue
                    if isinstance(result, Exception):
                        waiting.future.set_exception(result)
                    else:
                        waiting.future.set_result(result)

    async def close(self) -> None:
        if self.batches:
            log.info(
                "group commit: %d events in %d transactions (%.1f per commit)",
                self.events,
                self.batches,
                self.events / self.batches,
            )
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.executor is not None:
            if self.connection is not None:  # closed on the thread that uses it
                self.executor.submit(self.connection.close)
            self.executor.shutdown(wait=True)
