"""The IMAP service: every enabled account's sync, run in the gateway's one event loop.

Each account gets an :class:`AccountRunner` task that connects, runs the first (history) sync,
then stays live with IDLE on the Inbox (RFC 2177) and a STATUS poll of its other folders, and
shows a state users can trust (``connecting``, ``initial_sync`` with progress %, ``live``,
``paused``, ``auth_failed``, ``error``, the last successful sync, the last error in words;
changes worth telling the CRM become ``account.status_changed``). imapclient is blocking, so IMAP
commands run on a bounded thread pool (``imap.io_threads``), but waiting for IDLE news holds no
thread: the socket is registered with the event loop (``add_reader``) and a thread is borrowed
only to read what arrived, so hundreds of idle accounts cost sockets, not threads. (Twisted's
IMAP4 client would avoid threads too, at the price of a second reactor in the loop and a parser
no faster than imapclient's; :mod:`gateway.imap.headers` already takes the expensive parsing off
imapclient.) Temporary errors back off on ``imap.retry_schedule_seconds``, provider throttling
gets ``imap.throttle_seconds``, and a refused login is retried only ``imap.auth_max_failures``
times (providers lock mailboxes that keep failing) before the account waits in ``auth_failed``
for a new password, then resumes from its cursor. Each account uses at most its provider's
``max_connections`` (the sync connection, plus one for tests and actions), and with several
gateway processes on one database each account is synced by the single holder of its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import httpx
from prometheus_client import Counter, Gauge
from sqlalchemy import Connection, Engine, delete, select, update
from sqlmodel import Session
from sqlmodel import select as orm_select

from gateway.errors import ConfigError, Defer, StoreError
from gateway.imap import accounts, oauth
from gateway.imap.accounts import AccountCreate, AccountError, AccountPublic, AccountUpdate
from gateway.imap.connection import (
    ConnectionFactory,
    Endpoint,
    FolderInfo,
    ImapConnection,
    UidSet,
)
from gateway.imap.errors import AuthFailed, ImapError, ServerError, Throttled
from gateway.imap.models import AccountStatus, MailAccount, MailFolder, MailLink
from gateway.imap.oauth import Authorizations, Tokens
from gateway.imap.presets import Provider, load_providers
from gateway.imap.settings import ImapSettings
from gateway.imap.sync import ACCOUNT, LINK, AccountView, Cursor
from gateway.imap.sync import Engine as SyncEngine
from gateway.imap.vault import SecretError, Vault
from gateway.message import normalise_address
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.store.owner import free_dead_leases
from gateway.store.queue import Store
from hooks.crm_client import CrmClient

log = logging.getLogger(__name__)
T = TypeVar("T")

INBOX = "INBOX"
ONE_WAY_DETAIL = "one-way: incoming mail is not synced; mail sent from the CRM goes to Sent"


@dataclass
class FolderReport:
    name: str
    special_use: str | None
    messages: int | None


@dataclass
class TestReport:
    """What ``account test`` shows: a login, the folders with their special use and counts."""

    ok: bool
    error: str | None = None
    folders: list[FolderReport] = field(default_factory=list)
    capabilities: dict[str, bool] = field(default_factory=dict)

    __test__ = False  # not a pytest class

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "error": self.error,
            "folders": [
                {"name": f.name, "special_use": f.special_use, "messages": f.messages}
                for f in self.folders
            ],
            "capabilities": self.capabilities,
        }


def choose_folders(
    chosen: list[str], available: list[FolderInfo]
) -> tuple[list[FolderInfo], list[str]]:
    """The folders to sync (Inbox and the RFC 6154 Sent folder by default), and unknown names."""
    selectable = [f for f in available if f.selectable]
    by_name = {f.name: f for f in selectable}
    inbox = next((f for f in selectable if f.name.upper() == INBOX), None)
    if not chosen:
        picked = [f for f in (inbox,) if f is not None]
        sent = next((f for f in selectable if f.special_use == "\\Sent"), None)
        if sent is not None:
            picked.append(sent)
        return picked, []
    picked, missing = [], []
    for name in chosen:
        folder = inbox if name.upper() == INBOX else by_name.get(name)
        if folder is None:
            missing.append(name)
        elif folder not in picked:
            picked.append(folder)
    return picked, missing


def probe(factory: ConnectionFactory, endpoint: Endpoint, password: str) -> TestReport:
    """Log in, list folders with special use and message counts, log out (blocking)."""
    try:
        conn = factory.open(endpoint, password)
    except ImapError as exc:
        return TestReport(ok=False, error=exc.sentence)
    try:
        folders = conn.list_folders()
        report = TestReport(
            ok=True,
            capabilities={
                name.lower(): conn.has(name) for name in ("IDLE", "CONDSTORE", "QRESYNC", "MOVE")
            },
        )
        for folder in folders[:200]:
            messages = None
            if folder.selectable:
                with contextlib.suppress(ImapError):
                    messages = conn.status(folder.name).messages
            report.folders.append(FolderReport(folder.name, folder.special_use, messages))
        return report
    except ImapError as exc:
        return TestReport(ok=False, error=exc.sentence)
    finally:
        conn.logout()


FolderState = tuple[FolderInfo, int | None, int | None]  # folder, UIDVALIDITY, UIDNEXT


def first_look(
    factory: ConnectionFactory, endpoint: Endpoint, password: str, chosen: list[str]
) -> tuple[TestReport, list[FolderState]]:
    """The creation-time test (blocking), which also notes where "now" is in each folder."""
    try:
        conn = factory.open(endpoint, password)
    except ImapError as exc:
        return TestReport(ok=False, error=exc.sentence), []
    try:
        folders = conn.list_folders()
        picked, missing = choose_folders(chosen, folders)
        if missing:
            names = ", ".join(repr(m) for m in missing)
            known = ", ".join(repr(f.name) for f in folders if f.selectable)
            return TestReport(ok=False, error=f"no folder {names}; the mailbox has {known}"), []
        states: list[FolderState] = []
        for info in picked:
            status = conn.status(info.name)
            states.append((info, status.uidvalidity, status.uidnext))
        return TestReport(ok=True), states
    except ImapError as exc:
        return TestReport(ok=False, error=exc.sentence), []
    finally:
        conn.logout()


def login_secret(data: AccountCreate) -> str:
    """The password, or the access token of an OAuth account's tokens."""
    secret = data.password.get_secret_value() if data.password is not None else ""
    return Tokens.loads(secret).access_token if data.auth == "oauth" and secret else secret


