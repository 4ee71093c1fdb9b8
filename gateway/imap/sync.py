"""The sync engine: bring one folder's cursor up to date, logging only mail that involves contacts.

Per folder (RFC 3501 §2.3.1.1, RFC 7162): if UIDVALIDITY is unchanged, look only above the last
UID done, and skip the folder altogether when STATUS shows the same HIGHESTMODSEQ (CONDSTORE) or
the same UIDNEXT and message count; if UIDVALIDITY changed, every UID is void, so the window is
scanned again and mail already logged is *re-linked* by its Message-ID instead of logged twice.
New UIDs go in chunks (memory stays flat on any mailbox): scan the few headers that say who is
on each email, ask the CRM about all their addresses at once, decide with the pure rules of
:mod:`gateway.imap.decide`, fetch bodies (``BODY.PEEK[]``) only for what will be logged, and
commit the accepted messages, their links and the advanced cursor in one transaction, so a crash
repeats a chunk at worst and never logs it twice. UIDs that vanished from a folder (RFC 7162
``VANISHED``, or a UID SEARCH of the linked UIDs without QRESYNC) are looked up by Message-ID in
Trash, Archive and the other folders and reported as ``email.deleted`` / ``email.archived``.
The engine decides nothing about connections or retries: the service's runner owns those.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Connection, and_, bindparam, delete, insert, select, update

from gateway.imap.connection import FolderInfo, ImapConnection, Selected, UidSet
from gateway.imap.decide import candidates, direction, scan_addresses, worth_logging
from gateway.imap.headers import HeaderRecord
from gateway.imap.models import MailAccount, MailFolder, MailLink
from gateway.imap.settings import ImapSettings
from gateway.message import dedupe_key
from gateway.metrics import Metrics
from gateway.sighting import AccountRef, Direction
from gateway.store.queue import NewMessage, Store, Write
from hooks.crm_client import CrmClient

log = logging.getLogger(__name__)

ACCOUNT = MailAccount.__table__  # type: ignore[attr-defined]
FOLDER = MailFolder.__table__  # type: ignore[attr-defined]
LINK = MailLink.__table__  # type: ignore[attr-defined]

P = ParamSpec("P")
T = TypeVar("T")
Io = Callable[..., Awaitable[Any]]

# Folders whose history is never synced on the first pass: their old mail is what users threw away.
NO_HISTORY = ("\\Trash", "\\Junk")
# Virtual or draft folders: never searched when we look for where a message went.
NOT_A_HOME = ("\\Drafts", "\\Flagged")
MAX_FOLDERS_SEARCHED = 25


@dataclass(frozen=True, slots=True)
class AccountView:
    """What the engine needs of an account, fixed for one session."""

    id: str
    ref: AccountRef
    own: frozenset[str]
    start_at: float
    history: bool  # False for "start now": no mail from before the first connection
    emit_deleted: bool
    emit_archived: bool


@dataclass(slots=True)
class Cursor:
    """A ``mail_folder`` row as the engine keeps it in memory between passes."""

    id: int
    name: str
    special_use: str | None
    uidvalidity: int | None = None
    last_uid: int = 0
    highest_modseq: int | None = None
    uidnext: int | None = None
    messages: int | None = None
    initial_done: bool = False
    initial_total: int = 0
    initial_processed: int = 0
    fetched: int = 0
    logged: int = 0
    sync_started_at: float | None = None

    @classmethod
    def of(cls, row: MailFolder) -> Cursor:
        assert row.id is not None
        return cls(
            id=row.id,
            name=row.name,
            special_use=row.special_use,
            uidvalidity=row.uidvalidity,
            last_uid=row.last_uid,
            highest_modseq=row.highest_modseq,
            uidnext=row.uidnext,
            messages=row.messages,
            initial_done=row.initial_done,
            initial_total=row.initial_total,
            initial_processed=row.initial_processed,
            fetched=row.fetched,
            logged=row.logged,
            sync_started_at=row.sync_started_at,
        )

    def values(self) -> dict[str, Any]:
        return {
            "uidvalidity": self.uidvalidity,
            "last_uid": self.last_uid,
            "highest_modseq": self.highest_modseq,
            "uidnext": self.uidnext,
            "messages": self.messages,
            "initial_done": self.initial_done,
            "initial_total": self.initial_total,
            "initial_processed": self.initial_processed,
            "fetched": self.fetched,
            "logged": self.logged,
            "sync_started_at": self.sync_started_at,
            "updated_at": time.time(),
        }


@dataclass(slots=True)
class _Stored:
    """One piece of a chunk, ready to commit: the new messages' ids and the write."""

    ids: list[str]
    write: Write