def pushes_to_us(settings: ImapSettings, account: MailAccount) -> bool:
    """Whether the mailbox's server is asked (by METADATA) to push news to us: only with
    ``push_secret`` set, and only on a custom set-up, since a preset provider's server is never
    a Dovecot the admin configured to push (the entry would only change the mailbox)."""
    return bool(settings.push_secret) and account.provider == "custom"


def validate_new(
    session: Session, *, data: AccountCreate, vault: Vault, providers: dict[str, Provider]
) -> MailAccount:
    """The account ``data`` would make, checked but not stored (for the login test first)."""
    account = accounts.new_account(session, data=data, vault=vault, providers=providers)
    session.expunge(account)
    session.rollback()
    return account


def store_new(
    session: Session,
    *,
    data: AccountCreate,
    vault: Vault,
    providers: dict[str, Provider],
    draft: MailAccount,
    states: list[FolderState],
) -> MailAccount:
    """Store a tested account and its folders' starting cursors."""
    account = accounts.new_account(
        session, data=data, vault=vault, providers=providers, now=draft.created_at
    )
    account.id = draft.id
    session.flush()
    for info, uidvalidity, uidnext in states:
        # "Start now" means from this moment: the cursor starts at the UIDNEXT of the test.
        now = data.start == "now" and uidvalidity is not None and uidnext is not None
        session.add(
            MailFolder(
                account_id=account.id,
                name=info.name,
                special_use=info.special_use,
                uidvalidity=uidvalidity if now else None,
                last_uid=uidnext - 1 if now and uidnext is not None else 0,
                updated_at=time.time(),
            )
        )
    return account


class ImapService:
    """Runs the sync of every enabled account; the admin API's ``services["imap"]``."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        engine: Engine,
        crm: CrmClient,
        outbox: Any,
        metrics: Metrics,
        on_accepted: Callable[[str], None],
    ) -> None:
        self.settings = settings.imap
        self.store = store
        self.db = engine
        self.crm = crm
        self.outbox = outbox
        self.metrics = metrics
        self.providers = load_providers(self.settings.providers_file)
        self._vault: Vault | None = None
        self._vault_error: ConfigError | None = None
        try:
            self._vault = Vault(self.settings.secret_key, self.settings.previous_secret_keys)
        except ConfigError as exc:
            if self.settings.secret_key:
                raise  # a malformed key is a config mistake to fix before starting
            self._vault_error = exc  # unset: fine until an account needs a password
        self.authorizations = Authorizations()
        self._refreshing: dict[str, asyncio.Lock] = {}
        self.factory = ConnectionFactory(
            ca_file=self.settings.ca_file,
            connect_timeout=self.settings.connect_timeout_seconds,
            command_timeout=self.settings.command_timeout_seconds,
            keepalive_seconds=self.settings.tcp_keepalive_seconds,
        )
        # OAuth token requests trust what the IMAP connections trust: the system's CAs plus
        # ca_file (which is extra, so Google's and Microsoft's endpoints still verify).
        self.http = httpx.AsyncClient(
            timeout=self.settings.connect_timeout_seconds,
            trust_env=False,
            verify=self.factory.verified,
        )
        self.executor = ThreadPoolExecutor(
            max_workers=self.settings.io_threads, thread_name_prefix="mailgate-imap"
        )
        self.engine = SyncEngine(
            store=store,
            crm=crm,
            outbox=outbox,
            settings=self.settings,
            io=self.io,
            metrics=metrics,
            on_accepted=on_accepted,
        )
        self.runners: dict[str, AccountRunner] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._initial: asyncio.Semaphore | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self.lease_seconds = max(60.0, 4 * self.settings.reload_interval_seconds)
        self.status_gauge = Gauge(
            "mailgate_imap_accounts",
            "Connected mailboxes by sync status",
            ["status"],
            registry=metrics.registry,
        )
        self.engine.scanned = Counter(
            "mailgate_imap_messages_scanned",
            "Message headers scanned by IMAP sync",
            registry=metrics.registry,
        )
        self.pushes = Counter(
            "mailgate_imap_pushes",
            "News pushed by mail servers, by whether a mailbox synced here was nudged",
            ["result"],
            registry=metrics.registry,
        )

    @property
    def vault(self) -> Vault:
        if self._vault is None:
            raise self._vault_error or ConfigError("`imap.secret_key` is not set")
        return self._vault

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._initial = asyncio.Semaphore(self.settings.max_initial_syncs)
        if self.settings.enabled:
            await self._reclaim()
            await self.reconcile()
            self._reconciler = asyncio.create_task(self._reconcile_loop(), name="imap-reconcile")

    async def _reclaim(self) -> None:
        """Mailboxes a dead gateway process of this machine was syncing are free at once (a
        crash and a restart), not when their leases expire (see gateway.store.owner)."""
        me = self.store.owner

        def write(connection: Connection) -> int:
            return free_dead_leases(connection, ACCOUNT, me=me)

        if freed := await self.store.committer.write(write):
            log.info("took back %d mailboxes a stopped gateway process was syncing", freed)

    async def stop(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        await asyncio.gather(*(r.stop() for r in self.runners.values()))
        self.runners.clear()
        await self.http.aclose()
        me = self.store.owner

        def release(connection: Connection) -> None:
            # Another process may take these accounts over at once instead of after expiry.
            connection.execute(
                update(ACCOUNT)
                .where(ACCOUNT.c.lease_owner == me)
                .values(lease_owner=None, lease_expires_at=None)
            )

        with contextlib.suppress(StoreError):
            await self.store.committer.write(release)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking IMAP call on the bounded pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def session(self, fn: Callable[[Session], T], *, commit: bool = False) -> T:
        """Run ``fn(session)`` in a thread with an ORM session on the gateway's database."""

        def run() -> T:
            with Session(self.db, expire_on_commit=False) as session:
                result = fn(session)
                if commit:
                    session.commit()
                return result

        return await asyncio.to_thread(run)

    async def reconcile(self) -> None:
        """Claim accounts, start runners for new ones, stop them for deleted (or lost) ones, and
        wake changed ones (changes made with the CLI reach a running gateway this way).

        Several gateway processes may share the database: each account is synced by the one
        process holding its lease (renewed here; a dead process's leases expire after
        ``lease_seconds``), so no mailbox is synced twice or gets more connections than allowed.
        """
        me, now = self.store.owner, time.time()
        expires = now + self.lease_seconds

        def claim(connection: Connection) -> list[tuple[str, float, str, str | None]]:
            connection.execute(
                update(ACCOUNT)
                .where(
                    (ACCOUNT.c.lease_owner.is_(None))
                    | (ACCOUNT.c.lease_owner == me)
                    | (ACCOUNT.c.lease_expires_at < now)
                )
                .values(lease_owner=me, lease_expires_at=expires)
            )
            rows = connection.execute(
                select(ACCOUNT.c.id, ACCOUNT.c.updated_at, ACCOUNT.c.status, ACCOUNT.c.lease_owner)
            )
            return [(r[0], float(r[1]), r[2], r[3]) for r in rows]

        everything = await self.store.committer.write(claim)
        rows = [(a, u, s) for a, u, s, owner in everything if owner == me]
        present = {account_id for account_id, _, _ in rows}
        for account_id in list(self.runners):
            if account_id not in present:
                await self.runners.pop(account_id).stop()
        counts: dict[str, int] = {}
        for _account_id, _updated, status, _owner in everything:
            counts[status] = counts.get(status, 0) + 1
        for account_id, updated_at, _status in rows:
            runner = self.runners.get(account_id)
            if runner is None:
                runner = self.runners[account_id] = AccountRunner(self, account_id)
                runner.updated_at = updated_at
                runner.start()
            elif updated_at > runner.updated_at:
                runner.updated_at = updated_at
                runner.wake()
        for status in (
            AccountStatus.CONNECTING,
            AccountStatus.INITIAL_SYNC,
            AccountStatus.LIVE,
            AccountStatus.PAUSED,
            AccountStatus.AUTH_FAILED,
            AccountStatus.ERROR,
        ):
            self.status_gauge.labels(status=status).set(counts.get(status, 0))

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_seconds)
            try:
                await self.reconcile()
            except StoreError as exc:
                log.warning("IMAP accounts could not be reloaded: %s", exc)

    def slots(self, account: MailAccount) -> asyncio.Semaphore:
        """The account's connection budget (never above its provider's limit)."""
        if account.id not in self._slots:
            limit = min(account.max_connections, self.settings.max_connections_per_account)
            self._slots[account.id] = asyncio.Semaphore(max(1, limit))
        return self._slots[account.id]

    @contextlib.asynccontextmanager
    async def extra_connection(self, account: MailAccount) -> Any:
        """A second connection for a test or an action, within the account's budget."""
        slots = self.slots(account)
        try:
            await asyncio.wait_for(slots.acquire(), timeout=self.settings.connect_timeout_seconds)
        except TimeoutError:
            raise AccountError(
                f"all {account.max_connections} connections to {account.email} are busy; "
                "try again in a minute",
                status=409,
            ) from None
        try:
            yield
        finally:
            slots.release()

    # -- what the API and CLI ask for -------------------------------------------------------

    async def add_account(self, data: AccountCreate, *, test: bool = True) -> AccountPublic:
        """Validate, test the login (unless ``test`` is False), store and start syncing."""
        vault = self.vault
        draft = await self.session(
            lambda session: validate_new(session, data=data, vault=vault, providers=self.providers)
        )
        states: list[FolderState] = []
        if test:
            endpoint = accounts.endpoint_of(draft, self.providers)
            report, states = await self.io(
                first_look, self.factory, endpoint, login_secret(data), list(draft.folders)
            )
            if not report.ok:
                raise AccountError(report.error or "the login failed", status=422)
        account = await self.session(
            lambda session: store_new(
                session,
                data=data,
                vault=vault,
                providers=self.providers,
                draft=draft,
                states=states,
            ),
            commit=True,
        )
        if self.settings.enabled:
            await self.reconcile()
        return await self.get_account(account.id)

    async def test_new(self, data: AccountCreate) -> TestReport:
        """Try a set-up before adding it: log in, list folders with counts."""
        draft = await self.session(
            lambda session: validate_new(
                session, data=data, vault=self.vault, providers=self.providers
            )
        )
        return await self.io(
            probe, self.factory, accounts.endpoint_of(draft, self.providers), login_secret(data)
        )

    async def list_accounts(self, *, owner: str | None = None) -> list[AccountPublic]:
        def read(session: Session) -> list[AccountPublic]:
            return [accounts.public(a) for a in accounts.list_accounts(session, owner=owner)]

        return await self.session(read)

    async def get_account(self, account_id: str) -> AccountPublic:
        def read(session: Session) -> AccountPublic:
            account = accounts.get_account(session, account_id)
            return accounts.public(account, accounts.folders_of(session, account_id))

        return await self.session(read)

    async def test_account(self, account_id: str) -> TestReport:
        account = await self.session(lambda s: accounts.get_account(s, account_id))
        try:
            password = await self.credential(account)
        except (SecretError, ImapError) as exc:
            return TestReport(ok=False, error=str(exc))
        async with self.extra_connection(account):
            return await self.io(
                probe, self.factory, accounts.endpoint_of(account, self.providers), password
            )

    async def update_account(self, account_id: str, patch: AccountUpdate) -> AccountPublic:
        vault = self._vault

        def change(session: Session) -> MailAccount:
            account = accounts.get_account(session, account_id)
            return accounts.update_account(session, account=account, patch=patch, vault=vault)

        if patch.password is not None and vault is None:
            raise self.vault_error()
        await self.session(change, commit=True)
        if self.settings.enabled:
            await self.reconcile()
        return await self.get_account(account_id)

    def vault_error(self) -> ConfigError:
        return self._vault_error or ConfigError("`imap.secret_key` is not set")

    async def delete_account(self, account_id: str) -> None:
        """Disconnect: stop syncing, then delete the settings, cursors and links."""
        runner = self.runners.pop(account_id, None)
        if runner is not None:
            await runner.stop()
        await self._withdraw_push(account_id)

        def remove(session: Session) -> None:
            accounts.delete_account(session, accounts.get_account(session, account_id))

        await self.session(remove, commit=True)
        self._slots.pop(account_id, None)

    async def _withdraw_push(self, account_id: str) -> None:
        """Best effort: ask the server to stop pushing news of a mailbox we disconnect (an
        unreachable server or a wrong password must not stop the disconnect)."""
        account = await self.session(lambda s: s.get(MailAccount, account_id))
        if account is None or not pushes_to_us(self.settings, account):
            return

        def withdraw(password: str) -> None:
            conn = self.factory.open(accounts.endpoint_of(account, self.providers), password)
            try:
                conn.register_push(None)
            finally:
                conn.logout()

        try:
            password = await self.credential(account)
            await asyncio.wait_for(
                self.io(withdraw, password), self.settings.connect_timeout_seconds
            )
        except (ImapError, SecretError, TimeoutError) as exc:
            log.info("%s: push registration left on the server (%s)", account.email, exc)

    async def mailbox_action(
        self, account_id: str, message_id: str, action: Literal["delete", "archive"]
    ) -> dict[str, Any]:
        """CRM to mailbox: move a logged email to Trash or Archive, if the account allows it."""
        account = await self.session(lambda s: accounts.get_account(s, account_id))
        if not account.allow_mailbox_changes:
            raise AccountError(
                f"{account.email} does not allow changes to the mailbox; set "
                "allow_mailbox_changes to true first",
                status=403,
            )
        mid = message_id.strip().strip("<>")
        local, _, domain = mid.partition("@")
        key = f"mid:{local}@{domain.lower()}"
        link = await self.session(lambda s: s.get(MailLink, (account_id, key)))
        if link is None:
            raise AccountError(f"no logged email {message_id} in {account.email}", status=404)
        password = await self.credential(account)
        wanted = ("\\Trash",) if action == "delete" else ("\\Archive", "\\All")

        def act() -> str:
            conn = self.factory.open(accounts.endpoint_of(account, self.providers), password)
            try:
                folders = conn.list_folders()
                target = next((f for f in folders if f.special_use in wanted), None)
                if target is None:
                    raise AccountError(f"{account.email} has no {' or '.join(wanted)} folder")
                selected = conn.examine(link.folder)
                if selected.uidvalidity != link.uidvalidity:
                    raise AccountError("the folder changed since; try again after the next sync")
                conn.move(link.folder, UidSet.of([link.uid]), target.name)
                return target.name
            finally:
                conn.logout()

        async with self.extra_connection(account):
            try:
                destination = await self.io(act)
            except ImapError as exc:
                raise AccountError(
                    f"the mailbox could not be changed: {exc.sentence}", status=502
                ) from None

        def forget(connection: Connection) -> None:
            # The CRM asked for this: no email.deleted/archived echo when the sync notices.
            connection.execute(
                delete(LINK).where(LINK.c.account_id == account_id, LINK.c.key == key)
            )

        await self.store.committer.write(forget)
        return {"message_id": mid, "action": action, "folder": destination}

    async def append_sent(self, account_id: str, raw: bytes) -> bool:
        """Copy mail sent from the CRM into the account's Sent folder (RFC 3501 APPEND, marked
        \\Seen); in both sync modes, since one-way means "only CRM mail goes to the mailbox"."""
        account = await self.session(lambda s: accounts.get_account(s, account_id))
        password = await self.credential(account)

        def append() -> bool:
            conn = self.factory.open(accounts.endpoint_of(account, self.providers), password)
            try:
                sent = next((f for f in conn.list_folders() if f.special_use == "\\Sent"), None)
                if sent is None:
                    return False
                conn.append(sent.name, raw)
                return True
            finally:
                conn.logout()

        async with self.extra_connection(account):
            appended: bool = await self.io(append)
        return appended

    # -- credentials and OAuth ---------------------------------------------------------------

    async def credential(self, account: MailAccount) -> str:
        """What logs in to the mailbox: its password, or a fresh OAuth access token (refreshed
        shortly before it expires, once per account at a time, and stored)."""
        secret = self.vault.decrypt(account.secret)
        if account.auth_method != "oauth":
            return secret
        if not secret:
            raise AuthFailed(f"{account.email} has not been authorized yet; authorize it")
        tokens = Tokens.loads(secret)
        if tokens.fresh(time.time()):
            return tokens.access_token
        lock = self._refreshing.setdefault(account.id, asyncio.Lock())
        async with lock:
            # Another task may have refreshed while this one waited for the lock.
            current = await self.session(lambda s: s.get(MailAccount, account.id))
            if current is not None:
                tokens = Tokens.loads(self.vault.decrypt(current.secret))
                if tokens.fresh(time.time()):
                    return tokens.access_token
            try:
                client = oauth.client_for(self.providers.get(account.provider), self.settings)
            except oauth.OAuthError as exc:
                raise AuthFailed(str(exc)) from None
            renewed = await oauth.refresh(self.http, client, tokens)
            secret_bytes = self.vault.encrypt(renewed.dumps())

            def store(connection: Connection) -> None:
                connection.execute(
                    update(ACCOUNT).where(ACCOUNT.c.id == account.id).values(secret=secret_bytes)
                )

            await self.store.committer.write(store)
            return renewed.access_token

    async def oauth_start(self, data: AccountCreate) -> str:
        """The provider's sign-in URL for a new mailbox; the account is made at the callback."""
        data = data.model_copy(update={"auth": "oauth", "password": None})
        draft = await self.session(
            lambda session: validate_new(
                session, data=data, vault=self.vault, providers=self.providers
            )
        )
        request = {"create": data.model_dump(mode="json", exclude={"password"})}
        return self._authorization_url(draft, request)

    async def oauth_reconnect(self, account_id: str) -> str:
        """The sign-in URL that gives an existing account new tokens (after auth_failed)."""
        account = await self.session(lambda s: accounts.get_account(s, account_id))
        return self._authorization_url(account, {"account_id": account.id})

    def _authorization_url(self, account: MailAccount, request: dict[str, Any]) -> str:
        try:
            client = oauth.client_for(self.providers.get(account.provider), self.settings)
        except oauth.OAuthError as exc:
            raise AccountError(str(exc)) from None
        if not self.settings.oauth_redirect_url:
            raise AccountError(
                "set [imap] oauth_redirect_url to this gateway's "
                "/api/v1/accounts/oauth/callback as the provider can reach it"
            )
        return self.authorizations.start(
            client,
            redirect_uri=self.settings.oauth_redirect_url,
            login_hint=account.email,
            request=request,
        )

    async def oauth_finish(self, *, code: str, state: str) -> AccountPublic:
        """The provider's redirect: code for tokens, then add (tested) or reconnect the account."""
        try:
            pending = self.authorizations.take(state)
        except oauth.OAuthError as exc:
            raise AccountError(str(exc)) from None
        request = pending.request
        if "create" in request:
            provider = self.providers.get(str(request["create"].get("provider")))
        else:
            existing = await self.session(
                lambda s: accounts.get_account(s, str(request["account_id"]))
            )
            provider = self.providers.get(existing.provider)
        try:
            client = oauth.client_for(provider, self.settings)
            tokens = await oauth.exchange(self.http, client, code=code, pending=pending)
        except oauth.OAuthError as exc:
            raise AccountError(str(exc)) from None
        except ImapError as exc:
            raise AccountError(exc.sentence, status=502) from None
        if "create" in request:
            data = AccountCreate(**{**request["create"], "password": tokens.dumps()})
            return await self.add_account(data)
        account_id = str(request["account_id"])
        secret = self.vault.encrypt(tokens.dumps())

        def reconnect(session: Session) -> None:
            account = accounts.get_account(session, account_id)
            accounts.replace_secret(account, secret, auth_method="oauth")
            account.updated_at = time.time()
            session.add(account)

        await self.session(reconnect, commit=True)
        if self.settings.enabled:
            await self.reconcile()  # wakes the runner, as a new password does
        return await self.get_account(account_id)

    async def pushed(self, user: str, folder: str) -> int:
        """A mail server said ``folder`` of ``user`` changed; how many accounts were nudged.

        ``user`` is what we registered (the account id) or, on a server set up without
        ``user_from_metadata``, its login name. Only accounts this process syncs can be nudged;
        the others still learn of the change by IDLE or polling.
        """
        runner = self.runners.get(user)
        if runner is not None:
            runner.nudge(folder)
            self.pushes.labels(result="nudged").inc()
            return 1
        login = user.strip()

        def lookup(session: Session) -> list[str]:
            query = orm_select(MailAccount.id).where(
                (MailAccount.username == login) | (MailAccount.email == normalise_address(login))
            )
            return list(session.exec(query))

        nudged = 0
        for account_id in await self.session(lookup):
            if (runner := self.runners.get(account_id)) is not None:
                runner.nudge(folder)
                nudged += 1
        self.pushes.labels(result="nudged" if nudged else "unknown").inc()
        return nudged