@dataclass(slots=True)
class PassResult:
    scanned: int = 0
    accepted: list[str] = field(default_factory=list)
    relinked: int = 0
    events: int = 0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


class Engine:
    """Folder syncs for any account; one instance per service, stateless between calls."""

    def __init__(
        self,
        *,
        store: Store,
        crm: CrmClient,
        outbox: Any,
        settings: ImapSettings,
        io: Io,
        metrics: Metrics,
        on_accepted: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.crm = crm
        self.outbox = outbox
        self.settings = settings
        self.io = io
        self.metrics = metrics
        self.on_accepted = on_accepted
        self.clock = clock
        self.scanned: Any = None  # a Prometheus counter of scanned headers, if the service has one

    # -- cheap change detection -------------------------------------------------------------

    async def unchanged(self, conn: ImapConnection, cursor: Cursor) -> bool:
        """True when STATUS proves nothing was added or removed since the last pass."""
        if not cursor.initial_done or cursor.uidvalidity is None:
            return False
        status = await self.io(conn.status, cursor.name)
        if status.uidvalidity != cursor.uidvalidity:
            return False
        if conn.condstore and status.highest_modseq is not None:
            # RFC 7162 §3.1: any change (new mail, expunge, flags) raises HIGHESTMODSEQ.
            return bool(status.highest_modseq == cursor.highest_modseq)
        return bool(
            status.uidnext is not None
            and status.uidnext == cursor.uidnext
            and status.messages == cursor.messages
        )

    # -- one folder ------------------------------------------------------------------------

    async def sync_folder(
        self,
        conn: ImapConnection,
        account: AccountView,
        cursor: Cursor,
        *,
        folders: Sequence[FolderInfo] = (),
        synced: Sequence[str] = (),
        progress: Callable[[], float | None] | None = None,
    ) -> PassResult:
        """Bring ``cursor`` up to date with the folder; ``cursor`` is updated in place."""
        result = PassResult()
        selected = None
        if cursor.initial_done and cursor.uidvalidity is not None:
            selected = conn.reuse_selection(cursor.name)  # still selected since the last pass
            if selected is not None and selected.uidvalidity != cursor.uidvalidity:
                selected = None
        if selected is None:
            known = None
            if conn.qresync and cursor.uidvalidity is not None and cursor.highest_modseq:
                known = (cursor.uidvalidity, cursor.highest_modseq)
            selected = await self.io(conn.examine, cursor.name, known=known)
        resync = cursor.uidvalidity is not None and selected.uidvalidity != cursor.uidvalidity
        first = cursor.uidvalidity is None
        if resync:
            log.warning(
                "account %s folder %r: UIDVALIDITY changed (%s -> %s); rescanning and "
                "re-linking by Message-ID",
                account.id,
                cursor.name,
                cursor.uidvalidity,
                selected.uidvalidity,
            )
            cursor.last_uid = 0
            cursor.initial_done = False
            cursor.highest_modseq = None
        if first or resync:
            cursor.uidvalidity = selected.uidvalidity
            cursor.sync_started_at = self.clock()
            cursor.fetched = cursor.logged = cursor.initial_processed = 0
            if first and (cursor.special_use in NO_HISTORY or not account.history):
                cursor.last_uid = await self._highest_uid(conn, selected)
                cursor.initial_done = True
        finishing = first or not cursor.initial_done
        vanished = UidSet([])
        if not (first or resync):
            vanished = await self._vanished(conn, account, cursor, selected)

        since = None
        upto = 0
        if not cursor.initial_done:
            since = datetime.fromtimestamp(account.start_at, UTC).date()
            # Everything up to here is judged by the window now; mail older than the window
            # must not come back as "new" in the next incremental pass.
            upto = await self._highest_uid(conn, selected)
        uids = await self.io(conn.new_uids, cursor.last_uid, since=since)
        if not cursor.initial_done:
            cursor.initial_total = cursor.initial_processed + len(uids)
        chunks = list(uids.chunks(self.settings.scan_chunk))
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            await self._chunk(
                conn,
                account,
                cursor,
                chunk,
                result,
                finish=finishing and last,
                resync=resync,
                upto=upto,
                progress=progress,
            )
        if not chunks and finishing:
            cursor.initial_done = True
            cursor.last_uid = max(cursor.last_uid, upto)
            await self._commit_cursor(account, cursor, finish=True, resync=resync)
        # RFC 3501 §6.3.1: the UIDNEXT/HIGHESTMODSEQ seen at EXAMINE time are safe lower bounds;
        # anything that arrived since shows up as a difference at the next STATUS.
        if selected.uidnext is not None:
            cursor.uidnext = selected.uidnext
        cursor.messages = selected.exists
        if selected.highest_modseq is not None:
            cursor.highest_modseq = selected.highest_modseq
        if vanished:
            result.events += await self._report_vanished(
                conn, account, cursor, vanished, folders=folders, synced=synced
            )
        await self._commit_cursor(account, cursor)
        if resync:
            await self._drop_stale_links(account, cursor)
        return result

    async def _highest_uid(self, conn: ImapConnection, selected: Selected) -> int:
        if selected.uidnext is not None:
            return selected.uidnext - 1
        # No UIDNEXT (some servers omit it): "*" is the highest UID in use, if any.
        found: UidSet = await self.io(conn.search, "UID *")
        return found.max

    async def _chunk(
        self,
        conn: ImapConnection,
        account: AccountView,
        cursor: Cursor,
        chunk: UidSet,
        result: PassResult,
        *,
        finish: bool,
        resync: bool,
        upto: int = 0,
        progress: Callable[[], float | None] | None = None,
    ) -> None:
        records: list[HeaderRecord] = await self.io(conn.fetch_headers, chunk)
        result.scanned += len(records)
        if self.scanned is not None:
            self.scanned.inc(len(records))
        sent_folder = cursor.special_use == "\\Sent"
        chosen: list[tuple[HeaderRecord, Direction]] = []
        if records:
            addresses = scan_addresses(records, account.own)
            answer = await self.crm.match(addresses, owner=account.ref.owner)
            for record in records:
                way = direction(record, account.own, sent_folder=sent_folder)
                if worth_logging(candidates(record, account.own, way), answer, way):
                    chosen.append((record, way))
        # Mail already logged for this account (a UIDVALIDITY reset, a move between synced
        # folders, the same email in Inbox and Sent) is re-linked, never fetched or logged again.
        linked = await self._linked_keys(account.id, [r.key for r, _ in chosen if r.key])
        relinks: dict[str, int] = {}
        wanted: list[tuple[HeaderRecord, Direction]] = []
        for record, way in chosen:
            if record.key is not None and (record.key in linked or record.key in relinks):
                relinks[record.key] = record.uid
            else:
                wanted.append((record, way))
        pieces = self._pieces(wanted)
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            if last:
                # Only the last piece moves the cursor: if we stop before it, the chunk is
                # scanned again and what was stored meanwhile is re-linked, not logged twice.
                cursor.last_uid = max(cursor.last_uid, chunk.max)
                cursor.fetched += len(records)
                if not cursor.initial_done:
                    cursor.initial_processed += len(chunk)
                if finish:
                    cursor.initial_done = True
                    cursor.last_uid = max(cursor.last_uid, upto)
            stored = await self._store_piece(
                conn, account, cursor, piece, linked, relinks if last else {}, last=last
            )
            cursor.logged += len(stored.ids)
            if last:
                await self._commit_cursor(
                    account,
                    cursor,
                    finish=finish,
                    resync=resync,
                    also=stored.write,
                    progress=progress() if progress is not None else None,
                )
            else:
                await self.store.committer.write(stored.write)
            result.accepted.extend(stored.ids)
            if stored.ids:
                self.metrics.accepted.labels(source="imap").inc(len(stored.ids))
            for message_id in stored.ids:
                self.on_accepted(message_id)
        result.relinked += len(relinks)

    def _pieces(
        self, wanted: list[tuple[HeaderRecord, Direction]]
    ) -> list[list[tuple[HeaderRecord, Direction]]]:
        """Body fetches of at most ``body_chunk`` messages and ``body_batch_bytes`` (by the
        RFC822.SIZE the scan reported), so a run of huge messages never sits in memory at once;
        there is always at least one piece, the one that carries the cursor."""
        pieces: list[list[tuple[HeaderRecord, Direction]]] = [[]]
        size = 0
        for record, way in wanted:
            current = pieces[-1]
            if current and (
                len(current) >= self.settings.body_chunk
                or size + record.size > self.settings.body_batch_bytes
            ):
                pieces.append([])
                size = 0
            pieces[-1].append((record, way))
            size += record.size
        return pieces

    async def _store_piece(
        self,
        conn: ImapConnection,
        account: AccountView,
        cursor: Cursor,
        piece: list[tuple[HeaderRecord, Direction]],
        linked: set[str],
        relinks: dict[str, int],
        *,
        last: bool,
    ) -> _Stored:
        """Fetch one piece's bodies and build the write that stores them (and re-links)."""
        bodies: dict[int, bytes] = {}
        if piece:
            bodies = await self.io(conn.fetch_bodies, UidSet.of(r.uid for r, _ in piece))
        # Without a Message-ID the key is a hash of the whole message: known only now.
        late = [dedupe_key(bodies[r.uid]) for r, _ in piece if r.key is None and r.uid in bodies]
        linked |= await self._linked_keys(account.id, late)
        messages: list[NewMessage] = []
        links: list[dict[str, Any]] = []
        moved: dict[str, int] = dict(relinks)
        for record, way in piece:
            raw = bodies.pop(record.uid, None)
            if raw is None:
                continue  # expunged between the scan and the fetch: nothing left to log
            key = record.key or dedupe_key(raw)
            if key in linked:
                moved[key] = record.uid
                continue
            linked.add(key)  # the same email twice in one chunk is logged once
            message = NewMessage(
                source="imap",
                mail_from=record.from_[0] if record.from_ else "",
                rcpt_tos=[],
                raw=raw,
                header_message_id=record.message_id,
                meta={
                    "account": account.ref.as_meta(),
                    "direction": way,
                    "folder": cursor.name,
                    "uid": record.uid,
                    "uidvalidity": cursor.uidvalidity,
                    "own_addresses": sorted(account.own),
                },
            )
            messages.append(message)
            links.append(
                {
                    "account_id": account.id,
                    "key": key,
                    "folder": cursor.name,
                    "uidvalidity": cursor.uidvalidity,
                    "uid": record.uid,
                    "message_id": message.id,
                    "created_at": self.clock(),
                }
            )
        inserts = [self.store.inserting(m) for m in messages]
        relink_rows = [
            {"a": account.id, "k": key, "f": cursor.name, "v": cursor.uidvalidity, "u": uid}
            for key, uid in moved.items()
        ]

        def write(connection: Connection) -> None:
            for insert_message in inserts:
                insert_message(connection)
            if links:
                connection.execute(insert(LINK), links)
            if relink_rows:
                connection.execute(
                    update(LINK)
                    .where(and_(LINK.c.account_id == bindparam("a"), LINK.c.key == bindparam("k")))
                    .values(folder=bindparam("f"), uidvalidity=bindparam("v"), uid=bindparam("u")),
                    relink_rows,
                )

        return _Stored(ids=[m.id for m in messages], write=write)

    async def _linked_keys(self, account_id: str, keys: list[str]) -> set[str]:
        if not keys:
            return set()

        def read(connection: Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(keys), 500):
                rows = connection.execute(
                    select(LINK.c.key).where(
                        LINK.c.account_id == account_id, LINK.c.key.in_(keys[start : start + 500])
                    )
                )
                found.update(r[0] for r in rows)
            return found

        result: set[str] = await self.store.committer.read(read)
        return result

    async def _commit_cursor(
        self,
        account: AccountView,
        cursor: Cursor,
        *,
        finish: bool = False,
        resync: bool = False,
        also: Write | None = None,
        progress: float | None = None,
    ) -> None:
        """Write the cursor (with ``also`` and the account's first-sync ``progress`` in the same
        transaction: one commit per chunk); at the end of a folder's first sync, its
        ``sync.completed`` event too."""
        values = cursor.values()
        event: Write | None = None
        if finish and not resync:
            event = self.outbox.event(
                "sync.completed",
                {
                    "account_id": account.id,
                    "folder": cursor.name,
                    "fetched": cursor.fetched,
                    "logged": cursor.logged,
                    "started_at": _iso(cursor.sync_started_at or self.clock()),
                    "finished_at": _iso(self.clock()),
                },
            )

        def write(connection: Connection) -> None:
            if also is not None:
                also(connection)
            connection.execute(update(FOLDER).where(FOLDER.c.id == cursor.id).values(**values))
            if progress is not None:
                connection.execute(
                    update(ACCOUNT).where(ACCOUNT.c.id == account.id).values(progress=progress)
                )
            if event is not None:
                event(connection)

        await self.store.committer.write(write)

    async def _drop_stale_links(self, account: AccountView, cursor: Cursor) -> None:
        """After a UIDVALIDITY rescan, links still pointing at the old UIDVALIDITY are gone mail."""

        def write(connection: Connection) -> None:
            connection.execute(
                delete(LINK).where(
                    LINK.c.account_id == account.id,
                    LINK.c.folder == cursor.name,
                    LINK.c.uidvalidity != cursor.uidvalidity,
                )
            )

        await self.store.committer.write(write)

    # -- expunges and moves ----------------------------------------------------------------

    async def _vanished(
        self, conn: ImapConnection, account: AccountView, cursor: Cursor, selected: Selected
    ) -> UidSet:
        """Linked UIDs no longer in the folder (only logged mail matters to the CRM)."""
        changed = (
            selected.exists != cursor.messages
            or selected.expunged
            or bool(selected.vanished)
            or (selected.uidnext is not None and selected.uidnext != cursor.uidnext)
            or (
                selected.highest_modseq is not None
                and selected.highest_modseq != cursor.highest_modseq
            )
        )
        if not changed:
            return UidSet([])
        tracked = await self._links_in(account.id, cursor)
        if not tracked:
            return UidSet([])
        if conn.qresync and not selected.expunged and (selected.reused or cursor.highest_modseq):
            # RFC 7162: with QRESYNC enabled the server reports removals as VANISHED UIDs,
            # EARLIER ones at EXAMINE and later ones as they happen.
            return UidSet.of(u for u in tracked if u in selected.vanished)
        present: UidSet = await self.io(conn.search, f"UID {UidSet.of(tracked)}")
        return UidSet.of(u for u in tracked if u not in present)

    async def _links_in(self, account_id: str, cursor: Cursor) -> list[int]:
        def read(connection: Connection) -> list[int]:
            rows = connection.execute(
                select(LINK.c.uid).where(
                    LINK.c.account_id == account_id,
                    LINK.c.folder == cursor.name,
                    LINK.c.uidvalidity == cursor.uidvalidity,
                )
            )
            return sorted(int(r[0]) for r in rows)

        result: list[int] = await self.store.committer.read(read)
        return result

    async def _report_vanished(
        self,
        conn: ImapConnection,
        account: AccountView,
        cursor: Cursor,
        vanished: UidSet,
        *,
        folders: Sequence[FolderInfo],
        synced: Sequence[str],
    ) -> int:
        """Find where vanished logged mail went; emit deleted/archived; fix or drop the links."""

        def read(connection: Connection) -> list[tuple[str, int]]:
            rows = connection.execute(
                select(LINK.c.key, LINK.c.uid).where(
                    LINK.c.account_id == account.id,
                    LINK.c.folder == cursor.name,
                    LINK.c.uidvalidity == cursor.uidvalidity,
                )
            )
            return [(r[0], int(r[1])) for r in rows if int(r[1]) in vanished]

        gone: list[tuple[str, int]] = await self.store.committer.read(read)
        if not gone:
            return 0
        outcome: dict[str, tuple[str, str | None, int | None, int | None]] = {}
        searchable = {k.removeprefix("mid:"): k for k, _ in gone if k.startswith("mid:")}
        if (account.emit_deleted or account.emit_archived) and searchable:
            outcome = await self._locate(conn, cursor, searchable, folders, synced)
        events: list[Write] = []
        moved: list[dict[str, Any]] = []
        dropped: list[str] = []
        for key, _uid in gone:
            verdict, folder, uidvalidity, uid = outcome.get(key, ("deleted", None, None, None))
            if verdict == "relocated" and folder is not None:
                moved.append({"a": account.id, "k": key, "f": folder, "v": uidvalidity, "u": uid})
                continue
            dropped.append(key)
            wanted = account.emit_deleted if verdict == "deleted" else account.emit_archived
            if wanted:
                events.append(
                    self.outbox.event(
                        f"email.{verdict}",
                        {"message_id": key.removeprefix("mid:"), "account_id": account.id},
                    )
                )

        def write(connection: Connection) -> None:
            if moved:
                connection.execute(
                    update(LINK)
                    .where(and_(LINK.c.account_id == bindparam("a"), LINK.c.key == bindparam("k")))
                    .values(folder=bindparam("f"), uidvalidity=bindparam("v"), uid=bindparam("u")),
                    moved,
                )
            if dropped:
                connection.execute(
                    delete(LINK).where(LINK.c.account_id == account.id, LINK.c.key.in_(dropped))
                )
            for event in events:
                event(connection)

        await self.store.committer.write(write)
        return len(events)

    async def _locate(
        self,
        conn: ImapConnection,
        cursor: Cursor,
        searchable: dict[str, str],
        folders: Sequence[FolderInfo],
        synced: Sequence[str],
    ) -> dict[str, tuple[str, str | None, int | None, int | None]]:
        """Where each vanished email went: ``(verdict, folder, uidvalidity, uid)`` by key.

        Trash or Junk means deleted; another synced folder means it merely moved (its link
        follows, no event); Archive, All Mail or any other folder means archived; nowhere means
        expunged for good, which is deleted too.
        """
        others = [f for f in folders if f.selectable and f.name != cursor.name]
        order = sorted(
            others,
            key=lambda f: (
                0 if f.special_use in NO_HISTORY else 1 if f.name in synced else 2,
                0 if f.special_use in ("\\Archive", "\\All") else 1,
            ),
        )
        order = [f for f in order if f.special_use not in NOT_A_HOME][:MAX_FOLDERS_SEARCHED]
        result: dict[str, tuple[str, str | None, int | None, int | None]] = {}
        pending = dict(searchable)
        for folder in order:
            if not pending:
                break
            found: dict[str, int] = await self.io(conn.find_message_ids, folder.name, pending)
            if not found:
                continue
            status = await self.io(conn.status, folder.name)
            for message_id, uid in found.items():
                key = pending.pop(message_id)
                if folder.special_use in NO_HISTORY:
                    result[key] = ("deleted", None, None, None)
                elif folder.name in synced:
                    result[key] = ("relocated", folder.name, status.uidvalidity, uid)
                else:
                    result[key] = ("archived", None, None, None)
        return result