async def _first_set(seconds: float, *events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set or ``seconds`` pass."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class AccountRunner:
    """One account's life: connect, first sync, then live (IDLE + polling), with backoff."""

    def __init__(self, service: ImapService, account_id: str) -> None:
        self.service = service
        self.id = account_id
        self.updated_at = 0.0
        self.reported: str | None = None
        self.attempt = 0
        self.conn: ImapConnection | None = None
        self._wake = asyncio.Event()
        # News from the server's push (not a settings change): look now, no reconnect.
        self._nudge = asyncio.Event()
        self._others_changed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"imap-{self.id}")

    def wake(self) -> None:
        self._wake.set()

    def nudge(self, folder: str = INBOX) -> None:
        """The server pushed news of ``folder``: end IDLE and sync (other folders too if it
        was not the Inbox, which IDLE watches anyway)."""
        if folder.upper() != INBOX:
            self._others_changed = True
        self._nudge.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._close_now()

    def _close_now(self) -> None:
        """Drop the socket without a LOGOUT: a cancelled command may still own the connection."""
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.client.shutdown()
            self.conn = None

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        svc = self.service
        while True:
            account = await svc.session(lambda s: s.get(MailAccount, self.id))
            if account is None:
                return
            self.updated_at = max(self.updated_at, account.updated_at)
            self.reported = account.reported_status
            delay: float | None = 0.0
            if not account.enabled:
                await self._status(AccountStatus.PAUSED, detail="disabled by an admin")
                delay = None
            elif account.sync_mode == "one_way":
                await self._status(AccountStatus.LIVE, detail=ONE_WAY_DETAIL)
                delay = None
            elif (
                account.status == AccountStatus.AUTH_FAILED
                and account.auth_failures >= svc.settings.auth_max_failures
            ):
                delay = None  # waits for a new password (PATCH) to wake it
            else:
                delay = await self._attempt(account)
            await self._sleep(delay)

    async def _attempt(self, account: MailAccount) -> float | None:
        svc = self.service
        schedule = svc.settings.retry_schedule_seconds
        backoff = schedule[min(self.attempt, len(schedule) - 1)]
        try:
            await self._session(account)
            return 0.0
        except AuthFailed as exc:
            failures = account.auth_failures + 1
            await self._set(auth_failures=failures)
            self.attempt += 1
            if failures >= svc.settings.auth_max_failures:
                await self._status(
                    AccountStatus.AUTH_FAILED,
                    error=f"{exc.sentence} Syncing stopped after {failures} refused logins; "
                    "set a new password to reconnect.",
                )
                return None
            await self._status(AccountStatus.ERROR, error=exc.sentence)
            return backoff
        except Throttled as exc:
            await self._status(AccountStatus.ERROR, error=exc.sentence)
            return max(svc.settings.throttle_seconds, backoff)
        except (ImapError, Defer, StoreError, SecretError, ConfigError) as exc:
            text = exc.sentence if isinstance(exc, ImapError) else str(exc)
            if isinstance(exc, Defer):
                text = f"the CRM did not answer contact matching ({exc.reply}); retrying"
            self.attempt += 1
            log.warning("IMAP account %s: %s", self.id, text)
            await self._status(AccountStatus.ERROR, error=text)
            if isinstance(exc, ImapError) and not exc.temporary:
                # TLS trouble or IMAP switched off: retrying soon cannot help, and repeated
                # refused logins are what gets a mailbox locked.
                return schedule[-1]
            return backoff
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("IMAP account %s: unexpected error", self.id)
            self.attempt += 1
            await self._status(
                AccountStatus.ERROR,
                error=f"unexpected error ({type(exc).__name__}: {exc}); see the gateway's log",
            )
            return backoff
        finally:
            self._close_now()

    async def _sleep(self, delay: float | None) -> None:
        """Wait ``delay`` seconds (None: until woken); a wake (settings changed) ends it early."""
        if delay != 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
        self._wake.clear()

    async def _session(self, account: MailAccount) -> None:
        svc = self.service
        password = await svc.credential(account)
        endpoint = accounts.endpoint_of(account, svc.providers)
        async with svc.slots(account):
            if account.status not in (AccountStatus.INITIAL_SYNC, AccountStatus.LIVE):
                await self._status(AccountStatus.CONNECTING)
            conn = self.conn = await svc.io(svc.factory.open, endpoint, password)
            self.attempt = 0
            if pushes_to_us(svc.settings, account):
                # Best effort: a server without METADATA or push is still watched with IDLE.
                with contextlib.suppress(ImapError):
                    if await svc.io(conn.register_push, account.id):
                        log.debug("%s: the server will push news of this mailbox", account.email)
            if account.auth_failures:
                await self._set(auth_failures=0)
            folders = await svc.io(conn.list_folders)
            cursors, missing = await self._cursors(account, folders)
            if missing:
                await self._set(
                    last_error=f"folders not found, not synced: {', '.join(missing)}",
                    last_error_at=time.time(),
                )
            view = AccountView(
                id=account.id,
                ref=accounts.account_ref(account),
                own=accounts.own_addresses(account),
                start_at=account.start_at,
                history=account.start_from != "now",
                emit_deleted=account.emit_deleted,
                emit_archived=account.emit_archived,
            )
            synced = [c.name for c in cursors]
            if any(not c.initial_done for c in cursors):
                assert svc._initial is not None
                async with svc._initial:
                    await self._status(AccountStatus.INITIAL_SYNC, progress=0.0)
                    for cursor in cursors:
                        await svc.engine.sync_folder(
                            conn,
                            view,
                            cursor,
                            folders=folders,
                            synced=synced,
                            progress=functools.partial(self._progress, cursors),
                        )
            await self._status(AccountStatus.LIVE, synced=True)
            await self._live(conn, view, cursors, folders, synced)
            await svc.io(conn.logout)
            self.conn = None

    async def _live(
        self,
        conn: ImapConnection,
        view: AccountView,
        cursors: list[Cursor],
        folders: list[FolderInfo],
        synced: list[str],
    ) -> None:
        """Stay current until woken by a settings change (then return, to reconnect)."""
        svc = self.service
        loop = asyncio.get_running_loop()
        inbox = next((c for c in cursors if c.name.upper() == INBOX), None)
        idle = inbox is not None and conn.has("IDLE")
        next_poll = loop.time() + svc.settings.poll_interval_seconds
        poll_all = False
        last_mark = loop.time()
        while not self._wake.is_set():
            self._nudge.clear()
            if self._others_changed:
                self._others_changed = False
                poll_all = True
            for cursor in cursors:
                if cursor is inbox:
                    continue
                if (poll_all or not idle) and not await svc.engine.unchanged(conn, cursor):
                    await svc.engine.sync_folder(conn, view, cursor, folders=folders, synced=synced)
            if inbox is not None:
                # The Inbox goes last so it stays selected for IDLE (RFC 2177 needs a selected
                # mailbox); looking for where vanished mail went may select another: go again.
                await svc.engine.sync_folder(conn, view, inbox, folders=folders, synced=synced)
                if conn.selected != inbox.name:
                    continue
            if poll_all:
                next_poll = loop.time() + svc.settings.poll_interval_seconds
            if loop.time() - last_mark > 1.0:
                last_mark = loop.time()
                await self._set(last_sync_at=time.time())
            if self._wake.is_set():
                return
            wait = max(0.0, next_poll - loop.time())
            if idle:
                # News arrived with an earlier reply, or was pushed meanwhile: sync, not IDLE.
                if conn.changed or self._nudge.is_set():
                    poll_all = False
                    continue
                await self._idle(conn, min(wait, svc.settings.idle_refresh_seconds))
            else:
                await _first_set(wait, self._wake, self._nudge)
            poll_all = loop.time() >= next_poll

    async def _idle(self, conn: ImapConnection, seconds: float) -> None:
        """IDLE until the Inbox changes, ``seconds`` pass, or we are woken.

        The socket is watched by the event loop, so no thread waits; a thread is borrowed only
        to read what arrived. Ending IDLE (DONE) waits for the server's tagged reply within the
        command timeout, which is also how a dead connection is noticed (RFC 2177 §3).
        """
        svc = self.service
        loop = asyncio.get_running_loop()
        await svc.io(conn.idle_start)
        readable = asyncio.Event()
        fd = conn.fileno()
        loop.add_reader(fd, readable.set)
        deadline = loop.time() + seconds
        try:  # a closed connection or a cancel skips DONE below: that session is over anyway
            while not self._wake.is_set():
                if readable.is_set() or conn.buffered():
                    readable.clear()
                    changed, closed = await svc.io(conn.idle_poll)
                    if closed:
                        raise ServerError("the server closed the connection while idling")
                    if changed:
                        break
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if self._nudge.is_set():  # the server pushed news: DONE, then look at once
                    break
                await _first_set(remaining, readable, self._wake, self._nudge)
        finally:
            loop.remove_reader(fd)
        await svc.io(conn.idle_done)

    async def _cursors(
        self, account: MailAccount, folders: list[FolderInfo]
    ) -> tuple[list[Cursor], list[str]]:
        """The chosen folders' cursors (rows made for new ones), the Inbox last."""
        picked, missing = choose_folders(list(account.folders), folders)

        def load(session: Session) -> list[MailFolder]:
            query = orm_select(MailFolder).where(MailFolder.account_id == account.id)
            rows = {f.name: f for f in session.exec(query)}
            out = []
            for info in picked:
                row = rows.get(info.name)
                if row is None:
                    row = MailFolder(
                        account_id=account.id,
                        name=info.name,
                        special_use=info.special_use,
                        updated_at=time.time(),
                    )
                elif row.special_use != info.special_use:
                    row.special_use = info.special_use
                session.add(row)
                out.append(row)
            session.flush()
            return out

        rows = await self.service.session(load, commit=True)
        cursors = [Cursor.of(r) for r in rows]
        cursors.sort(key=lambda c: c.name.upper() == INBOX)
        return cursors, missing

    @staticmethod
    def _progress(cursors: list[Cursor]) -> float | None:
        """The first sync's progress over all folders, in percent."""
        total = sum(c.initial_total for c in cursors if c.initial_total)
        done = sum(c.initial_processed for c in cursors if c.initial_total)
        return round(100.0 * min(done, total) / total, 1) if total else None

    # -- state a user sees -----------------------------------------------------------------

    async def _set(self, **values: Any) -> None:
        def write(connection: Connection) -> None:
            connection.execute(update(ACCOUNT).where(ACCOUNT.c.id == self.id).values(**values))

        await self.service.store.committer.write(write)

    async def _status(
        self,
        status: str,
        *,
        error: str | None = None,
        detail: str | None = None,
        progress: float | None = None,
        synced: bool = False,
    ) -> None:
        """Record the state; tell the CRM (``account.status_changed``) when it really changed."""
        now = time.time()
        values: dict[str, Any] = {"status": status, "progress": progress}
        if error is not None:
            values.update(last_error=error, last_error_at=now)
        if synced:
            values["last_sync_at"] = now
        event = None
        if status != AccountStatus.CONNECTING and status != self.reported:
            values["reported_status"] = status
            event = self.service.outbox.event(
                "account.status_changed",
                {"account_id": self.id, "status": status, "detail": error or detail},
            )

        def write(connection: Connection) -> bool:
            target = ACCOUNT.c.id == self.id
            if status != AccountStatus.PAUSED:
                # An admin may have disabled the account a moment ago: never overwrite that.
                target = target & ACCOUNT.c.enabled.is_(True)
            if not connection.execute(update(ACCOUNT).where(target).values(**values)).rowcount:
                return False
            if event is not None:
                event(connection)
            return True

        written = await self.service.store.committer.write(write)
        if written and event is not None:
            self.reported = status
            log.info("IMAP account %s: %s%s", self.id, status, f" ({error})" if error else "")
